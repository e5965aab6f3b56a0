"""The driver's seams: the DataSource protocol on toy data and on the digits (labels "y" equal to the
dataset's; samples are data and bits/dim are reported as they are, unlike a latent source's), the objective's context (the true step and EMA params reach it), per-network declared
`config.model` keys (a misspelled key names itself and the valid ones; every builder reads only its
declared keys; shipped configs carry no unread model key), and `--mode=eval` over a range of
checkpoints (`eval.begin_ckpt` / `eval.end_ckpt`)."""
import copy
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs_helper import N, ROOT, load_config, override, tiny_config
from sdejax.data import datasets, digits
from sdejax.models import mlp, registry
from sdejax.training import build, config as config_lib, modes, objective, parallel, sources, state as state_lib
from sdejax.training import step as step_lib, trainer


def _source(config):
    return sources.get_source(config, build.stream_key(config, "split"), build.stream_key(config, "batches"))


def test_toy_source_protocol(tmp_path):
    config = tiny_config()
    src = _source(config)
    assert isinstance(src, sources.DataSource)
    assert (src.data_range, src.num_levels, src.num_classes, src.supports_fid) == (None, None, 0, False)
    chunk = src.chunk(5, 3)
    assert set(chunk) == {"x"} and chunk["x"].shape == (3, 32, 2)
    np.testing.assert_array_equal(chunk["x"][1], src.chunk(6, 1)["x"][0])  # batch of a step: its own key
    assert set(src.heldout) == {"x"} and src.heldout["x"].shape == (64, 2)
    batches = list(src.eval_batches(25))
    assert [set(b) for b in batches] == [{"x"}] * 2 and batches[1]["x"].shape == (25, 2)  # remainder dropped
    assert src.get_state() == {}
    true = src.true_entropy_bits_per_dim(jax.random.PRNGKey(0), 20_000)
    assert abs(true["bits_per_dim"] - 2.408) < 0.02  # H(0.2, 0.8) + log(2πe) nats, in bits/dim
    src.save(tmp_path / "toy", {"pc": chunk["x"][0]})
    assert (tmp_path / "toy.png").stat().st_size > 0 and src.tensorboard_image(chunk["x"][0]) is None
    x = chunk["x"][0]
    assert src.decode(x) is x and src.describe_bits({"bits_per_dim": 1.0}) == {"bits_per_dim": 1.0}


