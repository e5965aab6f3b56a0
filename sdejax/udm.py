"""The unified diffusion model (UDM; Su 2022, spaces.ac.cn/archives/9262) and cold diffusion (Bansal et al. 2022).

Forward: x_t = F_t(x_0, ε), ε ~ q(ε) (`sdejax.degradations`). A network predicts x̂_0 = G(x_t, t), trained by
−log q(x_0 | F_t(x_0, ε)): the MSE ‖x_0 − x̂_0‖² for continuous data, the cross-entropy for tokens
(`udm_loss`). Sampling walks a descending grid t_0 > … > t_{n−1}, predicting x̂_0 at (x_t, t) and
moving to s < t by one update rule (`RULES`), with ε̂ = F_t⁻¹(x̂_0, x_t) and D(x, t) = F_t(x, ε₀):

    deterministic   x_s = F_s(x̂_0, ε̂)                                  (DDIM η = 0 for `gaussian`)
    fresh           x_s = F_s(x̂_0, z),  z ~ q(ε)                        (p(x_s | x_t, x_0) = p(x_s | x_0))
    interp          x_s = F_s(x̂_0, sqrt(1 − ρ²) ε̂ + ρ z), ρ = `mix_weight(t, s, η)` (DDIM η for `gaussian`)
    cold_naive      x_s = D(x̂_0, s)                                    (Bansal et al., Algorithm 1)
    cold_improved   x_s = x_t − D(x̂_0, t) + D(x̂_0, s)                  (Bansal et al., Algorithm 2)

"deterministic" and "interp" need an invertible degradation (`invertible`). The cold rules treat the
degradation as the deterministic map D(x, t) = F_t(x, ε₀), ε₀ drawn once per call (none for blur,
mask, linear). With D(x, t) = x + t e, Algorithm 2 steps x_s = x_t − (t − s) e and recovers x_0 from
x_T = x_0 + T e exactly whatever the restorer.

Keys, as `sample_loop`: step i (t_i → t_{i+1}) draws z from fold_in(rng, i); ε₀ is drawn from
fold_in(rng, n − 1). So `udm_sample(split(k)[1], gaussian(sde), …, rule="interp", eta=η)` draws the
noise of `ddim_sample(k, sde, …, eta=η)` from the same x_T.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.degradations import Degradation
from sdejax.masked import T_SAMPLING, sample_times
from sdejax.sampling.loop import check_batch_axis, score_pytree
from sdejax.sde import batch_broadcast

Array = jax.Array
X0Fn = Callable[[Array, Array], Array]
LossFn = Callable[[Any, Array, dict], tuple[Array, dict]]


def _deterministic(deg, x, x0, t, s, eta, z, eps0):
    return deg.apply(x0, deg.invert(x0, x, t), s)


def _fresh(deg, x, x0, t, s, eta, z, eps0):
    return deg.apply(x0, z, s)


def _interp(deg, x, x0, t, s, eta, z, eps0):
    rho = batch_broadcast(deg.mix_weight(t, s, eta), x)
    return deg.apply(x0, jnp.sqrt(1.0 - rho**2) * deg.invert(x0, x, t) + rho * z, s)


def _cold_naive(deg, x, x0, t, s, eta, z, eps0):
    return deg.apply(x0, eps0, s)


def _cold_improved(deg, x, x0, t, s, eta, z, eps0):
    return x - deg.apply(x0, eps0, t) + deg.apply(x0, eps0, s)


RULES: dict[str, Callable[..., Array]] = {
    "deterministic": _deterministic, "fresh": _fresh, "interp": _interp,
    "cold_naive": _cold_naive, "cold_improved": _cold_improved,
}
INVERTING_RULES = ("deterministic", "interp")
LOSS_KINDS = ("mse", "xent")


def check_rule(degradation: Degradation, rule: str, eta: float = 0.0) -> float:
    """`eta` as a float, else a ValueError: an unknown rule (listing `RULES`), a rule that needs F_t⁻¹ on
    a degradation without one, η outside [0, 1], or η ≠ 0 for a rule that does not read it."""
    if rule not in RULES:
        raise ValueError(f"unknown UDM rule {rule!r}; valid: {list(RULES)}")
    if rule in INVERTING_RULES and not degradation.invertible:
        others = [r for r in RULES if r not in INVERTING_RULES]
        raise ValueError(f"rule {rule!r} recovers ε = F_t^-1(x0_hat, x_t), but the {degradation.name!r} degradation "
                         f"has no inverse (no noise to recover); use one of {others}")
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1]; got {eta}")
    if eta != 0.0 and rule != "interp":
        raise ValueError(f"eta = {eta} is only read by rule 'interp'; got rule {rule!r}")
    return eta


def check_grid(degradation: Degradation, ts: Any) -> np.ndarray:
    """`ts` as a float64 array: 1-D, ≥ 1 entry, finite, strictly decreasing, inside [t_min, T]."""
    arr = np.asarray(ts, np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"ts must be a non-empty 1-D grid of times; got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"ts must be finite; got {arr.tolist()}")
    bad = np.flatnonzero(np.diff(arr) >= 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"ts must be strictly decreasing; ts[{i}] = {arr[i]!r} <= ts[{i + 1}] = {arr[i + 1]!r}")
    lo, hi = degradation.t_min, degradation.T
    if arr[-1] < lo or arr[0] > hi:
        raise ValueError(f"ts must lie in [t_min, T] = [{lo}, {hi}] of the {degradation.name!r} degradation; "
                         f"got [{arr[-1]}, {arr[0]}]")
    return arr


def udm_step(degradation: Degradation, rule: str, x: Array, x0: Array, t: Array, s: Array,
             eta: float | Array = 0.0, z: Array | None = None, eps0: Array | None = None) -> Array:
    """One update x_t → x_s (s < t, both (batch,)) given x̂_0 by `rule` (module docstring); `z` is the fresh
    noise ("fresh", "interp"), `eps0` the fixed noise of the cold rules' D."""
    return RULES[rule](degradation, x, x0, t, s, eta, z, eps0)


