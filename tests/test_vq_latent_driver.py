"""Latent diffusion on a VQ autoencoder through the CLI (`configs/digits_ldm_vq.py`, offline digits, a tiny VQ
autoencoder with K = 64 codes of dimension 2 and f = 2, a tiny NCSN++, 2 steps each). Oracles computed here from
the network's encode / codebook / decode alone (codes by a float64 argmin in numpy), on parameters read back
by orbax alone: the first logged autoencoder loss is recon + (1 + β) Σ‖z_e − e_k‖² of the first batch at the
initial parameters; the test report's recon, quantisation error, codes used and perplexity are those of the
restored autoencoder on the 300 test digits; s = 1/std of z_e (not of z_q); the diffusion data are s·z_e; the
samples are D(e_k) with e_k nearest z/s; and the config errors. The KL path is test_latent_driver's."""
from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import digits_ldm, digits_ldm_vq
from configs_helper import override
from helpers import ROOT, run_cli
from sdejax import autoencoders
from sdejax.data import datasets, digits
from sdejax.models.autoencoder import VQAutoencoder
from sdejax.training import build, config as config_lib, families, modes

CONFIG = ROOT / "configs" / "digits_ldm_vq.py"
K, C, BETA = 64, 2, 0.25  # codes, code dimension (= latent channels), commitment weight of digits_ldm_vq
TINY = {"training.n_iters": 2, "training.batch_size": 8, "training.log_freq": 1, "training.eval_freq": 2,
        "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2, "training.snapshot_sampling": False,
        "autoencoder.n_iters": 2, "autoencoder.batch_size": 8, "autoencoder.features": 8,
        "autoencoder.channel_mult": (1, 1), "autoencoder.num_res_blocks": 0, "autoencoder.scale_batches": 2,
        "model.nf": 16, "model.ch_mult": (1,), "model.attn_resolutions": (), "model.num_scales": 25,
        "eval.num_samples": 4, "eval.batch_size": 10, "eval.num_bpd_batches": 1, "sampling.num_steps": 3}
MODULE = VQAutoencoder(f=2, num_codes=K, code_dim=C, features=8, channel_mult=(1, 1), out_channels=1,
                       num_res_blocks=0)
ENCODE = jax.jit(lambda p, x: MODULE.apply(p, x, method="encode"))
DECODE = jax.jit(lambda p, z: MODULE.apply(p, z, method="decode"))


def _flags(workdir, tfds):
    items = {**TINY, "data.data_dir": tfds}
    return [f"--workdir={workdir}", *(f"--config.{k}={v}".replace(" ", "") for k, v in items.items())]