@pytest.fixture(scope="module")
def digits_config(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(path, "array_record")
    return override(load_config("digits_ddpmpp.py"), {
        "data.data_dir": path, "training.batch_size": 8, "eval.batch_size": 10, "data.num_threads": 2,
        "data.prefetch": 2})


def test_digits_source_protocol_and_labels(digits_config, tmp_path):
    src = _source(digits_config)
    assert isinstance(src, sources.DataSource)
    assert (src.data_range, src.num_levels, src.num_classes, src.supports_fid) == ((-1.0, 1.0), 17, 10, True)
    chunk = src.chunk(0, 2)
    assert set(chunk) == {"x", "y"} and chunk["x"].shape == (2, 8, 16, 16, 1) and chunk["y"].shape == (2, 8)
    assert chunk["y"].dtype == np.int32 and chunk["x"].min() >= -1 and chunk["x"].max() <= 1
    train, held = datasets.get_dataset(digits_config)  # the same seeded order: the dataset's own labels
    raw = [next(train) for _ in range(2)]
    np.testing.assert_array_equal(chunk["y"], np.stack([b["label"] for b in raw]))
    np.testing.assert_array_equal(chunk["x"], np.stack([2 * b["image"] - 1 for b in raw]))
    np.testing.assert_array_equal(src.heldout["y"], next(held)["label"])
    first = next(src.eval_batches(10))
    _, test_split = datasets.get_dataset(digits_config, evaluation=True)
    np.testing.assert_array_equal(first["y"], next(iter(test_split))["label"])
    assert set(first) == {"x", "y"}
    assert src.get_state() == {"next_index": 2}
    assert src.true_entropy_bits_per_dim(jax.random.PRNGKey(0), 10) is None
    src.save(tmp_path / "grid", {"samples": chunk["x"][0][:4]})
    assert src.tensorboard_image(chunk["x"][0][:4]).shape == (35, 35, 1)  # 2x2 grid of 16x16, 1-pixel borders
    x = chunk["x"][0]
    assert src.decode(x) is x  # pixel samples are data (a latent source decodes)
    assert src.describe_bits({"bits_per_dim": 1.0}) == {"bits_per_dim": 1.0}


@pytest.mark.parametrize("p_uncond", [0.0, 1.0])
def test_labels_reach_a_class_conditional_loss(digits_config, p_uncond):
    """With model.num_classes > 0 the configured loss hands the network the batch's "y" (all of them
    dropped to the null class 10 with training.p_uncond = 1)."""
    config = override(copy.deepcopy(digits_config), {"model.num_classes": 10, "training.p_uncond": p_uncond})
    seen = []

    def apply_fn(params, x, labels, *, train=False, rng=None, y=None):
        seen.append(y)
        return jnp.zeros_like(x)

    batch = {k: v[0] for k, v in _source(config).chunk(0, 1).items()}
    obj = build.build_objective(config, build.build_sde(config), apply_fn, train=True)
    loss, _ = obj(None, jax.random.PRNGKey(0), batch, objective.Context(step=jnp.zeros((), jnp.int32), ema_params=None))
    assert np.isfinite(loss)
    np.testing.assert_array_equal(seen[-1], np.full(8, 10) if p_uncond else batch["y"])


def test_class_count_must_match_the_source(digits_config, tmp_path):
    config = override(copy.deepcopy(digits_config), {"model.num_classes": 5})
    with pytest.raises(ValueError, match="model.num_classes=5 but data.dataset='DIGITS' has 10 class labels"):
        build.setup(config, tmp_path)


def test_labels_reach_the_train_step_through_the_placement():
    """A labelled chunk is placed (`shard_batches`) and stepped with "y" intact: the objective's
    loss adds Σ y of its batch (no gradient), so the metrics show each step's labels."""
    placement = parallel.get_placement("jit")
    y = np.arange(12, dtype=np.int32).reshape(3, 4)
    batches = placement.shard_batches({"x": np.zeros((3, 4, 2), np.float32), "y": y})

    def obj(params, rng, batch, context):
        return jnp.sum(params["params"]["w"]) * 0.0 + jnp.sum(batch["y"]), {}

    tx = optax.sgd(1.0)
    state = state_lib.create_train_state({"params": {"w": jnp.ones(2)}}, tx, jax.random.PRNGKey(0))
    multi = placement.compile(step_lib.make_multi_step(step_lib.make_train_step(obj, tx, 0.9)))
    _, metrics = multi(placement.replicate(state), batches)
    np.testing.assert_array_equal(metrics["loss"], y.sum(axis=1))


@pytest.mark.parametrize("accum", [1, 2])
def test_objective_context_carries_the_step_and_ema(accum):
    """The loss reports 1000·step + Σ ema (no gradient) + w·c: with SGD(1) on w·c, w_k = w_0 − k c, and
    EMA_{k+1} = d·EMA_k + (1 − d)·w_{k+1}; each step's loss must be that of the state it starts from
    (a context of zeros, or of the updated state, gives other numbers)."""
    rate, k_steps, c = 0.5, 6, np.array([1.0, -2.0], np.float32)

    def obj(params, rng, batch, context):
        assert isinstance(context, objective.Context) and context.target_params is None
        extra = 1000.0 * context.step.astype(jnp.float32) + jnp.sum(context.ema_params["params"]["w"])
        return jnp.sum(params["params"]["w"] * c) + jax.lax.stop_gradient(extra), {}

    tx = optax.sgd(1.0)
    w0 = np.array([3.0, 1.0], np.float32)
    state = state_lib.create_train_state({"params": {"w": jnp.asarray(w0)}}, tx, jax.random.PRNGKey(0))
    state = state.replace(step=jnp.asarray(7, jnp.int32))  # a resumed run: the step is not the scan index
    train_step = step_lib.make_train_step(obj, tx, rate, grad_accum_steps=accum)
    _, metrics = jax.jit(step_lib.make_multi_step(train_step))(state, {"x": jnp.zeros((k_steps, 2, 1))})
    w, ema, expected = w0.astype(np.float64), w0.astype(np.float64), []
    for k in range(k_steps):
        expected.append(1000.0 * (7 + k) + ema.sum() + (w * c).sum())
        w = w - c
        ema = rate * ema + (1 - rate) * w
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)


