"""sdejax: score-based generative models with SDEs in JAX/Flax.

The spine: `sde` (forward SDEs), `score` (parameterisations, network -> score function), `analytic`
(exact Gaussian-mixture scores), `losses`, `sampling`, `likelihood`.
"""
from sdejax.analytic import GaussianMixture
from sdejax.sde import VESDE, VPSDE, get_sde, subVPSDE

__version__ = "0.1.0"
__all__ = ["GaussianMixture", "VESDE", "VPSDE", "get_sde", "subVPSDE"]
