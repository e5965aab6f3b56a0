"""Consistency models in the driver (`training.objective` = "ct" / "ict" / "cd"): config checks, the
context the objective sees (true step, target θ⁻, teacher), the target EMA, bitwise resume, the
consistency sampler of `--mode=sample`, and a DSM teacher distilled by CD. Tiny MLP, toy data."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs_helper import N, tiny_config
from helpers import assert_states_equal
from sdejax.consistency import ct_ema_rate
from sdejax.training import build, config as config_lib, modes, trainer
from sdejax.training import step as step_lib
from sdejax.training.objective import context_from_state

EDM = {"training.sde": "edmsde", "model.sigma_min": 0.002, "model.sigma_max": 80.0, "model.prediction": "x0",
       "model.embedding_type": "positional"}


def ct_config(**overrides):
    return tiny_config(**{**EDM, "training.objective": "ct", "training.ct_total_steps": 2 * N, **overrides})


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


# Config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"training.objective": "flow"}, "unknown training.objective 'flow'; valid: ['dsm', 'ct', 'ict', 'cd', 'pd', 'masked', 'udm']"),
    ({**EDM, "training.objective": "cd"}, "needs training.teacher_workdir"),
    ({"training.objective": "ct"}, "set training.sde = 'edmsde'; got 'vpsde'"),
    ({**EDM, "training.objective": "ict", "eval.enable_bpd": True}, "set eval.enable_bpd = False"),
    ({"training.cd_solver": "heun"}, "training.cd_solver is read by training.objective in ['cd'] only"),
    ({**EDM, "training.objective": "ct", "training.target_ema": 0.9}, "training.target_ema is read by"),
    ({**EDM, "training.objective": "cd", "training.teacher_workdir": "/x", "training.cd_solver": "rk4"},
     "unknown training.cd_solver 'rk4'; valid: ['heun', 'euler']"),
    ({**EDM, "training.objective": "ct", "sampling.consistency_sigmas": (0.8, 80.0)}, "strictly decreasing"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                       .replace(")", r"\)")):
        config_lib.check_config(tiny_config(**overrides))


def test_dsm_default_and_ict_keep_no_target(tmp_path):
    """No `training.objective` (DSM) and iCT (θ⁻ = sg(θ)): no target in the state, no teacher; an iCT
    step is finite and reads the iCT schedule (N(0) = 11 levels)."""
    s = build.setup(tiny_config(), tmp_path / "dsm")
    assert s.state.target_params is None and s.teacher_params is None and build.target_rate(s.config) is None
    config = ct_config(**{"training.objective": "ict"})
    s = build.setup(config, tmp_path / "ict")
    assert s.state.target_params is None and build.target_rate(config) is None
    batch = {**jax.tree_util.tree_map(lambda v: v[0], s.data.chunk(0, 1)), "index": jnp.arange(32)}
    loss, aux = s.objective(True)(s.state.params, jax.random.PRNGKey(0), batch, context_from_state(s.state))
    assert np.isfinite(loss) and int(aux["num_scales"]) == 11


# The teacher (module fixture) and the context ----------------------------------------------------
@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-step DSM score model on the EDM schedule."""
    workdir = tmp_path_factory.mktemp("teacher")
    trainer.train_model(tiny_config(**{**EDM, "training.n_iters": 2}), workdir)
    return workdir


def cd_config(teacher_dir, **overrides):
    return tiny_config(**{**EDM, "training.objective": "cd", "training.teacher_workdir": str(teacher_dir),
                          "training.num_scales": 6, "training.target_ema": 0.9, **overrides})


