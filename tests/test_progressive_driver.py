"""Progressive distillation in the driver (`training.objective = "pd"`): config checks, the stage
schedule N(k) and the teacher swap θ⁻ ← θ at stage ends, bitwise resume across a stage boundary and
`--mode=sample` by DDIM on the last completed stage's step count. Tiny MLP, toy data, VP schedule."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs_helper import tiny_config
from helpers import assert_states_equal
from sdejax.sampling.ddim import ddim_sample
from sdejax.training import build, config as config_lib, modes, trainer
from sdejax.training import step as step_lib
from sdejax.training.build import stream_key
from sdejax.training.objective import context_from_state

K, N0 = 4, 8  # steps per stage, the DSM teacher's DDIM steps (3 stages: 4, 2, 1 student steps)
PHASES = {"training.n_jitted_steps": 2, "training.log_freq": 2, "training.eval_freq": 2,
          "training.snapshot_freq": 2, "training.snapshot_freq_for_preemption": 2}


def leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-step DSM model of the tiny VP config (the PD student shares its network)."""
    workdir = tmp_path_factory.mktemp("teacher")
    trainer.train_model(tiny_config(**{"training.n_iters": 2, **PHASES}), workdir)
    return workdir


def pd_config(teacher_dir, **overrides):
    return tiny_config(**{**PHASES, "training.objective": "pd", "training.teacher_workdir": str(teacher_dir),
                          "training.pd_teacher_steps": N0, "training.pd_steps_per_stage": K,
                          "training.n_iters": 2 * K, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"training.pd_teacher_steps": 12}, "training.pd_teacher_steps must be a power of two >= 2"),
    ({"training.n_iters": 3 * K + 1}, "exceeds log2"),
    ({"training.snapshot_freq": 3}, "must divide training.pd_steps_per_stage"),
    ({"training.objective": "dsm"}, "is read by training.objective in"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        config_lib.check_config(pd_config("/nowhere", **overrides))
    with pytest.raises(ValueError, match="needs training.teacher_workdir"):
        config = pd_config("/nowhere")
        del config.training["teacher_workdir"]
        config_lib.check_config(config)


def test_stage_schedule_and_teacher_swap(teacher_dir, tmp_path):
    """θ = θ⁻ = the teacher's EMA at k = 0; the objective sees N(k) = N₀/2^(⌊k/K⌋+1) (aux); θ⁻ stays the
    teacher bitwise through stage 0 (μ = 1: 1·θ⁻ + 0·θ) and becomes θ_K bitwise after step K (μ = 0),
    then stays θ_K — the closed form of θ⁻ ← μθ⁻ + (1 − μ)θ with `pd_target_rate`."""
    config = pd_config(teacher_dir)
    s = build.setup(config, tmp_path)
    teacher = build.load_teacher(config, jnp.asarray(s.data.heldout["x"]))
    assert s.teacher is None  # the teacher lives in the state
    assert_states_equal(s.state.params, teacher.params)
    assert_states_equal(s.state.target_params, teacher.params)
    obj = s.objective(True)
    train_step = jax.jit(step_lib.make_train_step(obj, s.tx, config.model.ema_rate,
                                                  target_rate=build.target_rate(config)))
    state, seen = s.state, []
    for k in range(K + 2):
        batch = jax.tree_util.tree_map(lambda v: v[0], s.data.chunk(k, 1))
        seen.append(int(obj(state.params, state.rng, {**batch, "index": jnp.arange(32)},
                            context_from_state(state))[1]["num_steps"]))
        state = train_step(state, batch)[0]
        if k < K - 1:
            assert_states_equal(state.target_params, teacher.params)
        if k == K - 1:
            theta_k = state.params
            assert not np.array_equal(leaves(theta_k)[0], leaves(teacher.params)[0])
        if k >= K - 1:
            assert_states_equal(state.target_params, theta_k)
    assert seen == [N0 // 2] * K + [N0 // 4] * 2


@pytest.fixture(scope="module")
def pd_runs(teacher_dir, tmp_path_factory):
    """A run straight to 2K steps, and one of 3 steps (stage 0) resumed to 2K."""
    straight, resumed = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("resumed")
    trainer.train_model(pd_config(teacher_dir), straight)
    trainer.train_model(pd_config(teacher_dir, **{"training.n_iters": 3}), resumed)
    trainer.train_model(pd_config(teacher_dir), resumed)
    return straight, resumed


def test_resume_across_a_stage_boundary_is_bitwise_exact(teacher_dir, pd_runs):
    """2K steps straight == 3 steps + restore + 2K − 3 steps (the θ⁻ swap at step K in between);
    the stage-0 end (step K) is a retained snapshot."""
    config = pd_config(teacher_dir)
    a, b = (build.setup(config, workdir).state for workdir in pd_runs)
    assert int(a.step) == 2 * K
    assert_states_equal(a, b)
    assert K in build.setup(config, pd_runs[0]).checkpointer.all_steps()


def test_run_sample_uses_the_last_stage(teacher_dir, pd_runs):
    """After 2 stages `--mode=sample` is DDIM with θ⁻ (the stage-1 student) on N₀/4 = 2 steps: its
    samples are `ddim_sample` of that network on 3 grid points (NFE 2 + denoising; same draws, same
    program up to compilation: rtol 1e-5)."""
    config = pd_config(teacher_dir)
    assert build.pd_sampling_steps(config, 2 * K) == N0 // 4 and build.pd_sampling_steps(config, 0) == N0
    out = modes.run_sample(config, pd_runs[0])
    assert out["nfe"] == N0 // 4 + 1
    s = build.setup(config, pd_runs[0])
    score_fn = build.build_score_fn(config, s.sde, s.apply_fn, s.state.target_params)
    want, _ = ddim_sample(stream_key(config, "sample"), s.sde, score_fn, (config.eval.num_samples, 2),
                          num_steps=N0 // 4 + 1)
    np.testing.assert_allclose(np.load(out["path"])["samples"], want, rtol=1e-5, atol=1e-5)
