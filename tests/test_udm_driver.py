"""The unified diffusion framework through the driver (`training.objective = "udm"`,
`configs/digits_cold.py`) on the digits with a one-level DDPM++ of width 8: the driver's loss and samples must equal
the library's (`sdejax.udm`, `sdejax.degradations`) on the same parameters and keys, for cold blur
and for the Gaussian instance of the run's SDE; the maths is tested in test_udm. Config errors too."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import digits_cold
from configs_helper import override
from sdejax import degradations, udm
from sdejax.sde import VPSDE
from sdejax.training import build, config as config_lib, modes, trainer
from sdejax.training.objective import context_from_state

TINY = {"training.n_iters": 2, "training.n_jitted_steps": 1, "training.batch_size": 8, "training.log_freq": 1,
        "training.eval_freq": 0, "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2,
        "model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (),
        "eval.num_samples": 6, "eval.batch_size": 10, "sampling.num_steps": 4, "data.num_threads": 2,
        "data.prefetch": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for name, extra in (("blur", {}), ("gaussian", {"training.degradation": "gaussian", "sampling.udm_rule": "interp",
                                                    "sampling.eta": 0.5})):
        config = digits_cold.get_config("blur")
        del config.training["blur_sigma_max"]
        if name == "gaussian":
            del config.sampling["udm_prior_noise"]
        config = override(config, {**TINY, **extra})
        workdir = tmp_path_factory.mktemp(name)
        trainer.train_model(config, workdir)
        out[name] = (config, workdir)
    return out


@pytest.fixture(scope="module")
def restored(runs):
    """`name -> modes.restored_setup` of each run, restored once for the loss and the sampling tests."""
    return {name: modes.restored_setup(config, workdir) for name, (config, workdir) in runs.items()}


@pytest.mark.parametrize("overrides, message", [
    ({"sampling.udm_rule": "deterministic"}, "sampling.udm_rule = 'deterministic' recovers ε from x_t, which the "
                                             "'blur' degradation has not"),
    ({"training.degradation": "mask"}, "training.blur_sigma_max is read only with training.degradation = 'blur'"),
    ({"training.degradation": "noise"}, "unknown training.degradation 'noise'; valid: ['gaussian', 'blur', 'mask']"),
    ({"eval.enable_bpd": True}, "trains an x0 restorer with no likelihood"),
    ({"training.objective": "dsm"}, "training.degradation is read by training.objective in ['udm'] only"),
])
def test_udm_config_errors(overrides, message):
    config = digits_cold.get_config()
    override(config, overrides, any_type=True)
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.check_config(config)


def _net(apply_fn):
    return lambda params, x, t, **kw: apply_fn(params, x, 999.0 * t, **kw)


@pytest.mark.parametrize("name", ["blur", "gaussian"])
def test_driver_loss_is_the_library_udm_loss(restored, name):
    """The train step's objective is `udm_loss` (x0 MSE) of the degradation with the network on labels 999·t."""
    s = restored[name]
    deg = degradations.blur(8.0) if name == "blur" else degradations.gaussian(VPSDE(beta_min=0.1, beta_max=20.0))
    batch = jax.tree_util.tree_map(lambda v: jnp.asarray(v[0]), s.data.chunk(0, 1))
    rng, context = jax.random.PRNGKey(4), context_from_state(s.state)
    loss, aux = s.objective(True)(s.state.params, rng, batch, context)
    ref_loss, ref_aux = udm.udm_loss(_net(s.apply_fn), deg, "mse")(s.state.params, rng, {"x": batch["x"]})
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(aux["t"], ref_aux["t"], rtol=1e-6)


@pytest.mark.parametrize("name", ["blur", "gaussian"])
def test_driver_samples_are_the_library_udm_sampler(runs, restored, name):
    """`--mode=sample`: `udm_sample` from x_T = F_T(x_heldout, ε) (+ 0.02 z for blur) on linspace(T, t_end, 4):
    cold_improved to t = 0 without denoising (NFE 3) for blur, interp η = 0.5 (DDIM η) to the SDE's
    sampling eps with the final x̂0 (NFE 4) for the Gaussian instance."""
    (config, workdir), s = runs[name], restored[name]
    key, n = build.stream_key(config, "sample"), 6
    x, info = modes.draw_samples(s, config.sampling.method, n, key)
    deg = build.build_degradation(config, s.sde)
    k_eps, k_z, k_run = jax.random.split(key, 3)
    x0 = jnp.asarray(np.asarray(s.data.heldout["x"])[:n])
    x_T = deg.apply(x0, deg.noise(k_eps, x0.shape, x0.dtype), jnp.full((n,), deg.T))
    if name == "blur":
        x_T = x_T + 0.02 * jax.random.normal(k_z, x0.shape)
        ts, rule, eta, denoise, nfe = np.linspace(1.0, 0.0, 4), "cold_improved", 0.0, False, 3
    else:
        ts, rule, eta, denoise, nfe = np.linspace(1.0, s.sde.sampling_eps, 4), "interp", 0.5, True, 4
    f = lambda x, t: _net(s.apply_fn)(s.state.ema_params, x, t)  # noqa: E731
    ref, ref_nfe = udm.udm_sample(k_run, deg, f, x_T, ts, rule=rule, eta=eta, denoise=denoise)
    assert info["nfe"] == ref_nfe == nfe
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5 * float(np.abs(ref).max()))
    out = modes.run_sample(config, workdir)
    assert np.load(out["path"])["samples"].shape == (6, 16, 16, 1)
