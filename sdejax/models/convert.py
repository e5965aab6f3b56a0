"""Convert score_sde_pytorch weights into Flax variables for `get_model(config)`.

Names map mechanically: a torch path `all_modules.3.Conv_0.weight` becomes the Flax path
`all_modules_3/Conv_0/kernel` (a numeric component joins its predecessor with `_`). Layouts:

    conv weight (out, in, kh, kw) -> kernel (kh, kw, in, out)
    Linear weight (out, in)       -> kernel (in, out)
    GroupNorm weight              -> scale;  Embedding weight -> embedding
    NIN W/b, InstanceNorm++ alpha/gamma/beta, biases, Fourier W (-> `constants`) unchanged

The σ table buffer (`sigmas`) is recomputed from the config and skipped. A full training
checkpoint (`{'model', 'ema', 'optimizer', 'step'}`) is accepted; its `ema.shadow_params` is the
positional list of the *trainable* parameters in state-dict order, used when `ema=True`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from sdejax.models import registry

StateDict = Mapping[str, Any]
BUFFERS = ("sigmas",)
LEAF_CANDIDATES = {"weight": ("kernel", "scale", "embedding")}


def load_checkpoint(path: Union[str, os.PathLike]) -> Mapping[str, Any]:
    """Read `.npz` (numpy, no pickle) or `.pth`/`.pt` (torch.load with weights_only=True)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs torch (pip install torch); or export it to .npz") from e
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _flax_path(torch_name: str) -> tuple[tuple[str, ...], str]:
    """'refine1.adapt_convs.0.1_1_conv.weight' -> (('refine1', 'adapt_convs_0', '1_1_conv'), 'weight')."""
    parts: list[str] = []
    for p in torch_name.split("."):
        if p.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{p}"
        else:
            parts.append(p)
    return tuple(parts[:-1]), parts[-1]


def _to_flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _split_checkpoint(source: Mapping[str, Any], ema: bool) -> tuple[dict[str, np.ndarray], list | None]:
    """(model state dict without `module.` prefix, EMA shadow list or None)."""
    shadow = None
    if "model" in source and isinstance(source["model"], Mapping):
        if ema:
            ema_state = source.get("ema")
            if not isinstance(ema_state, Mapping) or "shadow_params" not in ema_state:
                raise ValueError("checkpoint has no ema.shadow_params; pass ema=False to load the raw weights")
            shadow = list(ema_state["shadow_params"])
        source = source["model"]
    state = {k: _to_numpy(v) for k, v in source.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state, shadow


def from_torch_state_dict(state_dict: Union[StateDict, str, os.PathLike], config: ml_collections.ConfigDict,
                          ema: bool = True) -> dict:
    """Flax variables for `get_model(config)` from a torch state dict, `.npz`/`.pth` path or full checkpoint.

    ema=True (default) takes the EMA weights when the input is a full checkpoint; a bare state dict
    is used as is. Every name and shape is checked; mismatches raise ValueError listing them.
    """
    source = load_checkpoint(state_dict) if isinstance(state_dict, (str, os.PathLike)) else state_dict
    state, shadow = _split_checkpoint(source, ema)

    model = registry.get_model(config)
    x, labels = registry.dummy_inputs(config)
    template = traverse_util.flatten_dict(
        jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, labels)))
    by_module = {key[1:]: key[0] for key in template}  # (module..., leaf) -> collection

    converted: dict[tuple[str, ...], np.ndarray] = {}
    trainable: list[tuple[str, ...]] = []
    unexpected, bad_shapes = [], []
    for name, value in state.items():
        if name in BUFFERS:
            continue
        module, leaf = _flax_path(name)
        match = next(((by_module[module + (c,)], c) for c in LEAF_CANDIDATES.get(leaf, (leaf,))
                      if module + (c,) in by_module), None)
        if match is None:
            unexpected.append(name)
            continue
        collection, flax_leaf = match
        key = (collection,) + module + (flax_leaf,)
        array = _to_flax_layout(value, flax_leaf).astype(np.float32)
        if array.shape != template[key].shape:
            bad_shapes.append(f"{name}: {value.shape} -> {array.shape}, expected {template[key].shape}")
            continue
        converted[key] = array
        if collection == "params":
            trainable.append(key)
    missing = ["/".join(k) for k in template if k not in converted]
    if unexpected or bad_shapes or missing:
        raise ValueError(f"state dict does not fit model {config.model.name!r}:\n"
                         f"  unexpected: {unexpected}\n  wrong shapes: {bad_shapes}\n  missing: {missing}")

    if shadow is not None:
        if len(shadow) != len(trainable):
            raise ValueError(f"ema.shadow_params has {len(shadow)} entries, model has {len(trainable)} trainable")
        for key, value in zip(trainable, shadow):
            array = _to_flax_layout(_to_numpy(value), key[-1]).astype(np.float32)
            if array.shape != converted[key].shape:
                raise ValueError(f"EMA entry for {'/'.join(key)} has shape {array.shape}, expected {converted[key].shape}")
            converted[key] = array
    return jax.tree_util.tree_map(jnp.asarray, traverse_util.unflatten_dict(converted))
