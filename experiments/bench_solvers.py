"""Error against NFE of the fast solvers on the Gaussian oracle, on every schedule, against 1000-step PC.

Data N(μ, diag S), μ = (1, −0.5, 2), S = (0.25, 1, 4), with the exact score −(x − α_t μ)/C_t,
C_t = α_t² S + σ_t². x_T is drawn from the exact marginal p_T = N(α_T μ, C_T) (the prior's mismatch is
not the solver's; the "prior" line shows what it would add), every sampler ends with the denoising
step at eps = sde.sampling_eps, and the target is the exact sampler's output x̂₀(x_eps), x_eps ~ p_eps,
i.e. N(μ, α²S²/C) at eps. The error is the 2-Wasserstein distance between diagonal Gaussians,
W2² = Σ_j (m_j − m*_j)² + (√v_j − √v*_j)². The output laws are computed
- exactly for the deterministic solvers: the output is a x_T + b feature by feature (two runs);
- exactly for PC (reverse_diffusion predictor, no corrector, 1000 grid points): the chain is affine,
  x' = mean(x) + ḡ z, so m' = mean(m), v' = (d mean/dx)² v + ḡ² with the predictor's own mean map
  (slope by jvp) and ḡ from the reverse discretisation; checked against a sampled run (max |z| of its
  moments' errors in Monte-Carlo standard errors);
- by Monte Carlo (--mc samples) for the stochastic solvers, resolved down to the quoted MC floor.
NFE counts the denoising step; Heun and 2S take the largest n with 2n − 1 ≤ NFE. "to PC" is the
first NFE (bisected between the listed ones) at which a solver's W2 is at most PC-1000's.

    python experiments/bench_solvers.py [--mc 100000] [--out experiments/results] [--schedules VE VP …]
"""
from __future__ import annotations

import argparse
import functools
import os
import pathlib
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from jax.tree_util import Partial  # noqa: E402

from sdejax.sampling import grids  # noqa: E402
from sdejax.sampling.dpm_solver import DPMSolverPP, DPMSolverPP2S  # noqa: E402
from sdejax.sampling.heun import HeunSolver  # noqa: E402
from sdejax.sampling.loop import batch_time, sample_loop  # noqa: E402
from sdejax.sampling.pc import PC, ReverseDiffusion  # noqa: E402
from sdejax.sampling.unipc import UniPC  # noqa: E402
from sdejax.score import tweedie_x0  # noqa: E402
from sdejax.sde import EDMSDE, CosineVPSDE, VESDE, VPSDE, subVPSDE, batch_broadcast  # noqa: E402

MU, VAR = np.array([1.0, -0.5, 2.0]), np.array([0.25, 1.0, 4.0])
NFES = (5, 10, 20, 35, 50, 100)
SCHEDULES = {"VE": VESDE(), "VP": VPSDE(), "sub-VP": subVPSDE(), "cosine": CosineVPSDE(), "EDM": EDMSDE()}
SOLVERS = {  # name: (solver, grid, stochastic); grids as their references recommend
    "Euler (σ̃) = DDIM": (HeunSolver(second_order=False), grids.karras, False),
    "Heun (EDM)": (HeunSolver(), grids.karras, False),
    "Heun, log-SNR grid": (HeunSolver(), grids.log_snr, False),
    "DPM-Solver++(2M)": (DPMSolverPP(2), grids.log_snr, False),
    "DPM-Solver++(3M)": (DPMSolverPP(3), grids.log_snr, False),
    "DPM-Solver++(3M), Karras grid": (DPMSolverPP(3), grids.karras, False),
    "DPM-Solver++(2S)": (DPMSolverPP2S(), grids.log_snr, False),
    "UniPC-2 (bh2)": (UniPC(2), grids.log_snr, False),
    "UniPC-3 (bh2)": (UniPC(3), grids.log_snr, False),
    "SDE-DPM-Solver++(2M) η=1": (DPMSolverPP(2, eta=1.0), grids.log_snr, True),
    "Heun + churn (EDM ImageNet)": (HeunSolver(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003),
                                    grids.karras, True),
}
KEY = jax.random.PRNGKey(0)


def _score(mean, var, sde, x, t):
    alpha, sigma = (batch_broadcast(v, x) for v in sde.marginal_coeffs(t))
    return -(x - alpha * mean) / (alpha**2 * var + sigma**2)


@functools.lru_cache(maxsize=None)
def score_fn(sde) -> Partial:
    """The exact score of the data under `sde`, one pytree per schedule (compiled samplers are reused)."""
    return Partial(_score, jnp.asarray(MU), jnp.asarray(VAR), sde)


