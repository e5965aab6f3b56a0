"""Guided consistency distillation and LCM-LoRA through the driver, on the digits with a tiny U-Net:
a class-conditional EDM teacher trained with label dropout (`configs/digits_edm_cond.py`), a guided
CD student with the w-embedding (`configs/digits_lcm.py`) and a LoRA student over the frozen teacher
(`configs/digits_lcm.py:lora`). The driver's loss and samples must equal the library's composition
(`sdejax.consistency`, `sdejax.models.lora`) on the same parameters and keys; the maths is tested in
test_guided_distillation / test_lora / test_consistency. Config errors and the optimizer keys too."""
from __future__ import annotations

import copy
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import digits_lcm
from configs_helper import load_config, override, tiny_config
from sdejax import consistency, score
from sdejax.data import digits
from sdejax.models import lora, registry
from sdejax.precond import Precond
from sdejax.sampling.consistency import consistency_sample
from sdejax.sde import EDMSDE
from sdejax.training import build, config as config_lib, image_condition, modes, state as state_lib, trainer
from sdejax.training.objective import context_from_state

TINY = {"training.n_iters": 2, "training.n_jitted_steps": 1, "training.batch_size": 8, "training.log_freq": 1,
        "training.eval_freq": 0, "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2,
        "model.nf": 16, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (),
        "data.downsample": 2,  # 8x8 digits: the claims are about wiring, not the image size
        "eval.num_samples": 10, "eval.batch_size": 10, "data.num_threads": 2, "data.prefetch": 2}
STUDENT = {"training.num_scales": 6, "training.cd_skip": 2}
EDM = {"training.sde": "edmsde", "model.sigma_min": 0.002, "model.sigma_max": 80.0, "model.prediction": "x0",
       "model.embedding_type": "positional"}


# Config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"model.num_classes": 2}, "set both model.num_classes and training.cd_guidance"),
    ({"training.cd_guidance": (1.0, 3.0)}, "set both model.num_classes and training.cd_guidance"),
    ({"training.cd_guidance": (1.0, 3.0), "model.num_classes": 2}, "the student must see it"),
    ({"training.cd_guidance": (3.0, 1.0)}, "a pair (w_min, w_max) of reals with w_min <= w_max"),
    ({"training.cd_guidance": (2.0, 2.0), "model.num_classes": 2, "sampling.guidance_weight": 1.0},
     "a consistency model has no score to guide"),
    ({"training.lora_alpha": 4.0}, "training.lora_alpha is read only with training.lora_rank"),
    ({"training.cd_skip": 6, "training.num_scales": 6}, "training.cd_skip = 6 must be at most"),
    ({"training.consistency_distance": "lpips"}, "unknown training.consistency_distance 'lpips'"),
])
def test_guided_and_lora_config_errors(overrides, message):
    config = tiny_config(**{**EDM, "training.objective": "cd", "training.teacher_workdir": "/x", **overrides})
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.check_config(config)