def _time_dtype(x: Array):
    return x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)


@functools.partial(jax.jit, static_argnames=("rule", "denoise"))
def _run(x0_fn, degradation, rng, x, ts, eta, *, rule, denoise):
    dtype = _time_dtype(x)
    ts = ts.astype(dtype)
    n = ts.shape[0]
    eps0 = degradation.noise(jax.random.fold_in(rng, n - 1), x.shape, dtype)

    def body(x, i):
        t, s = jnp.full(x.shape[:1], ts[i], dtype), jnp.full(x.shape[:1], ts[i + 1], dtype)
        z = degradation.noise(jax.random.fold_in(rng, i), x.shape, dtype)
        x_s = udm_step(degradation, rule, x, x0_fn(x, t), t, s, eta, z, eps0)
        return x_s.astype(x.dtype), None

    if n > 1:
        x, _ = jax.lax.scan(body, x, jnp.arange(n - 1))
    return x0_fn(x, jnp.full(x.shape[:1], ts[-1], dtype)) if denoise else x


def udm_sample(rng: Array, degradation: Degradation, x0_fn: X0Fn, x_T: Array, ts: Any, rule: str = "deterministic",
               eta: float = 0.0, denoise: bool = True) -> tuple[Array, int]:
    """UDM sampling from the caller's `x_T` on the caller's descending grid `ts` (n points); returns
    `(samples, nfe)`.

    n − 1 updates t_i → t_{i+1} by `rule` (module docstring) with x̂_0 = x0_fn(x, t) (t of shape (batch,));
    with `denoise` the output is x̂_0 at t_{n−1}, else x at t_{n−1}. NFE = n − 1 + [denoise]. The state
    keeps the dtype of `x_T` (integer tokens for `mask`). `x0_fn` enters the compiled program as a pytree
    (a `jax.tree_util.Partial` over network parameters reuses it); keys: module docstring.
    """
    eta = check_rule(degradation, rule, eta)
    grid = check_grid(degradation, ts)
    x_T = jnp.asarray(x_T)
    check_batch_axis("x_T", x_T.shape)
    out = _run(score_pytree(x0_fn), degradation, rng, x_T, jnp.asarray(grid, _time_dtype(x_T)), eta,
               rule=rule, denoise=bool(denoise))
    return out, grid.size - 1 + int(bool(denoise))


