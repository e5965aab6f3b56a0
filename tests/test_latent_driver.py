"""Latent diffusion through the CLI (`configs/digits_ldm.py`, offline digits, a tiny KL autoencoder with f = 2
and a tiny NCSN++, 2 steps each): `--mode=train_autoencoder` writes its checkpoint and the scale
s = 1/std of the encoder means, equal to that of an encoder restored here by orbax alone, and never rewrites
it; `--mode=train` on the latents takes as its first loss the library DSM loss of s·μ(x) of the first batch;
`--mode=sample` writes D(z/s) of the latent sampler's z; eval reports latent bits/dim under its own key;
and the errors: no autoencoder, a changed use_mean, training past the scale, bad settings. The networks'
maths is tested in test_autoencoders; here the wiring."""
from __future__ import annotations

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import digits_ldm
from configs_helper import override
from helpers import ROOT, run_cli
from sdejax import losses
from sdejax.data import datasets, digits
from sdejax.models.autoencoder import KLAutoencoder
from sdejax.precond import Precond
from sdejax.sde import EDMSDE
from sdejax.training import build, config as config_lib, families, latent, modes, sources

CONFIG = ROOT / "configs" / "digits_ldm.py"
TINY = {"training.n_iters": 2, "training.batch_size": 8, "training.log_freq": 1, "training.eval_freq": 2,
        "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2, "training.snapshot_sampling": False,
        "autoencoder.n_iters": 2, "autoencoder.batch_size": 8, "autoencoder.features": 8,
        "autoencoder.channel_mult": (1, 1), "autoencoder.num_res_blocks": 0, "autoencoder.scale_batches": 2,
        "model.nf": 16, "model.ch_mult": (1,), "model.attn_resolutions": (), "model.num_scales": 25,
        "eval.num_samples": 4, "eval.batch_size": 10,
        "eval.num_bpd_batches": 1, "sampling.num_steps": 3}
C = 2  # latent channels of digits_ldm: 8x8x2 latents


def _flags(workdir, tfds, **extra):
    items = {**TINY, "data.data_dir": tfds, **extra}
    return [f"--workdir={workdir}", *(f"--config.{k}={v}".replace(" ", "") for k, v in items.items())]


