"""Toy distributions: shapes, names, exact densities, the deterministic split and the batch source.

Tolerances: sample frequencies and means are checked within 4 Monte-Carlo standard errors
(SE = sqrt(p(1−p)/n) for a frequency, std/sqrt(n) for a mean).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdejax.data import toy

N = 20_000


@pytest.mark.parametrize("name", sorted(toy.TOY_DISTRIBUTIONS))
def test_every_named_distribution_samples(name):
    kwargs = {"weights": [1.0, 2.0], "means": [[0.0, 1.0], [2.0, 0.0]]} if name == "gaussian_mixture" else {}
    dist = toy.get_toy_distribution(name, **kwargs)
    x = dist.sample(jax.random.PRNGKey(0), 500)
    assert x.shape == (500, dist.dim) and bool(jnp.all(jnp.isfinite(x)))
    if dist.log_prob is not None:
        assert bool(jnp.all(jnp.isfinite(dist.log_prob(x))))  # samples lie in the support


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match="two_mode.*|checkerboard"):
        toy.get_toy_distribution("moons")


def test_two_mode_weights_and_entropy():
    """Weight 0.2 of the (−5,−5) mode within 4 SE; MC entropy = H(0.2, 0.8) + log(2πe) (modes 14σ apart,
    overlap ~e^-49) within 4 SE."""
    dist = toy.two_mode()
    x = np.asarray(dist.sample(jax.random.PRNGKey(1), N))
    frac = np.mean(x.sum(-1) < 0)
    assert abs(frac - 0.2) < 4 * np.sqrt(0.2 * 0.8 / N)
    h, se = dist.entropy(jax.random.PRNGKey(2), N)
    exact = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8)) + np.log(2 * np.pi * np.e)
    assert abs(h - exact) < 4 * se


def test_checkerboard_is_uniform_on_black_squares():
    """Each of the 8 squares holds 1/8 of the mass (4 SE); the density is 1/32 there, 0 elsewhere."""
    dist = toy.checkerboard()
    x = np.asarray(dist.sample(jax.random.PRNGKey(3), N))
    cells = np.floor(x / 2).astype(int)
    assert np.all((cells.sum(-1) % 2) == 0) and np.all(np.abs(x) <= 4)
    _, counts = np.unique(cells, axis=0, return_counts=True)
    assert counts.shape == (8,)
    assert np.all(np.abs(counts / N - 1 / 8) < 4 * np.sqrt(1 / 8 * 7 / 8 / N))
    np.testing.assert_allclose(dist.log_prob(jnp.array([[1.0, 1.0], [1.0, -1.0]])), [-np.log(32), -np.inf])


def test_gaussian_mixture_any_dimension():
    means = np.array([[1.0, 0, 0, 0, -1], [0, 2.0, 0, 0, 0]])
    dist = toy.gaussian_mixture([0.25, 0.75], means, std=0.5)
    x = np.asarray(dist.sample(jax.random.PRNGKey(4), N))
    assert x.shape == (N, 5)
    np.testing.assert_array_less(np.abs(x.mean(0) - (0.25 * means[0] + 0.75 * means[1])), 4 * x.std(0) / np.sqrt(N))


def test_swiss_roll_has_no_density():
    with pytest.raises(ValueError, match="no closed-form log_prob"):
        toy.swiss_roll().entropy(jax.random.PRNGKey(0), 10)


def test_split_is_deterministic_and_batches_come_from_train():
    dist = toy.two_mode()
    a_train, a_held = toy.train_heldout_split(dist, jax.random.PRNGKey(5), 100, 50)
    b_train, b_held = toy.train_heldout_split(dist, jax.random.PRNGKey(5), 100, 50)
    np.testing.assert_array_equal(a_train, b_train)
    np.testing.assert_array_equal(a_held, b_held)
    assert a_train.shape == (100, 2) and a_held.shape == (50, 2)
    assert not np.any(np.all(np.asarray(a_held)[:, None] == np.asarray(a_train)[None], -1))
    batch = toy.make_batch_fn(dist, a_train, 32)(jax.random.PRNGKey(6))["x"]
    assert batch.shape == (32, 2)
    assert np.all(np.any(np.all(np.asarray(batch)[:, None] == np.asarray(a_train)[None], -1), -1))
    stream = toy.make_batch_fn(dist, a_train[:0], 32)
    np.testing.assert_array_equal(stream(jax.random.PRNGKey(7))["x"], dist.sample(jax.random.PRNGKey(7), 32))
