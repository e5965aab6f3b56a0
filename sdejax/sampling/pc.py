"""Predictor–corrector sampling (Song et al., 2021, Alg. 1–5), generic over linear SDEs.

On a grid t_0 > … > t_{n−1} (default linspace(T, eps, N), N = sde.N, as the original), from x_T:
for i = 0 … n−2, a corrector at t_i, then a predictor from t_i to t_{i+1}; then a corrector at
t_{n−1} and, with `denoise`, Tweedie's x̂_0 = (x + σ² s(x, t_{n−1}))/α. Score evaluations:

    NFE = (n − 1)·[predictor] + n·n_steps·[corrector] + [denoise].

`ending="score_sde"` reproduces the original's loop instead: the predictor also runs at t_{n−1},
every predictor step targets s = t − T/n (so Euler–Maruyama uses dt = −T/n on the grid spaced
(T − eps)/(n − 1)), and `denoise` returns the last predictor step's mean (no Tweedie step):
NFE = n·[predictor] + n·n_steps·[corrector].

Predictors: `predictor(rng, sde, score_fn, x, t, s) -> (x_s, mean)`, one step t → s (both
`(batch,)`, s < t; s may lie below t_min with `ending="score_sde"`), z ~ N(0, I), reverse drift
f̄ = f − g² s (halved for the probability-flow ODE):
- `euler_maruyama`:     x_s = x + f̄(x, t)(s − t) + g(t) sqrt(t − s) z.
- `reverse_diffusion`:  x ← x − F + G² s(x, t) + G z with (F, G) = sde.discretize(x, t), the reverse of
  the SDE's own discrete chain (SMLD for VE, DDPM for VP); it steps one level of that chain.
- `ancestral_sampling`: x_s ~ q(x_s | x_t, x̂_0), the Gaussian posterior of the linear SDE, i.e. the
  DDIM step with η = 1 (η = 0, the deterministic DDIM, when `probability_flow`). For VE this is the
  original's ancestral step; for VP it has the original's mean (x + β s)/sqrt(1 − β) but the posterior
  variance β̃ = β σ_s²/σ_t² in place of β.
Correctors: `corrector(rng, sde, score_fn, x, t) -> (x, mean)`, one move at t, repeated n_steps
times; here x ← x + ε s(x, t) + sqrt(2ε) z, ε = 2 a_t (snr·r)² (`Langevin`):
- `langevin`: r = ‖z‖/‖s(x, t)‖. `langevin_norm="per_example"` (default) takes the norms per example;
  "batch" takes r = mean_b ‖z_b‖ / mean_b ‖s_b‖ over the batch, as the original (which also pmeans
  them over devices: under jit over a Mesh, jnp.mean over the sharded batch axis is a global
  reduction, so the step is the same for any device count). "batch" makes a sample depend on its
  batch-mates. The per-example step depends on the example's own state and noise, which biases the
  chain by O(1/d): for Gaussian data in R^d its stationary covariance is τ(Σ + 2I/tr Σ⁻¹),
  τ = (d+2)/d — negligible for images, infinite variance at d = 2. Use `ald` for low-dimensional data.
- `ald`: r = σ_t (annealed Langevin dynamics).
a_t = (α_t / α_{t−T/N})² generalises the original's α_i = 1 − β_i (VP) and 1 (VE): for the DDPM chain
α_t²/α_{t−Δ}² = exp(−∫β) ≈ 1 − β_i, for VE it is 1, and it is defined for sub-VP too (the original crashed).
Callables count one score evaluation per call unless they carry an `nfe` attribute; named ones are
frozen dataclasses, equal by value, so equal options reuse the compiled sampler.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from sdejax.sampling.common import check_int, check_number, initial_x, per_example_norm, time_grid
from sdejax.sampling.ddim import ddim_step
from sdejax.sampling.loop import Callback, Constraint, batch_time, sample_loop
from sdejax.score import tweedie_x0
from sdejax.sde import SDE, ScoreFn, batch_broadcast

Array = jax.Array
Predictor = Callable[[Array, SDE, ScoreFn, Array, Array, Array], tuple[Array, Array]]
Corrector = Callable[[Array, SDE, ScoreFn, Array, Array], tuple[Array, Array]]
ENDINGS = ("sdejax", "score_sde")
LANGEVIN_NORMS = ("per_example", "batch")


@dataclasses.dataclass(frozen=True)
class EulerMaruyama:
    """x_s = x + f̄(x, t)(s − t) + ḡ(t) sqrt(t − s) z for the reverse SDE (ḡ = 0 for the ODE)."""

    probability_flow: bool = False

    def __call__(self, rng, sde: SDE, score_fn: ScoreFn, x, t, s) -> tuple[Array, Array]:
        drift, diffusion = sde.reverse(score_fn, self.probability_flow).sde(x, t)
        dt = s - t
        z = jax.random.normal(rng, x.shape, x.dtype)
        mean = x + batch_broadcast(dt, x) * drift
        return mean + batch_broadcast(diffusion, x) * batch_broadcast(jnp.sqrt(-dt), x) * z, mean


@dataclasses.dataclass(frozen=True)
class ReverseDiffusion:
    """x ← x − F̄ + Ḡ z with (F̄, Ḡ) the reverse discretisation (F̄ = F − G² s, Ḡ = G; ODE: F − G² s/2, 0)."""

    probability_flow: bool = False

    def __call__(self, rng, sde: SDE, score_fn: ScoreFn, x, t, s) -> tuple[Array, Array]:
        del s  # the step is one level of the SDE's own discrete chain
        f, g = sde.reverse(score_fn, self.probability_flow).discretize(x, t)
        z = jax.random.normal(rng, x.shape, x.dtype)
        mean = x - f
        return mean + batch_broadcast(g, x) * z, mean


@dataclasses.dataclass(frozen=True)
class AncestralSampling:
    """x_s ~ q(x_s | x_t, x̂_0): the DDIM step with η = 1 (η = 0 for the probability-flow variant)."""

    probability_flow: bool = False

    def __call__(self, rng, sde: SDE, score_fn: ScoreFn, x, t, s) -> tuple[Array, Array]:
        s = jnp.maximum(s, sde.t_min)  # the score_sde ending's last target t − T/n may lie below t_min
        x0 = tweedie_x0(sde, score_fn, x, t)
        z = jax.random.normal(rng, x.shape, x.dtype)
        eta = 0.0 if self.probability_flow else 1.0
        return ddim_step(sde, x, x0, t, s, eta, z), ddim_step(sde, x, x0, t, s, eta, jnp.zeros_like(z))


def langevin_step_scale(sde: SDE, t: Array) -> Array:
    """a_t = (α_t / α_{max(t − T/N, t_min)})²: the generic form of the original's α_i (1 − β_i, or 1 for VE)."""
    alpha, _ = sde.marginal_coeffs(t)
    prev, _ = sde.marginal_coeffs(jnp.maximum(t - sde.T / sde.N, sde.t_min))
    return (alpha / prev) ** 2


