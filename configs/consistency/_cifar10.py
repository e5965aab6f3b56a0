"""CIFAR-10 consistency models on the EDM schedule (α = 1, σ = t ∈ [0.002, 80], σ_data = 0.5): the
NCSN++ network of score_sde (Song et al. 2023 use it for CIFAR-10), read through
`Precond.consistency` by CD / CT / iCT and through EDM's preconditioning by the DSM teacher.

Not available offline: LPIPS (the consistency-models paper's CD/CT metric) needs downloaded VGG
weights, so these configs use the squared L2 (CD, CT) and pseudo-Huber (iCT) distances; the paper's
L2 rows (CD 1-step FID ≈ 6.2 with L2 vs 3.55 with LPIPS) are the comparable numbers.
"""
from configs import _common
from configs.default_cifar10_configs import get_default_configs


def edm_cifar10(objective: str):
    """NCSN++ on CIFAR-10 with `training.objective = objective` on the EDM schedule."""
    config = _common.ncsnpp(get_default_configs(), embedding_type='positional', scale_by_sigma=False)
    t, m = config.training, config.model
    t.sde = 'edmsde'
    t.objective = objective
    t.reduce_mean = True
    m.sigma_min, m.sigma_max, m.sigma_data = 0.002, 80.0, 0.5
    m.precond = 'edm'  # the DSM teacher's preconditioning (consistency objectives use Precond.consistency)
    config.eval.enable_bpd = False
    config.data.centered = True  # [−1, 1], as EDM and the consistency models
    return config


def consistency_sampling(config, sigmas=(80.0, 0.821)):
    """Consistency sampling on `sigmas` (ECT's 2-step CIFAR-10 sequence; (80.0,) is one step)."""
    config.sampling.consistency_sigmas = tuple(sigmas)
    return config