@pytest.mark.parametrize("overrides, message", [
    ({"model.guidance_embedding": True}, "only guided consistency distillation provides"),
    ({**EDM, "training.objective": "ct", "training.ct_s0": 10, "training.ct_s1": 10}, "must exceed training.ct_s0"),
    ({**EDM, "training.objective": "ict", "training.cd_skip": 2}, "training.cd_skip is read by"),
    ({"optim.beta2": 1.0}, "optim.beta2 must be in [0, 1)"),
    ({"optim.optimizer": "SGD"}, "unknown optim.optimizer 'SGD'; valid: ['Adam', 'AdamW', 'RAdam']"),
])
def test_other_objective_and_optimizer_errors(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_lib.check_config(tiny_config(**overrides))


@pytest.mark.parametrize("name, reference", [("Adam", optax.adam), ("RAdam", optax.radam)])
def test_optimizer_reads_beta2(name, reference):
    """optim.optimizer / beta2 select optax's Adam / RAdam with (lr, β₁, β₂, ε): equal updates over 7 steps
    (RAdam's rectification starts after its first steps; no clipping)."""
    optim = tiny_config(**{"optim.optimizer": name, "optim.beta2": 0.95, "optim.lr": 1e-2, "optim.grad_clip": -1.0}).optim
    mine, ref = state_lib.get_optimizer(optim), reference(1e-2, b1=optim.beta1, b2=0.95, eps=optim.eps)
    params = {"params": {"w": jnp.linspace(-1.0, 1.0, 5)}}
    s_mine, s_ref = mine.init(params), ref.init(params["params"])
    for k in range(7):
        g = {"params": {"w": jnp.sin(jnp.arange(5.0) + k)}}
        u_mine, s_mine = mine.update(g, s_mine, params)
        u_ref, s_ref = ref.update(g["params"], s_ref, params["params"])
        np.testing.assert_allclose(u_mine["params"]["w"], u_ref["w"], rtol=1e-6, atol=1e-9)


# Runs on the digits (module fixture) -------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{teacher, guided, lora}: (config, workdir) of a 2-step class-conditional EDM teacher and two
    2-step students distilled from it."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(data_dir, "array_record")
    common = {**TINY, "data.data_dir": data_dir}
    out = {"teacher": (override(load_config("digits_edm_cond.py"), common), tmp_path_factory.mktemp("teacher"))}
    for name, variant in (("guided", "full"), ("lora", "lora")):
        config = override(digits_lcm.get_config(variant), {**common, **STUDENT})
        config.training.teacher_workdir = str(out["teacher"][1])
        out[name] = (config, tmp_path_factory.mktemp(name))
    for name in ("teacher", "guided", "lora"):
        trainer.train_model(*out[name])
    return out


def _teacher_fn(teacher_config, teacher_apply):
    """The library teacher: the EDM-preconditioned network's score, class-conditional (y=None: null class)."""
    precond = Precond.edm(float(teacher_config.model.sigma_data))
    return lambda params: (lambda x, sigma, y=None: score.get_score_fn(EDMSDE(), teacher_apply, params,
                                                                      precond=precond, y=y)(x, sigma))


def _batch(s):
    return {**jax.tree_util.tree_map(lambda v: jnp.asarray(v[0]), s.data.chunk(0, 1)), "index": jnp.arange(8)}


def test_guided_student_starts_as_the_teacher_and_its_loss_is_the_library_objective(runs, tmp_path):
    """Step 0 of guided CD: the student is the teacher's parameters plus a zero w-embedding; the driver's
    loss equals `guided_cd_objective` (w ~ U[1, 4], skip 2 of 6 levels, Heun, EMA target) of the
    library on the same batch, key and parameters; the levels are k = 2 apart."""
    config, _ = runs["guided"]
    s = build.setup(config, tmp_path)
    params, teacher = s.state.params["params"], s.teacher_params["params"]
    assert set(params) - set(teacher) == {"guidance_embed"}
    assert all(not np.any(np.asarray(v)) for v in jax.tree_util.tree_leaves(params["guidance_embed"]))
    for (path, a), (_, b) in zip(*(jax.tree_util.tree_flatten_with_path({k: t[k] for k in teacher})[0]
                                   for t in (params, teacher))):
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
    batch, rng, context = _batch(s), jax.random.PRNGKey(5), context_from_state(s.state, s.teacher_params)
    loss, aux = jax.jit(s.objective(True))(s.state.params, rng, batch, context)
    t_apply = registry.make_apply_fn(registry.get_model(image_condition.network_config(s.teacher.config)))
    ref = consistency.guided_cd_objective(s.apply_fn, _teacher_fn(s.teacher.config, t_apply), w_range=(1.0, 4.0),
                                          skip=2, num_scales=6, solver="heun")
    ref_loss, ref_aux = jax.jit(ref)(s.state.params, rng, batch, context)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    w = np.asarray(aux["w"])
    assert np.all((w >= 1.0) & (w <= 4.0)) and np.ptp(w) > 0
    grid = np.asarray(consistency.karras_sigma(jnp.arange(6), 6))
    lo = np.searchsorted(grid, np.asarray(aux["sigma_target"]) * (1 - 1e-6))
    np.testing.assert_allclose(np.asarray(aux["sigma"]), grid[lo + 2], rtol=1e-6)


def _moved(tree, key=1, scale=0.2):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [v + scale * jax.random.normal(k, v.shape, v.dtype)
                                                  for v, k in zip(leaves, keys)])


