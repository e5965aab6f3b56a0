"""A cheap, offline sample-quality monitor for models trained on scikit-learn's digits.

A small CNN is trained in-project to classify the 16x16 padded digits (``sdejax.data.digits``);
its 64-d penultimate activations replace Inception's pool3, and the Fréchet distance
|mu_s - mu_r|^2 + tr(S_s + S_r - 2 (S_s S_r)^(1/2)) between samples and the held-out test split
tracks sample quality during training. It is NOT FID: the numbers depend on this classifier,
its seed and the sample count, and are only comparable within one run.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdejax.data import digits
from sdejax.evaluation import metrics, stats

FEATURES = 64


class DigitsClassifier(nn.Module):
    """(N, 16, 16, 1) in [0, 1] -> (features (N, 64), logits (N, 10))."""

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        for width in (32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        features = nn.relu(nn.Dense(FEATURES)(x.reshape(len(x), -1)))
        return features, nn.Dense(10)(features)


def digits_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 16, 16, 1) float32 in [0, 1] on the 17-level grid, and labels, of a split."""
    images, labels = digits.padded_digits()
    index = digits.split_indices()[split]
    return images[index].astype(np.float32) / (digits.NUM_LEVELS - 1), labels[index]


def train_digits_classifier(rng: jax.Array, steps: int = 150, batch_size: int = 128) -> Any:
    """Adam on softmax cross-entropy over minibatches of the train split; returns params."""
    images, labels = digits_split("train")
    model = DigitsClassifier()
    params = model.init(rng, images[:1])
    optimizer = optax.adam(3e-3)

    def loss_fn(params, x, y):
        logits = model.apply(params, x)[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y):
        updates, opt_state = optimizer.update(jax.grad(loss_fn)(params, x, y), opt_state)
        return optax.apply_updates(params, updates), opt_state

    opt_state = optimizer.init(params)
    order = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel())
    for _ in range(steps):  # a Python loop: XLA:CPU runs these convs ~40x slower inside lax.scan
        index = order.choice(len(images), batch_size, replace=False)
        params, opt_state = step(params, opt_state, images[index], labels[index])
    return params


def digits_features(params: Any, images: jax.Array) -> jax.Array:
    """Penultimate (64-d) classifier activations of (N, 16, 16, 1) images in [0, 1]."""
    images = jnp.asarray(images)
    if images.shape[1:] != (digits.IMAGE_SIZE, digits.IMAGE_SIZE, 1):
        raise ValueError(f"images must have shape (N, {digits.IMAGE_SIZE}, {digits.IMAGE_SIZE}, 1); "
                         f"got {images.shape}")
    return DigitsClassifier().apply(params, images)[0]


def digits_frechet_distance(params: Any, samples: np.ndarray, reference: dict[str, Any],
                            batch_size: int = 500) -> float:
    """Fréchet distance between classifier features of ``samples`` and ``reference`` statistics."""
    feature_fn = jax.jit(digits_features)
    batches = (samples[i:i + batch_size] for i in range(0, len(samples), batch_size))
    got = stats.compute_statistics(lambda x: np.asarray(feature_fn(params, x)), batches)
    return metrics.frechet_distance(got["mu"], got["sigma"], reference["mu"], reference["sigma"])


def digits_reference(params: Any) -> dict[str, Any]:
    """Classifier-feature statistics {"mu", "sigma", "n"} of the held-out test split (300 images)."""
    test_images, _ = digits_split("test")
    return stats.finalize(stats.moments_of(np.asarray(digits_features(params, test_images))))


def make_digits_monitor(params: Any) -> Callable[[np.ndarray], float]:
    """``samples -> digits_frechet_distance`` against the test split, for a trained classifier:
    ``monitor = make_digits_monitor(train_digits_classifier(rng))``."""
    reference = digits_reference(params)
    return lambda samples: digits_frechet_distance(params, samples, reference)
