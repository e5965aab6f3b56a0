"""Samplers. Each returns `(samples, nfe)` and works with any linear SDE through `marginal_coeffs`.

The fixed-step ones are solvers (`PC`, `DDIM`, …) run by the one loop `sample_loop` on a time grid
(`sdejax.sampling.grids`); the probability-flow ODE and the reverse SDE are solved with diffrax.
"""
from sdejax.sampling import grids, methods
from sdejax.sampling.ddim import DDIM, ddim_sample
from sdejax.sampling.dpm_solver import DPMSolverPP, DPMSolverPP2S
from sdejax.sampling.heun import HeunSolver
from sdejax.sampling.langevin import annealed_langevin_sample, langevin_sample
from sdejax.sampling.loop import sample_loop
from sdejax.sampling.ode import ode_encode, ode_sample
from sdejax.sampling.pc import (
    CORRECTORS, PC, PREDICTORS, AncestralSampling, EulerMaruyama, Langevin, ReverseDiffusion, make_pc, pc_nfe,
    pc_sample,
)
from sdejax.sampling.methods import METHODS, sample, solve
from sdejax.sampling.sde import sde_sample
from sdejax.sampling.unipc import UniPC

__all__ = ["CORRECTORS", "DDIM", "DPMSolverPP", "DPMSolverPP2S", "HeunSolver", "METHODS", "PC", "PREDICTORS",
           "AncestralSampling", "EulerMaruyama", "Langevin", "ReverseDiffusion", "UniPC", "annealed_langevin_sample",
           "ddim_sample", "grids", "langevin_sample", "make_pc", "methods", "ode_encode", "ode_sample", "pc_nfe",
           "pc_sample", "sample", "sample_loop", "sde_sample", "solve"]
