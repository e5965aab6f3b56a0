"""Model registry: `get_model(config)` builds the Flax module named by `config.model.name`; each
entry of `MODELS` declares the `config.model` keys its builder reads (`Network.keys`), against which
`sdejax.training.config.check_config` checks a config before anything is built.

The network contract: `model.apply(variables, x_nhwc, labels, y=None, train=False,
rngs={'dropout': key})`, where `labels` are exactly what the reference score function passes
(VE continuous: σ(t); VP/sub-VP continuous: 999·t; VP discrete: t·(N−1); VE discrete: the integer
index of σ in the descending table). `make_apply_fn` adapts a module to the core library's
`apply_fn(params, x, labels, *, train=False, rng=None)` with params = the full variables dict.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sdejax.models import dit
from sdejax.models.ddpm import DDPM
from sdejax.models.ncsnpp import NCSNpp
from sdejax.models.ncsnv2 import NCSN, NCSNv2
from sdejax.models.token_denoiser import TokenDenoiser

Array = jax.Array
ApplyFn = Callable[..., Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


COMMON_KEYS = frozenset({"nonlinearity", "sigma_min", "sigma_max", "num_scales", "num_classes", "dtype"})
UNET_KEYS = frozenset({"nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv",
                       "scale_by_sigma"})
NCSNPP_KEYS = frozenset({"embedding_type", "conditional", "fir", "fir_kernel", "skip_rescale", "resblock_type",
                         "progressive", "progressive_input", "progressive_combine", "fourier_scale", "init_scale"})


def _common(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Fields every network takes (data shape, noise table, compute dtype, classes)."""
    m, d = config.model, config.data
    dtype_name = m.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype = {dtype_name!r} is not valid; choose from {sorted(DTYPES)}")
    return dict(image_size=d.image_size, num_channels=d.num_channels, centered=d.centered,
                nonlinearity=m.nonlinearity, sigma_min=float(m.sigma_min), sigma_max=float(m.sigma_max),
                num_scales=m.num_scales, num_classes=m.get("num_classes", 0), dtype=DTYPES[dtype_name])


def _unet_common(m: ml_collections.ConfigDict) -> dict[str, Any]:  # UNET_KEYS
    return dict(nf=m.nf, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attn_resolutions=tuple(m.attn_resolutions), dropout=float(m.dropout),
                resamp_with_conv=m.resamp_with_conv, scale_by_sigma=m.scale_by_sigma)


def _ncsnpp(config: ml_collections.ConfigDict) -> nn.Module:
    m = config.model
    if m.embedding_type == "fourier" and not config.training.continuous:
        raise ValueError("Fourier embeddings are only for continuous training (training.continuous = True)")
    return NCSNpp(**_common(config), **_unet_common(m), conditional=m.conditional, fir=m.fir,
                  fir_kernel=tuple(m.fir_kernel), skip_rescale=m.skip_rescale,
                  resblock_type=m.resblock_type.lower(), progressive=m.progressive.lower(),
                  progressive_input=m.progressive_input.lower(),
                  progressive_combine=m.progressive_combine.lower(),
                  embedding_type=m.embedding_type.lower(), fourier_scale=float(m.get("fourier_scale", 16.0)),
                  init_scale=float(m.init_scale), guidance_embedding=m.get("guidance_embedding", False))


def _ddpm(config: ml_collections.ConfigDict) -> nn.Module:
    return DDPM(**_common(config), **_unet_common(config.model), conditional=config.model.conditional,
                guidance_embedding=config.model.get("guidance_embedding", False))


def _ncsnv2(variant: int) -> Callable[[ml_collections.ConfigDict], nn.Module]:
    def build(config: ml_collections.ConfigDict) -> nn.Module:
        return NCSNv2(**_common(config), nf=config.model.nf, normalization=config.model.normalization,
                      variant=variant, flavor=config.model.get("flavor", "pytorch"))
    return build


def _ncsn(config: ml_collections.ConfigDict) -> nn.Module:
    return NCSN(**_common(config), nf=config.model.nf, normalization=config.model.normalization)


def _dit(config: ml_collections.ConfigDict) -> nn.Module:
    """DiT of `config.model` (`dit.CONFIG_KEYS`): size S/B/L/XL, patch_size 2/4/8; `shape` = (depth,
    hidden_size, num_heads), if set, overrides the size (small models)."""
    m, d = config.model, config.data
    shape = m.get("shape")
    if shape is not None and (len(shape) != 3 or any(int(v) != v or v < 1 for v in shape) or shape[1] % shape[2]):
        raise ValueError(f"model.shape must be (depth, hidden_size, num_heads) of positive ints with num_heads "
                         f"dividing hidden_size; got {shape!r}")
    dtype_name = m.get("dtype", "float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype = {dtype_name!r} is not valid; choose from {sorted(DTYPES)}")
    return dit.DiT(image_size=d.image_size, num_channels=d.num_channels, size=m.get("size", "S"),
                   patch_size=m.get("patch_size", 2), mlp_ratio=float(m.get("mlp_ratio", 4.0)),
                   learn_sigma=m.get("learn_sigma", False), num_classes=m.get("num_classes", 0),
                   guidance_embedding=m.get("guidance_embedding", False), dtype=DTYPES[dtype_name],
                   shape=None if shape is None else tuple(int(v) for v in shape))