def test_context_carries_step_target_and_teacher(teacher_dir, tmp_path):
    """The compiled driver step hands the objective the true step, θ⁻ of the state and the teacher's
    params (recorded by a host callback), and CD's student starts from the teacher."""
    s = build.setup(cd_config(teacher_dir, **{"training.n_iters": 3}), tmp_path)
    teacher_sum = float(sum(x.sum() for x in leaves(s.teacher_params)))
    assert_states_equal(s.state.params, s.teacher_params)  # same network: θ = θ⁻ = teacher at k = 0
    seen, real = [], s.objective(True)

    def record(step, target, teacher):
        seen.append((int(step), float(target), float(teacher)))

    def objective(params, rng, batch, context):
        total = lambda tree: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
        jax.debug.callback(record, context.step, total(context.target_params), total(context.teacher_params))
        return real(params, rng, batch, context)

    s.objective_fn = lambda train: objective
    multi_step, state = trainer.make_multi_step(s), s.placement.replicate(s.state)
    targets = []
    for k in range(3):
        targets.append(float(sum(x.sum() for x in leaves(state.target_params))))
        state, metrics = multi_step(state, s.placement.shard_batches(s.data.chunk(k, 1)))
        assert np.isfinite(metrics["loss"]).all()
    assert [x[0] for x in seen] == [0, 1, 2]
    np.testing.assert_allclose([x[1] for x in seen], targets, rtol=1e-5)
    np.testing.assert_allclose([x[2] for x in seen], teacher_sum, rtol=1e-6)
    assert targets[1] != targets[2]


def test_target_ema_closed_form(tmp_path):
    """After 2 steps θ⁻ = μ(1)(μ(0) θ₀ + (1 − μ(0)) θ₁) + (1 − μ(1)) θ₂, μ = ct_ema_rate(k, K)."""
    config = ct_config()
    s = build.setup(config, tmp_path)
    train_step = jax.jit(step_lib.make_train_step(s.objective(True), s.tx, config.model.ema_rate,
                                                  target_rate=build.target_rate(config)))
    states = [s.state]
    for k in range(2):
        states.append(train_step(states[-1], jax.tree_util.tree_map(lambda v: v[0], s.data.chunk(k, 1)))[0])
    mu0, mu1 = (float(ct_ema_rate(k, 2 * N)) for k in (0, 1))
    assert mu0 != 1.0 and 0 < mu1 < 1
    want = jax.tree_util.tree_map(lambda p0, p1, p2: mu1 * (mu0 * p0 + (1 - mu0) * p1) + (1 - mu1) * p2,
                                  *(st.params for st in states))
    for got, ref in zip(leaves(states[2].target_params), leaves(want)):
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(leaves(states[2].target_params)[0], leaves(states[2].params)[0])


# Training runs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_half_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ct_half")
    trainer.train_model(ct_config(**{"training.n_iters": N}), workdir)
    return workdir


def test_ct_resume_is_bitwise_exact(ct_half_run, tmp_path):
    """2N CT steps straight == N steps + restore + N steps, θ⁻ included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    trainer.train_model(ct_config(), straight)
    shutil.copytree(ct_half_run / "checkpoints", resumed / "checkpoints")
    trainer.train_model(ct_config(), resumed)
    a, b = build.setup(ct_config(), straight).state, build.setup(ct_config(), resumed).state
    assert int(a.step) == 2 * N and a.target_params is not None
    assert_states_equal(a, b)


def test_run_sample_of_a_ct_run(ct_half_run):
    """`--mode=sample` of a CT run: consistency sampling, NFE = len(sampling.consistency_sigmas)."""
    config = ct_config(**{"training.n_iters": N, "sampling.consistency_sigmas": (80.0, 0.821)})
    out = modes.run_sample(config, ct_half_run)
    assert out["nfe"] == 2 and out["step"] == N
    x = np.load(out["path"])["samples"]
    assert x.shape == (config.eval.num_samples, 2) and np.isfinite(x).all()
    one = modes.run_sample(ct_config(**{"training.n_iters": N}), ct_half_run)
    assert one["nfe"] == 1


def test_cd_from_a_dsm_teacher(teacher_dir, tmp_path):
    """A CD run from the 2-step DSM teacher trains a few steps, evaluates its loss and reports
    consistency samples (no bits/dim)."""
    config = cd_config(teacher_dir, **{"training.n_iters": 4, "training.n_jitted_steps": 2,
                                       "training.eval_freq": 2, "eval.after_training": True})
    out = trainer.train_model(config, tmp_path)
    assert out["steps"] == 4 and np.isfinite(out["final_loss"]) and np.isfinite(out["heldout_loss"])
    assert set(out["samplers"]) == {"consistency"} and out["samplers"]["consistency"]["nfe"] == 1
    assert "heldout" not in out
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 4
    state = build.setup(config, tmp_path).state
    assert int(state.step) == 4 and state.target_params is not None
