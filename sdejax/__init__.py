"""sdejax: score-based generative models with SDEs in JAX/Flax."""
