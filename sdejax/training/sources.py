"""Data sources of the driver: one `DataSource` protocol, implemented by toy distributions
(`ToySource`, `sdejax.data.toy`) and TFDS image datasets (`ImageSource`, `sdejax.data.datasets`),
and wrapped by latent diffusion's encoded source (`sdejax.training.latent.LatentSource`), so that
training, evaluation and sampling never ask which kind of data they hold.

Batches are dicts: "x" (the model's range) and, for a labelled source (`num_classes > 0`), "y"
(int32 class labels). Every array holds this process's rows only; `Placement` makes global arrays
of them.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterator, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdejax.data import toy
from sdejax.training import plots

Array = jax.Array


@runtime_checkable
class DataSource(Protocol):
    """What the driver needs of a dataset.

    data_range: the interval the model's data fill, (lo, hi) (images: (0, 1), or (−1, 1) when
      `data.centered`); None for unbounded (toy) data. Bits/dim rescale by it.
    num_levels: intensity levels of quantised data (256 for 8-bit images); None for continuous data.
    num_classes: classes of the "y" labels (0: unlabelled, no "y").
    heldout: this process's rows of the held-out batch of the eval loss, {"x", "y"?}.
    supports_fid: whether FID/KID/IS (Inception on images) apply to samples.
    """

    data_range: Optional[tuple[float, float]]
    num_levels: Optional[int]
    num_classes: int
    heldout: dict
    supports_fid: bool

    def chunk(self, step: int, k: int) -> dict:
        """This process's rows of the batches of steps step..step+k−1, stacked: {"x": (k, local_batch,
        ...), "y": int32 (k, local_batch) if labelled}."""

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """This process's rows of consecutive held-out batches {"x", "y"?}, one pass."""

    def get_state(self) -> dict:
        """The position of the training stream (checkpointed with the train state)."""

    def set_state(self, state: dict) -> None:
        """Resume the training stream at a saved position."""

    def true_entropy_bits_per_dim(self, rng: Array, n: int) -> Optional[dict]:
        """The true data density's entropy in bits/dim (Monte Carlo from `rng` with n draws), or None."""

    def save(self, stem: pathlib.Path, samples: dict[str, np.ndarray]) -> None:
        """Pictures of named sample sets (the model's range) at `<stem>[_<name>].png`."""

    def tensorboard_image(self, x: np.ndarray) -> Optional[np.ndarray]:
        """A uint8 HWC picture of samples `x` for TensorBoard, or None."""

    def decode(self, x: Array) -> Array:
        """Samples of the model's space as data in the model's range: `x` itself, or a latent source's
        decoded D(z/s) (`sdejax.training.latent`)."""

    def describe_bits(self, bits: dict) -> dict:
        """The held-out bits/dim report as this source's model measures it: `bits` itself, or a latent
        source's under `latent_bits_per_dim` keys with a note."""


