"""A score function that counts its own evaluations, to check the NFE the samplers report."""
import jax

from sdejax.analytic import GaussianMixture


class CountingScore:
    """The exact score of `mixture` under `sde`, counting its evaluations on the host."""

    def __init__(self, mixture: GaussianMixture, sde):
        self.score = mixture.score_fn(sde)
        self.calls = 0

    def _tick(self, t):
        self.calls += 1

    def __call__(self, x, t):
        jax.debug.callback(self._tick, t)
        return self.score(x, t)

    def run(self, fn, *args, **kwargs):
        """Call fn and return (its outputs, the number of score evaluations it made)."""
        self.calls = 0
        out = jax.block_until_ready(fn(*args, **kwargs))
        jax.effects_barrier()
        return out, self.calls
