"""Shared test setup: persistent XLA compilation cache and fixture paths."""
import os
import pathlib

import jax
import pytest

_CACHE = os.environ.get("SDEJAX_TEST_CACHE", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """`tests/fixtures` (reference outputs of score_sde_pytorch and pytorch-fid; see its README.md)."""
    if not (FIXTURES / "SHA256SUMS").is_file():
        pytest.fail(f"fixtures are missing from tests/fixtures ({FIXTURES}); they are committed with the repository")
    return FIXTURES
