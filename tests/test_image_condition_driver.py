"""Image-conditioned runs through the CLI (`sdejax.training.image_condition`), on the offline digits with tiny
NCSN++ networks and 2 training steps each: a cascade's 8x8 base (`configs/digits_lowres.py`, data.downsample
= 2), the 8x8 -> 16x16 super-resolution model (`configs/digits_sr.py`) and a ControlNet over the base
(`configs/digits_controlnet.py` at 8x8, blur control). Oracles: the driver's first losses are the library
losses (`sr_loss_fn`, the DSM loss of `ControlNetParams`); its samples are the library's `cascade_sample` of
the restored networks (with the base model, and on held-out D_2(x)); a fresh ControlNet samples the base's
samples and bits/dim bit for bit; training changes only the ControlNet's variables. The networks' maths is
tested in test_superres and test_controlnet; here the wiring."""
from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits_controlnet, digits_lowres, digits_sr
from configs_helper import override
from helpers import ROOT, run_cli
from sdejax import degradations, losses, score, superres
from sdejax.data import datasets, digits
from sdejax.models import registry
from sdejax.models.controlnet import ControlNetParams
from sdejax.precond import Precond
from sdejax.sampling import methods
from sdejax.sde import EDMSDE
from sdejax.training import build, config as config_lib, families, image_condition, modes, trainer

TINY = {"training.n_iters": 2, "training.batch_size": 8, "training.log_freq": 1, "training.eval_freq": 2,
        "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2, "training.snapshot_sampling": False,
        "model.nf": 8, "model.ch_mult": (1,), "model.attn_resolutions": (), "model.num_scales": 25,
        "eval.num_samples": 4, "eval.batch_size": 10, "eval.num_bpd_batches": 1, "eval.rtol": 1e-3,
        "eval.atol": 1e-3, "sampling.num_steps": 3}
CONFIGS = {"lowres": (digits_lowres, "digits_lowres.py"), "sr": (digits_sr, "digits_sr.py"),
           "controlnet": (digits_controlnet, "digits_controlnet.py")}
EDM = dict(sde=EDMSDE(0.002, 80.0, N=25), precond=Precond.edm(0.5))
CN_EXTRA = {"data.downsample": 2}  # the ControlNet steers the 8x8 base


def _config(name, tfds, **extra):
    return override(CONFIGS[name][0].get_config(), {**TINY, "data.data_dir": str(tfds), **extra})