def process_rows(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """This process's block of rows [p·n/P, (p+1)·n/P) along `axis` of a global batch."""
    n = x.shape[axis] // jax.process_count()
    return np.take(x, np.arange(jax.process_index() * n, (jax.process_index() + 1) * n), axis=axis)


class WrappedSource:
    """What a source transforming another (`self.inner`) delegates to it: the training stream's position
    and the pictures; it knows no true entropy. Subclasses (`LatentSource`, `DownsampledSource`) give
    chunk, eval_batches, heldout, decode and describe_bits."""

    inner: DataSource

    def get_state(self) -> dict:
        return self.inner.get_state()

    def set_state(self, state: dict) -> None:
        self.inner.set_state(state)

    def true_entropy_bits_per_dim(self, rng: Array, n: int) -> None:
        return None

    def save(self, stem: pathlib.Path, samples: dict[str, np.ndarray]) -> None:
        """The inner source's pictures of the samples (in its model range)."""
        self.inner.save(stem, samples)

    def tensorboard_image(self, x: np.ndarray) -> Optional[np.ndarray]:
        return self.inner.tensorboard_image(x)


@dataclasses.dataclass
class ToySource:
    """A toy distribution, a stateless batch source `batch_fn(rng)`, and the held-out points.

    `chunk(step, k)` = this process's rows of the batches of steps step..step+k−1, each drawn from
    `fold_in(data_key, step)` (so no iterator state is needed to resume). Unlabelled, continuous,
    unbounded; the true entropy is known where the distribution has a `log_prob`."""

    dist: toy.ToyDistribution
    batch_fn: Callable[[Array], dict]
    points: np.ndarray  # all held-out points (every process's)
    data_key: Array
    data_range = None
    num_levels = None
    num_classes = 0
    supports_fid = False

    def __post_init__(self):
        key, fn = self.data_key, self.batch_fn
        self._batches = jax.jit(lambda steps: jax.vmap(lambda i: fn(jax.random.fold_in(key, i)))(steps))
        self.heldout = {"x": process_rows(np.asarray(self.points))}

    def chunk(self, step: int, k: int) -> dict:
        return {"x": process_rows(np.asarray(self._batches(jnp.arange(step, step + k))["x"]), axis=1)}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """Consecutive held-out batches (a remainder < batch_size is dropped)."""
        x = self.points
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            yield {"x": process_rows(x[i:i + batch_size])}

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state

    def true_entropy_bits_per_dim(self, rng: Array, n: int) -> Optional[dict]:
        if self.dist.log_prob is None:
            return None
        h, se = self.dist.entropy(rng, n)
        scale = self.dist.dim * np.log(2.0)
        return {"bits_per_dim": h / scale, "bits_per_dim_se": se / scale, "num_samples": n}

    def save(self, stem: pathlib.Path, samples: dict[str, np.ndarray]) -> None:
        """One figure: scatter plots of the held-out data beside each sample set."""
        plots.save_scatter(pathlib.Path(f"{stem}.png"), self.points, samples)

    def tensorboard_image(self, x: np.ndarray) -> None:
        return None

    def decode(self, x: Array) -> Array:
        return x

    def describe_bits(self, bits: dict) -> dict:
        return bits


@dataclasses.dataclass
class ImageSource:
    """A TFDS image dataset (`sdejax.data.datasets`): the process-local train iterator (exact
    `get_state`/`set_state`), a held-out batch for the eval loss, the data scaler; labelled when
    the dataset's records carry a TFDS class label."""

    config: ml_collections.ConfigDict
    train_iter: Any
    num_levels: int
    num_classes: int
    heldout: dict = dataclasses.field(default_factory=dict)
    supports_fid = True

    @property
    def data_range(self) -> tuple[float, float]:
        return (-1.0, 1.0) if self.config.data.centered else (0.0, 1.0)

    def batch(self, images_and_labels: dict) -> dict:
        """A pipeline batch {"image" in [0, 1], "label"} as the model's {"x", "y"?}."""
        from sdejax.data.datasets import get_data_scaler

        out = {"x": np.asarray(get_data_scaler(self.config)(images_and_labels["image"]), np.float32)}
        if self.num_classes:
            out["y"] = np.asarray(images_and_labels["label"], np.int32)
        return out

    def chunk(self, step: int, k: int) -> dict:
        del step  # the iterator's own position is checkpointed
        batches = [self.batch(next(self.train_iter)) for _ in range(k)]
        return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        """The test split in file order, one pass, dequantised as in training (`config.eval.batch_size`
        global batches)."""
        del batch_size
        from sdejax.data import datasets

        _, it = datasets.get_dataset(self.config, evaluation=True)
        for batch in it:
            yield self.batch(batch)

    def get_state(self) -> dict:
        return self.train_iter.get_state()

    def set_state(self, state: dict) -> None:
        if state:
            self.train_iter.set_state(state)

    def true_entropy_bits_per_dim(self, rng: Array, n: int) -> None:
        return None

    def _unit(self, x: np.ndarray) -> np.ndarray:
        from sdejax.data.datasets import get_data_inverse_scaler

        return np.clip(np.asarray(get_data_inverse_scaler(self.config)(x)), 0.0, 1.0)

    def save(self, stem: pathlib.Path, samples: dict[str, np.ndarray]) -> None:
        """An image grid per sample set: `<stem>.png`, or `<stem>_<name>.png` for several."""
        for name, x in samples.items():
            plots.save_image_grid(pathlib.Path(f"{stem}_{name}.png" if len(samples) > 1 else f"{stem}.png"),
                                  self.tensorboard_image(x))

    def tensorboard_image(self, x: np.ndarray) -> np.ndarray:
        return plots.image_grid(self._unit(x))

    def decode(self, x: Array) -> Array:
        return x

    def describe_bits(self, bits: dict) -> dict:
        return bits


def _num_classes(config: ml_collections.ConfigDict) -> int:
    """Classes of the dataset's TFDS "label" feature (0 for unlabelled datasets)."""
    from sdejax.data import registry

    spec = registry.get_spec(config)
    if not spec.labeled or spec.tfds_name is None:
        return 0
    d = config.data
    builder = registry.get_builder(registry.tfds_name(spec, config), d.get("data_dir", None),
                                   d.get("stack", "grain"), d.get("download", True))
    return int(builder.info.features["label"].num_classes)


def get_source(config: ml_collections.ConfigDict, split_key: Array, batch_key: Array) -> DataSource:
    """The source of `config.data.dataset`: a TFDS image dataset (`sdejax.data.registry.DATASETS`)
    or a toy distribution (`sdejax.data.toy`; train/held-out split from `split_key`, batches from
    `batch_key`)."""
    from sdejax.data import datasets, registry

    d = config.data
    if d.dataset in registry.DATASETS:
        train_iter, eval_iter = datasets.get_dataset(config)
        source = ImageSource(config, train_iter, registry.get_spec(config).num_levels, _num_classes(config))
        source.heldout = source.batch(next(iter(eval_iter)))
        return source
    dist = toy.get_toy_distribution(d.dataset, **dict(d.get("dataset_kwargs", {})))
    train_x, heldout = toy.train_heldout_split(dist, split_key, d.get("num_train", 0), d.num_heldout)
    return ToySource(dist, toy.make_batch_fn(dist, train_x, config.training.batch_size), np.asarray(heldout),
                     batch_key)
