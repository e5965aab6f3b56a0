"""LoRA adapters for the Dense, Conv, NIN and FIRConv2d kernels of any sdejax network.

    W' = W + s · reshape(A B, W.shape),   A (fan_in, r) ~ N(0, 1/fan_in),   B (r, out) = 0,   s = α / r

A kernel W of shape (..., in, out) is read as the matrix (fan_in, out), fan_in = prod(W.shape[:-1]):
Dense/NIN (in, out) as is, a conv kernel (kh, kw, in, out) flattened in C order, so that
conv(x, W') = conv(x, W) + s · conv(x, reshape(A, (kh, kw, in, r))) B: a conv with W's kernel size,
strides, padding and dilation down to r channels, then a 1×1 up-projection (exact for the FIR
up/down convs too: their FIR filter acts on every channel alike and so commutes with B).

The adapter is a pytree mirroring the variables dict, holding {"A", "B"} where the base holds a
selected kernel: {"params": {"Dense_0": {"kernel": {"A": ..., "B": ...}}}}. `merge` gives the
deployable merged variables (`merge(p, a, -s)` unmerges, to rounding); `lora_apply_fn` gives an
`apply_fn(adapter, x, labels, *, train, rng)` that runs the frozen base plus the unmerged branches,
so any sdejax objective can train the adapter as its "params" (LCM-LoRA: a few-step student as an
adapter over a frozen teacher). Adapters alone are saved with orbax (`save_adapter`, `load_adapter`).
"""
from __future__ import annotations

import functools
import math
import pathlib
import re
from typing import Any, Callable, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sdejax.models.layers import NIN
from sdejax.models.up_down import FIRConv2d

Array = jax.Array
Targets = Union[None, str, Callable[[str, tuple[int, ...]], bool]]

KERNEL_NAMES = ("kernel", "W")
# Layers the unmerged forward adapts: module type -> (its output-width field, its kernel's name).
LORA_LAYERS: dict[type, tuple[str, str]] = {nn.Dense: ("features", "kernel"), nn.Conv: ("features", "kernel"),
                                            NIN: ("num_units", "W"), FIRConv2d: ("features", "kernel")}