def _train(mp, name, workdir, tfds, **extra):
    items = {**TINY, "data.data_dir": tfds, **extra}
    flags = [f"--workdir={workdir}", *(f"--config.{k}={v}".replace(" ", "") for k, v in items.items())]
    run_cli(mp, *flags, "--mode=train", config=ROOT / "configs" / CONFIGS[name][1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tfds = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(tfds, "array_record")
    dirs = {name: tmp_path_factory.mktemp(name) for name in CONFIGS}
    mp = pytest.MonkeyPatch()
    try:
        _train(mp, "lowres", dirs["lowres"], tfds)
        _train(mp, "sr", dirs["sr"], tfds)
        config = _config("controlnet", tfds, **CN_EXTRA, **{"controlnet.base_workdir": str(dirs["lowres"])})
        trainer.train_model(config, dirs["controlnet"])  # what the CLI runs (data.downsample is no CLI key here)
    finally:
        mp.undo()
    return {"tfds": tfds, **dirs}


def _first_batch(config):
    """The first training batch of the digits pipeline in [−1, 1] (data.centered), as the driver draws it."""
    train, _ = datasets.get_dataset(config)
    return 2.0 * jnp.asarray(next(train)["image"]) - 1.0


def _logged_first_loss(workdir):
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in log if r["step"] == 1 and "loss" in r)


def _dsm(apply_fn):
    """EDM's DSM loss (log-normal σ, x0-prediction through EDM preconditioning), as configs/digits_edm.py."""
    return losses.get_sde_loss_fn(EDM["sde"], apply_fn, train=True, reduce_mean=True, continuous=True, eps=0.002,
                                  precond=EDM["precond"], time_sampling="lognormal", p_mean=-1.2, p_std=1.2)


def _sr_network(config):
    """The SR network built here from the registry: the run's NCSN++ on 1 + 1 + 1 input channels."""
    net_config = override(ml_collections.ConfigDict(config.to_dict()), {"data.num_channels": 3})
    model, variables = registry.init_model(net_config, build.stream_key(config, "init"))
    return superres.sr_apply_fn(registry.make_apply_fn(model)), variables


def test_downsampled_source_is_the_area_mean_with_its_levels(runs):
    """data.downsample = 2: held-out rows are the 2x2 block means of the 16x16 source's (dequantised) held-out
    digits; (17 − 1)·4 + 1 = 65 levels; the base network is built at 8x8."""
    s = modes.restored_setup(_config("lowres", runs["tfds"]), runs["lowres"])
    full = np.asarray(s.data.inner.heldout["x"], np.float64)
    assert full.shape == (10, 16, 16, 1)
    want = full.reshape(10, 8, 2, 8, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(s.data.heldout["x"], want, rtol=0, atol=1e-6)
    assert s.data.num_levels == 65 and s.data.data_range == (-1.0, 1.0) and not s.data.supports_fid
    assert s.apply_fn(s.state.ema_params, jnp.asarray(want[:2]), jnp.ones((2,))).shape == (2, 8, 8, 1)


def test_sr_first_step_loss_is_the_library_sr_loss(runs):
    """Logged step-1 loss = `sr_loss_fn` (z = D_2(x), s ~ U[0, 0.5], z_s = z + s ε) of EDM's DSM loss of the
    step-0 SR network on the first batch, with the step's key split(state rng)[1]."""
    config = _config("sr", runs["tfds"])
    apply_fn, variables = _sr_network(config)
    loss = superres.sr_loss_fn(_dsm(apply_fn), EDM["sde"], 0.5, functools.partial(superres.downsample, factor=2))
    step_rng = jax.random.split(build.stream_key(config, "state"))[1]
    ref, aux = loss(variables, step_rng, {"x": _first_batch(config), "index": jnp.arange(8)})
    assert float(jnp.max(aux["aug_level"])) <= 0.5
    np.testing.assert_allclose(_logged_first_loss(runs["sr"]), float(ref), rtol=1e-5)


@pytest.mark.parametrize("cascade", [True, False], ids=["after_the_base", "on_heldout"])
def test_sr_samples_are_the_library_cascade(runs, cascade):
    """The driver's samples = `cascade_sample` of (the base model's Heun samples, or the held-out D_2(x)) and one
    SR stage at s = 0.1 (Heun, 3 steps = 5 NFE each), networks restored and wrapped here; NFE = 10 or 5."""
    extra = {"superres.base_workdir": str(runs["lowres"])} if cascade else {}
    s = modes.restored_setup(_config("sr", runs["tfds"], **extra), runs["sr"])
    key, n = jax.random.PRNGKey(3), 4
    x, nfe = jax.jit(families.family(s.config).sampler(s, "heun", n, (n, 16, 16, 1)))(
        s.network_params(s.state.ema_params), None, key)
    heun = methods.from_config({"method": "heun", "num_steps": 3})
    sr_apply, _ = _sr_network(s.config)
    stage = superres.SRStage(superres.sr_score_builder(EDM["sde"], sr_apply, s.state.ema_params, precond=EDM["precond"]),
                             lambda k, score_fn: heun(k, EDM["sde"], score_fn, (n, 16, 16, 1)), EDM["sde"], 0.1)
    if cascade:
        b = modes.restored_setup(_config("lowres", runs["tfds"]), runs["lowres"])
        base_score = score.get_score_fn(EDM["sde"], b.apply_fn, b.state.ema_params, precond=EDM["precond"])
        first = lambda k: heun(k, EDM["sde"], base_score, (n, 8, 8, 1))  # noqa: E731
    else:
        low = superres.downsample(jnp.asarray(s.data.heldout["x"][:n]), 2)
        first = lambda k: (low, 0)  # noqa: E731
    want, nfes = jax.jit(lambda k: superres.cascade_sample(k, first, [stage]))(key)
    assert int(nfe) == (10 if cascade else 5) == sum(int(v) for v in nfes)
    np.testing.assert_allclose(np.asarray(x), np.asarray(want[-1]), rtol=1e-5, atol=1e-5)


def test_sr_sample_mode_reports_the_condition_error(runs, monkeypatch):
    """--mode=sample on held-out conditions: condition_rms = RMS of D_2(x̂) − D_2(x) in [0, 1] units of the
    written samples against the held-out rows they were conditioned on."""
    out = modes.run_sample(_config("sr", runs["tfds"]), runs["sr"])
    x = np.load(out["path"])["samples"]
    held = modes.restored_setup(_config("sr", runs["tfds"]), runs["sr"]).data.heldout["x"][:4]
    down = lambda v: np.asarray(v, np.float64).reshape(4, 8, 2, 8, 2, 1).mean(axis=(2, 4))  # noqa: E731
    want = np.sqrt(np.mean(((down(x) - down(held)) / 2.0) ** 2))
    np.testing.assert_allclose(out["condition_rms"], want, rtol=1e-5)


def _blur(x):
    return degradations.blur(sigma_max=1.5, schedule="linear").apply(x, None, jnp.ones((x.shape[0],), x.dtype))


def test_controlnet_trains_only_its_side_and_its_first_loss_is_the_library_loss(runs):
    """The state holds the ControlNet only (copy, hint, zero projections); after 2 steps its copy moved off the
    base while the frozen base is the base checkpoint's EMA bit for bit; logged step-1 loss = EDM's DSM loss of
    ControlNetParams(base, step-0 ControlNet, G_1.5 ∗ x) on the first batch (8x8)."""
    config = _config("controlnet", runs["tfds"], **CN_EXTRA, **{"controlnet.base_workdir": str(runs["lowres"])})
    s = modes.restored_setup(config, runs["controlnet"])
    b = modes.restored_setup(_config("lowres", runs["tfds"]), runs["lowres"])
    params = s.state.params["params"]
    assert set(params) == {"copy", "hint"} | {k for k in params if k.startswith("zero_")} and len(params) > 2
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree_util.tree_leaves(s.teacher.params),
                                                    jax.tree_util.tree_leaves(b.state.ema_params)))
    base_copy = {k: b.state.ema_params["params"][k] for k in params["copy"]}
    moved = jax.tree_util.tree_map(lambda u, v: float(jnp.max(jnp.abs(u - v))), params["copy"], base_copy)
    assert max(jax.tree_util.tree_leaves(moved)) > 0
    fresh = build.setup(config, runs["controlnet"] / "fresh")
    x = superres.downsample(_first_batch(config), 2)  # the 16x16 batch, downsampled as the run's source
    network = ControlNetParams(b.state.ema_params, fresh.state.params, _blur(x))
    step_rng = jax.random.split(build.stream_key(config, "state"))[1]
    ref, _ = _dsm(fresh.apply_fn)(network, step_rng, {"x": x, "index": jnp.arange(8)})
    np.testing.assert_allclose(_logged_first_loss(runs["controlnet"]), float(ref), rtol=1e-5)


