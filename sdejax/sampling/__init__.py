"""Samplers. Each returns `(samples, nfe)` and works with any linear SDE through `marginal_coeffs`."""
from sdejax.sampling.ddim import ddim_sample
from sdejax.sampling.langevin import annealed_langevin_sample, langevin_sample
from sdejax.sampling.ode import ode_encode, ode_sample
from sdejax.sampling.pc import CORRECTORS, PREDICTORS, pc_sample
from sdejax.sampling.sde import sde_sample

__all__ = ["CORRECTORS", "PREDICTORS", "annealed_langevin_sample", "ddim_sample", "langevin_sample",
           "ode_encode", "ode_sample", "pc_sample", "sde_sample"]