_RATIOS = {  # r in ε = 2 a_t (snr·r)², from (sde, t, noise z, score)
    "per_example": lambda sde, t, z, score: per_example_norm(z) / per_example_norm(score),
    "batch": lambda sde, t, z, score: jnp.mean(per_example_norm(z)) / jnp.mean(per_example_norm(score)),
    "sigma": lambda sde, t, z, score: sde.marginal_coeffs(t)[1],
}


@dataclasses.dataclass(frozen=True)
class Langevin:
    """One move x ← x + ε s(x, t) + sqrt(2ε) z, ε = 2 a_t (snr·r)²; `norm` picks r: "per_example"
    ‖z‖/‖s‖, "batch" mean‖z‖/mean‖s‖ over the batch (score_sde), "sigma" σ_t (ALD, Alg. 5)."""

    snr: float = 0.16
    norm: str = "per_example"

    def __post_init__(self):
        if self.norm not in _RATIOS:
            raise ValueError(f"unknown Langevin norm {self.norm!r}; valid: {list(_RATIOS)}")

    def __call__(self, rng, sde: SDE, score_fn: ScoreFn, x, t) -> tuple[Array, Array]:
        score = score_fn(x, t)
        z = jax.random.normal(rng, x.shape, x.dtype)
        r = _RATIOS[self.norm](sde, t, z, score)
        step = batch_broadcast(2.0 * langevin_step_scale(sde, t), x) * batch_broadcast((self.snr * r) ** 2, x)
        mean = x + step * score
        return mean + jnp.sqrt(2.0 * step) * z, mean


