"""Time grids for the fixed-step samplers: strictly descending arrays of t, from t_max (T) to eps.

A grid t_0 > t_1 > … > t_{n−1} is a float64 numpy array built outside jit (the sampler casts it to
the data dtype); every builder works on any linear SDE through `marginal_coeffs`, `log_snr` and
`t_from_log_snr`, and validates its output. The names follow k-diffusion, dpm-solver and diffusers:

    uniform     t_i = linspace(t_max, eps, n)                       (score_sde's PC grid; 'time_uniform')
    karras      σ̃_i = (σ̃_max^{1/ρ} + i/(n−1)(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ,  σ̃ = σ/α   (EDM)
    log_snr     λ_i = linspace(λ(t_max), λ(eps), n)                  (dpm-solver's 'logSNR')
    quadratic   t_i = linspace(√t_max, √eps, n)²                     (dpm-solver's 'time_quadratic')
    ddpm        t = i/(N_train − 1)·T at diffusers' integer timesteps i (leading / trailing / linspace)

Times with a given σ̃ or λ come from `sde.t_from_log_snr`; the end times t_max and eps are kept
exactly where the grid reaches them. `get_grid` accepts a name, a builder or a user array.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from sdejax.sde import SDE, check_per_example

GridBuilder = Callable[..., np.ndarray]


def _float64(fn: Callable[..., Any], *args: Any) -> np.ndarray:
    """`fn(*args)` of a jnp function evaluated in float64 (outside jit), as a writable numpy array."""
    with jax.ensure_compile_time_eval(), jax.enable_x64(True):  # concrete even inside an outer jit trace
        return np.array(fn(*(jnp.asarray(a, jnp.float64) for a in args)), np.float64)


def _sigma_tilde(sde: SDE, t: np.ndarray) -> np.ndarray:
    """σ̃(t) = σ_t/α_t in float64."""
    ratio = lambda alpha, sigma: sigma / alpha  # noqa: E731
    return _float64(lambda u: check_per_example(ratio(*sde.marginal_coeffs(u)), u, "a grid in sigma-tilde"), t)


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_n(n: int) -> None:
    _check_int("n (number of grid points)", n, 1)


def _ends(sde: SDE, eps: float | None, t_max: float | None) -> tuple[float, float]:
    """(t_max, eps) with defaults T and `sde.sampling_eps`, checked: t_min ≤ eps < t_max ≤ T."""
    hi = float(sde.T if t_max is None else t_max)
    lo = float(sde.sampling_eps if eps is None else eps)
    if not sde.t_min < hi <= sde.T:
        raise ValueError(f"t_max must lie in (t_min, T] = ({sde.t_min}, {sde.T}]; got {hi}")
    if not sde.t_min <= lo < hi:
        raise ValueError(f"eps must lie in [t_min, t_max) = [{sde.t_min}, {hi}); got {lo}")
    return hi, lo


def _pin_ends(ts: np.ndarray, first: float | None, last: float | None) -> np.ndarray:
    """Set ts[0] = first and ts[−1] = last exactly (where given), undoing the rounding of a round trip."""
    if last is not None and ts.size > 1:
        ts[-1] = last
    if first is not None:
        ts[0] = first
    return ts


def validate(sde: SDE, ts: Any) -> np.ndarray:
    """`ts` as a float64 grid, or a ValueError naming the first offending entry.

    A grid is 1-D with ≥ 1 entry, finite, strictly decreasing, inside [sde.t_min, sde.T], and has
    α(t) > 0 and σ(t) > 0 (a finite log-SNR) at every point.
    """
    try:
        arr = np.asarray(ts, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"ts must be a numeric array of times; got {ts!r}") from err
    if arr.ndim != 1:
        raise ValueError(f"ts must be a 1-D array of times; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("ts must have at least one entry; got an empty array")
    t = arr.tolist()
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise ValueError(f"ts must be finite; ts[{bad[0]}] = {t[bad[0]]}")
    bad = np.flatnonzero(np.diff(arr) >= 0)
    if bad.size:
        i = bad[0]
        raise ValueError(f"ts must be strictly decreasing; ts[{i}] = {t[i]!r} <= ts[{i + 1}] = {t[i + 1]!r}")
    bad = np.flatnonzero((arr < sde.t_min) | (arr > sde.T))
    if bad.size:
        raise ValueError(f"ts[{bad[0]}] = {t[bad[0]]!r} lies outside the SDE's time range "
                         f"[t_min, T] = [{sde.t_min}, {sde.T}]")
    bad = np.flatnonzero(~np.all(np.isfinite(_float64(sde.log_snr, arr)).reshape(arr.size, -1), axis=1))
    if bad.size:
        i = bad[0]
        raise ValueError(f"ts[{i}] = {t[i]!r} has an infinite log-SNR (α(t) = 0 or σ(t) = 0): every grid "
                         f"time needs α(t) > 0 and σ(t) > 0; end the grid at t > {t[i]!r} "
                         f"(e.g. sde.sampling_eps = {sde.sampling_eps})")
    return arr


def uniform(sde: SDE, n: int, eps: float | None = None, t_max: float | None = None) -> np.ndarray:
    """t_i = t_max + i/(n−1)(eps − t_max): score_sde's PC grid, `jnp.linspace(T, eps, N)` computed in float64."""
    _check_n(n)
    hi, lo = _ends(sde, eps, t_max)
    return validate(sde, _float64(lambda a, b: jnp.linspace(a, b, n), hi, lo))


