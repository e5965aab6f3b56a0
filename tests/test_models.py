"""Score networks: exactness against the PyTorch reference fixtures, parameter counts of the
paper's configurations, conversion, class conditioning, dropout, bf16 and a few training steps.

Scores are computed here from the raw output (VE: s = output; VP/sub-VP: s = -output / std);
they can switch to `sdejax.score.get_score_fn` once it lands.
"""
import importlib
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from sdejax.models import (count_params, dummy_inputs, from_torch_state_dict, get_model, init_model,
                           make_apply_fn, null_class)
from sdejax.models import refinenet, up_down

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FIXTURES = ["model_ncsnpp_ve_outputskip", "model_ddpmpp_vp", "model_ncsnpp_ve_residual_nofir",
            "model_ncsnpp_ve_cifar", "model_ncsnpp_ve_ddpmblocks_fir", "model_ddpmpp_subvp",
            "model_ddpm_vp", "model_ncsnv2_ve"]


def rbg_key(seed: int) -> jax.Array:
    """An "rbg" key for network init and dropout: XLA:CPU compiles threefry's initialisers and masks
    slowly (measured for tiny/ncsn_ve init: 51 s threefry vs 26 s rbg on 2 shared cores)."""
    return jax.random.key(seed, impl="rbg")


def load_config(name: str) -> ml_collections.ConfigDict:
    """`configs/<name>.py`'s get_config()."""
    return importlib.import_module("configs." + name.replace("/", ".")).get_config()


def load_fixture(fixtures_dir, name):
    base = fixtures_dir / "reference" / name
    side = json.loads(base.with_suffix(".json").read_text())
    data = np.load(base.with_suffix(".npz"))
    return side, {k: data[k] for k in data.files}


def reference_std(side, data, path):
    """The std the reference score function divides by (VP / sub-VP), per batch element."""
    kind, kw = side["sde"]["class"], side["sde"]["kwargs"]
    b0, b1 = kw["beta_min"], kw["beta_max"]
    if path == "discrete":
        n = kw["N"]
        alphas_cumprod = np.cumprod(1.0 - np.linspace(b0 / n, b1 / n, n))
        return np.sqrt(1.0 - alphas_cumprod)[data["input/labels_discrete"].astype(np.int64)]
    t = data["input/t"].astype(np.float64)
    log_mean = -0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0
    return np.sqrt(1.0 - np.exp(2 * log_mean)) if kind == "VPSDE" else 1.0 - np.exp(2 * log_mean)


@pytest.mark.parametrize("name", FIXTURES)
def test_matches_reference(fixtures_dir, name):
    side, data = load_fixture(fixtures_dir, name)
    config = ml_collections.ConfigDict(side["config"])
    state = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    variables = from_torch_state_dict(state, config)
    assert count_params(variables) == side["n_parameters"]
    apply = jax.jit(make_apply_fn(get_model(config)))
    x = jnp.asarray(data["input/x"].transpose(0, 2, 3, 1))
    tol = 1e-4 if config.model.name.startswith("ncsnv2") else 1e-5
    for path in side["score_paths"]:
        out = np.asarray(apply(variables, x, jnp.asarray(data[f"input/labels_{path}"]))).transpose(0, 3, 1, 2)
        ref = data[f"output/model_{path}"]
        assert np.abs(out - ref).max() <= tol * np.abs(ref).max(), path
        if side["sde"]["class"] == "VESDE":
            score = out
        else:
            score = -out / reference_std(side, data, path)[:, None, None, None]
        ref_score = data[f"output/score_{path}"]
        assert np.abs(score - ref_score).max() <= tol * np.abs(ref_score).max(), path


PARAM_COUNT_CONFIGS = [  # the full-size configs of reference/param_counts.json (same paths as ours)
    "ve/cifar10_ncsnpp_continuous", "ve/cifar10_ncsnpp_deep_continuous", "vp/cifar10_ddpmpp_continuous",
    "vp/cifar10_ddpmpp_deep_continuous", "vp/ddpm/cifar10", "vp/ddpm/cifar10_continuous", "ve/cifar10_ddpm",
    "ve/cifar10_ncsnpp", "subvp/cifar10_ddpmpp_continuous", "ve/celebahq_256_ncsnpp_continuous", "ve/ncsnv2/cifar10",
]


@pytest.fixture(scope="module")
def reference_param_counts(fixtures_dir) -> dict[str, tuple[int, int]]:
    """{config: (total, trainable)} of the PyTorch reference models (total includes the frozen Fourier W)."""
    summary = json.loads((fixtures_dir / "reference" / "param_counts.json").read_text())["summary"]
    return {s["config"].removeprefix("configs/").removesuffix(".py"): (s["params_total"], s["params_trainable"])
            for s in summary}