def _path_str(path: tuple[Any, ...]) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def kernel_paths(params: Any) -> dict[str, tuple[int, ...]]:
    """'/'-joined paths and shapes of the adaptable kernels: leaves named `kernel` or `W` of rank 2
    (Dense, NIN: (in, out)) or 4 (Conv: (kh, kw, in, out))."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path_str(p): tuple(v.shape) for p, v in leaves
            if str(getattr(p[-1], "key", p[-1])) in KERNEL_NAMES and len(v.shape) in (2, 4)}


def _shorten(names: list[str], limit: int = 12) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def select(params: Any, targets: Targets = None) -> dict[str, tuple[int, ...]]:
    """The kernels `targets` selects: None = all, a regex (`re.search` on the path, e.g.
    r"NIN_\\d/W$"), or a predicate(path, shape) -> bool. Selecting nothing is an error listing the kernels."""
    kernels = kernel_paths(params)
    if targets is None:
        chosen = kernels
    elif callable(targets):
        chosen = {k: s for k, s in kernels.items() if targets(k, s)}
    else:
        chosen = {k: s for k, s in kernels.items() if re.search(targets, k)}
    if not chosen:
        raise ValueError(f"LoRA targets {targets!r} match no kernel; available: {_shorten(sorted(kernels))}")
    return chosen


def lora_scale(rank: int, alpha: Optional[float] = None) -> float:
    """s = α / r (α defaults to r, i.e. s = 1)."""
    return 1.0 if alpha is None else float(alpha) / rank


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def init_lora(rng: Array, params: Any, rank: int, targets: Targets = None) -> dict:
    """Adapter {path: {"A": N(0, 1/fan_in) (fan_in, r), "B": zeros (r, out)}} for the selected kernels
    (nested like `params`). 1 ≤ rank ≤ min(fan_in, out) for every selected kernel."""
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1; got {rank!r}")
    chosen = select(params, targets)
    adapter: dict = {}
    for i, (path, shape) in enumerate(sorted(chosen.items())):
        fan_in, out = math.prod(shape[:-1]), shape[-1]
        if rank > min(fan_in, out):
            raise ValueError(f"LoRA rank {rank} exceeds min(fan_in, out) = min({fan_in}, {out}) of {path} "
                             f"{shape}; lower the rank or exclude it with `targets`")
        a = jax.random.normal(jax.random.fold_in(rng, i), (fan_in, rank), jnp.float32) / math.sqrt(fan_in)
        _set(adapter, path.split("/"), {"A": a, "B": jnp.zeros((rank, out), jnp.float32)})
    return adapter


def adapter_entries(adapter: Any) -> dict[str, tuple[Array, Array]]:
    """{kernel path: (A, B)} of an adapter."""
    leaves = jax.tree_util.tree_flatten_with_path(adapter)[0]
    entries: dict[str, dict[str, Array]] = {}
    for p, v in leaves:
        entries.setdefault(_path_str(p[:-1]), {})[str(getattr(p[-1], "key", p[-1]))] = v
    bad = [k for k, v in entries.items() if set(v) != {"A", "B"}]
    if bad:
        raise ValueError(f"not a LoRA adapter: entries without exactly {{'A', 'B'}} at {_shorten(bad)}")
    return {k: (v["A"], v["B"]) for k, v in entries.items()}


def _check_fit(path: str, shape: tuple[int, ...], a: Array, b: Array) -> None:
    fan_in, out = math.prod(shape[:-1]), shape[-1]
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != fan_in or b.shape != (a.shape[1], out):
        raise ValueError(f"LoRA adapter at {path}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the base "
                         f"kernel {shape} (need A (fan_in={fan_in}, r), B (r, out={out}))")


def check_fits(params: Any, adapter: Any) -> None:
    """Raise a ValueError naming the first adapter path absent from, or of the wrong shape for, `params`."""
    kernels = kernel_paths(params)
    for path, (a, b) in adapter_entries(adapter).items():
        if path not in kernels:
            raise ValueError(f"LoRA adapter path {path} is not a kernel of the base; base kernels: "
                             f"{_shorten(sorted(kernels))}")
        _check_fit(path, kernels[path], a, b)


def merge(params: Any, adapter: Any, scale: float) -> Any:
    """Variables with each adapted kernel replaced by W + scale · reshape(A B, W.shape), in W's dtype."""
    check_fits(params, adapter)
    entries = adapter_entries(adapter)

    def update(path: tuple[Any, ...], w: Array) -> Array:
        key = _path_str(path)
        if key not in entries:
            return w
        a, b = entries[key]
        return (w + scale * jnp.reshape(a @ b, w.shape)).astype(w.dtype)

    return jax.tree_util.tree_map_with_path(update, params)


def _node(adapter: Any, keys: tuple[str, ...]) -> Any:
    for k in keys:
        if not isinstance(adapter, dict) or k not in adapter:
            return None
        adapter = adapter[k]
    return adapter


def _interceptor(adapter: Any, scale: Array, used: set[str]) -> Callable[..., Any]:
    """Adds scale · down(x) B at each adapted layer: down = the layer itself, cloned with r output
    channels, kernel reshape(A), zero bias (so strides, padding, dilation, FIR and dtype are its own)."""
    inside_branch = [False]  # the cloned down-projection is itself a module call: pass it through

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        node = _node(adapter, ("params", *module.path))
        if inside_branch[0] or context.method_name != "__call__" or not isinstance(node, dict):
            return next_fun(*args, **kwargs)
        mine = [k for k, v in node.items() if isinstance(v, dict) and set(v) == {"A", "B"}]
        if not mine:
            return next_fun(*args, **kwargs)
        path = "/".join(("params", *module.path))
        if type(module) not in LORA_LAYERS or LORA_LAYERS[type(module)][1] != mine[0]:
            raise ValueError(f"LoRA adapter at {path}/{mine[0]}: unmerged LoRA supports "
                             f"{sorted(t.__name__ for t in LORA_LAYERS)}, not {type(module).__name__}; use merge()")
        if getattr(module, "feature_group_count", 1) != 1:
            raise ValueError(f"LoRA adapter at {path}: grouped convolutions are not supported; use merge()")
        field, kname = LORA_LAYERS[type(module)]
        own = module.variables["params"]
        a, b = node[kname]["A"], node[kname]["B"]
        _check_fit(f"{path}/{kname}", tuple(own[kname].shape), a, b)
        r = a.shape[1]
        down_params = {k: (jnp.reshape(a, v.shape[:-1] + (r,)) if k == kname else jnp.zeros(v.shape[:-1] + (r,), v.dtype))
                       for k, v in own.items()}
        out = next_fun(*args, **kwargs)
        inside_branch[0] = True
        try:
            h = module.clone(parent=None, **{field: r}).apply({"params": down_params}, *args, **kwargs)
        finally:
            inside_branch[0] = False
        used.add(f"{path}/{kname}")
        return out + (scale * jnp.einsum("...r,ro->...o", h, b.astype(h.dtype))).astype(out.dtype)

    return intercept


