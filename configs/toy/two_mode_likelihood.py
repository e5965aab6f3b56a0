"""Maximum-likelihood training (Song et al. 2021) of the two-mode mixture: likelihood weighting g²
with importance sampling t ∝ g²/σ², and a score-parameterised MLP (the score is O(1) at small t)."""
from configs.default_toy import get_config as default_config


def get_config():
    config = default_config()
    config.training.likelihood_weighting = True
    config.training.importance_weighting = True
    config.model.prediction = "score"
    return config
