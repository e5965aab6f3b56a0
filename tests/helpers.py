"""Helpers shared by tests (a module, so test files never import each other): the repository root,
child-process environment and ports, comparing training states, running the CLI in-process."""
import os
import socket

import jax
import numpy as np

from configs_helper import ROOT

__all__ = ["ROOT", "assert_states_equal", "free_port", "state_leaves", "run_cli", "subprocess_env"]


def subprocess_env(**extra) -> dict:
    """Environment for a child JAX process: the test cache and XLA flags (conftest's settings; an
    `XLA_FLAGS` in `extra` is appended), CPU only, and `tests/` on the path (so a child script can
    import these helpers)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
               JAX_COMPILATION_CACHE_DIR=os.environ.get("SDEJAX_TEST_CACHE", str(ROOT / ".jax_cache")),
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    flags = " ".join(f for f in (os.environ.get("XLA_FLAGS"), extra.pop("XLA_FLAGS", None)) if f)
    env.update(extra, **({"XLA_FLAGS": flags} if flags else {}))
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a coordinator address)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_leaves(state):
    """(path, leaf) pairs and the treedef of `state`, fetched to the host."""
    return jax.tree_util.tree_flatten_with_path(jax.device_get(state))


def assert_states_equal(a, b):
    """Two pytrees (training states) have the same structure and bitwise-equal leaves."""
    (la, ta), (lb, tb) = state_leaves(a), state_leaves(b)
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def run_cli(monkeypatch, *args, config=None):
    """Parse flags and run `cli.main` in-process (config overrides are read from sys.argv);
    `config` defaults to the CLI's default config file."""
    from absl import flags

    from sdejax import cli

    argv = ["sdejax", f"--config={cli.DEFAULT_CONFIG if config is None else config}", *args]
    monkeypatch.setattr("sys.argv", argv)
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # per-parse override flags
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    cli.main(["sdejax"])
