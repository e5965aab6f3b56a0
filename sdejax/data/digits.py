"""TFDS builder for the 8x8 handwritten digits shipped with scikit-learn (no download).

The 1,797 images of `sklearn.datasets.load_digits` hold integer intensities k in {0, ..., 16}
(17 levels). They are stored as uint8 levels, zero-padded by 4 pixels on every side to 16x16x1,
so the value grid survives untouched; the input pipeline maps them to [0, 1] on that 17-level
grid (see `sdejax.data.transforms.to_unit_interval`).

Splits are fixed by a seeded permutation (numpy PCG64, seed 0): the first 1,497 indices form
"train", the last 300 "test". Preparing needs neither network nor TensorFlow (the image is a
raw `Tensor` feature, so no PNG encoder is involved).
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_LEVELS = 17  # intensities 0..16
PAD = 4  # 8x8 -> 16x16
IMAGE_SIZE = 8 + 2 * PAD
NUM_TEST = 300
SPLIT_SEED = 0


def split_indices() -> dict[str, np.ndarray]:
    """The deterministic train/test partition of the 1,797 sklearn digits."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(1797)
    return {"train": np.sort(perm[:-NUM_TEST]), "test": np.sort(perm[-NUM_TEST:])}


def padded_digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits as uint8 levels of shape (1797, 16, 16, 1) and int labels (1797,)."""
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    images = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)))
    return images, digits.target.astype(np.int64)


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits, padded to 16x16, 17 intensity levels (0-16)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
                description=__doc__,
                features=tfds.features.FeaturesDict({
                        "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=10),
                }),
                supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with scikit-learn
        return {name: self._generate_examples(idx) for name, idx in split_indices().items()}

    def _generate_examples(self, indices):
        images, labels = padded_digits()
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare_digits(data_dir: str, file_format: str = "array_record") -> SklearnDigits:
    """Writes the digits dataset into `data_dir` in `file_format` ("array_record" or "tfrecord")."""
    builder = SklearnDigits(data_dir=data_dir, file_format=file_format)
    builder.download_and_prepare(file_format=file_format)
    return builder
