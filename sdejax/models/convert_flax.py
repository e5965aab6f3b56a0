"""Load the original score_sde (JAX/Flax) checkpoints into sdejax's networks.

score_sde saved its training state with `flax.training.checkpoints.save_checkpoint` as files
`checkpoint_<k>`: one msgpack map {step, optimizer: {target, state}, lr, model_state, ema_rate,
params_ema, rng}. Sampling and evaluation used `params_ema`; `optimizer.target` holds the raw
training parameters. The file is read with `flax.serialization.msgpack_restore` (no pickle).

Names. score_sde's modules are `@nn.compact`, so Flax names every submodule `<Class>_<k>`, k
counting the instances of that class its parent created so far (parameter-free ones included);
sdejax's ports use the PyTorch names instead (`all_modules_3/Conv_0`, `res2_0/conv1`). The mapping
is derived, not tabulated per configuration: an abstract `init` of sdejax's network records the
order in which every module is first called, and each module gets the name the original gives its
counterpart (the original class name below, numbered per parent and class in that order). This
holds because sdejax's blocks create their submodules in the original's order, class by class;
`tests/test_flax_checkpoints.py` checks it on the original's outputs and on trees named after
score_sde's code for every resampling, pyramid, block and embedding option.

Networks: NCSN++ / DDPM++ (`ncsnpp`), DDPM (`ddpm`), NCSNv2 (`ncsnv2_64|128|256`, which needs
`config.model.flavor = 'flax'`: score_sde's Flax NCSNv2 is not the PyTorch one). score_sde's Flax
NCSN v1 cannot be built, so it has no checkpoints; it is refused.

Leaves are copied unchanged except: GroupNorm / InstanceNorm++ parameters stored by flax 0.3.x as
(1, 1, 1, C) become (C,) ((C,) is accepted too); the FIR resampling conv's `weight` is sdejax's
`kernel` (same (kh, kw, in, out) layout); the Fourier features `W` go to sdejax's `constants`.
Every name and shape is checked; whatever does not map is refused, naming the nearest expected
names.
"""
from __future__ import annotations

import collections
import difflib
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization, traverse_util
from flax.linen.module import InterceptorContext

from sdejax.models import registry

PathLike = Union[str, os.PathLike]
ModulePath = tuple[str, ...]

_SHARED = {"Conv": "Conv", "Dense": "Dense", "GroupNorm": "GroupNorm", "Dropout": "Dropout", "NIN": "NIN"}
_RESAMPLE = {"Upsample": "Upsample", "Downsample": "Downsample"}
# sdejax module class -> the class of its counterpart in score_sde, per network.
ORIGINAL_CLASS: dict[str, dict[str, str]] = {
    "NCSNpp": {**_SHARED, **_RESAMPLE, "FIRConv2d": "Conv2d", "Combine": "Combine",
               "GaussianFourierProjection": "GaussianFourierProjection", "AttnBlock": "AttnBlockpp",
               "ResnetBlockBigGAN": "ResnetBlockBigGANpp", "ResnetBlockDDPM": "ResnetBlockDDPMpp"},
    "DDPM": {**_SHARED, **_RESAMPLE, "AttnBlock": "AttnBlock", "ResnetBlockDDPM": "ResnetBlockDDPM"},
    "NCSNv2": {"Conv": "Conv", "InstanceNormPlus": "InstanceNorm2dPlus", "ResidualBlock": "ResidualBlock",
               "ConvMeanPool": "ConvMeanPool", "RefineBlock": "RefineBlock", "RCUBlock": "RCUBlock",
               "CRPBlock": "CRPBlock", "MSFBlock": "MSFBlock"},
}
# (original class, sdejax leaf) -> the original's leaf name, where they differ.
ORIGINAL_LEAF = {("Conv2d", "kernel"): "weight"}
# Original classes whose parameters flax 0.3.x stored as (1, 1, 1, C).
BROADCAST_SHAPED = ("GroupNorm", "InstanceNorm2dPlus")
TREES = ("params_ema", "params")
SHOWN = 20  # mismatches listed per kind in an error
NCSN_V1 = ("score_sde's Flax NCSN (v1) cannot be built (its ConditionalResidualBlock with resample='down' "
           "calls the normaliser's constructor with (h, y)), so no checkpoint of it exists; load NCSN v1 "
           "weights from score_sde_pytorch with sdejax.models.from_torch_state_dict")