def _example_noise(degradation: Degradation, keys: Array, x0: Array, dtype) -> Array | None:
    """ε per example from its own key (None for a deterministic degradation)."""
    return jax.vmap(lambda k: degradation.noise(k, x0.shape[1:], dtype))(keys)


def _per_example_mean(v: Array) -> Array:
    return jnp.mean(jnp.reshape(v, (v.shape[0], -1)), axis=-1)


def _mse(out: Array, x0: Array) -> Array:
    """mean ‖x̂_0 − x_0‖² per example."""
    if out.shape != x0.shape:
        raise ValueError(f"the network must return x0_hat of shape {x0.shape}; got {out.shape}")
    return _per_example_mean(jnp.square(out - x0))


def _xent(logits: Array, x0: Array) -> Array:
    """mean −log softmax(logits)[x_0] per example (nats per token)."""
    if logits.shape[:-1] != x0.shape:
        raise ValueError(f"the network must return logits of shape {x0.shape} + (K,); got {logits.shape}")
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    return _per_example_mean(-jnp.take_along_axis(logp, x0[..., None], axis=-1)[..., 0])


def _check_data(batch: dict, kind: str) -> Array:
    if "x" not in batch:
        raise ValueError(f"batch must be a dict with key 'x'; got keys {sorted(batch)}")
    x0 = jnp.asarray(batch["x"])
    check_batch_axis("batch['x']", x0.shape)
    floating = jnp.issubdtype(x0.dtype, jnp.floating)
    if floating != (kind == "mse"):
        need = "floating data" if kind == "mse" else "integer tokens"
        raise ValueError(f"loss kind {kind!r} needs {need} in batch['x']; got dtype {x0.dtype}")
    return x0


def udm_loss(apply_fn: Callable[..., Array], degradation: Degradation, kind: str = "mse",
             t_sampling: str = "uniform", t_min: float = 0.0, train: bool = True) -> LossFn:
    """loss_fn(params, rng, batch) -> (mean loss, aux): the x_0-prediction objective
    E_{t, x_0, ε} ℓ(G(F_t(x_0, ε), t), x_0) with ℓ the per-example mean of (x̂_0 − x_0)² ("mse", floating
    batch["x"]) or of −log softmax(logits)[x_0] ("xent", integer tokens, logits (B, ..., K)).

    apply_fn(params, x_t, t, train=, rng=) gets t of shape (B,) itself as the label. t ~ U[max(t_min,
    t_min of the degradation), T] iid or by the Kronecker sequence (`t_sampling` "golden", as
    `sdejax.masked`). Per example, t and ε come from fold_in(key, index), index = batch["index"]
    (default 0..B−1), so a sharded batch draws the noise of the whole one; the network key folds in
    index[0]. aux: {"losses": (B,), "t": (B,)}.
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown UDM loss kind {kind!r}; valid: {list(LOSS_KINDS)}")
    if t_sampling not in T_SAMPLING:
        raise ValueError(f"unknown t_sampling {t_sampling!r}; valid: {list(T_SAMPLING)}")
    lo, hi = max(float(t_min), degradation.t_min), degradation.T
    if not (math.isfinite(lo) and lo < hi):
        raise ValueError(f"t_min must be below T = {hi} of the {degradation.name!r} degradation; got {t_min}")
    per_example = _mse if kind == "mse" else _xent

    def loss_fn(params: Any, rng: Array, batch: dict) -> tuple[Array, dict]:
        x0 = _check_data(batch, kind)
        n = x0.shape[0]
        index = jnp.asarray(batch.get("index", jnp.arange(n)))
        if index.shape != (n,):
            raise ValueError(f"batch['index'] must have shape ({n},); got {index.shape}")
        t_rng, e_rng, net_rng, shift_rng = jax.random.split(rng, 4)
        fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
        dtype = _time_dtype(x0)
        u = sample_times(fold(t_rng, index), index, shift_rng, 0.0, t_sampling).astype(dtype)
        t = lo + (hi - lo) * u
        x_t = degradation.apply(x0, _example_noise(degradation, fold(e_rng, index), x0, dtype), t)
        out = apply_fn(params, x_t, t, train=train, rng=jax.random.fold_in(net_rng, index[0]))
        losses = per_example(out, x0)
        return jnp.mean(losses), {"losses": losses, "t": t}

    return loss_fn
