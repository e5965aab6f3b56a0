"""Checksums of a checkpoint folder: written into it before orbax commits it, checked before a restore.

`seal(folder, step)` writes `sdejax_checksums.json`: the sha256 of every file in the folder (the
arrays' bytes as stored, their metadata, the data-iterator state and the config) and a digest of
that list, so that damage to the checksum file itself is told apart from damage to the contents.
The Checkpointer seals from orbax's post-finalization callback, inside the temporary folder that
orbax then renames into place: a step folder either carries its checksums or its save never
completed. Orbax writes two top-level files after the seal: `commit_success.txt` (a marker) is not
covered, and `_CHECKPOINT_METADATA` is covered without its `commit_timestamp_nsecs`.

`verify(folder, step)` returns None for an intact folder, else what is damaged, in words.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Optional

CHECKSUM_FILE = "sdejax_checksums.json"
FORMAT = "sdejax-checkpoint-checksums/1"
UNSEALED = "it has no checksum file (its save never completed, or it predates sdejax's checksums)"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_NOT_COVERED = (CHECKSUM_FILE, "commit_success.txt")
_SHOWN = 5  # problems listed in a report


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(folder: pathlib.Path, name: str) -> str:
    """sha256 of a file's bytes; for the step metadata, of its JSON without the commit time."""
    path = folder / name
    if name == _STEP_METADATA:
        meta = json.loads(path.read_text())
        meta.pop("commit_timestamp_nsecs", None)
        return _sha256(json.dumps(meta, sort_keys=True).encode())
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _covered(folder: pathlib.Path) -> list[str]:
    """Relative paths ('state/_METADATA') of the files the checksums cover, sorted."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in _NOT_COVERED)


def _list_digest(files: dict) -> str:
    return _sha256(json.dumps(files, sort_keys=True).encode())


def seal(folder: pathlib.Path, step: int) -> None:
    """Write the checksum file of `folder` (the checkpoint of `step`), atomically."""
    files = {name: _file_digest(folder, name) for name in _covered(folder)}
    record = {"format": FORMAT, "step": step, "files": files, "digest": _list_digest(files)}
    tmp = folder / f"{CHECKSUM_FILE}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / CHECKSUM_FILE)


def is_sealed(folder: pathlib.Path) -> bool:
    return (folder / CHECKSUM_FILE).is_file()


def _read_record(folder: pathlib.Path, step: int) -> tuple[Optional[dict], Optional[str]]:
    """(the files' checksums, None) or (None, what is wrong with the checksum file)."""
    try:
        record = json.loads((folder / CHECKSUM_FILE).read_text())
        files = record["files"]
        if record["format"] != FORMAT or not isinstance(files, dict):
            raise ValueError(f"not an {FORMAT} record")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"its checksum file {CHECKSUM_FILE} is unreadable ({type(e).__name__}: {e})"
    if record.get("digest") != _list_digest(files):
        return None, f"its checksum file {CHECKSUM_FILE} is damaged (its digest does not match its list)"
    if record.get("step") != step:
        return None, f"its checksum file belongs to step {record.get('step')} (a folder renamed or copied?)"
    return files, None


def _file_problem(folder: pathlib.Path, name: str, expected: str) -> Optional[str]:
    if not (folder / name).is_file():
        return f"{name} is missing"
    try:
        ok = _file_digest(folder, name) == expected
    except (OSError, ValueError) as e:
        return f"{name} is unreadable ({type(e).__name__}: {e})"
    return None if ok else f"{name} differs from its checksum (changed after the save)"


def verify(folder: pathlib.Path, step: int) -> Optional[str]:
    """None if every file the checksums list is present and unchanged; else what is damaged."""
    if not folder.is_dir():
        return "the folder is missing"
    if not is_sealed(folder):
        return UNSEALED if any(folder.iterdir()) else "the folder is empty (a save that never wrote anything)"
    files, problem = _read_record(folder, step)
    if problem:
        return problem
    problems = [p for name, expected in sorted(files.items()) if (p := _file_problem(folder, name, expected))]
    if not problems:
        return None
    more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
    return "; ".join(problems[:_SHOWN]) + more