def checkpoint_file(path: PathLike, step: Optional[int] = None) -> pathlib.Path:
    """The `checkpoint_<k>` file: `path` itself, or in the folder `path` number `step` (default: the newest)."""
    path = pathlib.Path(path)
    if path.is_file():
        if step is not None:
            raise ValueError(f"step={step} is only for a folder of checkpoints; {path} is a file")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no Flax checkpoint at {path}")
    found = {int(m.group(1)): p for p in path.iterdir() if (m := re.fullmatch(r"checkpoint_(\d+)", p.name))}
    if not found:
        raise FileNotFoundError(f"no checkpoint_<k> file in {path}")
    if step is None:
        return found[max(found)]
    if step not in found:
        raise FileNotFoundError(f"no checkpoint_{step} in {path}; present: {sorted(found)}")
    return found[step]


def read_flax_checkpoint(path: PathLike, step: Optional[int] = None) -> dict[str, Any]:
    """score_sde's training state as nested dicts of numpy arrays (see `checkpoint_file` for `path`, `step`)."""
    file = checkpoint_file(path, step)
    state = serialization.msgpack_restore(file.read_bytes())
    if not isinstance(state, dict) or not all(tree in state for tree in ("params_ema", "optimizer")):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{file} is not a score_sde training state (no params_ema / optimizer; has {keys})")
    return state


def _module_calls(model: nn.Module, config: ml_collections.ConfigDict) -> tuple[dict[ModulePath, str], Any]:
    """({module path: class name} in first-call order, abstract variables) of an abstract init."""
    calls: dict[ModulePath, str] = {}

    def record(call: Callable[..., Any], args: tuple, kwargs: dict, context: InterceptorContext) -> Any:
        if context.method_name == "__call__":
            calls.setdefault(tuple(context.module.path), type(context.module).__name__)
        return call(*args, **kwargs)

    x, labels = registry.dummy_inputs(config)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, x, labels))
    return calls, variables


def original_module_names(calls: Mapping[ModulePath, str], network: str) -> dict[ModulePath, ModulePath]:
    """sdejax module path -> the original's module path (`<Class>_<k>` per parent and class, call order)."""
    table = ORIGINAL_CLASS[network]
    counters: collections.Counter = collections.Counter()
    names: dict[ModulePath, ModulePath] = {(): ()}
    for path, cls in calls.items():
        if not path:
            continue
        if cls not in table:
            raise ValueError(f"sdejax module {'/'.join(path)} ({cls}) has no counterpart in score_sde's {network} "
                             "(e.g. class conditioning, which score_sde does not have)")
        parent, original = path[:-1], table[cls]
        names[path] = names[parent] + (f"{original}_{counters[parent, original]}",)
        counters[parent, original] += 1
    return names


def _check_network(model: nn.Module) -> str:
    """The network's class name, if score_sde has a Flax original of it as configured."""
    network = type(model).__name__
    if network == "NCSN":
        raise ValueError(NCSN_V1)
    if network not in ORIGINAL_CLASS:
        raise ValueError(f"no score_sde Flax counterpart for {network}; known: {sorted(ORIGINAL_CLASS)}")
    if network == "NCSNv2" and model.flavor != "flax":
        raise ValueError("score_sde's Flax NCSNv2 differs from score_sde_pytorch's (InstanceNorm++ variance, "
                         "MSF upsampling, 64px RefineBlock width): set config.model.flavor = 'flax'")
    return network


