"""Masked (absorbing-state) diffusion through the driver (`training.objective = "masked"`,
`configs/digits_masked.py`) on the digits with a tiny TokenDenoiser. The driver's loss, bits/dim and
samples must equal the library's (`sdejax.masked`, `sdejax.sampling.masked`) on the same tokens,
parameters and keys; the NELBO's maths is tested in test_masked. Config errors too."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_ddpmpp, digits_masked
from configs_helper import override
from sdejax import masked
from sdejax.sampling import masked as masked_sampling
from sdejax.training import build, config as config_lib, modes, trainer
from sdejax.training.objective import context_from_state

TINY = {"training.n_iters": 2, "training.n_jitted_steps": 1, "training.batch_size": 8, "training.log_freq": 1,
        "training.eval_freq": 0, "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2,
        "model.features": 16, "model.depth": 1, "model.num_heads": 2, "eval.num_samples": 6,
        "eval.batch_size": 10, "eval.num_bpd_batches": 1, "eval.num_probes": 2, "sampling.num_steps": 5,
        "data.num_threads": 2, "data.prefetch": 2}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    config = override(digits_masked.get_config(), TINY)
    workdir = tmp_path_factory.mktemp("masked")
    trainer.train_model(config, workdir)
    return config, workdir


@pytest.mark.parametrize("base, overrides, message", [
    (digits_ddpmpp, {"training.objective": "masked"}, "training.objective = 'masked' goes with a token network"),
    (digits_masked, {"training.objective": "dsm"}, "training.masking_schedule is read by training.objective in ['masked'] only"),
    (digits_masked, {"data.uniform_dequantization": True}, "set data.uniform_dequantization = False"),
    (digits_masked, {"training.masking_schedule": "cos"}, "unknown training.masking_schedule 'cos'; valid: ['cosine', 'linear']"),
    (digits_masked, {"sampling.masked_grid": "karras"}, "unknown sampling.masked_grid 'karras'; valid: ['uniform', 'cosine']"),
])
def test_masked_config_errors(base, overrides, message):
    config = base.get_config()
    override(config, overrides, any_type=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.check_config(config)


def test_num_tokens_must_match_the_levels(tmp_path):
    config = override(digits_masked.get_config(), {**TINY, "model.num_tokens": 16})
    with pytest.raises(ValueError, match=r"model.num_tokens = 16 but data.dataset = 'DIGITS' has 17 intensity "
                                         r"levels; set model.num_tokens = 17"):
        build.setup(config, tmp_path)


def _tokens(x):
    """The digits in the model's range [−1, 1] -> their 17 levels, by hand: k = 8 (x + 1)."""
    return np.rint(8.0 * (np.asarray(x, np.float64) + 1.0)).astype(np.int32)


def test_driver_loss_and_bits_are_the_library_nelbo(run):
    """The train step's objective is `masked_diffusion_loss` on the batch's levels; held-out bits/dim is the
    mean over `eval.num_probes` keys of its per-example NELBO/(D ln 2)."""
    config, workdir = run
    s = modes.restored_setup(config, workdir)
    batch = jax.tree_util.tree_map(lambda v: jnp.asarray(v[0]), s.data.chunk(0, 1))
    tokens = _tokens(batch["x"])
    assert np.allclose(np.asarray(batch["x"]), tokens / 8.0 - 1.0, atol=1e-6)  # the data are on the grid
    ref = masked.masked_diffusion_loss(s.apply_fn, 17, "linear")
    rng, context = jax.random.PRNGKey(3), context_from_state(s.state)
    loss, aux = s.objective(True)(s.state.params, rng, batch, context)
    ref_loss, ref_aux = ref(s.state.params, rng, {"x": jnp.asarray(tokens)})
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(aux["bpd"], ref_aux["bpd"], rtol=1e-6)

    out = modes.heldout_bits_per_dim(s)
    xb = next(s.data.eval_batches(10))["x"]
    key = jax.random.fold_in(build.stream_key(config, "eval"), 0)
    # jitted like the driver's: eager float32 rounding, amplified by the NELBO weight −α′/(1 − α) = 1/t near
    # t_min, can differ from the compiled program's by a few 1e-5.
    ev = jax.jit(masked.masked_diffusion_loss(s.apply_fn, 17, "linear", train=False))
    bits = np.mean([np.asarray(ev(s.state.ema_params, jax.random.fold_in(key, k), {"x": jnp.asarray(_tokens(xb))})[1]
                               ["bpd"]) for k in range(2)], axis=0)
    np.testing.assert_allclose(out["bits_per_dim"], bits.mean(), rtol=1e-5)
    assert out["num_points"] == 10 and out["nfe_per_batch"] == 2


def test_driver_samples_are_the_library_ancestral_sampler(run):
    """`--mode=sample`: ancestral unmasking with the EMA params on 5 uniform steps, tokens k mapped to
    k/8 − 1; every value lies on the 17-level grid."""
    config, workdir = run
    s = modes.restored_setup(config, workdir)
    key = build.stream_key(config, "sample")
    x, info = modes.draw_samples(s, config.sampling.method, 6, key)
    z = masked_sampling.ancestral_sample(key, lambda z, t: s.apply_fn(s.state.ema_params, z, t), (6, 16, 16, 1),
                                         17, "linear", num_steps=5)
    assert info["nfe"] == 5
    np.testing.assert_allclose(x, np.asarray(z) / 8.0 - 1.0, atol=1e-6)
    out = modes.run_sample(config, workdir)
    assert np.load(out["path"])["samples"].shape == (6, 16, 16, 1)