def test_param_counts_fixture_lists_the_tested_configs(reference_param_counts):
    assert sorted(reference_param_counts) == sorted(PARAM_COUNT_CONFIGS)


@pytest.mark.parametrize("name", sorted(PARAM_COUNT_CONFIGS))
def test_full_size_param_counts(name, reference_param_counts):
    """sdejax's network from our copy of the config has the reference's total and trainable counts."""
    config = load_config(name)
    model = get_model(config)
    x, labels = dummy_inputs(config)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, labels))
    assert (count_params(shapes), count_params(shapes["params"])) == reference_param_counts[name]


def test_unknown_model_name_lists_valid_ones():
    config = load_config("tiny/ncsnpp_ve")
    config.model.name = "unet9000"
    with pytest.raises(ValueError, match="valid: .*ncsnpp"):
        get_model(config)


def test_bad_architecture_option_is_reported():
    config = load_config("tiny/ncsnpp_ve")
    config.model.progressive = "sideways"
    model = get_model(config)
    with pytest.raises(ValueError, match="output_skip"):
        model.init(jax.random.PRNGKey(0), *dummy_inputs(config))


def test_full_checkpoint_with_module_prefix_and_ema(fixtures_dir):
    side, data = load_fixture(fixtures_dir, "model_ncsnpp_ve_cifar")
    config = ml_collections.ConfigDict(side["config"])
    state = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    frozen = "all_modules.0.W"
    trainable = [k for k in state if k not in ("sigmas", frozen)]
    shadow = [state[k] + 1.0 for k in trainable]
    ckpt = {"model": {"module." + k: v for k, v in state.items()}, "step": 7,
            "ema": {"decay": 0.999, "num_updates": 7, "shadow_params": shadow}}
    raw = from_torch_state_dict(ckpt, config, ema=False)
    averaged = from_torch_state_dict(ckpt, config)
    np.testing.assert_array_equal(raw["constants"]["all_modules_0"]["W"], state[frozen])
    np.testing.assert_array_equal(averaged["constants"]["all_modules_0"]["W"], state[frozen])
    np.testing.assert_array_equal(averaged["params"]["all_modules_3"]["kernel"],
                                  state["all_modules.3.weight"].transpose(2, 3, 1, 0) + 1.0)
    np.testing.assert_array_equal(raw["params"]["all_modules_1"]["kernel"], state["all_modules.1.weight"].T)
    with pytest.raises(ValueError, match="shadow_params has"):
        from_torch_state_dict({**ckpt, "ema": {"shadow_params": shadow[:-1]}}, config)
    with pytest.raises(ValueError, match="missing"):
        from_torch_state_dict({k: v for k, v in state.items() if k != "all_modules.3.bias"}, config)


def test_npz_round_trip(tmp_path, fixtures_dir):
    side, data = load_fixture(fixtures_dir, "model_ncsnv2_ve")
    state = {k[len("param/"):]: v for k, v in data.items() if k.startswith("param/")}
    np.savez(tmp_path / "weights.npz", **state)
    variables = from_torch_state_dict(tmp_path / "weights.npz", ml_collections.ConfigDict(side["config"]))
    np.testing.assert_array_equal(variables["params"]["res1_0"]["normalize1"]["alpha"], state["res1.0.normalize1.alpha"])


@pytest.fixture(scope="module")
def tiny_class_conditional():
    config = load_config("tiny/ncsnpp_ve")
    config.model.num_classes = 3
    model, variables = init_model(config, rbg_key(0), batch_size=2)
    # Perturb the weights: the zero-initialised output layers would hide every effect (numpy draws: one
    # jax.random.normal per leaf shape would be one compile each).
    leaves, tree = jax.tree_util.tree_flatten(variables)
    noise = np.random.default_rng(3)
    variables = jax.tree_util.tree_unflatten(
        tree, [jnp.asarray(p + 0.05 * noise.standard_normal(p.shape), p.dtype) for p in leaves])
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    return config, model, variables, x, jnp.array([0.5, 3.0])


def test_class_conditioning_with_null_class(tiny_class_conditional):
    _, model, variables, x, sigmas = tiny_class_conditional
    apply = jax.jit(lambda v, y: model.apply(v, x, sigmas, y=y))
    unconditional = jax.jit(lambda v: model.apply(v, x, sigmas))(variables)
    null = jnp.full((2,), null_class(3), jnp.int32)
    np.testing.assert_allclose(unconditional, apply(variables, null), atol=1e-6 * np.abs(unconditional).max())
    class0, class1 = apply(variables, jnp.array([0, 0])), apply(variables, jnp.array([1, 1]))
    assert np.abs(class0 - class1).max() > 1e-3 * np.abs(class0).max()
    with pytest.raises(ValueError, match="integer classes"):
        model.apply(variables, x, sigmas, y=jnp.array([0.0, 1.0]))