def expected_leaves(model: nn.Module, config: ml_collections.ConfigDict
                    ) -> dict[str, tuple[tuple[str, ...], jax.ShapeDtypeStruct]]:
    """'original/path/leaf' -> (sdejax variables key (collection, *path, leaf), its abstract value)."""
    network = _check_network(model)
    calls, variables = _module_calls(model, config)
    names = original_module_names(calls, network)
    expected = {}
    for key, value in traverse_util.flatten_dict(variables).items():
        module, leaf = names[key[1:-1]], key[-1]
        original_class = module[-1].rsplit("_", 1)[0]
        expected["/".join(module + (ORIGINAL_LEAF.get((original_class, leaf), leaf),))] = (key, value)
    return expected


def _fit(value: np.ndarray, path: str, target: jax.ShapeDtypeStruct) -> Optional[np.ndarray]:
    """`value` in the target's shape and dtype, or None when the shapes are incompatible."""
    value = np.asarray(value)
    if value.shape != target.shape:
        squeezable = (path.split("/")[-2].rsplit("_", 1)[0] in BROADCAST_SHAPED and len(target.shape) == 1
                      and value.shape == (1,) * (value.ndim - 1) + target.shape)
        if not squeezable:
            return None
        value = value.reshape(target.shape)
    return value.astype(target.dtype)


def _listed(kind: str, entries: list[str]) -> list[str]:
    """The first SHOWN entries as indented lines, then how many more there are."""
    more = [f"  ... and {len(entries) - SHOWN} more {kind}"] if len(entries) > SHOWN else []
    return [f"  {kind} {entry}" for entry in entries[:SHOWN]] + more


def _mismatch_report(unknown: list[str], bad_shapes: list[str], missing: list[str],
                     expected: Mapping[str, Any], network: str) -> str:
    near = [f"{path} (nearest expected: {', '.join(difflib.get_close_matches(path, list(expected), 3, 0.0))})"
            for path in unknown[:SHOWN]]
    return "\n".join([f"the Flax parameters do not fit sdejax's {network} for this config:",
                      *_listed("unknown", near + unknown[SHOWN:]), *_listed("wrong shape", bad_shapes),
                      *_listed("missing", missing)])


def from_flax_params(params: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict:
    """sdejax variables for `get_model(config)` from an original score_sde parameter tree."""
    model = registry.get_model(config)
    expected = expected_leaves(model, config)
    flat = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}
    converted, unknown, bad_shapes = {}, [], []
    for path, value in flat.items():
        if path not in expected:
            unknown.append(path)
            continue
        key, target = expected[path]
        array = _fit(value, path, target)
        if array is None:
            bad_shapes.append(f"{path}: {tuple(np.shape(value))}, expected {tuple(target.shape)}")
            continue
        converted[key] = jnp.asarray(array)
    missing = [path for path in expected if path not in flat]
    if unknown or bad_shapes or missing:
        raise ValueError(_mismatch_report(unknown, bad_shapes, missing, expected, type(model).__name__))
    return traverse_util.unflatten_dict(converted)


def load_flax_checkpoint(path: PathLike, config: ml_collections.ConfigDict, tree: str = "params_ema",
                         step: Optional[int] = None) -> dict:
    """sdejax variables for `get_model(config)` from a score_sde `checkpoint_<k>` file, or from its
    folder (`<workdir>/checkpoints`: number `step`, default the newest).

    `tree`: "params_ema" (what score_sde sampled and evaluated with) or "params" (the training
    parameters, `optimizer.target`). For both from one read, use `read_flax_checkpoint` and
    `from_flax_params`.
    """
    if tree not in TREES:
        raise ValueError(f"tree={tree!r} is not valid; choose from {list(TREES)}")
    state = read_flax_checkpoint(path, step)
    if state.get("model_state"):
        raise ValueError(f"the checkpoint has model_state {sorted(state['model_state'])}; "
                         "score_sde's networks have none and sdejax's cannot hold it")
    params = state["params_ema"] if tree == "params_ema" else state["optimizer"]["target"]
    return from_flax_params(params, config)