def _config(tfds, **extra):
    return override(digits_ldm.get_config(), {**TINY, "data.data_dir": str(tfds), **extra})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train_autoencoder, train and sample through the CLI in one workdir; the autoencoder's parameters
    read back by orbax alone (no driver code) and its module."""
    tfds = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(tfds, "array_record")
    workdir = tmp_path_factory.mktemp("ldm")
    mp = pytest.MonkeyPatch()
    try:
        for mode in ("train_autoencoder", "train", "sample"):
            run_cli(mp, *_flags(workdir, tfds), f"--mode={mode}", config=CONFIG)
    finally:
        mp.undo()
    ae_dir = workdir / "autoencoder"
    params = ocp.StandardCheckpointer().restore(ae_dir / "checkpoints" / "2" / "state")["params"]
    module = KLAutoencoder(f=2, latent_channels=C, features=8, channel_mult=(1, 1), out_channels=1, num_res_blocks=0)
    scale = json.loads((ae_dir / "latent_scale.json").read_text())
    return {"tfds": tfds, "workdir": workdir, "ae_dir": ae_dir, "params": params, "module": module, "scale": scale}


def _mean(run, x):
    return np.asarray(run["module"].apply(run["params"], jnp.asarray(x), method="encode")[0], np.float64)


def _pixel_batches(run, batch_size, skip, take):
    """Training batches skip..skip+take−1 of the digits pipeline at `batch_size`, in [−1, 1] (data.centered)."""
    config = _config(run["tfds"], **{"training.batch_size": batch_size})
    train, _ = datasets.get_dataset(config)
    batches = [2.0 * next(train)["image"] - 1.0 for _ in range(skip + take)]
    return np.stack(batches[skip:])


def test_autoencoder_checkpoint_logs_and_scale(run, monkeypatch):
    """s = 1/std of every entry of μ(x) of the 2 training batches after the last of 2 steps (std of 2·8·8·8·2
    float32 values in float64: equal to rounding); the log has the held-out reconstruction and KL; a
    rerun leaves the scale file as it was; training past its step is refused."""
    ae_dir, scale = run["ae_dir"], run["scale"]
    assert sorted(p.name for p in (ae_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    z = _mean(run, _pixel_batches(run, 8, skip=2, take=2).reshape(16, 16, 16, 1))
    assert scale["use_mean"] is True and scale["autoencoder_step"] == 2 and scale["latent_shape"] == [8, 8, C]
    assert scale["num_values"] == z.size == 16 * 8 * 8 * C
    np.testing.assert_allclose(scale["scale"], 1.0 / z.std(), rtol=1e-5)
    log = [json.loads(line) for line in (ae_dir / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if "eval_recon" in r][-1]
    assert last["step"] == 2 and last["eval_recon"] > 0 and last["eval_kl"] >= 0 and np.isfinite(last["loss"])
    report = json.loads((ae_dir / "metrics.json").read_text())
    assert report["test"]["num_batches"] == 30 and report["latent_scale"] == scale  # 300 test digits

    before = ((ae_dir / "latent_scale.json").read_bytes(), (ae_dir / "latent_scale.json").stat().st_mtime_ns)
    run_cli(monkeypatch, *_flags(run["workdir"], run["tfds"]), "--mode=train_autoencoder", config=CONFIG)
    assert ((ae_dir / "latent_scale.json").read_bytes(), (ae_dir / "latent_scale.json").stat().st_mtime_ns) == before
    with pytest.raises(ValueError, match=r"autoencoder.n_iters = 3, but the latent scale .* was estimated at "
                                         r"autoencoder step 2 and is never recomputed"):
        run_cli(monkeypatch, *_flags(run["workdir"], run["tfds"], **{"autoencoder.n_iters": 3}),
                "--mode=train_autoencoder", config=CONFIG)


def test_first_step_loss_is_the_library_dsm_loss_of_the_scaled_latents(run):
    """Logged step-1 loss = EDM's DSM (σ ∈ [0.002, 80], EDM preconditioning with σ_data = 0.5, ln σ ~ N(−1.2, 1.2²),
    reduce_mean) of the step-0 network on z = s·μ(x) of the first training batch, with the step's key
    split(state rng)[1]."""
    config = _config(run["tfds"])
    log = [json.loads(line) for line in (run["workdir"] / "train_log.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in log if r["step"] == 1 and "loss" in r)
    z = np.float32(run["scale"]["scale"]) * _mean(run, _pixel_batches(run, 8, skip=0, take=1)[0]).astype(np.float32)
    assert z.shape == (8, 8, 8, C)
    apply_fn, variables = build.build_model(config, build.stream_key(config, "init"), None)
    step_rng = jax.random.split(build.stream_key(config, "state"))[1]
    loss_fn = losses.get_sde_loss_fn(EDMSDE(0.002, 80.0, N=25), apply_fn, train=True, reduce_mean=True,
                                     continuous=True, eps=0.002, precond=Precond.edm(0.5), time_sampling="lognormal",
                                     p_mean=-1.2, p_std=1.2)
    ref, _ = loss_fn(variables, step_rng, {"x": jnp.asarray(z), "index": jnp.arange(8)})
    np.testing.assert_allclose(logged, float(ref), rtol=1e-5)


@pytest.fixture(scope="module")
def restored(run):
    return modes.restored_setup(_config(run["tfds"]), run["workdir"])


def test_samples_are_the_decoded_latent_samples(run, restored):
    """samples_2.npz = D(z/s) of the config's sampler's z (EDM Heun, 3 steps = 5 NFE, EMA params, the run's
    sample key) on (4, 8, 8, 2) latents, pictured as a 2x2 grid of 16x16 digits."""
    s, config = restored, restored.config
    assert isinstance(s.data, sources.DataSource) and s.data.heldout["x"].shape == (10, 8, 8, C)
    sample = families.family(config).sampler(s, config.sampling.method, 4, (4, 8, 8, C))
    z, nfe = jax.jit(sample)(s.state.ema_params, None, build.stream_key(config, "sample"))
    ref = np.asarray(run["module"].apply(run["params"], z / run["scale"]["scale"], method="decode"))
    x = np.load(run["workdir"] / "samples" / "samples_2.npz")["samples"]
    assert x.shape == ref.shape == (4, 16, 16, 1) and int(nfe) == 5
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    assert np.asarray(Image.open(run["workdir"] / "samples" / "samples_2.png")).shape == (35, 35)


def test_eval_bits_are_latent_bits(run, restored, monkeypatch):
    """Held-out bits/dim go through the family's likelihood on the test digits' latents s·μ(x) (10 x 8x8x2, no
    dequantisation: data range and levels None) and are reported as latent_bits_per_dim with the note. The
    PF-ODE itself is tested in test_likelihood; here a stub returns each example's mean latent as its "bits"."""
    def nll_bits(setup):
        assert (setup.data.data_range, setup.data.num_levels) == (None, None)

        def bits(params, rng, xb, yb):
            assert xb.shape == (10, 8, 8, C)
            return jnp.mean(xb, axis=(1, 2, 3)), jnp.int32(7)

        return bits

    monkeypatch.setitem(families.FAMILIES, "dsm", dataclasses.replace(families.SCORE, nll_bits=nll_bits))
    out = modes.heldout_bits_per_dim(restored)
    test_digits = next(iter(datasets.get_dataset(restored.config, evaluation=True)[1]))["image"]
    ref = np.float32(run["scale"]["scale"]) * _mean(run, 2.0 * test_digits - 1.0).astype(np.float32)
    per_example = ref.reshape(10, -1).mean(axis=1)
    assert "bits_per_dim" not in out and "NOT pixel bits/dim" in out["note"] and out["num_points"] == 10
    np.testing.assert_allclose(out["latent_bits_per_dim"], per_example.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["latent_bits_per_dim_se"], per_example.std() / np.sqrt(10), rtol=1e-4, atol=1e-7)