def _clamped_sigma(name: str, value: float | None, default: float, lo: float, hi: float) -> float:
    """A σ̃ endpoint: `default` when None, else `value` clipped to the SDE's range [lo, hi]."""
    if value is None:
        return default
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number; got {value!r}")
    return float(np.clip(value, lo, hi))


def karras(sde: SDE, n: int, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None,
           eps: float | None = None) -> np.ndarray:
    """EDM's grid, uniform in σ̃^{1/ρ}: σ̃_i = (σ̃_max^{1/ρ} + i/(n−1)(σ̃_min^{1/ρ} − σ̃_max^{1/ρ}))^ρ.

    σ̃ = σ/α; the endpoints default to σ̃(T) and σ̃(eps) and are clamped to that range (EDM's
    0.002…80 never leaves the SDE's domain), t_i = t(λ = −2 log σ̃_i). ρ = 1 is linear in σ̃;
    ρ → ∞ tends to the log_snr grid (log σ̃ deviates from it by at most (Δ log σ̃)²/(8ρ)).
    """
    _check_n(n)
    if not (np.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a positive finite number; got {rho!r}")
    hi, lo = _ends(sde, eps, None)
    s_hi, s_lo = _sigma_tilde(sde, np.array([hi, lo]))
    top = _clamped_sigma("sigma_max", sigma_max, s_hi, s_lo, s_hi)
    bottom = _clamped_sigma("sigma_min", sigma_min, s_lo, s_lo, s_hi)
    if not bottom < top:
        raise ValueError(f"sigma_min must be below sigma_max after clamping to the SDE's range "
                         f"[σ̃(eps), σ̃(T)] = [{s_lo}, {s_hi}]; got sigma_min = {bottom}, sigma_max = {top}")
    ramp = np.linspace(0.0, 1.0, n)
    sig = (top ** (1 / rho) + ramp * (bottom ** (1 / rho) - top ** (1 / rho))) ** rho
    ts = _float64(sde.t_from_log_snr, -2.0 * np.log(_pin_ends(sig, top, bottom)))
    return validate(sde, _pin_ends(ts, hi if top == s_hi else None, lo if bottom == s_lo else None))


def log_snr(sde: SDE, n: int, eps: float | None = None, t_max: float | None = None) -> np.ndarray:
    """Uniform in log-SNR: λ_i = λ(t_max) + i/(n−1)(λ(eps) − λ(t_max)), t_i = t(λ_i) (dpm-solver's 'logSNR')."""
    _check_n(n)
    hi, lo = _ends(sde, eps, t_max)
    lam_hi, lam_lo = _float64(sde.log_snr, np.array([hi, lo]))
    ts = _float64(sde.t_from_log_snr, np.linspace(lam_hi, lam_lo, n))
    return validate(sde, _pin_ends(ts, hi, lo))


def quadratic(sde: SDE, n: int, eps: float | None = None, t_max: float | None = None) -> np.ndarray:
    """t_i = (√t_max + i/(n−1)(√eps − √t_max))² (dpm-solver's 'time_quadratic', DDIM's quadratic)."""
    _check_n(n)
    hi, lo = _ends(sde, eps, t_max)
    return validate(sde, _pin_ends(np.linspace(np.sqrt(hi), np.sqrt(lo), n) ** 2, hi, lo))


def _leading(n_train: int, num_steps: int) -> np.ndarray:
    return np.arange(num_steps, dtype=np.int64)[::-1] * (n_train // num_steps)


def _trailing(n_train: int, num_steps: int) -> np.ndarray:
    # diffusers' np.arange(N, 0, −N/num_steps) can hold one extra element ≈ 0 (e.g. 61 of 1000, which
    # would become timestep −1); the first num_steps are its grid.
    return np.round(np.arange(n_train, 0, -n_train / num_steps)[:num_steps]).astype(np.int64) - 1


def _linspace(n_train: int, num_steps: int) -> np.ndarray:
    return np.round(np.linspace(0, n_train - 1, num_steps))[::-1].astype(np.int64)


SPACINGS: dict[str, Callable[[int, int], np.ndarray]] = {
    "leading": _leading, "trailing": _trailing, "linspace": _linspace}


def ddpm_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
    """diffusers' integer timesteps (`timestep_spacing`), descending, int64, with N = num_train_timesteps:

    leading   (arange(num_steps) · (N // num_steps))[::-1] + steps_offset
    trailing  round(arange(N, 0, −N/num_steps)) − 1
    linspace  round(linspace(0, N − 1, num_steps))[::-1]

    As in diffusers, `steps_offset` applies to 'leading' only (elsewhere it must be 0).
    """
    _check_int("num_train_timesteps", num_train_timesteps, 1)
    _check_int("num_steps", num_steps, 1)
    _check_int("steps_offset", steps_offset, 0)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid spacings: {list(SPACINGS)}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps must be <= num_train_timesteps = {num_train_timesteps}; got {num_steps}")
    if steps_offset and spacing != "leading":
        raise ValueError(f"steps_offset applies to spacing='leading' only; got steps_offset = {steps_offset} "
                         f"with spacing = {spacing!r}")
    steps = SPACINGS[spacing](num_train_timesteps, num_steps) + steps_offset
    if steps[0] > num_train_timesteps - 1:
        raise ValueError(f"steps_offset = {steps_offset} moves the first timestep to {steps[0]}, past "
                         f"num_train_timesteps − 1 = {num_train_timesteps - 1}")
    return steps


def ddpm_grid(sde: SDE, num_steps: int, spacing: str = "leading", num_train_timesteps: int | None = None,
              steps_offset: int = 0) -> np.ndarray:
    """The times t = i/(N_train − 1)·T of `ddpm_timesteps` (the knots of score_sde's discrete labels
    and of `DiscreteVPSDE`; N_train defaults to sde.N). Timestep 0 is t = 0, where VP-type SDEs have
    σ = 0: there use 'trailing', `steps_offset=1` or a discrete-table schedule."""
    n_train = sde.N if num_train_timesteps is None else num_train_timesteps
    _check_int("num_train_timesteps", n_train, 2)
    steps = ddpm_timesteps(n_train, num_steps, spacing, steps_offset)
    return validate(sde, np.linspace(0.0, sde.T, n_train)[steps])


GRIDS: dict[str, GridBuilder] = {
    "uniform": uniform, "karras": karras, "log_snr": log_snr, "quadratic": quadratic, "ddpm": ddpm_grid}


def _check_options(name: str, builder: GridBuilder, options: dict[str, Any]) -> None:
    """Unknown keyword options fail fast with the builder's valid ones."""
    params = list(inspect.signature(builder).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params[2:]]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for grid {name!r}; valid options: {valid}")


def get_grid(grid: str | GridBuilder | Any, sde: SDE, n: int | None = None, **options: Any) -> np.ndarray:
    """A validated grid from a name in GRIDS, a builder `fn(sde, n, **options)`, or an array of times.

    An array takes no options; `n`, where given, must equal its length.
    """
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; valid names: {sorted(GRIDS)} (or an array of times)")
        name, builder = grid, GRIDS[grid]
    elif callable(grid):
        name, builder = getattr(grid, "__name__", repr(grid)), grid
    else:
        if options:
            raise ValueError(f"an array grid takes no options; got {sorted(options)}")
        ts = validate(sde, grid)
        if n is not None and n != ts.size:
            raise ValueError(f"n = {n} does not match the array grid's length {ts.size}")
        return ts
    if n is None:
        raise ValueError(f"grid {name!r} needs n, the number of grid points")
    _check_options(name, builder, options)
    return validate(sde, builder(sde, n, **options))
