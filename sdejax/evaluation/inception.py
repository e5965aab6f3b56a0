"""The FID variant of Inception-v3 (TF ``inception-2015-12-05`` as ported by pytorch-fid), NHWC.

Differences from torchvision's Inception-v3: 1008 classes, no auxiliary head, average pools
that exclude zero padding from the count (A, C and the first E block), a max pool in the pool
branch of Mixed_7c, BatchNorm eps 1e-3, and no ImageNet re-normalisation of the input.

Preprocessing (pytorch-fid): bilinear resize to 299x299 with half-pixel centres, clamped edges
and no antialiasing, then x -> 2x - 1. ``pool3`` is the global mean of Mixed_7c (2048 features,
used by FID and KID); ``logits = pool3 @ W + b`` (1008 classes, used by the Inception score).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sdejax.evaluation.inception_weights import load_state_dict

SIZE = 299
NUM_CLASSES = 1008
BN_EPS = 1e-3
PREPROCESSING = ("pytorch-fid: float RGB in [0, 1], bilinear resize to 299x299 (half-pixel centres, "
                 "no antialias), x -> 2x - 1; FID Inception-v3 pool3 (2048) features")
STAGES = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "block0_maxpool1", "Conv2d_3b_1x1",
    "Conv2d_4a_3x3", "block1_maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
    "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c",
)
_HIGHEST = jax.lax.Precision.HIGHEST  # no TF32/bf16 passes on accelerators

Variables = Mapping[str, Any]


class ConvUnit(nn.Module):
    """conv (no bias) -> inference BatchNorm y = (x - mean) / sqrt(var + 1e-3) * scale + bias -> ReLU."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pads = [(p, p) for p in self.padding]
        x = nn.Conv(self.features, self.kernel, self.strides, pads, use_bias=False,
                    precision=_HIGHEST, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """3x3 stride-1 average pool, padding 1, dividing by the number of real (unpadded) cells."""
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
    return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
    """Mixed_5b/c/d: [1x1] [1x1 -> 5x5] [1x1 -> 3x3 -> 3x3] [avg pool -> 1x1 (pool_features)]."""

    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = ConvUnit(64, (1, 1), name="branch1x1")(x)
        b5 = ConvUnit(48, (1, 1), name="branch5x5_1")(x)
        b5 = ConvUnit(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = ConvUnit(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = ConvUnit(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = ConvUnit(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = ConvUnit(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a (35 -> 17): [3x3/2] [1x1 -> 3x3 -> 3x3/2] [max pool 3x3/2]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvUnit(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = ConvUnit(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvUnit(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = ConvUnit(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-e: [1x1] [1x1 -> 1x7 -> 7x1] [1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7] [avg pool -> 1x1]."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = ConvUnit(192, (1, 1), name="branch1x1")(x)
        b7 = ConvUnit(c, (1, 1), name="branch7x7_1")(x)
        b7 = ConvUnit(c, **row, name="branch7x7_2")(b7)
        b7 = ConvUnit(192, **col, name="branch7x7_3")(b7)
        bd = ConvUnit(c, (1, 1), name="branch7x7dbl_1")(x)
        bd = ConvUnit(c, **col, name="branch7x7dbl_2")(bd)
        bd = ConvUnit(c, **row, name="branch7x7dbl_3")(bd)
        bd = ConvUnit(c, **col, name="branch7x7dbl_4")(bd)
        bd = ConvUnit(192, **row, name="branch7x7dbl_5")(bd)
        bp = ConvUnit(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a (17 -> 8): [1x1 -> 3x3/2] [1x1 -> 1x7 -> 7x1 -> 3x3/2] [max pool 3x3/2]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = ConvUnit(192, (1, 1), name="branch3x3_1")(x)
        b3 = ConvUnit(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = ConvUnit(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = ConvUnit(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = ConvUnit(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = ConvUnit(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b/c: [1x1] [1x1 -> (1x3 | 3x1)] [1x1 -> 3x3 -> (1x3 | 3x1)] [pool -> 1x1].

    The pool is an average pool excluding padding in Mixed_7b and a 3x3 stride-1 max pool in
    Mixed_7c (as in the TF graph).
    """

    max_pool: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = ConvUnit(320, (1, 1), name="branch1x1")(x)
        b3 = ConvUnit(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([ConvUnit(384, **row, name="branch3x3_2a")(b3),
                              ConvUnit(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = ConvUnit(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = ConvUnit(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([ConvUnit(384, **row, name="branch3x3dbl_3a")(bd),
                              ConvUnit(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3(x, 1, 1) if self.max_pool else _avg_pool_3x3(x)
        bp = ConvUnit(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """Trunk on preprocessed (N, 299, 299, 3) input in [-1, 1] -> {"pool3", "logits"}.

    The stage outputs are sown, in the order of STAGES, into ``intermediates``/``stages``.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        layers = (
            ConvUnit(32, (3, 3), (2, 2), name="Conv2d_1a_3x3"),
            ConvUnit(32, (3, 3), name="Conv2d_2a_3x3"),
            ConvUnit(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3"),
            lambda h: _max_pool_3x3(h, 2, 0),
            ConvUnit(80, (1, 1), name="Conv2d_3b_1x1"),
            ConvUnit(192, (3, 3), name="Conv2d_4a_3x3"),
            lambda h: _max_pool_3x3(h, 2, 0),
            InceptionA(32, name="Mixed_5b"),
            InceptionA(64, name="Mixed_5c"),
            InceptionA(64, name="Mixed_5d"),
            InceptionB(name="Mixed_6a"),
            InceptionC(128, name="Mixed_6b"),
            InceptionC(160, name="Mixed_6c"),
            InceptionC(160, name="Mixed_6d"),
            InceptionC(192, name="Mixed_6e"),
            InceptionD(name="Mixed_7a"),
            InceptionE(max_pool=False, name="Mixed_7b"),
            InceptionE(max_pool=True, name="Mixed_7c"),
        )
        for layer in layers:
            x = layer(x)
            self.sow("intermediates", "stages", x)
        pool3 = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=_HIGHEST, name="fc")(pool3)
        return {"pool3": pool3, "logits": logits}


def resize(images: jax.Array) -> jax.Array:
    """Bilinear resize of NHWC images to 299x299: half-pixel centres, clamped edges, no antialias.

    A 299x299 input is returned unchanged (as in torch's ``F.interpolate``).
    """
    _check_images(images)
    n, h, w, c = images.shape
    if (h, w) == (SIZE, SIZE):
        return images
    return jax.image.resize(images, (n, SIZE, SIZE, c), "linear", antialias=False)


def preprocess(images: jax.Array) -> jax.Array:
    """pytorch-fid's input pipeline: ``resize(images) * 2 - 1`` (range [0, 1] -> [-1, 1])."""
    return 2 * resize(images) - 1


def apply(variables: Variables, images: jax.Array, *, intermediates: bool = False) -> dict[str, Any]:
    """Features of NHWC float images in [0, 1], any size: {"pool3": (N, 2048), "logits": (N, 1008)}.

    With ``intermediates=True`` the result also holds ``"intermediates"``: {stage: NHWC map}.
    """
    x = preprocess(images)
    if not intermediates:
        return FIDInceptionV3().apply(variables, x)
    out, state = FIDInceptionV3().apply(variables, x, mutable=["intermediates"])
    return {**out, "intermediates": dict(zip(STAGES, state["intermediates"]["stages"]))}


def _check_images(images: Any) -> None:
    shape, dtype = np.shape(images), getattr(images, "dtype", None)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"images must be NHWC RGB with shape (N, H, W, 3); got shape {shape}")
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"images must be a float array with values in [0, 1]; got dtype {dtype} "
                        "(convert uint8 with images / 255)")


@functools.cache
def _expected_shapes() -> dict[str, dict[tuple[str, ...], tuple[int, ...]]]:
    """Flax variable paths -> shapes, from an abstract initialisation."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32))
    flat = {}
    for collection in ("params", "batch_stats"):
        leaves = jax.tree_util.tree_flatten_with_path(shapes[collection])[0]
        flat[collection] = {tuple(k.key for k in path): leaf.shape for path, leaf in leaves}
    return flat


_LEAF_MAP = {  # torch suffix -> (collection, flax leaf, layout change)
    ("conv", "weight"): ("params", "kernel", lambda w: w.transpose(2, 3, 1, 0)),
    ("bn", "weight"): ("params", "scale", None),
    ("bn", "bias"): ("params", "bias", None),
    ("bn", "running_mean"): ("batch_stats", "mean", None),
    ("bn", "running_var"): ("batch_stats", "var", None),
    ("fc", "weight"): ("params", "kernel", lambda w: w.T),
    ("fc", "bias"): ("params", "bias", None),
}


def from_torch_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Map pytorch-fid state_dict names/arrays onto this module's variables (float32 numpy).

    ``A.B.conv.weight`` (out, in, kh, kw) -> params[A][B][conv][kernel] (kh, kw, in, out);
    ``bn.weight/bias`` -> scale/bias; ``bn.running_mean/var`` -> batch_stats mean/var;
    ``fc.weight`` -> kernel (transposed). ``num_batches_tracked`` counters are ignored.
    """
    expected = _expected_shapes()
    flat: dict[str, dict[tuple[str, ...], np.ndarray]] = {"params": {}, "batch_stats": {}}
    unknown = []
    for name, value in state_dict.items():
        parts = tuple(name.split("."))
        if parts[-1] == "num_batches_tracked":
            continue
        rule = _LEAF_MAP.get(parts[-2:])
        if rule is None:
            unknown.append(name)
            continue
        collection, leaf, transform = rule
        array = np.asarray(value, dtype=np.float32)
        array = transform(array) if transform else array
        path = parts[:-1] + (leaf,)
        want = expected[collection].get(path)
        if want is None:
            unknown.append(name)
        elif array.shape != want:
            raise ValueError(f"state_dict[{name!r}] has shape {np.shape(value)}, which does not map "
                             f"to the expected {collection} shape {want}")
        flat[collection][path] = array
    missing = [_torch_name(c, p) for c in flat for p in expected[c] if p not in flat[c]]
    if unknown or missing:
        raise KeyError(f"state_dict does not match the FID Inception-v3: unknown names {unknown[:5]}"
                       f" ({len(unknown)} in all), missing {missing[:5]} ({len(missing)} in all)")
    return {c: _unflatten(flat[c]) for c in flat}


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    """Inverse of _LEAF_MAP: the state_dict name of a Flax variable path."""
    for (module, torch_leaf), (coll, leaf, _) in _LEAF_MAP.items():
        if (coll, module, leaf) == (collection, path[-2], path[-1]):
            return ".".join(path[:-1] + (torch_leaf,))
    raise AssertionError(f"no state_dict name for {collection}/{'/'.join(path)}")


def _unflatten(flat: Mapping[tuple[str, ...], np.ndarray]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def load_weights(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Variables from the weight file at ``path`` (``.npz`` or ``.pth``), else ``$SDEJAX_INCEPTION_WEIGHTS``."""
    return from_torch_state_dict(load_state_dict(path))


def weights_sha256(variables: Variables) -> str:
    """sha256 over (path, shape, float32 little-endian bytes) of every leaf, in sorted path order.

    The same weights give the same checksum whether they were read from ``.pth`` or ``.npz``.
    """
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    digest = hashlib.sha256()
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf, dtype="<f4"))
        digest.update(f"{jax.tree_util.keystr(path)}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
