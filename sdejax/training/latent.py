"""Latent diffusion in the driver (Rombach et al. 2022): an autoencoder (`sdejax.models.autoencoder`)
trained by `--mode=train_autoencoder` (`sdejax.training.autoencoder_mode`), then any diffusion model of the
driver trained on its latents

    z = s · E(x),   s = 1 / std(E(x)),   x = D(z / s)              (autoencoder.kind = "kl", the default)
    z = s · z_e(x), s = 1 / std(z_e(x)), x = D(quantize(z / s))    (autoencoder.kind = "vq": LDM's "VQ-reg")

with E(x) the KL encoder mean μ(x) (`latent.use_mean = True`, the default) or a sample μ(x) + σ(x) ε, z_e the
VQ encoder's output before quantisation (deterministic: `latent.use_mean = False` is refused), and s one
number estimated once, after the autoencoder's training, over `autoencoder.scale_batches` training batches
(the std of all latent entries), saved beside its checkpoints as `<autoencoder dir>/latent_scale.json`.
What differs between the kinds (network, loss, latents, decoder, held-out metrics) is a `Kind` of `KINDS`.

The driver does not branch on it: `source` wraps the run's data source in a `LatentSource` (training
batches, held-out data and eval batches encoded by the frozen encoder; samples decoded by `decode`), and
`network_config` gives the network builder the latent shape (H/f, W/f, C). Config sections:

- `config.autoencoder`: kind ("kl" or "vq"), the network (f, latent_channels: also the VQ code dimension,
  features, channel_mult, num_res_blocks; VQ: num_codes K) and its training (n_iters, batch_size, lr,
  scale_batches; KL: beta, the KL weight; VQ: commitment β);
- `config.latent` (its presence makes the run latent): use_mean, autoencoder_workdir (default
  `<workdir>/autoencoder`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdejax import autoencoders
from sdejax.models.autoencoder import KLAutoencoder, VQAutoencoder
from sdejax.training import checkpoint, sources, state as state_lib

Array = jax.Array
EncodeFn = Callable[[Any, np.ndarray, Array, int], Array]  # (params, x, key, row0) -> unscaled latents
DecodeFn = Callable[[Any, Array, float], Array]  # (params, z, s) -> pixels


@dataclasses.dataclass(frozen=True)
class Kind:
    """What one autoencoder kind defines: its own config keys (`required`, `defaults`), the network
    `module(settings, out_channels)`, whether its latents may be sampled (`sampled`: `latent.use_mean = False`
    allowed), the training loss `loss(module, settings, recon_loss)`, the latents of
    diffusion `latents(module, mean_only) -> EncodeFn`, the decoder `decoder(module) -> DecodeFn`, and the
    held-out metrics: `batch_metrics(aux) -> (means, sums)` of one batch's loss aux (scalars averaged over
    batches; arrays summed over them) and `split_metrics(sums)` of the summed arrays."""

    required: tuple[str, ...]
    defaults: dict
    module: Callable[[dict, int], Any]
    sampled: bool
    loss: Callable[[Any, dict, autoencoders.ReconLoss], autoencoders.LossFn]
    latents: Callable[[Any, bool], EncodeFn]
    decoder: Callable[[Any], DecodeFn]
    batch_metrics: Callable[[dict], tuple[dict, dict]]
    split_metrics: Callable[[dict], dict]


def _network_kwargs(a: dict, out_channels: int) -> dict:
    return dict(f=a["f"], features=a["features"], channel_mult=a["channel_mult"], out_channels=out_channels,
                num_res_blocks=a["num_res_blocks"])


def encoder(module: KLAutoencoder, mean_only: bool) -> EncodeFn:
    """`encode(params, x, key, row0)` -> μ(x), or μ(x) + σ(x) ε with ε of row r (global index row0 + r) drawn
    from fold_in(key, row0 + r); unscaled, jitted."""

    def encode(params, x, key, row0):
        mean, logvar = module.apply(params, x, method="encode")
        if mean_only:
            return mean
        rows = row0 + jnp.arange(x.shape[0])
        eps = jax.vmap(lambda r: jax.random.normal(jax.random.fold_in(key, r), mean.shape[1:], mean.dtype))(rows)
        return mean + jnp.exp(0.5 * logvar) * eps

    return jax.jit(encode)


def vq_encoder(module: VQAutoencoder, mean_only: bool = True) -> EncodeFn:
    """`encode(params, x, key, row0)` -> z_e(x), the encoder output before quantisation (key, row0 unused)."""
    del mean_only
    return jax.jit(lambda params, x, key, row0: module.apply(params, x, method="encode"))


def vq_decoder(module: VQAutoencoder) -> DecodeFn:
    """(params, z, s) -> D(z_q), z_q = the code nearest z / s (`autoencoders.quantize`)."""

    def decode(params, z, s):
        z_q = autoencoders.quantize(z / s, module.apply(params, method="codebook"))[2]
        return module.apply(params, z_q, method="decode")

    return decode


def vq_split_metrics(sums: dict) -> dict:
    """usage (codes used), num_codes K and perplexity exp(−Σ p log p) of the summed code histogram."""
    counts = np.asarray(sums["counts"], np.float64)
    p = counts / counts.sum()
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return {"usage": int(np.sum(counts > 0)), "num_codes": int(counts.size), "perplexity": float(np.exp(entropy))}


KINDS: dict[str, Kind] = {
    "kl": Kind(
        required=(), defaults={"beta": 1e-6},
        module=lambda a, c: KLAutoencoder(latent_channels=a["latent_channels"], **_network_kwargs(a, c)),
        sampled=True,
        loss=lambda m, a, recon: autoencoders.vae_loss(lambda p, x: m.apply(p, x, method="encode"),
                                                       lambda p, z: m.apply(p, z, method="decode"),
                                                       beta=float(a["beta"]), recon_loss=recon),
        latents=encoder,
        decoder=lambda m: lambda p, z, s: m.apply(p, z / s, method="decode"),
        batch_metrics=lambda aux: ({"recon": jnp.mean(aux["recon"]), "kl": jnp.mean(aux["kl"])}, {}),
        split_metrics=lambda sums: {}),
    "vq": Kind(
        required=("num_codes",), defaults={"commitment": 0.25},
        module=lambda a, c: VQAutoencoder(num_codes=a["num_codes"], code_dim=a["latent_channels"],
                                          **_network_kwargs(a, c)),
        sampled=False,
        loss=lambda m, a, recon: autoencoders.vq_vae_loss(lambda p, x: m.apply(p, x, method="encode"),
                                                          lambda p, z: m.apply(p, z, method="decode"),
                                                          codebook_fn=lambda p: m.apply(p, method="codebook"),
                                                          beta=float(a["commitment"]), recon_loss=recon),
        latents=vq_encoder,
        decoder=vq_decoder,
        batch_metrics=lambda aux: ({"recon": jnp.mean(aux["recon"]), "quantization": jnp.mean(aux["codebook"])},
                                   {"counts": aux["counts"]}),
        split_metrics=vq_split_metrics),
}

SCALE_FILE = "latent_scale.json"
AUTOENCODER_REQUIRED = ("f", "latent_channels", "n_iters", "batch_size", "lr")
AUTOENCODER_DEFAULTS = {"features": 32, "channel_mult": None, "num_res_blocks": 1, "scale_batches": 10}
DEFAULT_KIND = "kl"
COMMON_KEYS = frozenset(AUTOENCODER_REQUIRED) | frozenset(AUTOENCODER_DEFAULTS) | {"kind"}
KIND_KEYS = {name: frozenset(k.required) | frozenset(k.defaults) for name, k in KINDS.items()}
AUTOENCODER_KEYS = COMMON_KEYS | frozenset().union(*KIND_KEYS.values())
LATENT_DEFAULTS = {"use_mean": True, "autoencoder_workdir": None}
BITS_NOTE = ("latent_bits_per_dim is -log2 p(z)/D of the scaled latents z = s*E(x) (D = H/f * W/f * C) by the "
             "probability-flow ODE, without dequantisation. It is NOT pixel bits/dim: the decoder is not a "
             "bijection and defines no density on pixels, D is another dimension, and the scale s shifts it by "
             "log2(s) per dimension; a pixel NLL would need the decoder likelihood p(x|z) and the ELBO.")


def kind_name(config: ml_collections.ConfigDict) -> str:
    """`autoencoder.kind` (default "kl"); ValueError listing the valid kinds."""
    name = config.autoencoder.get("kind", DEFAULT_KIND)
    if name not in KINDS:
        raise ValueError(f"unknown autoencoder.kind {name!r}; valid: {sorted(KINDS)}")
    return name


def kind(config: ml_collections.ConfigDict) -> Kind:
    """The `Kind` of `autoencoder.kind`."""
    return KINDS[kind_name(config)]


def check_kind(config: ml_collections.ConfigDict) -> None:
    """ValueError for a key of another kind (e.g. autoencoder.beta with kind "vq"), a missing key of the
    kind, or `latent.use_mean = False` with a kind whose latents are deterministic (VQ's z_e)."""
    name, present = kind_name(config), set(config.autoencoder.keys())
    if foreign := sorted(present & (AUTOENCODER_KEYS - COMMON_KEYS - KIND_KEYS[name])):
        owners = sorted({n for n, keys in KIND_KEYS.items() if keys & set(foreign)})
        raise ValueError(f"autoencoder.kind = {name!r} does not read {[f'autoencoder.{k}' for k in foreign]} "
                         f"(key(s) of kind {owners}); the keys of kind {name!r}: {sorted(KIND_KEYS[name])}")
    if missing := sorted(set(KINDS[name].required) - present):
        raise ValueError(f"missing config key(s) {[f'autoencoder.{k}' for k in missing]} "
                         f"(required by autoencoder.kind = {name!r})")
    if not KINDS[name].sampled and not use_mean(config):
        raise ValueError(f"latent.use_mean = False has no meaning for autoencoder.kind = {name!r}: its latents "
                         "are the deterministic encoder output (VQ: z_e before quantisation); set it True or "
                         "remove it")


def autoencoder_settings(config: ml_collections.ConfigDict) -> dict:
    """`config.autoencoder` with its defaults (`AUTOENCODER_DEFAULTS`, the kind's `Kind.defaults`) filled in;
    "kind" is included for kinds other than "kl" (KL checkpoints saved before kinds existed have none)."""
    if "autoencoder" not in config:
        raise ValueError("latent diffusion needs config.autoencoder (keys: required "
                         f"{list(AUTOENCODER_REQUIRED)}, optional {sorted(AUTOENCODER_DEFAULTS)})")
    a, name = config.autoencoder, kind_name(config)
    k = KINDS[name]
    out = {key: a[key] for key in AUTOENCODER_REQUIRED + k.required}
    out.update({key: a.get(key, v) for key, v in {**AUTOENCODER_DEFAULTS, **k.defaults}.items()})
    out["channel_mult"] = None if out["channel_mult"] is None else tuple(out["channel_mult"])
    if name != DEFAULT_KIND:
        out["kind"] = name
    return out


def use_mean(config: ml_collections.ConfigDict) -> bool:
    """Whether the latents are the encoder mean μ(x) (True, default) or a posterior sample."""
    return bool(config.get("latent", {}).get("use_mean", LATENT_DEFAULTS["use_mean"]))


def autoencoder_dir(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
    """`latent.autoencoder_workdir`, default `<workdir>/autoencoder`."""
    given = config.get("latent", {}).get("autoencoder_workdir", None)
    return pathlib.Path(given) if given else pathlib.Path(workdir) / "autoencoder"


def build_autoencoder(config: ml_collections.ConfigDict) -> KLAutoencoder | VQAutoencoder:
    return kind(config).module(autoencoder_settings(config), config.data.num_channels)


def optimizer_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The autoencoder's optimizer: Adam(`autoencoder.lr`, β = (0.9, 0.999), ε = 1e-8), no warm-up, gradients
    clipped at global norm 1."""
    return ml_collections.ConfigDict(dict(optimizer="Adam", lr=float(autoencoder_settings(config)["lr"]), beta1=0.9,
                                          eps=1e-8, warmup=0, grad_clip=1.0, weight_decay=0.0))


def optimizer(config: ml_collections.ConfigDict):
    """The optax transformation of `optimizer_config`."""
    return state_lib.get_optimizer(optimizer_config(config))


def initial_state(config: ml_collections.ConfigDict, x: np.ndarray, rng: Array) -> tuple[Any, state_lib.TrainState]:
    """(module, step-0 train state) of the autoencoder, initialised on images shaped like `x[:1]`."""
    module, tx, example = build_autoencoder(config), optimizer(config), jnp.asarray(x[:1])
    init = jax.jit(lambda key: state_lib.create_train_state(module.init(key, example), tx, jax.random.fold_in(key, 1)))
    return module, init(rng)


def checkpointer(config: ml_collections.ConfigDict, ae_dir: pathlib.Path, allow_config_change: tuple[str, ...] = (),
                 keep: Optional[int] = None, keep_period: Optional[int] = None) -> checkpoint.Checkpointer:
    """The autoencoder's checkpoints `<ae_dir>/checkpoints`, saved with (and compared against) the
    autoencoder settings and the data section only: the diffusion model's settings may differ."""
    saved = {"autoencoder": autoencoder_settings(config), "data": config.data.to_dict()}
    return checkpoint.Checkpointer(ae_dir / "checkpoints", keep=keep, keep_period=keep_period, config=saved,
                                   allow_config_change=allow_config_change)


def read_scale(ae_dir: pathlib.Path) -> dict:
    """The saved latent scale (`SCALE_FILE`); FileNotFoundError saying to train the autoencoder first."""
    path = ae_dir / SCALE_FILE
    if not path.is_file():
        what = ("no autoencoder checkpoint" if not (ae_dir / "checkpoints").is_dir()
                else "an autoencoder checkpoint but no latent scale (its training has not finished)")
        raise FileNotFoundError(f"latent diffusion (config.latent): {what} in {ae_dir} ({SCALE_FILE} is missing); "
                                "run --mode=train_autoencoder first, with the same --config and --workdir")
    return json.loads(path.read_text())


def network_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config the diffusion network is built from: itself, or for a latent run a copy whose `data`
    describes the latents: image_size H/f, num_channels C, centered (the network reads z as it is)."""
    if "latent" not in config:
        return config
    a, c = autoencoder_settings(config), ml_collections.ConfigDict(config.to_dict())
    c.data.image_size = config.data.image_size // a["f"]
    c.data.num_channels = a["latent_channels"]
    c.data.centered = True
    return c


@dataclasses.dataclass
class LatentSource(sources.WrappedSource):
    """The `DataSource` of z = s·E(x) over a pixel source `inner`, encoded by the frozen autoencoder
    `params` (`encode`: the kind's `Kind.latents`); samples come back as pixels through `decode`. Continuous and
    unbounded (bits/dim with no dequantisation, reported as latent bits/dim: `describe_bits`).

    Noise of a sampled E(x) (use_mean False): training step k's batch from fold_in(fold_in(key, 0), k),
    held-out batch i from fold_in(fold_in(key, 1), i), the eval-loss batch from fold_in(key, 2), and
    per row its global index, so a resumed run encodes the same latents."""

    inner: sources.DataSource
    encode: EncodeFn
    decode_fn: DecodeFn  # (params, z, s) -> D(z / s), or D(quantize(z / s)): `Kind.decoder`
    params: Any
    scale: float
    key: Array
    data_range = None
    num_levels = None

    def __post_init__(self):
        self.num_classes, self.supports_fid = self.inner.num_classes, self.inner.supports_fid
        self.heldout = self._encoded(self.inner.heldout, jax.random.fold_in(self.key, 2))

    def _encoded(self, batch: dict, key: Array) -> dict:
        n = np.shape(batch["x"])[0]
        z = self.encode(self.params, batch["x"], key, jax.process_index() * n)
        return {**batch, "x": np.float32(self.scale) * np.asarray(z, np.float32)}

    def chunk(self, step: int, k: int) -> dict:
        c, key = self.inner.chunk(step, k), jax.random.fold_in(self.key, 0)
        z = [self._encoded({"x": c["x"][i]}, jax.random.fold_in(key, step + i))["x"] for i in range(k)]
        return {**c, "x": np.stack(z)}

    def eval_batches(self, batch_size: int) -> Iterator[dict]:
        key = jax.random.fold_in(self.key, 1)
        for i, batch in enumerate(self.inner.eval_batches(batch_size)):
            yield self._encoded(batch, jax.random.fold_in(key, i))

    def decode(self, z: Array) -> Array:
        """x = D(z / s) (KL) or D(quantize(z / s)) (VQ), in the pixel source's model range."""
        return self.decode_fn(self.params, z, self.scale)

    def describe_bits(self, bits: dict) -> dict:
        """Bits/dim of the latents renamed `latent_bits_per_dim*`, with `BITS_NOTE`."""
        renamed = {("latent_" + k if k.startswith("bits_per_dim") else k): v for k, v in bits.items()}
        return {**renamed, "note": BITS_NOTE}



def restore_autoencoder(config: ml_collections.ConfigDict, ae_dir: pathlib.Path, x: np.ndarray, step: int,
                        allow_config_change: tuple[str, ...] = ()) -> tuple[Any, Any]:
    """(module, parameters) of the autoencoder checkpoint at `step` in `ae_dir`."""
    module, target = initial_state(config, x, jax.random.PRNGKey(0))
    ckpt = checkpointer(config, ae_dir, allow_config_change)
    try:
        state, _ = ckpt.restore(target, step=step)
    finally:
        ckpt.close()
    return module, state.params


def source(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, data: sources.DataSource, key: Array,
           allow_config_change: tuple[str, ...] = ()) -> sources.DataSource:
    """`data` itself, or for a latent run (`config.latent`) the `LatentSource` over it, with the autoencoder
    checkpoint at the step its saved scale was estimated."""
    if "latent" not in config:
        return data
    ae_dir = autoencoder_dir(config, workdir)
    scale = read_scale(ae_dir)
    if scale["use_mean"] != use_mean(config):
        raise ValueError(f"latent.use_mean = {use_mean(config)} but the latent scale in {ae_dir / SCALE_FILE} was "
                         f"estimated with use_mean = {scale['use_mean']}; use that value or retrain the autoencoder "
                         "in a fresh autoencoder workdir")
    module, params = restore_autoencoder(config, ae_dir, data.heldout["x"], scale["autoencoder_step"],
                                         allow_config_change)
    k = kind(config)
    return LatentSource(data, k.latents(module, use_mean(config)), jax.jit(k.decoder(module)),
                        jax.device_put(jax.device_get(params)), float(scale["scale"]), key)