def moments(sde, t) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of p_t: α_t μ and C_t."""
    alpha, sigma = (float(v) for v in sde.marginal_coeffs(jnp.asarray(t)))
    return alpha * MU, alpha**2 * VAR + sigma**2


def target(sde) -> tuple[np.ndarray, np.ndarray]:
    """The law of x̂₀(x_eps) = μ + (α S/C)(x_eps − α μ), x_eps ~ p_eps: N(μ, α²S²/C)."""
    alpha, _ = sde.marginal_coeffs(jnp.asarray(sde.sampling_eps))
    _, c = moments(sde, sde.sampling_eps)
    return MU, (float(alpha) * VAR) ** 2 / c


def w2(law, ref) -> float:
    (m, v), (m_ref, v_ref) = law, ref
    return float(np.sqrt(np.sum((m - m_ref) ** 2) + np.sum((np.sqrt(v) - np.sqrt(v_ref)) ** 2)))


def grid_points(solver, nfe: int) -> int:
    """The largest n with solver.nfe(n, denoise=True) ≤ nfe."""
    n = 1
    while solver.nfe(n + 1, True) <= nfe:
        n += 1
    return n


def output_law(sde, solver, grid, stochastic: bool, nfe: int, mc: int):
    """(mean, var) of the denoised output from x_T ~ p_T: exact for deterministic solvers, else Monte Carlo."""
    ts = grid(sde, grid_points(solver, nfe), eps=sde.sampling_eps)
    m_T, v_T = moments(sde, sde.T)
    if not stochastic:
        out, _ = sample_loop(solver, sde, score_fn(sde), KEY, jnp.stack([jnp.zeros(3), jnp.ones(3)]), ts)
        slope, offset = np.asarray(out[1] - out[0]), np.asarray(out[0])
        return slope * m_T + offset, slope**2 * v_T
    x_T = m_T + np.sqrt(v_T) * jax.random.normal(jax.random.PRNGKey(1), (mc, 3), jnp.float64)
    out, _ = sample_loop(solver, sde, score_fn(sde), KEY, x_T, ts)
    return np.asarray(jnp.mean(out, 0)), np.asarray(jnp.var(out, 0))


def pc_law(sde, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Exact output law of PC (reverse_diffusion, no corrector, n points, denoise) by the moment recursion."""
    ts = jnp.asarray(grids.uniform(sde, n, sde.sampling_eps))
    predictor, score = ReverseDiffusion(), score_fn(sde)
    m_T, v_T = moments(sde, sde.T)

    def step(carry, i):
        m, v = carry
        t, s = batch_time(ts[i], m), batch_time(ts[i + 1], m)
        m_next, slope = jax.jvp(lambda y: predictor(KEY, sde, score, y, t, s)[1], (m,), (jnp.ones_like(m),))
        g = batch_broadcast(sde.reverse(score).discretize(m, t)[1], m)
        return (m_next, slope**2 * v + g**2), None

    (m, v), _ = jax.lax.scan(step, (jnp.asarray(m_T)[None], jnp.asarray(v_T)[None]), jnp.arange(n - 1))
    m_out, slope = jax.jvp(lambda y: tweedie_x0(sde, score, y, batch_time(ts[-1], y)), (m,), (jnp.ones_like(m),))
    return np.asarray(m_out[0]), np.asarray(slope[0] ** 2 * v[0])


def pc_check(sde, law, mc: int, n: int = 1000) -> float:
    """max |z| of PC's sampled output moments against `law` (z = error / its Monte-Carlo SE; < 4 agrees)."""
    m_T, v_T = moments(sde, sde.T)
    x_T = m_T + np.sqrt(v_T) * jax.random.normal(jax.random.PRNGKey(2), (mc, 3), jnp.float64)
    out, nfe = sample_loop(PC(corrector=None), sde, score_fn(sde), KEY, x_T, grids.uniform(sde, n, sde.sampling_eps))
    assert nfe == n
    (m, v), mean, var = law, np.asarray(jnp.mean(out, 0)), np.asarray(jnp.var(out, 0))
    return float(max(np.max(np.abs(mean - m) / np.sqrt(v / mc)), np.max(np.abs(var - v) / (v * np.sqrt(2 / mc)))))


def mc_floor(sde, mc: int) -> float:
    """W2 of the moments of `mc` exact draws of the target to the target: the Monte-Carlo resolution."""
    m, v = target(sde)
    draws = m + np.sqrt(v) * np.asarray(jax.random.normal(jax.random.PRNGKey(3), (mc, 3), jnp.float64))
    return w2((draws.mean(0), draws.var(0)), (m, v))


def prior_floor(sde) -> float:
    """W2 the exact flow would leave if x_T came from the SDE's prior N(0, prior_std²) instead of p_T."""
    m_T, v_T = moments(sde, sde.T)
    m_eps, c_eps = moments(sde, sde.sampling_eps)
    alpha = float(sde.marginal_coeffs(jnp.asarray(sde.sampling_eps))[0])
    slope = (alpha * VAR / c_eps) * np.sqrt(c_eps / v_T)  # x̂₀ of the flow map, per unit of x_T
    law = (MU - slope * m_T, slope**2 * sde.prior_std**2)  # mean: μ + slope·(0 − α_T μ)
    return w2(law, target(sde))


