"""sdejax: score-based generative models with SDEs in JAX/Flax.

The spine: `sde` / `discrete` (schedules), `precond` (how a network sees (x, t)), `score`
(parameterisations, network -> score function), `analytic`
(exact Gaussian-mixture scores), `losses`, `sampling`, `likelihood`.
"""
from sdejax.analytic import GaussianMixture
from sdejax.discrete import DiscreteVPSDE
from sdejax.precond import Precond
from sdejax.sde import EDMSDE, SDE, VESDE, VPSDE, CosineVPSDE, get_sde, subVPSDE

__version__ = "0.1.0"
__all__ = ["CosineVPSDE", "DiscreteVPSDE", "EDMSDE", "GaussianMixture", "Precond", "SDE", "VESDE", "VPSDE", "get_sde",
           "subVPSDE"]