def test_class_labels_rejected_without_classes():
    config = load_config("tiny/ncsnpp_ve")
    model = get_model(config)
    x, labels = dummy_inputs(config)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, labels))
    with pytest.raises(ValueError, match="num_classes"):
        jax.eval_shape(lambda v: model.apply(v, x, labels, y=jnp.array([1])), shapes)


def test_dropout_only_in_train_mode(tiny_class_conditional):
    _, model, variables, x, sigmas = tiny_class_conditional
    apply = make_apply_fn(model)
    fn = jax.jit(lambda rng, train: apply(variables, x, sigmas, train=train, rng=rng), static_argnums=1)
    np.testing.assert_array_equal(fn(rbg_key(0), False), fn(rbg_key(1), False))
    a, b = fn(rbg_key(0), True), fn(rbg_key(1), True)
    assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()
    np.testing.assert_array_equal(a, fn(rbg_key(0), True))


def test_bfloat16_compute_keeps_fp32_params_and_output(tiny_class_conditional):
    config, model, variables, x, sigmas = tiny_class_conditional
    config = ml_collections.ConfigDict(config.to_dict())
    config.model.dtype = "bfloat16"
    model16 = get_model(config)
    out32 = jax.jit(model.apply)(variables, x, sigmas)
    out16 = jax.jit(model16.apply)(variables, x, sigmas)
    assert out16.dtype == jnp.float32
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
    assert np.abs(out16 - out32).max() <= 0.05 * np.abs(out32).max()
    config.model.dtype = "float8"
    with pytest.raises(ValueError, match="bfloat16"):
        get_model(config)


@pytest.mark.parametrize("name", ["tiny/ncsnpp_ve", "tiny/ncsn_ve"])
def test_tiny_model_trains(name):
    """A few Adam steps of denoising score matching on a fixed batch reduce the loss.

    NCSN++ (U-Net family) and NCSN v1 (RefineNet family with noise-conditional norms); DDPM and
    NCSNv2 share their blocks and are covered by the reference fixtures.
    """
    config = load_config(name)
    model, variables = init_model(config, rbg_key(0), batch_size=4)
    apply = make_apply_fn(model)
    x0 = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3))
    z = jax.random.normal(jax.random.PRNGKey(2), x0.shape)
    if config.model.name in ("ncsn", "ncsnv2_64"):
        labels = jnp.array([0, 1, 2, 3])
        sigmas = jnp.exp(jnp.linspace(jnp.log(config.model.sigma_max), jnp.log(config.model.sigma_min),
                                      config.model.num_scales))[labels][:, None, None, None]
    else:
        labels = jnp.array([0.3, 0.5, 0.9, 1.5])
        sigmas = labels[:, None, None, None]
    xt = x0 + sigmas * z

    def loss_fn(params, rng):
        score = apply(params, xt, labels, train=True, rng=rng)
        return jnp.mean(jnp.sum((score * sigmas + z) ** 2, axis=(1, 2, 3)))

    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, opt_state, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, rng)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, opt_state = variables, opt.init(variables)
    losses = []
    for i in range(5):
        params, opt_state, loss = step(params, opt_state, rbg_key(10 + i))
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    if "constants" in params:  # the frozen Fourier W never moves
        np.testing.assert_array_equal(params["constants"]["all_modules_0"]["W"],
                                      variables["constants"]["all_modules_0"]["W"])


def test_fir_resampling_preserves_constants():
    x = jnp.ones((1, 8, 8, 2))
    up = up_down.upsample_2d(x, (1, 3, 3, 1))
    down = up_down.downsample_2d(x, (1, 3, 3, 1))
    assert up.shape == (1, 16, 16, 2) and down.shape == (1, 4, 4, 2)
    np.testing.assert_allclose(up[:, 2:-2, 2:-2], 1.0, rtol=1e-6)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 1.0, rtol=1e-6)
    # With the box kernel [1, 1], FIR upsampling is nearest neighbour and downsampling is 2x2 averaging.
    r = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 1))
    np.testing.assert_allclose(up_down.upsample_2d(r, (1, 1)), up_down.naive_upsample_2d(r), rtol=1e-6)
    np.testing.assert_allclose(up_down.downsample_2d(r, (1, 1)), up_down.naive_downsample_2d(r), rtol=1e-6)


def test_bilinear_align_corners():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 4, 1))
    y = refinenet.resize_bilinear_align_corners(x, (5, 7))
    corners = [(0, 0), (0, -1), (-1, 0), (-1, -1)]
    for i, j in corners:
        np.testing.assert_allclose(y[0, i, j], x[0, i, j], rtol=1e-6)
    # Output row 2 of 5 sits exactly on input row 1 of 3; column 3 of 7 halfway between input columns 1 and 2.
    np.testing.assert_allclose(y[0, 2, 3], 0.5 * (x[0, 1, 1] + x[0, 1, 2]), rtol=1e-5)
