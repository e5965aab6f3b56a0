"""Noise-conditional classifiers p_φ(y | x_t, t): `logits = net(x, labels, train)`, shape (B, K).

The noise labels are the score model's (`sdejax.precond.LABELS`: VE σ(t), VP 999 t, ...), embedded
as in the U-Nets and added to every block as a per-channel (per-feature) bias:

    e = Dense(2E)(act(Dense(2E)(emb(labels))))       emb: Fourier features of log labels, or sinusoidal
    block:  h = conv(act(GN(x)));  h += Dense(act(e));  h = conv(dropout(act(GN(h))));  out = skip(x) + h

Families (`CLASSIFIERS`, built from `config.classifier` by `build_classifier`):

    wideresnet  WRN-d-k (Zagoruyko & Komodakis 2016) with score_sde's noise conditioning: stem conv(16),
                three stages of (d − 4)/6 pre-activation blocks of widths 16k, 32k, 64k (stride 2 into
                stages 2 and 3), GroupNorm(min(C/4, 32)) instead of batch norm, per-image standardisation
                of the input, global average pool, Dense(K). WRN-28-10 for 32x32x3 CIFAR-10.
    conv        the same residual network with free widths nf·ch_mult and `depth` blocks per stage;
                small (nf=32, ch_mult=(1, 2, 2), depth=1) for the 16x16x1 digits.
    mlp         residual MLP on flattened vectors (toy data): h ← h + W₂ act(W₁ act(h) + U e).

`embedding="none"` drops the noise conditioning (the network ignores labels): the plain WRN.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sdejax.models.layers import GaussianFourierProjection, _add_temb, default_init, get_act, group_norm, \
    timestep_embedding

Array = jax.Array
ApplyFn = Callable[..., Array]
EMBEDDINGS = ("fourier", "positional", "none")


class NoiseEmbedding(nn.Module):
    """e = Dense(2E)(act(Dense(2E)(emb(labels)))) with emb the E-dim Fourier features of log labels
    ("fourier", score_sde's choice for σ labels; needs labels > 0) or sinusoidal ("positional", for 999 t)."""

    embedding: str = "fourier"
    embedding_size: int = 128
    fourier_scale: float = 16.0
    nonlinearity: str = "swish"

    @nn.compact
    def __call__(self, labels: Array) -> Array:
        if self.embedding == "fourier":
            emb = GaussianFourierProjection(self.embedding_size // 2, self.fourier_scale)(jnp.log(labels))
        else:
            emb = timestep_embedding(labels, self.embedding_size)
        dim = 2 * self.embedding_size
        emb = nn.Dense(dim, kernel_init=default_init())(emb)
        return nn.Dense(dim, kernel_init=default_init())(get_act(self.nonlinearity)(emb))


def _check_embedding(embedding: str) -> None:
    if embedding not in EMBEDDINGS:
        raise ValueError(f"unknown classifier embedding {embedding!r}; valid: {list(EMBEDDINGS)}")


def _embed(module: nn.Module, x: Array, labels: Array) -> Optional[Array]:
    """The noise embedding of a classifier module (None without conditioning); checks label shape."""
    _check_embedding(module.embedding)
    if labels.shape != x.shape[:1]:
        raise ValueError(f"labels must have shape (batch,) = {x.shape[:1]}; got {labels.shape}")
    if module.embedding == "none":
        return None
    return NoiseEmbedding(module.embedding, module.embedding_size, module.fourier_scale, module.nonlinearity,
                          name="embed")(labels)


def _conv(features: int, kernel: int = 3, stride: int = 1) -> nn.Conv:
    """Bias-free conv with "SAME" padding (stride 2 halves the resolution), as in WRN."""
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding="SAME", use_bias=False,
                   kernel_init=default_init())


class NoiseResBlock(nn.Module):
    """Pre-activation residual block with the noise embedding added after the first conv (module
    docstring); the shortcut is a strided 1x1 conv of act(GN(x)) where the shape changes."""

    features: int
    stride: int = 1
    dropout: float = 0.0
    nonlinearity: str = "relu"

    @nn.compact
    def __call__(self, x: Array, temb: Optional[Array], train: bool) -> Array:
        act = get_act(self.nonlinearity)
        pre = act(group_norm(x.shape[-1])(x))
        h = _conv(self.features, 3, self.stride)(pre)
        h = _add_temb(h, temb, act, jnp.float32)
        h = act(group_norm(self.features)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(self.features)(h)
        if x.shape[-1] != self.features or self.stride != 1:
            x = _conv(self.features, 1, self.stride)(pre)
        return x + h


def standardize(x: Array) -> Array:
    """Per-image standardisation (x − mean)/max(std, 1/√N) over H, W, C (as TF and score_sde's WRN)."""
    n = x[0].size
    mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
    return (x - mean) / jnp.maximum(jnp.std(x, axis=(1, 2, 3), keepdims=True), n ** -0.5)


class ResNetClassifier(nn.Module):
    """Residual classifier on NHWC images: stem conv(stem), stages of `blocks` NoiseResBlocks of widths
    `widths` (stride 2 into every stage after the first), act(GN), global average pool, Dense(K)."""

    widths: tuple[int, ...] = (160, 320, 640)
    blocks: int = 4
    stem: int = 16
    num_classes: int = 10
    dropout: float = 0.0
    embedding: str = "fourier"
    embedding_size: int = 128
    fourier_scale: float = 16.0
    nonlinearity: str = "relu"

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"x must be NHWC images (B, H, W, C); got shape {x.shape}")
        if self.blocks < 1 or not self.widths:
            raise ValueError(f"need blocks >= 1 and at least one stage; got blocks={self.blocks}, "
                             f"widths={self.widths}")
        temb = _embed(self, x, labels)
        h = nn.Conv(self.stem, (3, 3), padding="SAME", use_bias=False, kernel_init=default_init())(standardize(x))
        for stage, width in enumerate(self.widths):
            for i in range(self.blocks):
                stride = 2 if stage > 0 and i == 0 else 1
                h = NoiseResBlock(width, stride, self.dropout, self.nonlinearity)(h, temb, train)
        h = get_act(self.nonlinearity)(group_norm(h.shape[-1])(h))
        return nn.Dense(self.num_classes, kernel_init=default_init())(jnp.mean(h, axis=(1, 2)))


class MLPClassifier(nn.Module):
    """Residual MLP on flattened inputs: h₀ = W_in x; h ← h + W₂ act(W₁ act(h) + U e); logits = W_out act(h)."""

    features: int = 128
    depth: int = 2
    num_classes: int = 10
    embedding: str = "positional"
    embedding_size: int = 64
    fourier_scale: float = 16.0
    nonlinearity: str = "swish"

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
        if self.depth < 1 or self.features < 1:
            raise ValueError(f"depth and nf must be >= 1; got depth={self.depth}, nf={self.features}")
        act = get_act(self.nonlinearity)
        temb = _embed(self, x, labels)
        h = nn.Dense(self.features)(jnp.reshape(x, (x.shape[0], -1)))
        for _ in range(self.depth):
            z = nn.Dense(self.features)(act(h))
            if temb is not None:
                z = z + nn.Dense(self.features)(act(temb))
            h = h + nn.Dense(self.features)(act(z))
        return nn.Dense(self.num_classes)(act(h))


# The config table ------------------------------------------------------------------------------------

_SHARED = dict(num_classes=10, embedding="fourier", embedding_size=128, fourier_scale=16.0)
DEFAULTS: dict[str, dict[str, Any]] = {
    "wideresnet": dict(_SHARED, depth=28, widen=10, dropout=0.0, nonlinearity="relu", embedding_size=256),
    "conv": dict(_SHARED, nf=32, ch_mult=(1, 2, 2), depth=1, dropout=0.0, nonlinearity="swish", embedding_size=64),
    "mlp": dict(_SHARED, nf=128, depth=2, nonlinearity="swish", embedding="positional", embedding_size=64),
}


def _wideresnet(c: dict[str, Any]) -> nn.Module:
    if c["depth"] < 10 or (c["depth"] - 4) % 6:
        raise ValueError(f"classifier.depth of a Wide-ResNet must be 6n + 4 (n >= 1, e.g. 28); got {c['depth']}")
    k = c["widen"]
    return ResNetClassifier((16 * k, 32 * k, 64 * k), (c["depth"] - 4) // 6, 16, c["num_classes"], c["dropout"],
                            c["embedding"], c["embedding_size"], c["fourier_scale"], c["nonlinearity"])


def _conv_net(c: dict[str, Any]) -> nn.Module:
    return ResNetClassifier(tuple(c["nf"] * m for m in c["ch_mult"]), c["depth"], c["nf"], c["num_classes"],
                            c["dropout"], c["embedding"], c["embedding_size"], c["fourier_scale"], c["nonlinearity"])


def _mlp(c: dict[str, Any]) -> nn.Module:
    return MLPClassifier(c["nf"], c["depth"], c["num_classes"], c["embedding"], c["embedding_size"],
                         c["fourier_scale"], c["nonlinearity"])


@dataclasses.dataclass(frozen=True)
class Classifier:
    """A builder from the resolved settings of `config.classifier` (`name` plus the keys of `defaults`)."""

    build: Callable[[dict[str, Any]], nn.Module]
    defaults: dict[str, Any]

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self.defaults) | {"name"}


