"""Improved consistency training (iCT; Song & Dhariwal 2023) on the two-mode mixture: the CT config
`configs/toy/two_mode_ct.py` (σ_data = 5, the data's scale) with the iCT objective (pseudo-Huber
distance, log-normal levels, 1/Δσ weights, θ⁻ = sg(θ), N(k) doubling from 10 to 1280).
"""
from configs.toy.two_mode_ct import get_config as ct_config


def get_config():
    config = ct_config()
    config.training.objective = "ict"
    return config
