"""Input pipelines selected by `config.data.dataset`, with score_sde's config keys.

Reads `config.data.{dataset, image_size, random_flip, uniform_dequantization, num_channels}`,
`config.training.batch_size`, `config.eval.batch_size`, `config.seed`, and the optional
`config.data.{data_dir, stack, download, category, tfrecords_path, num_threads, prefetch,
num_workers}`. Iterators yield numpy dicts {"image": float32 (local_batch, H, W, C) in [0, 1],
"label": int32 (local_batch,)}, local_batch = batch_size / jax.process_count(); apply
`get_data_scaler(config)` to centre to [-1, 1] (as score_sde does in its train step).

Two stacks: "grain" (default; array_record + tfds data sources + grain, no TensorFlow) and "tf"
(tfrecord + tf.data). Both give the same order semantics (see `sdejax.data.pipeline`) and
iterators with `get_state()` / `set_state()`.
"""
from __future__ import annotations

import dataclasses

from sdejax.data import pipeline, registry
from sdejax.data.pipeline import Pipeline
from sdejax.data.registry import DATASETS, DatasetNotPreparedError  # noqa: F401 (re-exported)
from sdejax.data.transforms import get_data_inverse_scaler, get_data_scaler  # noqa: F401

STACKS = ("grain", "tf")


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel
        return jax.process_index(), jax.process_count()
    return process_index, process_count


def get_iterator(config, split: str, opts: Pipeline, *, data_dir: str | None = None,
                 stack: str | None = None, download: bool | None = None):
    """One iterator over `split` ("train" or "eval", mapped to the dataset's own split names)
    of `config.data.dataset`, following `opts`."""
    spec = registry.get_spec(config)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval'; got {split!r}")
    stack = stack or config.data.get("stack", "grain")
    if stack not in STACKS:
        raise ValueError(f"Unknown input stack {stack!r}; valid stacks: {list(STACKS)}")
    data_dir = data_dir or config.data.get("data_dir", None)
    download = config.data.get("download", True) if download is None else download
    opts = dataclasses.replace(opts, num_levels=spec.num_levels, crop=spec.crop,
                               labeled=spec.labeled)
    split_name = spec.train_split if split == "train" else spec.eval_split
    builder = None
    if spec.tfds_name is not None:
        builder = registry.get_builder(registry.tfds_name(spec, config), data_dir, stack, download)
    if stack == "grain":
        if builder is None:
            from sdejax.data.tfrecords import TFRecordSource  # pylint: disable=import-outside-toplevel
            source = TFRecordSource(config.data.tfrecords_path)
        else:
            source = builder.as_data_source(split=split_name, file_format="array_record")
        return pipeline.grain_iterator(source, opts)
    from sdejax.data import tf_pipeline  # pylint: disable=import-outside-toplevel (TensorFlow)
    if builder is None:
        records, decode = tf_pipeline.tfrecord_records(config.data.tfrecords_path)
    else:
        records, decode = tf_pipeline.tfds_records(builder, split_name)
    return tf_pipeline.TFDataIterator(records, decode, opts)


def get_dataset(config, *, uniform_dequantization: bool | None = None, evaluation: bool = False,
                data_dir: str | None = None, stack: str | None = None,
                download: bool | None = None, process_index: int | None = None,
                process_count: int | None = None):
    """(train_iter, eval_iter) as in score_sde.

    Training mode: both repeat forever and are shuffled (seeds `config.seed`, `config.seed + 1`);
    the train iterator flips if `config.data.random_flip`. `evaluation=True`: one pass in file
    order, no flip, the last partial global batch dropped. Dequantisation follows
    `uniform_dequantization` (default `config.data.uniform_dequantization`). Process index and
    count default to `jax.process_index()` / `jax.process_count()`.
    """
    p_index, p_count = _process(process_index, process_count)
    dequantize = (config.data.uniform_dequantization if uniform_dequantization is None
                  else uniform_dequantization)
    common = dict(
        image_size=config.data.image_size, dequantize=dequantize, shuffle=not evaluation,
        num_epochs=1 if evaluation else None, process_index=p_index, process_count=p_count,
        num_threads=config.data.get("num_threads", 8), prefetch=config.data.get("prefetch", 16),
        num_workers=config.data.get("num_workers", 0))
    for name, size in (("training", config.training.batch_size), ("eval", config.eval.batch_size)):
        if size % p_count:
            raise ValueError(f"config.{name}.batch_size={size} is not divisible by the number "
                             f"of processes {p_count}")
    train_opts = Pipeline(batch_size=config.training.batch_size, seed=config.seed,
                          flip=config.data.random_flip and not evaluation, **common)
    eval_opts = Pipeline(batch_size=config.eval.batch_size, seed=config.seed + 1, **common)
    kwargs = dict(data_dir=data_dir, stack=stack, download=download)
    return (get_iterator(config, "train", train_opts, **kwargs),
            get_iterator(config, "eval", eval_opts, **kwargs))