CLASSIFIERS: dict[str, Classifier] = {
    "wideresnet": Classifier(_wideresnet, DEFAULTS["wideresnet"]),
    "conv": Classifier(_conv_net, DEFAULTS["conv"]),
    "mlp": Classifier(_mlp, DEFAULTS["mlp"]),
}


def default_config(name: str) -> ml_collections.ConfigDict:
    """`config.classifier` for `name` with every key at its default."""
    entry = _entry(name)
    return ml_collections.ConfigDict(dict(entry.defaults, name=name))


def _entry(name: str) -> Classifier:
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier.name {name!r}; valid: {sorted(CLASSIFIERS)}")
    return CLASSIFIERS[name]


def get_classifier(config: ml_collections.ConfigDict) -> nn.Module:
    """The module of `config.classifier` (missing keys take `DEFAULTS`); unknown names, unknown keys
    and bad settings raise ValueError listing the valid choices."""
    c = config.classifier
    entry = _entry(c.get("name", None))
    if unknown := set(c.keys()) - entry.keys:
        raise ValueError(f"unknown classifier key(s) {sorted(unknown)} for {c.name!r}; valid: {sorted(entry.keys)}")
    settings = {key: c.get(key, default) for key, default in entry.defaults.items()}
    _check_embedding(settings["embedding"])
    get_act(settings["nonlinearity"])
    if settings["num_classes"] < 2:
        raise ValueError(f"classifier.num_classes must be >= 2; got {settings['num_classes']}")
    if not 0.0 <= settings.get("dropout", 0.0) < 1.0:
        raise ValueError(f"classifier.dropout must be in [0, 1); got {settings['dropout']}")
    return entry.build(settings)