def test_context_from_state_and_adapter():
    state = state_lib.create_train_state({"params": {"w": jnp.ones(2)}}, optax.sgd(1.0), jax.random.PRNGKey(0))
    state = state.replace(step=jnp.asarray(3, jnp.int32), ema_params={"params": {"w": jnp.full(2, 5.0)}})
    ctx = objective.context_from_state(state)
    assert int(ctx.step) == 3 and float(ctx.ema_params["params"]["w"][0]) == 5.0
    assert len(jax.tree_util.tree_leaves(ctx)) == 2  # target/teacher None: no leaves
    obj = objective.from_loss(lambda params, rng, batch: (jnp.sum(batch["x"]) * params, {"n": 1}))
    assert obj(2.0, None, {"x": jnp.ones(3)}, ctx) == (6.0, {"n": 1})


NETWORK_CONFIGS = {"mlp": ("default_toy.py", None), "ncsnpp": ("tiny/ncsnpp_ve.py", None),
                   "ddpm": ("tiny/ddpm_vp.py", None), "ncsn": ("tiny/ncsn_ve.py", None),
                   "ncsnv2_64": ("tiny/ncsnv2_ve.py", "ncsnv2_64"), "ncsnv2_128": ("tiny/ncsnv2_ve.py", "ncsnv2_128"),
                   "ncsnv2_256": ("tiny/ncsnv2_ve.py", "ncsnv2_256"),
                   "dit": ("dit/cifar10_dit.py", None), "token_denoiser": ("digits_masked.py", None)}


def _network_config(name):
    path, rename = NETWORK_CONFIGS[name]
    config = load_config(path)
    if rename:
        config.model.name = rename
    return config


def test_every_network_has_a_config_here():
    assert set(NETWORK_CONFIGS) == set(config_lib.NETWORK_KEYS) == {"mlp", *registry.MODELS}


@pytest.mark.parametrize("name", sorted(NETWORK_CONFIGS))
def test_misspelled_model_key_names_it_and_the_valid_ones(name, tmp_path):
    config = _network_config(name)
    config_lib.check_config(config)
    valid = sorted(config_lib.model_keys(name))
    for typo in ("nff", "ema_rat"):
        bad = _network_config(name)
        bad.model[typo] = 1
        with pytest.raises(ValueError) as err:
            build.setup(bad, tmp_path)  # fails in check_config, before anything is built
        assert f"unknown config key(s) ['model.{typo}']" in str(err.value)
        assert f"valid keys of model for model.name='{name}': {valid}" in str(err.value)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("name,other", [("mlp", "nf"), ("ddpm", "fir"), ("ncsn", "dropout"), ("ncsnpp", "features")])
def test_another_networks_key_is_refused(name, other):
    config = _network_config(name)
    config.model[other] = 1
    with pytest.raises(ValueError, match=rf"unknown config key\(s\) \['model.{other}'\]"):
        config_lib.check_config(config)


