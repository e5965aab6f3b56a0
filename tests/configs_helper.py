"""Configs shared by tests (a module, so test files need not import each other): the quick-start
toy config and its tiny variant (an MLP of width 16, 10-step phases), with dotted overrides."""
import importlib.util
import pathlib
from typing import Any

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parent.parent
N = 10  # steps per phase of the tiny config; checkpoints, logs and dispatches every N steps

TINY = {
    "training.batch_size": 32, "training.n_iters": 2 * N, "training.n_jitted_steps": N, "training.log_freq": N,
    "training.eval_freq": N, "training.snapshot_freq": N, "training.snapshot_freq_for_preemption": N,
    "model.features": 16, "model.depth": 1, "model.embedding_size": 16, "model.num_scales": 25,
    "data.num_heldout": 64, "eval.num_samples": 64, "eval.batch_size": 64, "eval.enable_bpd": False,
    "optim.warmup": 0, "eval.after_training": False,
}


def load_config(relative_path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a file under configs/ (e.g. "default_toy.py")."""
    path = ROOT / "configs" / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def override(config: ml_collections.ConfigDict, overrides: dict[str, Any],
             any_type: bool = False) -> ml_collections.ConfigDict:
    """Set dotted keys ("training.batch_size", "seed") in place; returns `config`. With `any_type` a
    key is replaced by a value of any type, as a config file may write it (plain assignment and
    `--config.key=...` overrides are type-checked by ml_collections)."""
    for key, value in overrides.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node[section]
        if any_type and name in node:
            del node[name]
        node[name] = value
    return config


def tiny_config(**overrides: Any) -> ml_collections.ConfigDict:
    """The tiny toy config with `overrides` (dotted keys) applied."""
    return override(load_config("default_toy.py"), {**TINY, **overrides})
