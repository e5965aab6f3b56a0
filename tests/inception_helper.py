"""The Inception fixture's weight recipe, shared by the tests that build the fixture's network (a
module, so test files never import each other)."""
import hashlib
import json
import pathlib

import numpy as np


def regenerate_state_dict(spec_path: pathlib.Path) -> dict[str, np.ndarray]:
    """The fixture's weight recipe: per entry, z ~ N(0, 1) from default_rng(seed), then the kind's rule."""
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
        state[entry["name"]] = value
    return state
