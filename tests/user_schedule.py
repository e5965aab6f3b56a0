"""A schedule written as a user would: a few lines, nothing registered (shared by several tests)."""
import jax.numpy as jnp

from sdejax.sde import SDE, _static_dataclass


@_static_dataclass
class UserCosine(SDE):
    """A user's schedule in a few lines: only marginal_coeffs and prior_std."""

    N: int = 1000

    def marginal_coeffs(self, t):
        return jnp.cos(0.5 * jnp.pi * t * 0.98), jnp.sin(0.5 * jnp.pi * t * 0.98)

    @property
    def prior_std(self):
        return 1.0
