"""The Inception fixture's weight recipe, shared by the tests that build the fixture's network (a
module, so test files never import each other)."""
import functools
import hashlib
import json
import pathlib

import numpy as np


def regenerate_state_dict(spec_path: pathlib.Path) -> dict[str, np.ndarray]:
    """The fixture's weight recipe: per entry, z ~ N(0, 1) from default_rng(seed), then the kind's rule.
    Built (and checked against the spec's hashes) once per process: a new dict of read-only arrays."""
    return dict(_state_dict(pathlib.Path(spec_path).resolve()))


@functools.lru_cache(maxsize=None)
def _state_dict(spec_path: pathlib.Path) -> dict[str, np.ndarray]:
    rules = {
        "conv_weight": lambda z, e: z * (1.0 / np.sqrt(e["fan_in"])),
        "linear_weight": lambda z, e: z * (1.0 / np.sqrt(e["fan_in"])),
        "linear_bias": lambda z, e: z * 0.1,
        "bn_weight": lambda z, e: 1.0 + 0.1 * z,
        "bn_bias": lambda z, e: 0.1 * z,
        "bn_running_mean": lambda z, e: 0.1 * z,
        "bn_running_var": lambda z, e: 1.0 + 0.1 * np.abs(z),
    }
    state = {}
    for entry in json.loads(spec_path.read_text())["entries"]:
        if entry["kind"] == "bn_num_batches_tracked":
            state[entry["name"]] = np.zeros((), np.int64)
            continue
        z = np.random.default_rng(entry["seed"]).standard_normal(tuple(entry["shape"]))
        value = rules[entry["kind"]](z, entry).astype(np.float32)
        assert hashlib.sha256(value.tobytes()).hexdigest() == entry["sha256_f32_le"], entry["name"]
        value.flags.writeable = False  # shared between the tests of a session
        state[entry["name"]] = value
    return state


@functools.lru_cache(maxsize=None)
def fixture_variables(spec_path: pathlib.Path):
    """`inception.from_torch_state_dict` of the recipe's weights, converted once per process (JAX arrays)."""
    from sdejax.evaluation import inception

    return inception.from_torch_state_dict(regenerate_state_dict(spec_path))
