"""Time-conditioned MLP for low-dimensional (toy) data.

    e = embed(labels);   h₀ = W_in x;   h_{l+1} = h_l + W_l₂ act(W_l₁ act(h_l) + U_l e);   out = W_out act(h_L)

The noise labels are what `sdejax.score.network_inputs` passes (VE: σ(t); VP/sub-VP: 999 t).
`embedding_type="fourier"` embeds log(labels) with Gaussian random features (as NCSN++ does for
σ; suited to VE; the labels must be > 0, checked when concrete), `"fourier_linear"` the labels as
given (for labels that may be ≤ 0, e.g. the consistency labels ¼ ln σ), `"positional"` embeds the
labels themselves sinusoidally (as DDPM; suited to 999 t). With `num_classes` > 0 the class
embedding E[y] (`conditioning.add_class_embedding`), with `guidance_embedding` the CFG weight w
(`conditioning.add_guidance_embedding`), are added to e. Inputs of any trailing shape are flattened and the output is reshaped like x.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdejax.models import conditioning
from sdejax.models.layers import GaussianFourierProjection, get_act, timestep_embedding

Array = jax.Array

EMBEDDINGS = ("fourier", "fourier_linear", "positional")
# The `config.model` keys `from_config` reads (besides those every model shares, which
# `sdejax.training.config` adds: name, EMA, SDE, preconditioning).
CONFIG_KEYS = frozenset({"features", "depth", "embedding_type", "embedding_size", "fourier_scale", "nonlinearity",
                         "num_classes", "guidance_embedding"})


class MLP(nn.Module):
    """Residual MLP score network: (x (B, ...), labels (B,)) -> like x."""

    features: int = 128
    depth: int = 3
    embedding_type: str = "positional"
    embedding_size: int = 64
    fourier_scale: float = 16.0
    nonlinearity: str = "swish"
    num_classes: int = 0
    guidance_embedding: bool = False

    def setup(self):
        if self.embedding_type not in EMBEDDINGS:
            raise ValueError(f"unknown embedding_type {self.embedding_type!r}; valid: {list(EMBEDDINGS)}")
        if self.depth < 1 or self.features < 1:
            raise ValueError(f"depth and features must be >= 1; got depth={self.depth}, features={self.features}")

    @nn.compact
    def __call__(self, x: Array, labels: Array, train: bool = False, y: Optional[Array] = None,
                 w: Optional[Array] = None) -> Array:
        if labels.shape != x.shape[:1]:
            raise ValueError(f"labels must have shape (batch,) = {x.shape[:1]}; got {labels.shape}")
        act = get_act(self.nonlinearity)
        if self.embedding_type == "positional":
            emb = timestep_embedding(labels, self.embedding_size)
        else:
            emb = GaussianFourierProjection(self.embedding_size // 2, self.fourier_scale)(_fourier_input(
                labels, self.embedding_type))
        emb = nn.Dense(self.features)(act(nn.Dense(self.features)(emb)))
        emb = conditioning.add_class_embedding(emb, y, self.num_classes, emb.dtype)
        emb = conditioning.add_guidance_embedding(emb, w, self.guidance_embedding, self.embedding_size)
        h = nn.Dense(self.features)(jnp.reshape(x, (x.shape[0], -1)))
        for _ in range(self.depth):
            z = nn.Dense(self.features)(act(h)) + nn.Dense(self.features)(emb)
            h = h + nn.Dense(self.features)(act(z))
        out = nn.Dense(x[0].size, kernel_init=nn.initializers.zeros)(act(h))
        return jnp.reshape(out, x.shape)


def _fourier_input(labels: Array, embedding_type: str) -> Array:
    """log(labels) ("fourier", labels > 0: a clear error instead of a NaN where they are concrete) or
    the labels as given ("fourier_linear")."""
    if embedding_type == "fourier_linear":
        return labels
    if not isinstance(labels, jax.core.Tracer) and not bool(jnp.all(labels > 0)):
        raise ValueError("embedding_type='fourier' embeds log(labels) and needs labels > 0; got min "
                         f"{float(jnp.min(labels))} (use 'fourier_linear' for labels that may be <= 0, "
                         "e.g. the consistency labels ¼ ln σ)")
    return jnp.log(labels)


def from_config(config: Any) -> MLP:
    """The MLP of `config.model` (`CONFIG_KEYS`; `num_classes`, `guidance_embedding` default 0, False)."""
    m = config.model
    return MLP(features=m.features, depth=m.depth, embedding_type=m.embedding_type, embedding_size=m.embedding_size,
               fourier_scale=m.fourier_scale, nonlinearity=m.nonlinearity, num_classes=m.get("num_classes", 0),
               guidance_embedding=m.get("guidance_embedding", False))


def make_apply_fn(model: nn.Module) -> Callable[..., Array]:
    """`apply_fn(params, x, labels, *, train=False, rng=None, y=None, w=None)` with params the full
    variables dict (the Fourier projection keeps its frozen W in the "constants" collection)."""

    def apply_fn(params: Any, x: Array, labels: Array, *, train: bool = False, rng: Optional[Array] = None,
                 y: Optional[Array] = None, w: Optional[Array] = None) -> Array:
        del rng  # no dropout
        return model.apply(params, x, labels, train=train, y=y, w=w)

    return apply_fn