def first_nfe_below(error_at, level: float, nfes=NFES) -> str:
    """The first NFE with error ≤ level: the first listed one, bisected down from there (errors decrease)."""
    hit = next((k for k, nfe in enumerate(nfes) if error_at(nfe) <= level), None)
    if hit is None:
        return f"> {nfes[-1]}"
    lo, hi = (nfes[hit - 1] if hit else 1), nfes[hit]  # error(lo) > level ≥ error(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if error_at(mid) <= level else (mid, hi)
    return str(hi)


def bench_schedule(name: str, sde, mc: int) -> dict:
    start = time.perf_counter()
    ref = target(sde)
    pc = pc_law(sde)
    pc_err, pc_z, floor = w2(pc, ref), pc_check(sde, pc, mc), mc_floor(sde, mc)
    print(f"{name}: PC-1000 W2 {pc_err:.2e} (recursion vs Monte Carlo: max |z| {pc_z:.1f}; MC floor {floor:.1e})",
          flush=True)
    rows = {}
    for label, (solver, grid, stochastic) in SOLVERS.items():
        error_at = functools.lru_cache(maxsize=None)(
            lambda nfe: w2(output_law(sde, solver, grid, stochastic, nfe, mc), ref))
        unresolved = stochastic and pc_err < floor  # Monte Carlo cannot resolve PC's error
        rows[label] = ([error_at(nfe) for nfe in NFES],
                       "below MC floor" if unresolved else first_nfe_below(error_at, pc_err))
        print(f"{name:7s} {label:30s} " + " ".join(f"{e:9.2e}" for e in rows[label][0]) + f"  to PC: {rows[label][1]}",
              flush=True)
    return {"rows": rows, "pc": pc_err, "pc_check": pc_z, "mc_floor": floor,
            "prior": prior_floor(sde), "seconds": time.perf_counter() - start}


def machine() -> str:
    """CPU model and core count (Linux: /proc/cpuinfo), else the platform's name."""
    info = pathlib.Path("/proc/cpuinfo")
    models = [line.split(":", 1)[1].strip() for line in info.read_text().splitlines()
              if line.startswith("model name")] if info.exists() else []
    return f"{models[0] if models else platform.machine()}, {os.cpu_count()} cores"


def markdown(results: dict, mc: int, seconds: float) -> str:
    lines = ["# Fast solvers on the Gaussian oracle: W2 to the exact output law against NFE\n",
             f"Machine: {machine()} (shared), {jax.default_backend()} backend, "
             f"jax {jax.__version__}; float64; Monte Carlo {mc} samples for the stochastic solvers; "
             f"total {seconds:.0f} s. Generated by `experiments/bench_solvers.py` (its docstring defines "
             "everything).\n"]
    for name, res in results.items():
        lines.append(f"\n## {name}  (PC-1000: W2 = {res['pc']:.2e}; its recursion vs a sampled run: max |z| "
                     f"{res['pc_check']:.1f}; MC floor {res['mc_floor']:.1e}; x_T from the prior would add "
                     f"{res['prior']:.1e}; {res['seconds']:.0f} s)\n")
        lines.append("| solver | " + " | ".join(f"NFE {n}" for n in NFES) + " | NFE to PC-1000 |")
        lines.append("|---|" + "---|" * (len(NFES) + 1))
        for label, (errors, to_pc) in res["rows"].items():
            lines.append(f"| {label} | " + " | ".join(f"{e:.2e}" for e in errors) + f" | {to_pc} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = -(-(len(results) + 1) // cols)  # one panel for the legend
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.6 * rows), sharey=True, squeeze=False)
    colors = plt.cm.tab20(np.linspace(0, 1, len(SOLVERS), endpoint=False))
    for ax, (name, res) in zip(axes.flat, results.items()):
        for color, (label, (errors, _)) in zip(colors, res["rows"].items()):
            ax.loglog(NFES, errors, "o--" if SOLVERS[label][2] else "o-", ms=3, color=color, label=label)
        ax.axhline(res["pc"], color="k", ls=":", lw=1.2, label="PC, 1000 NFE")
        ax.set_title(name)
        ax.set_xlabel("NFE")
        ax.set_ylabel("W2 to the exact output law")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    list(axes.flat)[len(results)].legend(handles, labels, fontsize=8, loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mc", type=int, default=100_000, help="Monte-Carlo samples for stochastic samplers")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "experiments" / "results")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = {name: bench_schedule(name, SCHEDULES[name], args.mc) for name in args.schedules}
    text = markdown(results, args.mc, time.perf_counter() - start)
    (args.out / "bench_solvers.md").write_text(text)
    plot(results, args.out / "bench_solvers.png")
    print(text)


if __name__ == "__main__":
    main()