def test_fresh_controlnet_samples_and_bits_are_the_base_models(runs):
    """Zero projections: at step 0 the ControlNet's samples (Heun, any control) and held-out bits/dim are the
    base run's, bit for bit, with the same keys."""
    config = _config("controlnet", runs["tfds"], **CN_EXTRA, **{"controlnet.base_workdir": str(runs["lowres"])})
    fresh = build.setup(config, runs["controlnet"] / "fresh_bits")
    b = modes.restored_setup(_config("lowres", runs["tfds"]), runs["lowres"])
    key, n = jax.random.PRNGKey(1), 4
    for s in (fresh, b):
        s.compiled.clear()
    x_cn, _ = modes.draw_samples(fresh, "heun", n, key)
    x_base, _ = modes.draw_samples(b, "heun", n, key)
    np.testing.assert_array_equal(x_cn, x_base)
    assert modes.heldout_bits_per_dim(fresh)["bits_per_dim"] == modes.heldout_bits_per_dim(b)["bits_per_dim"]


@pytest.mark.parametrize("name, overrides, message", [
    ("sr", {"controlnet": {"base_workdir": "x"}}, "config.superres and config.controlnet are two kinds of run"),
    ("sr", {"superres.factor": 3}, "superres.factor = 3 must divide the image size 16"),
    ("sr", {"superres.upsample": "cubic"}, "unknown superres.upsample 'cubic'; valid: ['nearest', 'bilinear']"),
    ("sr", {"superres.scale": 2}, "unknown config key(s) ['superres.scale']"),
    ("sr", {"training.objective": "udm"}, "config.superres conditions a pixel DSM score model"),
    ("controlnet", {"controlnet.factor": 2}, "controlnet.factor is read only with controlnet.control = 'low_res'"),
    ("controlnet", {"controlnet.control": "edges"}, "unknown controlnet.control 'edges'; valid: ['blur', 'low_res']"),
    ("lowres", {"data.downsample": 3}, "data.downsample = 3 must divide data.image_size = 16"),
])
def test_config_errors(name, overrides, message, tmp_path):
    config = override(CONFIGS[name][0].get_config(), overrides, any_type=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.check_config(config)


def test_base_of_another_kind_is_refused(runs):
    """A cascade's base must model this run's images downsampled by superres.factor; a ControlNet's base this
    run's data and network."""
    config = _config("sr", runs["tfds"], **{"superres.base_workdir": str(runs["sr"])})
    with pytest.raises(ValueError, match="superres.base_workdir must hold an unconditioned DSM score model"):
        build.setup(config, runs["sr"])
    config = _config("controlnet", runs["tfds"], **{"controlnet.base_workdir": str(runs["lowres"])})
    with pytest.raises(ValueError, match=re.escape("controlnet.base_workdir must hold a DSM model with this run's "
                                                   "data, training.sde and config.model (EMA keys aside)")):
        build.setup(config, runs["controlnet"] / "wrong")
    assert image_condition.kind(config) == "controlnet"
