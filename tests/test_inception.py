"""FID Inception-v3 parity with pytorch-fid on the synthetic-weight fixture (inception_fid/)."""
import hashlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inception_helper import fixture_variables, regenerate_state_dict
from sdejax.evaluation import inception, inception_weights

PROBED = ("Conv2d_1a_3x3", "block0_maxpool1", "Mixed_5b", "Mixed_6e", "Mixed_7c")


def rel_err(ours, ref) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return fixtures_dir / "inception_fid"


@pytest.fixture(scope="module")
def state_dict(fixture):
    return regenerate_state_dict(fixture / "params_spec.json")


@pytest.fixture(scope="module")
def variables(fixture):
    return fixture_variables(fixture / "params_spec.json")


@pytest.fixture(scope="module")
def io(fixture):
    with np.load(fixture / "io.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def batch(io):
    """The fixture's 3 small and 1 large image as one (4, 299, 299, 3) batch (one compile)."""
    small = jnp.asarray(io["input/x_small"].transpose(0, 2, 3, 1))
    large = jnp.asarray(io["input/x_large"].transpose(0, 2, 3, 1))
    return jnp.concatenate([inception.resize(small), large])


@pytest.fixture(scope="module")
def outputs(variables, batch):
    run = jax.jit(lambda v, x: inception.apply(v, x, intermediates=True))
    return jax.tree.map(np.asarray, run(variables, batch))


def test_preprocess_matches_torch_resize(io):
    small = jnp.asarray(io["input/x_small"].transpose(0, 2, 3, 1))
    ours = np.asarray(inception.preprocess(small))[0, :, :, 0]
    assert np.abs(ours - io["preprocessed/img0_ch0"]).max() <= 2e-5
    large = io["input/x_large"].transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(inception.preprocess(jnp.asarray(large))), 2 * large - 1)


