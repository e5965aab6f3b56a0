"""Class-conditional sampling from a config: which labels, classifier-free and classifier guidance.

`config.sampling` keys (beside each method's own, `sdejax.sampling.methods.CONFIG_KEYS`):

    class_label       -1: sample i gets class i mod K (a grid shows the classes in turn); k: every sample k
    guidance_weight   w of classifier-free guidance, s_c + w(s_c − s_u) (`sdejax.guidance.cfg`); 0: conditional;
                      of a w-conditioned network (`model.guidance_embedding`, guided CD) its input w
    guidance_rescale  φ of Lin et al.'s rescale, in ε-space (0: none)
    classifier_scale  γ of classifier guidance with the classifier of `--mode=train_classifier` (0: none)

A class-conditional model (`model.num_classes` > 0) samples conditionally; an unconditional one only
with `classifier_scale` > 0 (the labels then select what the classifier guides towards).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from sdejax import guidance

Array = jax.Array
GUIDANCE_KEYS = frozenset({"class_label", "guidance_weight", "guidance_rescale", "classifier_scale"})
DEFAULTS = {"class_label": -1, "guidance_weight": 0.0, "guidance_rescale": 0.0, "classifier_scale": 0.0}


def settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The guidance settings of `config.sampling`, defaults filled in."""
    return {k: config.sampling.get(k, v) for k, v in DEFAULTS.items()}


def method_options(sampling: Any) -> dict:
    """`config.sampling` without the guidance keys: what `methods.from_config` reads."""
    return {k: v for k, v in dict(sampling).items() if k not in GUIDANCE_KEYS}


def num_label_classes(config: ml_collections.ConfigDict) -> int:
    """K for the sampling labels: the model's classes, else the classifier's (0: unconditional)."""
    k = config.model.get("num_classes", 0)
    if k:
        return k
    if settings(config)["classifier_scale"] > 0:
        return config.classifier.get("num_classes", 10)
    return 0


def check(config: ml_collections.ConfigDict) -> None:
    """Fail before any work on guidance settings the model cannot honour (the values' ranges are
    `config.VALUE_RULES`, checked first by `check_config`)."""
    g, k = settings(config), num_label_classes(config)
    cfg = g["guidance_weight"] != 0 and not config.model.get("guidance_embedding", False)  # else w is an input
    if cfg and not config.model.get("num_classes", 0):
        raise ValueError("sampling.guidance_weight (classifier-free guidance) needs a class-conditional model "
                         "(model.num_classes > 0, trained with training.p_uncond > 0)")
    if cfg and not config.training.get("p_uncond", 0.0) > 0:
        raise ValueError("sampling.guidance_weight needs a model trained with label dropout (training.p_uncond > 0): "
                         "its null-class output is the unconditional score")
    if g["classifier_scale"] > 0 and "classifier" not in config:
        raise ValueError("sampling.classifier_scale > 0 needs config.classifier (the network of --mode=train_classifier)")
    if k and not -1 <= g["class_label"] < k:
        raise ValueError(f"sampling.class_label must be -1 (cycle through the classes) or in [0, {k}); "
                         f"got {g['class_label']}")


def sample_labels(config: ml_collections.ConfigDict, n: int) -> Optional[Array]:
    """The (n,) classes of n samples (module docstring), or None for unconditional sampling."""
    k = num_label_classes(config)
    if not k:
        return None
    label = settings(config)["class_label"]
    return jnp.arange(n, dtype=jnp.int32) % k if label < 0 else jnp.full((n,), label, jnp.int32)


def guided_score_fn(config: ml_collections.ConfigDict, sde, make_score: Callable[..., Any], y: Optional[Array],
                    classifier_log_prob: Optional[Callable] = None):
    """The sampler's `score_fn(x, t)`: `make_score(y)` (the network's score with labels y; None the
    null class / an unconditional model), with CFG and classifier guidance as configured."""
    g = settings(config)
    if not config.model.get("num_classes", 0):
        score_fn = make_score(None)
    elif g["guidance_weight"] != 0 or g["guidance_rescale"] > 0:
        score_fn = guidance.cfg(sde, make_score(y), make_score(None), g["guidance_weight"],
                                rescale=g["guidance_rescale"])
    else:
        score_fn = make_score(y)
    if g["classifier_scale"] > 0:
        score_fn = guidance.classifier_guidance(score_fn, classifier_log_prob, y, g["classifier_scale"])
    return score_fn
