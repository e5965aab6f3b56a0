"""The in-training digits monitor: its Fréchet distance grows as samples degrade."""
import jax
import numpy as np
import pytest

from sdejax.evaluation import digits_monitor


@pytest.fixture(scope="module")
def params():
    return digits_monitor.train_digits_classifier(jax.random.key(0))


@pytest.fixture(scope="module")
def train_digits():
    return digits_monitor.digits_split("train")


def test_classifier_learns_the_digits(params):
    images, labels = digits_monitor.digits_split("test")
    logits = digits_monitor.DigitsClassifier().apply(params, images)[1]
    assert (np.asarray(logits).argmax(1) == labels).mean() > 0.85


def test_distance_tracks_sample_quality(params, train_digits):
    monitor = digits_monitor.make_digits_monitor(params)
    images, labels = train_digits
    rng = np.random.default_rng(0)
    noisy = [np.clip(images + s * rng.normal(size=images.shape), 0, 1).astype(np.float32) for s in (0.1, 0.3)]
    distances = [monitor(images), monitor(noisy[0]), monitor(noisy[1]),
                 monitor(rng.random(images.shape).astype(np.float32))]
    assert distances == sorted(distances) and distances[0] < 0.5 * distances[1]
    assert monitor(images[labels == 1]) > 10 * distances[0]  # mode collapse onto one class


def test_features_reject_wrong_shape(params):
    with pytest.raises(ValueError, match="images"):
        digits_monitor.digits_features(params, np.zeros((2, 8, 8, 1), np.float32))
