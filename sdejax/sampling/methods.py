"""Every sampler by name, with its options: `sample(method, rng, sde, score_fn, shape, **options)`.

The fast solvers run through `solve`: a solver object (`HeunSolver`, `DPMSolverPP`, `UniPC`, …) on a
grid of `num_steps` times built by name (`sdejax.sampling.grids`), from the prior or the caller's
`x_T`. `from_config(config.sampling)` binds a method and its options from a config (the keys each
method reads are listed in `CONFIG_KEYS`), validated before anything runs.

| method        | order | NFE (n grid points, with denoise)       | default grid |
|---------------|-------|------------------------------------------|--------------|
| pc            | 1     | (n−1)[pred] + n·k[corr] + 1             | uniform, n = sde.N |
| ddim          | 1     | n                                        | uniform      |
| euler         | 1     | n                                        | karras       |
| heun          | 2     | 2(n−1) + 1                               | karras       |
| dpm_solver    | 1–3   | n                                        | log_snr      |
| dpm_solver_2s | 2     | 2(n−1) + 1                               | log_snr      |
| unipc         | 2–4   | n                                        | log_snr      |
| ode / sde     | adaptive (diffrax) | counted                         | —            |
| ald           | —     | L·k + 1                                  | SMLD levels  |
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

import jax

from sdejax.sampling import grids
from sdejax.sampling.common import initial_x
from sdejax.sampling.ddim import ddim_sample
from sdejax.sampling.dpm_solver import DPMSolverPP, DPMSolverPP2S
from sdejax.sampling.heun import HeunSolver
from sdejax.sampling.langevin import annealed_langevin_sample
from sdejax.sampling.loop import Callback, Constraint, Solver, sample_loop
from sdejax.sampling.ode import ode_sample
from sdejax.sampling.pc import pc_sample
from sdejax.sampling.sde import sde_sample
from sdejax.sampling.unipc import UniPC
from sdejax.sde import SDE, ScoreFn

Array = jax.Array


def solve(
    solver: Solver,
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    num_steps: int | None = None,
    grid: Any = "log_snr",
    eps: float | None = None,
    *,
    ts: Any = None,
    x_T: Array | None = None,
    denoise: bool = True,
    dtype: Any = None,
    trajectory: bool = False,
    callback: Callback | None = None,
    constraint: Constraint | None = None,
    resample: tuple[int, int] | None = None,
    **grid_options: Any,
):
    """`solver` on the grid `ts` (or `grids.get_grid(grid, sde, num_steps, eps=eps, **grid_options)`)
    from x_T (default: a prior draw with the first half of `split(rng)`, in `dtype`, default float32).
    Returns `(samples, nfe)` (with `trajectory`: `(samples, xs, nfe)`, see `sample_loop`, also for the
    inverse-problem `constraint` and RePaint's `resample`)."""
    if ts is None:
        if num_steps is None:
            raise ValueError("give num_steps (the number of grid points) or a grid ts")
        ts = grids.get_grid(grid, sde, num_steps, eps=eps, **grid_options)
    else:
        ts = grids.get_grid(ts, sde, num_steps)
    prior_rng, rng = jax.random.split(rng)
    x = initial_x(sde, prior_rng, shape, x_T, dtype)
    return sample_loop(solver, sde, score_fn, rng, x, ts, denoise, trajectory, callback, constraint, resample)


@dataclasses.dataclass(frozen=True)
class FastMethod:
    """`(rng, sde, score_fn, shape, num_steps, grid, eps, **options)` for the solvers built by `make`:
    the options named in `solver_options` build the solver, the rest go to `solve`."""

    make: Callable[..., Solver]
    default_grid: str
    solver_options: tuple[str, ...] = ()

    def split(self, options: dict) -> tuple[Solver, dict]:
        built = self.make(**{k: options[k] for k in self.solver_options if k in options})
        return built, {k: v for k, v in options.items() if k not in self.solver_options}

    def __call__(self, rng, sde, score_fn, shape, num_steps=None, grid=None, eps=None, **options):
        built, rest = self.split(options)
        return solve(built, rng, sde, score_fn, shape, num_steps, grid or self.default_grid, eps, **rest)

    def check(self, options: dict) -> None:
        self.split(options)


METHODS: dict[str, Callable] = {
    "pc": pc_sample,
    "ddim": ddim_sample,
    "ode": ode_sample,
    "sde": sde_sample,
    "ald": annealed_langevin_sample,
    "euler": FastMethod(functools.partial(HeunSolver, second_order=False), "karras"),
    "heun": FastMethod(HeunSolver, "karras", ("s_churn", "s_tmin", "s_tmax", "s_noise")),
    "dpm_solver": FastMethod(DPMSolverPP, "log_snr", ("order", "eta", "lower_order_final")),
    "dpm_solver_2s": FastMethod(DPMSolverPP2S, "log_snr"),
    "unipc": FastMethod(UniPC, "log_snr", ("order", "variant", "corrector", "lower_order_final")),
}

_GRID_KEYS = {"num_steps": "num_steps", "grid": "grid", "rho": "rho", "eps": "eps", "denoise": "noise_removal"}
# method -> {function option: config.sampling key}; a key absent from the config keeps the default.
CONFIG_KEYS: dict[str, dict[str, str]] = {
    "pc": {"predictor": "predictor", "corrector": "corrector", "snr": "snr", "n_steps": "n_steps_each",
           "probability_flow": "probability_flow", "denoise": "noise_removal", "eps": "eps",
           "langevin_norm": "langevin_norm", "ending": "ending"},
    "ddim": {"num_steps": "num_steps", "eta": "eta", "denoise": "noise_removal", "eps": "eps"},
    "ode": {"rtol": "rtol", "atol": "atol", "denoise": "noise_removal", "eps": "eps", "solver": "ode_solver"},
    "sde": {"rtol": "rtol", "atol": "atol", "eps": "eps", "solver": "sde_solver", "num_steps": "num_steps"},
    "ald": {"n_steps_each": "n_steps_each", "step_lr": "snr", "denoise": "noise_removal"},
    "euler": dict(_GRID_KEYS),
    "heun": {**_GRID_KEYS, "s_churn": "s_churn", "s_tmin": "s_tmin", "s_tmax": "s_tmax", "s_noise": "s_noise"},
    "dpm_solver": {**_GRID_KEYS, "order": "order", "eta": "eta", "lower_order_final": "lower_order_final"},
    "dpm_solver_2s": dict(_GRID_KEYS),
    "unipc": {**_GRID_KEYS, "order": "order", "variant": "variant", "corrector": "use_corrector",
              "lower_order_final": "lower_order_final"},
}
ALL_CONFIG_KEYS = frozenset({"method"} | {k for keys in CONFIG_KEYS.values() for k in keys.values()})


def get_method(name: str) -> Callable:
    """The sampling function called `name`, or a ValueError listing the valid names."""
    if name not in METHODS:
        raise ValueError(f"unknown sampling method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name]


def sample(method: str, rng: Array, sde: SDE, score_fn: ScoreFn, shape: tuple[int, ...], **options: Any):
    """Samples by `method` (a name in METHODS) with its `options`; returns `(samples, nfe)`."""
    return get_method(method)(rng, sde, score_fn, tuple(shape), **options)


def check_options(method: str, options: dict) -> None:
    """Fail now on an unknown option or a bad solver setting of `method` (the solver is built)."""
    fn = get_method(method)
    check = getattr(fn, "check", None)
    if check is not None:
        check(options)
    try:
        inspect.signature(fn).bind(None, None, None, (), **options)
    except TypeError as e:
        raise ValueError(f"sampling method {method!r}: {e}") from None


def from_config(sampling: Any) -> Callable[[Array, SDE, ScoreFn, tuple[int, ...]], tuple[Array, Any]]:
    """`fn(rng, sde, score_fn, shape)` sampling by `sampling.method` with the options `CONFIG_KEYS`
    reads from `sampling` (a ConfigDict or mapping; `grid = "default"` keeps the method's default
    grid); unknown keys, names and solver settings fail here, before anything runs."""
    method = sampling["method"]
    get_method(method)
    if unknown := set(sampling.keys()) - ALL_CONFIG_KEYS:
        raise ValueError(f"unknown sampling key(s) {sorted(unknown)}; valid: {sorted(ALL_CONFIG_KEYS)}")
    options = {opt: sampling[key] for opt, key in CONFIG_KEYS[method].items()
               if key in sampling and not (key == "grid" and sampling[key] == "default")}
    check_options(method, options)
    return functools.partial(sample, method, **options)
