"""Shared test setup: persistent XLA compilation cache and fixture paths."""
import os
import pathlib

import jax
import pytest

_CACHE = os.environ.get("SDEJAX_TEST_CACHE", str(pathlib.Path(__file__).resolve().parent.parent / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

FIXTURES = pathlib.Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
    """`../shared/fixtures` beside the checkout (reference outputs of score_sde and pytorch-fid)."""
    if not FIXTURES.exists():
        pytest.fail(f"fixtures not found at {FIXTURES}; the checkout must sit beside shared/")
    return FIXTURES