def _config(tfds):
    return override(digits_ldm_vq.get_config(), {**TINY, "data.data_dir": str(tfds)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """train_autoencoder, train and sample through the CLI in one workdir; the autoencoder's parameters
    read back by orbax alone."""
    tfds = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(tfds, "array_record")
    workdir = tmp_path_factory.mktemp("ldm_vq")
    mp = pytest.MonkeyPatch()
    try:
        for mode in ("train_autoencoder", "train", "sample"):
            run_cli(mp, *_flags(workdir, tfds), f"--mode={mode}", config=CONFIG)
    finally:
        mp.undo()
    ae_dir = workdir / "autoencoder"
    params = ocp.StandardCheckpointer().restore(ae_dir / "checkpoints" / "2" / "state")["params"]
    return {"tfds": tfds, "workdir": workdir, "ae_dir": ae_dir, "params": params,
            "scale": json.loads((ae_dir / "latent_scale.json").read_text()),
            "report": json.loads((ae_dir / "metrics.json").read_text())}


def _nearest(params, z):
    """(codes, e_codes) by a float64 argmin of ‖z − e_j‖² over the codebook."""
    e = np.asarray(MODULE.apply(params, method="codebook"), np.float64)
    codes = np.argmin(np.sum((np.asarray(z, np.float64)[..., None, :] - e) ** 2, axis=-1), axis=-1)
    return codes, e[codes]


def _terms(params, x):
    """(z_e, codes, per-example Σ (x − D(e_k))², per-example Σ ‖z_e − e_k‖²) in float64."""
    z_e = np.asarray(ENCODE(params, jnp.asarray(x)), np.float64)
    codes, z_q = _nearest(params, z_e)
    x_hat = np.asarray(DECODE(params, jnp.asarray(z_q, jnp.float32)), np.float64)
    return z_e, codes, np.sum((x - x_hat) ** 2, axis=(1, 2, 3)), np.sum((z_e - z_q) ** 2, axis=(1, 2, 3))


def _pixel_batches(run, skip, take):
    """Training batches skip..skip+take−1 of the digits pipeline at batch size 8, in [−1, 1]."""
    train, _ = datasets.get_dataset(_config(run["tfds"]))
    return np.stack([2.0 * next(train)["image"] - 1.0 for _ in range(skip + take)][skip:]).astype(np.float64)


def _test_digits(run):
    _, test = datasets.get_dataset(_config(run["tfds"]), evaluation=True)
    return np.concatenate([2.0 * np.asarray(b["image"], np.float64) - 1.0 for b in test])


def test_first_logged_loss_is_the_vq_loss_of_the_first_batch(run):
    """Step-1 loss = mean of Σ (x − D(e_k))² + (1 + β) Σ ‖z_e − e_k‖² (codebook + β commitment, equal in value)
    at the initial parameters init(stream_key("autoencoder")) on the first training batch; float32 rounding."""
    log = [json.loads(line) for line in (run["ae_dir"] / "train_log.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in log if r["step"] == 1 and "loss" in r)
    init = jax.jit(lambda key: MODULE.init(key, jnp.zeros((1, 16, 16, 1))))
    params0 = init(build.stream_key(_config(run["tfds"]), "autoencoder"))
    x = _pixel_batches(run, skip=0, take=1)[0]
    _, _, recon, quant = _terms(params0, x.astype(np.float32))
    np.testing.assert_allclose(logged, np.mean(recon + (1 + BETA) * quant), rtol=1e-5)
    library, _ = jax.jit(autoencoders.vq_vae_loss(ENCODE, DECODE, lambda p: MODULE.apply(p, method="codebook"),
                                                  beta=BETA))(params0, jax.random.PRNGKey(0),
                                                              {"x": jnp.asarray(x, jnp.float32)})
    np.testing.assert_allclose(logged, float(library), rtol=1e-5)


def test_report_usage_perplexity_and_recon_of_the_test_split(run):
    """metrics.json "test": recon, quantisation error, loss = recon + (1 + β) quantisation and recon/256 per
    dimension of the restored autoencoder on the 300 test digits; codes used of K and the perplexity of their
    histogram (`autoencoders.codebook_usage`); the log's held-out record has the VQ metrics."""
    report = run["report"]["test"]
    x = _test_digits(run)
    assert x.shape == (300, 16, 16, 1) and report["num_batches"] == 30
    _, codes, recon, quant = _terms(run["params"], x.astype(np.float32))
    counts, perplexity = autoencoders.codebook_usage(jnp.asarray(codes), K)
    assert report["usage"] == int(np.sum(np.asarray(counts) > 0)) == len(np.unique(codes)) and report["num_codes"] == K
    np.testing.assert_allclose(report["perplexity"], float(perplexity), rtol=1e-5)
    np.testing.assert_allclose(report["recon"], recon.mean(), rtol=1e-5)
    np.testing.assert_allclose(report["quantization"], quant.mean(), rtol=1e-5)
    np.testing.assert_allclose(report["loss"], recon.mean() + (1 + BETA) * quant.mean(), rtol=1e-5)
    np.testing.assert_allclose(report["mse_per_dim"], recon.mean() / 256, rtol=1e-5)
    log = [json.loads(line) for line in (run["ae_dir"] / "train_log.jsonl").read_text().splitlines()]
    last = [r for r in log if "eval_usage" in r][-1]
    assert last["step"] == 2 and 1 <= last["eval_usage"] <= K and 1 <= last["eval_perplexity"] <= last["eval_usage"]
    assert last["eval_recon"] > 0 and last["eval_quantization"] >= 0 and "eval_kl" not in last


@pytest.fixture(scope="module")
def restored(run):
    return modes.restored_setup(_config(run["tfds"]), run["workdir"])


def test_scale_is_one_over_std_of_z_e_and_diffusion_sees_s_z_e(run, restored):
    """s = 1/std of every entry of z_e (before quantisation) of the 2 training batches after the last step
    (2·8·8·8·2 values); the latent source's eval batch is s·z_e of the first 10 test digits."""
    scale = run["scale"]
    z_e = _terms(run["params"], _pixel_batches(run, skip=2, take=2).reshape(16, 16, 16, 1).astype(np.float32))[0]
    assert scale["use_mean"] is True and scale["autoencoder_step"] == 2 and scale["latent_shape"] == [8, 8, C]
    assert scale["num_values"] == z_e.size == 16 * 8 * 8 * C and run["report"]["latent_scale"] == scale
    np.testing.assert_allclose(scale["scale"], 1.0 / z_e.std(), rtol=1e-5)
    assert not np.isclose(scale["scale"], 1.0 / _nearest(run["params"], z_e)[1].std(), rtol=1e-3)
    z = next(restored.data.eval_batches(10))["x"]
    ref = np.float32(scale["scale"]) * _terms(run["params"], _test_digits(run)[:10].astype(np.float32))[0]
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())


def test_samples_are_decoded_after_quantisation(run, restored):
    """samples_2.npz = D(e_k), e_k the code nearest z/s, of the config's sampler's z (EDM Heun, 3 steps, EMA
    params, the run's sample key) on (4, 8, 8, 2) latents; not D(z/s)."""
    s = restored
    sample = families.family(s.config).sampler(s, s.config.sampling.method, 4, (4, 8, 8, C))
    z, _ = jax.jit(sample)(s.state.ema_params, None, build.stream_key(s.config, "sample"))
    z_q = _nearest(run["params"], np.asarray(z) / run["scale"]["scale"])[1]
    ref = np.asarray(DECODE(run["params"], jnp.asarray(z_q, jnp.float32)))
    x = np.load(run["workdir"] / "samples" / "samples_2.npz")["samples"]
    assert x.shape == ref.shape == (4, 16, 16, 1)
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    unquantised = np.asarray(DECODE(run["params"], z / run["scale"]["scale"]))
    assert np.abs(x - unquantised).max() > 1e-3


def test_kl_config_cannot_restore_the_vq_autoencoder(run):
    """A KL config on the VQ autoencoder's workdir is refused, naming the kind saved with the checkpoint."""
    config = override(digits_ldm.get_config(), {**TINY, "data.data_dir": run["tfds"]})
    with pytest.raises(ValueError, match=r"autoencoder.kind: 'vq' \(checkpoint\) vs '<absent>' \(config\)"):
        build.setup(config, run["workdir"])


@pytest.mark.parametrize("overrides, message", [
    ({"autoencoder.kind": "ae"}, "unknown autoencoder.kind 'ae'; valid: ['kl', 'vq']"),
    ({"autoencoder.beta": 1e-4}, "autoencoder.kind = 'vq' does not read ['autoencoder.beta'] (key(s) of kind "
                                 "['kl']); the keys of kind 'vq': ['commitment', 'num_codes']"),
    ({"autoencoder.num_codes": 1}, "autoencoder.num_codes must be an integer >= 2 (codebook size K); got 1"),
    ({"autoencoder.commitment": -0.1}, "autoencoder.commitment must be in [0, inf); got -0.1"),
    ({"latent.use_mean": False}, "latent.use_mean = False has no meaning for autoencoder.kind = 'vq'"),
])
def test_vq_config_errors(overrides, message):
    config = override(digits_ldm_vq.get_config(), overrides, any_type=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.check_config(config)


def test_kind_keys_are_checked_both_ways():
    config = override(digits_ldm.get_config(), {"autoencoder.num_codes": 64})
    with pytest.raises(ValueError, match=re.escape("autoencoder.kind = 'kl' does not read ['autoencoder.num_codes']")):
        config_lib.check_config(config)
    config = digits_ldm_vq.get_config()
    del config.autoencoder["num_codes"]
    with pytest.raises(ValueError, match=re.escape("missing config key(s) ['autoencoder.num_codes'] (required by "
                                                   "autoencoder.kind = 'vq')")):
        config_lib.check_config(config)
    config_lib.check_config(override(digits_ldm_vq.get_config(), {"latent.use_mean": True}))