def torch_bilinear_1d(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """torch's bilinear rule, align_corners=False: src = max((dst + 0.5) * in / out - 0.5, 0)."""
    size = x.shape[axis]
    src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    lam = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    return np.take(x, lo, axis) * (1 - lam) + np.take(x, hi, axis) * lam


def test_downsampling_resize_has_no_antialias():
    x = np.random.default_rng(0).random((1, 411, 350, 3))
    ref = torch_bilinear_1d(torch_bilinear_1d(x, 299, 1), 299, 2)
    ours = np.asarray(inception.resize(jnp.asarray(x, jnp.float32)))
    assert np.abs(ours - ref).max() < 1e-4  # float32 sample positions; antialiasing would move ~1e-1


def test_pool3_and_logits(outputs, io, variables):
    assert outputs["pool3"].shape == (4, 2048) and outputs["logits"].shape == (4, 1008)
    assert rel_err(outputs["pool3"], io["pool3"]) <= 2e-6
    assert rel_err(outputs["logits"], io["logits"]) <= 5e-6
    no_bias = outputs["logits"] - variables["params"]["fc"]["bias"]
    assert rel_err(no_bias, io["logits_no_bias"]) <= 5e-6


@pytest.mark.parametrize("stage", inception.STAGES)
def test_channel_means(outputs, io, stage):
    ours = outputs["intermediates"][stage].astype(np.float64).mean(axis=(1, 2))
    assert rel_err(ours, io[f"chanmean/{stage}"]) <= 2e-6


@pytest.mark.parametrize("stage", PROBED)
def test_probes(outputs, io, stage):
    channels = io[f"probe/{stage}/channels"]
    ours = outputs["intermediates"][stage].transpose(0, 3, 1, 2)[:, channels]
    assert rel_err(ours, io[f"probe/{stage}"]) <= 2e-5


def test_apply_without_intermediates(variables, batch, outputs):
    plain = jax.jit(inception.apply)(variables, batch)
    assert set(plain) == {"pool3", "logits"}
    np.testing.assert_allclose(plain["pool3"], outputs["pool3"], rtol=0, atol=1e-6)


def test_float64_matches_torch_float64(fixture, tmp_path, state_dict):
    """In JAX's float64 mode the network matches torch's float64 run to 1e-9 (own process)."""
    weights = tmp_path / "w.npz"
    inception_weights.save_state_dict(state_dict, weights)
    script = textwrap.dedent(f"""
        import jax, numpy as np
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp
        from sdejax.evaluation import inception
        v = jax.tree.map(lambda a: np.asarray(a, np.float64), inception.load_weights({str(weights)!r}))
        io = np.load({str(fixture / "io.npz")!r})
        small = jnp.asarray(io["input/x_small"].transpose(0, 2, 3, 1).astype(np.float64))
        large = jnp.asarray(io["input/x_large"].transpose(0, 2, 3, 1).astype(np.float64))
        out = jax.jit(inception.apply)(v, jnp.concatenate([inception.resize(small), large]))
        for key in ("pool3", "logits"):
            ref = io["f64/" + key]
            print(key, np.abs(np.asarray(out[key]) - ref).max() / np.abs(ref).max())
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    errors = dict(line.split() for line in result.stdout.strip().splitlines())
    assert float(errors["pool3"]) <= 1e-9 and float(errors["logits"]) <= 1e-9, errors


def test_npz_round_trip_and_checksum(tmp_path, state_dict, variables, monkeypatch):
    path = tmp_path / "inception.npz"
    inception_weights.save_state_dict(state_dict, path)
    with np.load(path) as saved:
        assert not any(name.endswith("num_batches_tracked") for name in saved.files)
    monkeypatch.setenv(inception_weights.ENV_VAR, str(path))
    loaded = inception.load_weights()
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    assert inception.weights_sha256(loaded) == inception.weights_sha256(variables)
    changed = dict(state_dict, **{"fc.bias": state_dict["fc.bias"] + 1})
    assert inception.weights_sha256(inception.from_torch_state_dict(changed)) != inception.weights_sha256(variables)


def test_pth_needs_torch_or_loads(tmp_path, state_dict, variables):
    path = tmp_path / inception_weights.WEIGHTS_FILE
    try:
        import torch
    except ImportError:
        path.write_bytes(b"not read")
        with pytest.raises(ImportError, match="convert_inception.py"):
            inception.load_weights(path)
        return
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)
    jax.tree.map(np.testing.assert_array_equal, inception.load_weights(path), variables)


def test_missing_weights_explain_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv(inception_weights.ENV_VAR, raising=False)
    for path in (None, tmp_path / "absent.npz"):
        with pytest.raises(FileNotFoundError) as err:
            inception.load_weights(path)
        message = str(err.value)
        assert inception_weights.WEIGHTS_FILE in message and "fid_weights" in message
        assert "convert_inception.py" in message and inception_weights.ENV_VAR in message


def test_state_dict_errors(state_dict):
    missing = {k: v for k, v in state_dict.items() if k != "Mixed_6b.branch7x7_2.bn.running_var"}
    with pytest.raises(KeyError, match="Mixed_6b.branch7x7_2.bn.running_var"):
        inception.from_torch_state_dict(missing)
    with pytest.raises(KeyError, match="AuxLogits.fc.weight"):
        inception.from_torch_state_dict({**state_dict, "AuxLogits.fc.weight": np.zeros((1000, 768))})
    with pytest.raises(ValueError, match="fc.weight"):
        inception.from_torch_state_dict({**state_dict, "fc.weight": np.zeros((1000, 2048))})


def test_bad_images_name_the_argument():
    with pytest.raises(ValueError, match="images"):
        inception.preprocess(jnp.zeros((2, 3, 32, 32)))
    with pytest.raises(TypeError, match="images"):
        inception.preprocess(jnp.zeros((2, 32, 32, 3), jnp.uint8))


def test_provenance_says_whether_weights_are_the_standard_file(tmp_path, state_dict, variables):
    """The .pth's own sha256, or the one an .npz recorded at conversion, against the standard file's."""
    pth = tmp_path / inception_weights.WEIGHTS_FILE
    pth.write_bytes(b"not the weights")
    assert inception_weights.provenance(pth) == {"file": str(pth), "standard": False,
                                                 "source_sha256": hashlib.sha256(b"not the weights").hexdigest()}
    for source, standard in ((inception_weights.STANDARD_SHA256, True), ("0" * 64, False), (None, False)):
        path = tmp_path / f"{source}.npz"
        inception_weights.save_state_dict(state_dict, path, source_sha256=source)
        assert inception_weights.provenance(path) == {"file": str(path), "source_sha256": source,
                                                      "standard": standard}
        jax.tree.map(np.testing.assert_array_equal, inception.load_weights(path), variables)
    # torch.hub names files by the first 8 hex digits of their sha256.
    assert inception_weights.WEIGHTS_FILE.endswith(f"-{inception_weights.STANDARD_SHA256[:8]}.pth")
