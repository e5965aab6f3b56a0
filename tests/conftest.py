"""Shared test setup: persistent XLA compilation cache and fixture paths."""
import os
import pathlib

# Tests run tiny programs, so XLA's compile time dominates. LLVM at -O1 compiled a tiny U-Net's init 2.1x
# and its gradient 1.1x faster than the default, and ran the gradient as fast (2 CPU cores); -O0 compiled
# faster still but ran 1.6x slower, which the execution-heavy tests (the quick start, Inception) pay for.
# Set before JAX starts its backend; child processes inherit it (helpers.subprocess_env).
FAST_COMPILE = "--xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

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


# The longest files (measured, cold cache) start first, longest first, so the two xdist workers finish
# together instead of one running the digits CLI test alone at the end (pytest.ini turns off xdist's own
# reordering of files by their number of tests, --no-loadscope-reorder, which would undo this order).
SLOW_FIRST = ("test_training.py", "test_image_condition_driver.py", "test_digits_cli.py", "test_models.py",
              "test_fast_solvers.py", "test_guided_cd_driver.py", "test_controlnet.py", "test_conditional_driver.py",
              "test_latent_driver.py", "test_preemption.py", "test_udm_driver.py", "test_parallel.py",
              "test_fid_workflow.py", "test_vq_latent_driver.py", "test_lora.py", "test_ode_sde_samplers.py",
              "test_classifier.py", "test_blurring.py", "test_guided_distillation.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
