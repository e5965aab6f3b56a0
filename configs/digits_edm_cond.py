"""The class-conditional digits EDM teacher of guided consistency distillation: `configs/digits_edm.py`
with 10 classes and label dropout 0.1 (its null class is the unconditional score that classifier-free
guidance needs), sampled with EDM's Heun, 18 steps = 35 NFE, classes in turn.

    sdejax --config=configs/digits_edm_cond.py --workdir=runs/digits_edm_cond   # then configs/digits_lcm.py
"""
from configs import _conditional, digits_edm


def get_config():
    return _conditional.conditional(digits_edm.get_config(), 10, "conv")