def _token_denoiser(config: ml_collections.ConfigDict) -> nn.Module:
    """Masked diffusion's transformer over token grids (K = `model.num_tokens` real tokens + MASK)."""
    m = config.model
    return TokenDenoiser(num_tokens=m.num_tokens, features=m.get("features", 64), depth=m.get("depth", 2),
                         num_heads=m.get("num_heads", 4), mlp_ratio=m.get("mlp_ratio", 4))


@dataclasses.dataclass(frozen=True)
class Network:
    """A network builder `build(config) -> module`, the `config.model` keys it reads (besides
    `name`; the keys every model shares, SDE, EMA and preconditioning, are the driver's) and whether
    it reads integer tokens instead of real-valued images."""

    build: Callable[[ml_collections.ConfigDict], nn.Module]
    keys: frozenset[str]
    tokens: bool = False

    def __call__(self, config: ml_collections.ConfigDict) -> nn.Module:
        return self.build(config)


_NCSNV2_KEYS = COMMON_KEYS | {"nf", "normalization", "flavor"}
MODELS: dict[str, Network] = {
    "ncsnpp": Network(_ncsnpp, COMMON_KEYS | UNET_KEYS | NCSNPP_KEYS | {"guidance_embedding"}),
    "ddpm": Network(_ddpm, COMMON_KEYS | UNET_KEYS | {"conditional", "guidance_embedding"}),
    "ncsn": Network(_ncsn, COMMON_KEYS | {"nf", "normalization"}),
    "ncsnv2_64": Network(_ncsnv2(64), _NCSNV2_KEYS),
    "ncsnv2_128": Network(_ncsnv2(128), _NCSNV2_KEYS),
    "ncsnv2_256": Network(_ncsnv2(256), _NCSNV2_KEYS),
    "dit": Network(_dit, dit.CONFIG_KEYS),
    "token_denoiser": Network(_token_denoiser, frozenset({"num_tokens", "features", "depth", "num_heads", "mlp_ratio"}),
                              tokens=True),
}


def get_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The Flax module for `config.model.name`; unknown names raise ValueError listing the valid ones."""
    name = config.model.name
    if name not in MODELS:
        raise ValueError(f"unknown model.name {name!r}; valid: {sorted(MODELS)}")
    return MODELS[name](config)


def dummy_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> tuple[Array, Array]:
    """(x, labels) with the right shapes and label dtype for `model.init`."""
    size, ch = config.data.image_size, config.data.num_channels
    dtype = jnp.int32 if MODELS[config.model.name].tokens else jnp.float32
    x = jnp.zeros((batch_size, size, size, ch), dtype)
    if config.model.name.startswith("ncsn") and config.model.name != "ncsnpp":
        return x, jnp.zeros((batch_size,), jnp.int32)
    return x, jnp.ones((batch_size,), jnp.float32)


def init_model(config: ml_collections.ConfigDict, rng: Array, batch_size: int = 1) -> tuple[nn.Module, dict]:
    """Build the model and its variables ({'params': ..., possibly 'constants': ...})."""
    model = get_model(config)
    x, labels = dummy_inputs(config, batch_size)
    extra = guidance_inputs(config, batch_size)
    return model, jax.jit(lambda key: model.init({"params": key}, x, labels, train=False, **extra))(rng)


def guidance_inputs(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, Array]:
    """{"w": zeros (batch,)} for a w-conditioned network (`model.guidance_embedding`), else {}: what
    `model.init` needs besides (x, labels)."""
    return {"w": jnp.zeros((batch_size,), jnp.float32)} if config.model.get("guidance_embedding", False) else {}


def count_params(variables: Any) -> int:
    """Number of scalars in a variables tree (all collections, e.g. frozen Fourier W included)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables))


def make_apply_fn(model: nn.Module) -> ApplyFn:
    """apply_fn(params, x, labels, *, train=False, rng=None, y=None, w=None) for `sdejax.score.get_score_fn`.

    `params` is the full variables dict; `rng` seeds dropout (needed when train=True and dropout > 0);
    `w` (batch,) is the guidance weight of a w-conditioned network (`model.guidance_embedding`), passed
    on only when given (the networks without the embedding take no `w`).
    """
    def apply_fn(params: Any, x: Array, labels: Array, *, train: bool = False,
                 rng: Optional[Array] = None, y: Optional[Array] = None, w: Optional[Array] = None) -> Array:
        rngs = {"dropout": rng} if rng is not None else {}
        extra = {} if w is None else {"w": w}
        return model.apply(params, x, labels, y=y, train=train, rngs=rngs, **extra)
    return apply_fn
