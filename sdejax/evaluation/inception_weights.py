"""Reading and writing the FID Inception-v3 weight file (pytorch-fid's state_dict).

The standard file is ``pt_inception-2015-12-05-6726825d.pth``: a ``torch.save``d state_dict
ported by pytorch-fid from TensorFlow's ``inception-2015-12-05`` graph. sdejax reads it
directly when torch is installed, or reads an ``.npz`` holding the same names and arrays
(made once with ``experiments/convert_inception.py``, which records the source file's sha256 in
it). Nothing is ever downloaded. ``provenance`` says whether a file is (or was converted from) the
standard one: its sha256 is ``STANDARD_SHA256`` (torch.hub's naming convention puts the first 8 hex
digits of a file's sha256 in its name: ``...-6726825d.pth``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import pathlib
from typing import Any, Mapping

import numpy as np

ENV_VAR = "SDEJAX_INCEPTION_WEIGHTS"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
STANDARD_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"  # 95,628,359 bytes
SOURCE_KEY = "_source_sha256"  # the .npz entry holding the sha256 of the .pth it was converted from
WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)

_HOW_TO_GET = f"""\
The FID Inception-v3 weights are the file {WEIGHTS_FILE} (about 95 MB), TensorFlow's
inception-2015-12-05 graph as ported by pytorch-fid. It is a release asset of the
pytorch-fid GitHub repository (release tag `fid_weights`):
    {WEIGHTS_URL}
pytorch-fid caches it in ~/.cache/torch/hub/checkpoints/. sdejax reads the .pth directly when
torch is installed; otherwise convert it once, on any machine with torch, with
    python experiments/convert_inception.py {WEIGHTS_FILE} inception_fid.npz
and pass the .npz by argument/flag or set the environment variable {ENV_VAR}."""


def resolve_path(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The weight file from ``path``, else from ``$SDEJAX_INCEPTION_WEIGHTS``; it must exist."""
    chosen = path if path is not None else os.environ.get(ENV_VAR)
    if chosen is None:
        raise FileNotFoundError(f"no Inception weight file given (argument or ${ENV_VAR}).\n{_HOW_TO_GET}")
    chosen = pathlib.Path(chosen).expanduser()
    if not chosen.is_file():
        raise FileNotFoundError(f"Inception weight file {chosen} does not exist.\n{_HOW_TO_GET}")
    return chosen


def load_state_dict(path: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """Names -> numpy arrays from a ``.npz`` or (with torch installed) a ``.pth`` weight file."""
    file = resolve_path(path)
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            return {name: data[name] for name in data.files if name != SOURCE_KEY}
    if file.suffix in (".pth", ".pt"):
        if importlib.util.find_spec("torch") is None:
            raise ImportError(f"reading {file} needs torch, which is not installed.\n{_HOW_TO_GET}")
        import torch

        state = torch.load(file, map_location="cpu", weights_only=True)
        return {name: tensor.numpy() for name, tensor in state.items()}
    raise ValueError(f"weight file {file} must end in .npz or .pth.\n{_HOW_TO_GET}")


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike,
                    source_sha256: str | None = None) -> None:
    """Write a state_dict as an uncompressed ``.npz`` under the same names (BN counters dropped),
    with the sha256 of the file it came from when given."""
    arrays = {
        name: np.asarray(value)
        for name, value in state_dict.items()
        if not name.endswith("num_batches_tracked")
    }
    if source_sha256 is not None:
        arrays[SOURCE_KEY] = np.array(source_sha256)
    np.savez(path, **arrays)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """{"file", "source_sha256", "standard"} of a weight file: the sha256 of the ``.pth`` itself, or
    the one an ``.npz`` recorded at conversion (None if it recorded none), and whether that is the
    standard file's ``STANDARD_SHA256``."""
    file = resolve_path(path)
    if file.suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            source = str(data[SOURCE_KEY]) if SOURCE_KEY in data.files else None
    else:
        source = file_sha256(file)
    return {"file": os.fspath(file), "source_sha256": source, "standard": source == STANDARD_SHA256}
