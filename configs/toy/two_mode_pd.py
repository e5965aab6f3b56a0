"""Progressive distillation (Salimans & Ho 2022) of the quick-start two-mode mixture on the VP SDE:
a v-prediction DSM teacher (`get_teacher_config`, DDIM with N₀ = 1024 steps) distilled 1024 → 512 →
… → 1 DDIM steps, `pd_steps_per_stage` optimizer steps per halving, each stage end a snapshot
(`experiments/toy_progressive.py` trains both and writes the table)."""
from configs.default_toy import get_config as default_config


def get_teacher_config():
    config = default_config()
    config.model.prediction = "v"  # x̂₀ = α z − σ v stays bounded at both ends of the schedule
    config.eval.after_training = False
    return config


def get_config(teacher_workdir: str = "experiments/results/toy_progressive/teacher"):
    config = get_teacher_config()
    t = config.training
    t.objective = "pd"
    t.teacher_workdir = teacher_workdir
    t.pd_teacher_steps = 1024
    t.pd_steps_per_stage = 500
    t.n_iters = 10 * t.pd_steps_per_stage
    t.snapshot_freq = t.snapshot_freq_for_preemption = t.eval_freq = t.log_freq = t.pd_steps_per_stage
    t.n_jitted_steps = 250
    config.optim.lr = 1e-3
    config.optim.warmup = 0
    return config