class _Recorder:
    """A read-only view of a ConfigDict that records which keys are read."""

    def __init__(self, node, seen):
        self._node, self._seen = node, seen

    def __getattr__(self, key):
        self._seen.add(key)
        return self._node[key]

    __getitem__ = __getattr__

    def get(self, key, default=None):
        self._seen.add(key)
        return self._node.get(key, default)

    def __contains__(self, key):
        self._seen.add(key)
        return key in self._node


def _keys_read(config) -> set:
    seen = set()
    view = types.SimpleNamespace(model=_Recorder(config.model, seen), data=config.data, training=config.training)
    if config.model.name == "mlp":
        mlp.from_config(view)
    else:
        registry.MODELS[config.model.name](view)
    return seen


@pytest.mark.parametrize("name", sorted(NETWORK_CONFIGS))
def test_builders_read_only_their_declared_keys(name):
    config = _network_config(name)
    read = _keys_read(config)
    declared = config_lib.NETWORK_KEYS[name]
    assert read <= declared, f"{name} reads undeclared {sorted(read - declared)}"


def _shipped_configs():
    return sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.py")
                  if not p.name.startswith("_") and "get_config" in p.read_text())


@pytest.mark.parametrize("path", _shipped_configs())
def test_shipped_configs_carry_no_unread_model_key(path):
    """Each config's model keys are read by its network's builder or shared by every model."""
    config = load_config(path)
    unread = set(config.model) - _keys_read(config) - config_lib.SHARED_MODEL_KEYS
    assert not unread, f"{path}: nothing reads model.{sorted(unread)}"


@pytest.mark.parametrize("key,value,message", [
    ("sampling.predictor", "reverse", "unknown sampling.predictor 'reverse'"),  # read by the report's PC too
    ("data.dataset", "CIFAR-10", r"unknown data.dataset 'CIFAR-10'; valid: \[.*'CIFAR10'"),
    ("eval.begin_ckpt", 30, r"eval.begin_ckpt=30 > eval.end_ckpt=20"),
])
def test_names_and_ranges_fail_before_training(key, value, message, tmp_path):
    config = tiny_config(**{"sampling.method": "ode", "eval.end_ckpt": 20, key: value})
    with pytest.raises(ValueError, match=message):
        trainer.train_model(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2N steps of the tiny config: retained snapshots at N and 2N, eval loss logged at both."""
    workdir = tmp_path_factory.mktemp("range")
    trainer.train_model(tiny_config(), workdir)
    return workdir


def _logged_eval_loss(workdir):
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r}


def test_eval_default_is_the_newest_checkpoint(trained):
    out = modes.run_eval(tiny_config(), trained)
    assert out["step"] == 2 * N and "checkpoints" not in out
    assert out["heldout_loss"] == pytest.approx(_logged_eval_loss(trained)[2 * N], rel=1e-6)
    assert json.loads((trained / "eval_metrics.json").read_text()) == out


@pytest.mark.parametrize("begin,end,steps", [(1, -1, [N, 2 * N]), (N, N, [N]), (N + 1, 3 * N, [2 * N])])
def test_eval_range_evaluates_each_checkpoint(trained, begin, end, steps):
    """Each step's held-out loss is that of its own checkpoint: the value training logged there."""
    out = modes.run_eval(tiny_config(**{"eval.begin_ckpt": begin, "eval.end_ckpt": end}), trained)
    assert [r["step"] for r in out["checkpoints"]] == steps and out["step"] == steps[-1]
    logged = _logged_eval_loss(trained)
    for r in out["checkpoints"]:
        assert r["heldout_loss"] == pytest.approx(logged[r["step"]], rel=1e-6)
    assert json.loads((trained / "eval_metrics.json").read_text())["checkpoints"] == out["checkpoints"]


def test_eval_range_without_checkpoints_lists_the_retained(trained):
    with pytest.raises(FileNotFoundError, match=rf"\[{3 * N}, {4 * N}\].*retained steps: \[{N}, {2 * N}\]"):
        modes.run_eval(tiny_config(**{"eval.begin_ckpt": 3 * N, "eval.end_ckpt": 4 * N}), trained)