def test_sampled_latents_are_mean_plus_sigma_eps(run):
    """latent.encoder with use_mean False: row r of z is μ + σ ε with ε ~ N(0, I) from fold_in(key, r), so two
    halves of a batch encoded apart (row0 = 0, 4) equal the whole."""
    x = jnp.asarray(_pixel_batches(run, 8, skip=0, take=1)[0])
    key, encode = jax.random.PRNGKey(5), latent.encoder(run["module"], False)
    whole = np.asarray(encode(run["params"], x, key, 0))
    halves = np.concatenate([np.asarray(encode(run["params"], x[:4], key, 0)),
                             np.asarray(encode(run["params"], x[4:], key, 4))])
    mean, logvar = run["module"].apply(run["params"], x, method="encode")
    eps = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, r), (8, 8, C))) for r in range(8)])
    np.testing.assert_allclose(whole, np.asarray(mean) + np.exp(0.5 * np.asarray(logvar)) * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(halves, whole, rtol=1e-6, atol=1e-6)


def test_missing_autoencoder_says_to_train_it(run, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"no autoencoder checkpoint in .*autoencoder.*run "
                                                r"--mode=train_autoencoder first"):
        run_cli(monkeypatch, *_flags(tmp_path, run["tfds"]), "--mode=train", config=CONFIG)
    assert not (tmp_path / "checkpoints").exists()
    (tmp_path / "ae" / "checkpoints").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="an autoencoder checkpoint but no latent scale"):
        latent.read_scale(tmp_path / "ae")
    with pytest.raises(ValueError, match=r"latent.use_mean = False but the latent scale .* was estimated with "
                                         r"use_mean = True"):
        build.setup(_config(run["tfds"], **{"latent.use_mean": False}), run["workdir"])


@pytest.mark.parametrize("overrides, message", [
    ({"autoencoder.f": 3}, "autoencoder.f must be 2, 4 or 8 (the downsampling factor); got 3"),
    ({"autoencoder.f": 4}, "autoencoder.channel_mult needs log2(f) + 1 = 3 entries for f = 4; got (1, 2)"),
    ({"data.image_size": 12, "autoencoder.f": 8, "autoencoder.channel_mult": None},
     "autoencoder.f = 8 must divide data.image_size = 12"),
    ({"autoencoder.lr_rate": 1e-3}, "unknown config key(s) ['autoencoder.lr_rate']; valid keys of autoencoder:"),
    ({"latent.enabled": True}, "unknown config key(s) ['latent.enabled']; valid keys of latent: "
                               "['autoencoder_workdir', 'use_mean']"),
    ({"sampling.classifier_scale": 1.0}, "classifier guidance of a latent model would need a classifier of the latents"),
])
def test_latent_config_errors(overrides, message):
    config = override(digits_ldm.get_config(), overrides, any_type=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.check_config(config)


def test_latent_needs_an_autoencoder_on_images():
    config = digits_ldm.get_config()
    del config["autoencoder"]
    with pytest.raises(ValueError, match=re.escape("config.latent (latent diffusion) needs config.autoencoder")):
        config_lib.check_config(config)
    config = digits_ldm.get_config()
    del config.autoencoder["n_iters"]
    with pytest.raises(ValueError, match=re.escape("missing config key(s) ['autoencoder.n_iters']")):
        config_lib.check_config(config)
    config = override(digits_ldm.get_config(), {"data.dataset": "two_mode"})
    with pytest.raises(ValueError, match="config.autoencoder encodes images; data.dataset = 'two_mode' is not an image"):
        config_lib.check_config(config)