def _lora_forward(base_params: Any, scale: Array, adapter: Any, x: Array, labels: Array, *,
                  apply_fn: Callable[..., Array], **kwargs: Any) -> Array:
    check_fits(base_params, adapter)
    used: set[str] = set()
    with nn.intercept_methods(_interceptor(adapter, scale, used)):
        out = apply_fn(jax.lax.stop_gradient(base_params), x, labels, **kwargs)
    missing = sorted(set(adapter_entries(adapter)) - used)
    if missing:
        raise ValueError(f"LoRA adapter entries never reached by a {sorted(t.__name__ for t in LORA_LAYERS)} "
                         f"layer's __call__: {_shorten(missing)}; use merge() for these")
    return out


def lora_apply_fn(apply_fn: Callable[..., Array], base_params: Any, scale: float) -> Callable[..., Array]:
    """`f(adapter, x, labels, *, train=False, rng=None, **kw)` = the base network (frozen: a
    stop_gradient constant) with scale · (x A) B added at every adapted layer, without forming W'.

    A `jax.tree_util.Partial`: base params and scale are pytree leaves, so passing `f` into jit as an
    argument neither embeds the base as a constant nor recompiles for a new base or scale.
    """
    return jax.tree_util.Partial(functools.partial(_lora_forward, apply_fn=apply_fn), base_params,
                                 jnp.asarray(scale, jnp.float32))


def _joined_forward(params: tuple[Any, Any], x: Array, labels: Array, *, apply_fn: Callable[..., Array],
                    scale: float, **kwargs: Any) -> Array:
    base, adapter = params
    return _lora_forward(base, jnp.asarray(scale, jnp.float32), adapter, x, labels, apply_fn=apply_fn, **kwargs)


def joined_apply_fn(apply_fn: Callable[..., Array], scale: float) -> Callable[..., Array]:
    """`f((base, adapter), x, labels, *, train=False, rng=None, **kw)`: `lora_apply_fn` with the frozen
    base taken from the params pair, so a caller that holds the base elsewhere (the driver: the teacher's
    parameters, an argument of the jitted step) passes it in rather than closing over it."""
    return functools.partial(_joined_forward, apply_fn=apply_fn, scale=float(scale))


def save_adapter(path: Union[str, pathlib.Path], adapter: Any) -> None:
    """Write the adapter alone (orbax StandardCheckpointer; `path` must not exist yet)."""
    adapter_entries(adapter)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(pathlib.Path(path).absolute(), adapter)


def load_adapter(path: Union[str, pathlib.Path], like: Any) -> Any:
    """Restore an adapter shaped like `like` (an adapter, e.g. `init_lora(...)` for the intended base);
    a saved adapter of other paths or shapes is a ValueError naming the first mismatching path."""
    want = {f"{k}/{n}": tuple(v.shape) for k, ab in adapter_entries(like).items() for n, v in zip("AB", ab)}
    with ocp.StandardCheckpointer() as ckpt:
        meta = ckpt.metadata(pathlib.Path(path).absolute())
    meta = getattr(meta, "item_metadata", meta)
    saved = {_path_str(p): tuple(v.shape) for p, v in jax.tree_util.tree_flatten_with_path(meta)[0]}
    for key in sorted(set(saved) | set(want)):
        if saved.get(key) != want.get(key):
            raise ValueError(f"saved LoRA adapter at {path} does not fit: {key} has shape {saved.get(key)} in the "
                             f"file, {want.get(key)} expected")
    abstract = jax.tree_util.tree_map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), like)
    with ocp.StandardCheckpointer() as ckpt:
        return ckpt.restore(pathlib.Path(path).absolute(), abstract)