def make_apply_fn(model: nn.Module) -> ApplyFn:
    """apply_fn(params, x, labels, *, train=False, rng=None) -> logits, params the full variables dict
    ({'params', 'constants'}); `rng` seeds dropout (needed when train=True and dropout > 0)."""

    def apply_fn(params: Any, x: Array, labels: Array, *, train: bool = False, rng: Optional[Array] = None) -> Array:
        rngs = {"dropout": rng} if rng is not None else {}
        return model.apply(params, x, labels, train=train, rngs=rngs)

    return apply_fn


def build_classifier(config: ml_collections.ConfigDict, rng: Array, x: Array) -> tuple[ApplyFn, dict]:
    """(apply_fn, variables) of `config.classifier`, initialised on inputs shaped like `x` (labels ones)."""
    model = get_classifier(config)
    labels = jnp.ones(x.shape[:1], jnp.float32)
    variables = jax.jit(lambda key: model.init({"params": key}, x, labels, train=False))(rng)
    return make_apply_fn(model), variables


def classifier_shapes(config: ml_collections.ConfigDict, x_shape: tuple[int, ...]) -> Any:
    """The variables' ShapeDtypeStructs by `jax.eval_shape` (nothing compiled or allocated)."""
    model = get_classifier(config)
    x = jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32)
    labels = jax.ShapeDtypeStruct(tuple(x_shape[:1]), jnp.float32)
    return jax.eval_shape(lambda key, x, t: model.init({"params": key}, x, t, train=False),
                          jax.random.PRNGKey(0), x, labels)