def _evaluations(fn) -> int:
    return 0 if fn is None else getattr(fn, "nfe", 1)


@dataclasses.dataclass(frozen=True)
class PC:
    """The predictor–corrector solver for `sample_loop` (module docstring); None skips a part."""

    predictor: Predictor | None = ReverseDiffusion()
    corrector: Corrector | None = Langevin()
    n_steps: int = 1
    ending: str = "sdejax"

    def __post_init__(self):
        if self.predictor is None and self.corrector is None:
            raise ValueError("predictor and corrector cannot both be 'none'")
        if self.ending not in ENDINGS:
            raise ValueError(f"unknown ending {self.ending!r}; valid: {list(ENDINGS)}")
        check_int("n_steps", self.n_steps, 1)

    def _correct(self, rng, sde, score_fn, x, t):
        if self.corrector is None:
            return x
        move = lambda j, x: self.corrector(jax.random.fold_in(rng, j), sde, score_fn, x, t)[0]
        return jax.lax.fori_loop(0, self.n_steps, move, x)

    def _predict(self, rng, sde, score_fn, x, t, i, ts):
        """(x_s, mean) of the predictor from t = ts[i]: to ts[i + 1], or to t − T/n for score_sde."""
        s = t - sde.T / ts.shape[0] if self.ending == "score_sde" else batch_time(ts[i + 1], x)
        return self.predictor(rng, sde, score_fn, x, t, s)

    def init(self, sde: SDE, score_fn: ScoreFn, x: Array, ts: Array) -> None:
        return None

    def step(self, sde: SDE, score_fn: ScoreFn, rng: Array, state, x: Array, i: Array, ts: Array):
        c_rng, p_rng = jax.random.split(rng)
        t = batch_time(ts[i], x)
        x = self._correct(c_rng, sde, score_fn, x, t)
        return (x if self.predictor is None else self._predict(p_rng, sde, score_fn, x, t, i, ts)[0]), state

    def final(self, sde: SDE, score_fn: ScoreFn, rng: Array, state, x: Array, ts: Array, denoise: bool) -> Array:
        c_rng, p_rng = jax.random.split(rng)
        t = batch_time(ts[-1], x)
        x = self._correct(c_rng, sde, score_fn, x, t)
        if self.ending == "sdejax":
            return tweedie_x0(sde, score_fn, x, t) if denoise else x
        if self.predictor is None:
            return x
        x, mean = self._predict(p_rng, sde, score_fn, x, t, ts.shape[0] - 1, ts)
        return mean if denoise else x

    def nfe(self, n: int, denoise: bool) -> int:
        corrector = n * self.n_steps * _evaluations(self.corrector)
        if self.ending == "score_sde":
            return n * _evaluations(self.predictor) + corrector
        return (n - 1) * _evaluations(self.predictor) + corrector + int(denoise)


