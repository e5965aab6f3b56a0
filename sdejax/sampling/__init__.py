"""Samplers. Each returns `(samples, nfe)` and works with any linear SDE through `marginal_coeffs`.

The fixed-step ones are solvers (`PC`, `DDIM`, …) run by the one loop `sample_loop` on a time grid
(`sdejax.sampling.grids`); the probability-flow ODE and the reverse SDE are solved with diffrax.
"""
from sdejax.sampling.ddim import DDIM, ddim_sample
from sdejax.sampling.langevin import annealed_langevin_sample, langevin_sample
from sdejax.sampling.loop import sample_loop
from sdejax.sampling.ode import ode_encode, ode_sample
from sdejax.sampling.pc import (
    CORRECTORS, PC, PREDICTORS, AncestralSampling, EulerMaruyama, Langevin, ReverseDiffusion, make_pc, pc_nfe,
    pc_sample,
)
from sdejax.sampling.sde import sde_sample

__all__ = ["CORRECTORS", "DDIM", "PC", "PREDICTORS", "AncestralSampling", "EulerMaruyama", "Langevin",
           "ReverseDiffusion", "annealed_langevin_sample", "ddim_sample", "langevin_sample", "make_pc",
           "ode_encode", "ode_sample", "pc_nfe", "pc_sample", "sample_loop", "sde_sample"]