def _library_sample(config, apply_fn, params, n, key, **cond):
    f = consistency.get_consistency_fn(apply_fn, params, 0.002, 0.5, **cond)
    return np.asarray(consistency_sample(f, key, (n, 8, 8, 1), (80.0, 0.821), 0.002)[0])


def test_guided_sampling_conditions_on_class_and_w(runs):
    """`--mode=sample` of the guided student: two consistency steps with labels i mod 10 and w =
    sampling.guidance_weight, equal to the library's on the same (moved) parameters and key; w acts."""
    config, workdir = runs["guided"]
    s = modes.restored_setup(config, workdir)
    assert int(s.state.step) == 2
    s.state = s.state.replace(ema_params=_moved(s.state.ema_params))
    n, key = config.eval.num_samples, build.stream_key(config, "sample")
    x, info = modes.draw_samples(s, config.sampling.method, n, key)
    y = jnp.arange(n) % 10
    ref = _library_sample(config, s.apply_fn, s.state.ema_params, n, key, y=y, w=jnp.full((n,), 2.0))
    assert info["nfe"] == 2
    np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    other = _library_sample(config, s.apply_fn, s.state.ema_params, n, key, y=y, w=jnp.zeros((n,)))
    assert np.abs(other - ref).max() > 1e-3 * np.abs(ref).max()
    out = modes.run_sample(config, workdir)
    assert np.load(out["path"])["samples"].shape == (10, 8, 8, 1)


def test_lora_student_trains_the_adapter_over_the_frozen_teacher(runs, tmp_path):
    """LCM-LoRA: the state holds only the rank-4 adapter (B = 0 at step 0, so the student's loss is
    that of a full student started from the teacher at the same fixed w); after 2 steps B moved, and
    the driver's samples (merged W + sAB) equal the unmerged frozen-base forward's to rounding."""
    config, workdir = runs["lora"]
    fresh = build.setup(config, tmp_path / "fresh")
    entries = lora.adapter_entries(fresh.state.params)
    assert entries and all(not np.any(np.asarray(b)) for _, b in entries.values())
    # an adapted m×n kernel (min(m, n) >= 16 here) has r(m + n) <= mn(r/16 + r/144) = 0.28 mn entries at r = 4
    assert registry.count_params(fresh.state.params) < 0.3 * registry.count_params(fresh.teacher_params)
    full = override(copy.deepcopy(config), {})
    for key in ("lora_rank", "lora_alpha"):
        del full.training[key]
    full_s = build.setup(full, tmp_path / "full")  # a full student starts from the teacher's parameters
    batch, rng = _batch(fresh), jax.random.PRNGKey(7)
    loss = jax.jit(fresh.objective(True))(fresh.state.params, rng, batch,
                                          context_from_state(fresh.state, fresh.teacher_params))[0]
    full_loss = jax.jit(full_s.objective(True))(full_s.state.params, rng, batch,
                                                context_from_state(full_s.state, full_s.teacher_params))[0]
    np.testing.assert_allclose(loss, full_loss, rtol=1e-5)

    s = modes.restored_setup(config, workdir)
    assert int(s.state.step) == 2
    assert any(np.any(np.asarray(b)) for _, b in lora.adapter_entries(s.state.params).values())
    n, key = config.eval.num_samples, build.stream_key(config, "sample")
    x, _ = modes.draw_samples(s, config.sampling.method, n, key)
    scale = build.student_lora_scale(config)
    assert scale == 1.0
    unmerged = lora.lora_apply_fn(s.apply_fn, s.teacher_params, scale)
    ref = _library_sample(config, unmerged, s.state.ema_params, n, key, y=jnp.arange(n) % 10)
    np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_lora_student_needs_the_teachers_network(runs, tmp_path):
    config, _ = runs["lora"]
    with pytest.raises(ValueError, match="a LoRA student adapts the teacher's network"):
        build.setup(override(copy.deepcopy(config), {"model.nf": 8}), tmp_path)
    unguided_teacher = override(copy.deepcopy(runs["guided"][0]), {"training.teacher_workdir": str(runs["guided"][1])})
    with pytest.raises(ValueError, match="must hold a score model trained with training.objective = 'dsm'"):
        build.setup(unguided_teacher, tmp_path / "b")