_PREDICTORS = {
    "euler_maruyama": EulerMaruyama,
    "reverse_diffusion": ReverseDiffusion,
    "ancestral_sampling": AncestralSampling,
    "none": lambda probability_flow: None,
}
_CORRECTORS = {
    "langevin": Langevin,
    "ald": lambda snr, norm: Langevin(snr, "sigma"),
    "none": lambda snr, norm: None,
}
PREDICTORS, CORRECTORS = tuple(_PREDICTORS), tuple(_CORRECTORS)


def _named(kind: str, value, table: dict, *options):
    """A callable as is, else the named predictor/corrector of `table` built with `options`."""
    if callable(value):
        return value
    if value not in table:
        raise ValueError(f"unknown {kind} {value!r}; valid: {list(table)} (or a callable)")
    return table[value](*options)


def make_pc(
    predictor: str | Predictor = "reverse_diffusion",
    corrector: str | Corrector = "langevin",
    snr: float = 0.16,
    n_steps: int = 1,
    probability_flow: bool = False,
    langevin_norm: str = "per_example",
    ending: str = "sdejax",
) -> PC:
    """The `PC` solver of `pc_sample`'s options (names or callables)."""
    if langevin_norm not in LANGEVIN_NORMS:
        raise ValueError(f"unknown langevin_norm {langevin_norm!r}; valid: {list(LANGEVIN_NORMS)}")
    return PC(_named("predictor", predictor, _PREDICTORS, bool(probability_flow)),
              _named("corrector", corrector, _CORRECTORS, check_number("snr", snr), langevin_norm),
              check_int("n_steps", n_steps, 1), ending)


def pc_nfe(n: int, predictor="reverse_diffusion", corrector="langevin", n_steps: int = 1, denoise: bool = True,
           ending: str = "sdejax") -> int:
    """Score evaluations of `pc_sample` on an n-point grid (module docstring)."""
    return make_pc(predictor, corrector, n_steps=n_steps, ending=ending).nfe(n, bool(denoise))


def pc_sample(
    rng: Array,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    predictor: str | Predictor = "reverse_diffusion",
    corrector: str | Corrector = "langevin",
    snr: float = 0.16,
    n_steps: int = 1,
    probability_flow: bool = False,
    denoise: bool = True,
    eps: float | None = None,
    *,
    ts=None,
    x_T: Array | None = None,
    trajectory: bool = False,
    callback: Callback | None = None,
    constraint: Constraint | None = None,
    resample: tuple[int, int] | None = None,
    langevin_norm: str = "per_example",
    ending: str = "sdejax",
    dtype=None,
):
    """Predictor–corrector sampling (module docstring); returns `(samples, nfe)`, or
    `(samples, xs, nfe)` with `trajectory` (xs[k]: the state after step k, at t_{k+1} before its
    corrector; see `sample_loop`, also for `callback`).

    `predictor`/`corrector`: names in PREDICTORS/CORRECTORS or callables (module docstring).
    `ts`: any grid of ≥ 2 times (default `grids.uniform(sde, sde.N, eps)`; `eps` defaults to
    `sde.sampling_eps`). `x_T`: the initial state (default: a prior draw with the first half of
    `split(rng)`, in `dtype`, default float32). To keep the x̂_0 estimates (ancestral steps and the
    final denoising) in the data range, pass `sdejax.guidance.threshold(sde, score_fn, lo, hi)`.
    `score_fn` may be a `jax.tree_util.Partial` whose arguments are traced (see `score_pytree`).
    """
    solver = make_pc(predictor, corrector, snr, n_steps, probability_flow, langevin_norm, ending)
    grid = time_grid(sde, ts, sde.N, eps)
    if grid.size < 2:
        raise ValueError(f"pc_sample needs a grid of >= 2 times (sde.N or len(ts)); got {grid.size}")
    prior_rng, rng = jax.random.split(rng)
    x = initial_x(sde, prior_rng, shape, x_T, dtype)
    return sample_loop(solver, sde, score_fn, rng, x, grid, denoise, trajectory, callback, constraint, resample)
