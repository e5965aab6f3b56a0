"""Random access to score_sde's FFHQ / CelebA-HQ TFRecords without TensorFlow.

Each record is a serialized `tf.train.Example` with "shape" (int64 [C, H, W]) and "data" (raw
uint8 bytes, CHW), as the original code wrote and read them. A TFRecord file is a sequence of
[uint64 length][uint32 crc][bytes][uint32 crc]; the offsets are scanned once from the headers.
"""
from __future__ import annotations

import glob
import os
import struct

import numpy as np
from tensorflow_datasets.proto import tf_example_pb2


def tfrecord_files(pattern: str) -> list[str]:
    """The files matching `pattern` (a path or glob), sorted; FileNotFoundError if none."""
    files = sorted(glob.glob(os.path.expanduser(pattern)))
    if not files:
        raise FileNotFoundError(
            f"No TFRecords match config.data.tfrecords_path={pattern!r}; create them with "
            "score_sde's dataset_tool.py (FFHQ / CelebA-HQ) and point tfrecords_path at them")
    return files


def decode_example(serialized: bytes) -> np.ndarray:
    """A serialized Example with "shape" (C, H, W) and raw "data" -> uint8 HWC image."""
    feature = tf_example_pb2.Example.FromString(serialized).features.feature
    shape = tuple(feature["shape"].int64_list.value)
    data = np.frombuffer(feature["data"].bytes_list.value[0], dtype=np.uint8)
    return data.reshape(shape).transpose(1, 2, 0)


class TFRecordSource:
    """A grain random-access source over TFRecord files yielding {"image", "label": 0}."""

    def __init__(self, pattern: str):
        self._files = tfrecord_files(pattern)
        self._index = [(f, off, n) for f in self._files for off, n in _scan(f)]
        self._fds: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        path, offset, length = self._index[i]
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return {"image": decode_example(os.pread(self._fds[path], length, offset)), "label": 0}

    def __getstate__(self):  # file descriptors do not cross process boundaries
        return {**self.__dict__, "_fds": {}}


def _scan(path: str) -> list[tuple[int, int]]:
    """(offset, length) of every record's payload in one TFRecord file."""
    records, pos, size = [], 0, os.path.getsize(path)
    with open(path, "rb") as f:
        while pos < size:
            f.seek(pos)
            (length,) = struct.unpack("<Q", f.read(8))
            records.append((pos + 12, length))
            pos += 12 + length + 4
    return records
