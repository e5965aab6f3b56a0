"""Which datasets exist, where their records live, and how an image is cropped and resized.

Names follow score_sde's `config.data.dataset` (CIFAR10, SVHN, CELEBA, LSUN, FFHQ, CelebAHQ) plus
MNIST, IMAGENET32/64 (downsampled ImageNet), IMAGENET (imagenet2012 at any size) and DIGITS (sklearn's digits, built offline).
"""
from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from sdejax.data import digits


class DatasetNotPreparedError(FileNotFoundError):
    """A dataset's records are not in `data_dir` and could not be downloaded or built."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How to find one dataset and turn a record into a uint8 HWC image.

    tfds_name: TFDS name ("{category}" is filled from `config.data.category`); None means the
      score_sde TFRecords at `config.data.tfrecords_path`.
    crop: side of the centred square crop before resizing (None: the largest square).
    labeled: whether records carry an integer "label" (otherwise label 0 is yielded).
    """

    tfds_name: str | None
    train_split: str = "train"
    eval_split: str = "test"
    channels: int = 3
    num_levels: int = 256
    crop: int | None = None
    labeled: bool = True


DATASETS: dict[str, DatasetSpec] = {
    "CIFAR10": DatasetSpec("cifar10"),
    "SVHN": DatasetSpec("svhn_cropped"),
    "MNIST": DatasetSpec("mnist", channels=1),
    "CELEBA": DatasetSpec("celeb_a", eval_split="validation", crop=140, labeled=False),
    "LSUN": DatasetSpec("lsun/{category}", eval_split="validation", labeled=False),
    "FFHQ": DatasetSpec(None, labeled=False),
    "CelebAHQ": DatasetSpec(None, labeled=False),
    "IMAGENET32": DatasetSpec("downsampled_imagenet/32x32", eval_split="validation", labeled=False),
    "IMAGENET64": DatasetSpec("downsampled_imagenet/64x64", eval_split="validation", labeled=False),
    "IMAGENET": DatasetSpec("imagenet2012", eval_split="validation"),  # full size (manual download), 1000 classes
    "DIGITS": DatasetSpec("sklearn_digits", channels=1, num_levels=digits.NUM_LEVELS),
}

FILE_FORMAT = {"grain": "array_record", "tf": "tfrecord"}


def get_spec(config) -> DatasetSpec:
    """The spec of `config.data.dataset`; checks `config.data.num_channels` against it."""
    name = config.data.dataset
    if name not in DATASETS:
        raise ValueError(f"Unknown config.data.dataset {name!r}; valid names: {sorted(DATASETS)}")
    spec = DATASETS[name]
    if config.data.num_channels != spec.channels:
        raise ValueError(
            f"config.data.num_channels={config.data.num_channels} but {name} has {spec.channels}")
    return spec


def tfds_name(spec: DatasetSpec, config) -> str:
    """The TFDS dataset name, e.g. "lsun/church_outdoor" for LSUN with category church_outdoor."""
    if "{category}" in spec.tfds_name:
        return spec.tfds_name.format(category=config.data.category)
    return spec.tfds_name


def get_builder(name: str, data_dir: str | None, stack: str, download: bool):
    """A prepared TFDS builder for `name` whose records suit `stack` ("grain" or "tf").

    The digits are always built locally when missing. Other datasets are downloaded and prepared
    if `download`; a dataset that is neither present nor obtainable raises DatasetNotPreparedError
    saying how to prepare it.
    """
    file_format = FILE_FORMAT[stack]
    local = name == "sklearn_digits"
    download = download or local

    def make(**kwargs):
        if local:
            return digits.SklearnDigits(data_dir=data_dir, **kwargs)
        return tfds.builder(name, data_dir=data_dir, **kwargs)

    builder = make()
    where = os.fspath(builder.data_dir_root)
    how = (f"prepare it with `tfds build {name} --data_dir={where} --file_format={file_format}`"
           f" (where the network or TFDS's manual download is available), or point "
           f"config.data.data_dir / data_dir= at a directory that holds it")
    if not builder.is_prepared():
        if not download:
            raise DatasetNotPreparedError(f"Dataset {name} is not prepared in {where}: {how}.")
        builder = make(file_format=file_format)
        try:
            builder.download_and_prepare(file_format=file_format)
        except Exception as err:  # network, manual-download or TensorFlow errors alike
            raise DatasetNotPreparedError(
                f"Dataset {name} is not prepared in {where} and preparing it failed "
                f"({type(err).__name__}: {err}); {how}.") from err
    formats = {f.value for f in builder.info.available_file_formats()}
    if file_format not in formats:
        raise DatasetNotPreparedError(
            f"Dataset {name} in {builder.data_dir} is stored as {sorted(formats)}, but the "
            f"{stack!r} input stack reads {file_format}: convert it with `tfds convert_format "
            f"--dataset_version_dir={builder.data_dir} --out_file_format={file_format}`, "
            f"or {how}.")
    return builder
