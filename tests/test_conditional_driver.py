"""The conditional path through the driver on the digits: a class-conditional model trained with label
dropout, its classifier (`train_classifier`: checkpoints and the accuracy-vs-noise report), and
`run_sample` with classifier-free and classifier guidance, which must equal the library's own
composition (`sdejax.guidance`) on the restored parameters, labels i mod 10 and the same key.
A one-level DDPM++ of width 8 and 2 steps: the maths is tested in test_guidance / test_conditioning; here
the wiring, which does not depend on the network's size (compile time does: about half of the original's)."""
from __future__ import annotations

import copy
import json

import jax
import numpy as np
import pytest

from configs_helper import load_config, override
from sdejax import guidance
from sdejax.data import digits
from sdejax.sampling import methods
from sdejax.training import build, classifier_mode, conditioning, modes, trainer

TINY = {"training.n_iters": 2, "training.n_jitted_steps": 1, "training.batch_size": 8, "training.log_freq": 1,
        "training.eval_freq": 0, "training.snapshot_freq": 0, "training.snapshot_freq_for_preemption": 2,
        "model.nf": 8, "model.ch_mult": (1,), "model.num_res_blocks": 1, "model.attn_resolutions": (),
        "model.num_scales": 25, "eval.num_samples": 10, "eval.batch_size": 10, "eval.enable_bpd": False,
        "data.num_threads": 2, "data.prefetch": 2, "sampling.method": "ddim", "sampling.num_steps": 3,
        "classifier.nf": 8, "classifier.ch_mult": (1,), "classifier.embedding_size": 16}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with a 2-step class-conditional model and a 2-step classifier, and its config."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    digits.prepare_digits(data_dir, "array_record")
    config = override(load_config("digits_ddpmpp_cond.py"), {**TINY, "data.data_dir": data_dir})
    workdir = tmp_path_factory.mktemp("run")
    trainer.train_model(config, workdir)
    metrics = classifier_mode.train_classifier(config, workdir)
    return config, workdir, metrics


def test_classifier_run_writes_checkpoints_and_the_report(trained):
    config, workdir, metrics = trained
    assert metrics["steps"] == 2 and (workdir / "classifier" / "checkpoints" / "2").is_dir()
    report = json.loads((workdir / "classifier" / "accuracy.json").read_text())
    assert report == metrics["accuracy_by_noise_level"] and report["num_examples"] == 300  # the test split
    assert len(report["accuracy"]) == len(report["t"]) == classifier_mode.REPORT_TIMES
    assert all(0 <= a <= 1 for a in report["accuracy"]) and report["sigma_tilde"] == sorted(report["sigma_tilde"])


def _randomised(tree, key=1, scale=0.2):
    """Parameters moved away from the near-zero output init, so that the class labels matter."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(key), len(leaves))
    return jax.tree_util.tree_unflatten(treedef, [v + scale * jax.random.normal(k, v.shape, v.dtype)
                                                  for v, k in zip(leaves, keys)])


@pytest.mark.parametrize("kind", ["cfg", "classifier"])
def test_guided_sampling_equals_the_library_composition(trained, kind):
    """The driver's sampler (labels i mod 10, the configured weights) draws exactly what the library's
    `guidance.cfg` / `guidance.classifier_guidance` draw on the same parameters and key, and differs from
    unguided sampling."""
    config, workdir, _ = trained
    # γ = 10: a 2-step classifier's ∇ log p(y|x) is small; the guided-vs-unguided gap grows linearly in γ
    # (3.7 at γ = 3, 12.3 at γ = 10, against the 1% threshold of 8.9)
    settings = {"sampling.guidance_weight": 2.0} if kind == "cfg" else {"sampling.classifier_scale": 10.0}
    config = override(copy.deepcopy(config), settings)
    s = modes.restored_setup(config, workdir)
    s.state = s.state.replace(ema_params=_randomised(s.state.ema_params))
    n, key = config.eval.num_samples, build.stream_key(config, "sample")
    x, info = modes.draw_samples(s, "ddim", n, key)
    y = conditioning.sample_labels(config, n)
    np.testing.assert_array_equal(np.asarray(y), np.arange(n) % 10)
    net = lambda labels: build.build_score_fn(config, s.sde, s.apply_fn, s.state.ema_params, labels)  # noqa: E731
    if kind == "cfg":
        score_fn = guidance.cfg(s.sde, net(y), net(None), 2.0)
    else:
        log_prob_of, params = classifier_mode.restore_classifier(config, workdir)
        score_fn = guidance.classifier_guidance(net(y), log_prob_of(params), y, 10.0)
    draw = methods.from_config(conditioning.method_options(config.sampling))
    ref, nfe = draw(key, s.sde, score_fn, (n, 16, 16, 1))
    assert info["nfe"] == nfe
    np.testing.assert_allclose(x, np.asarray(ref), rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    unguided, _ = draw(key, s.sde, net(y), (n, 16, 16, 1))
    assert np.max(np.abs(np.asarray(unguided) - x)) > 1e-2 * float(np.abs(x).max())  # the guidance acts


def test_sample_mode_writes_the_class_grid(trained):
    """`run_sample` of the conditional model: eval.num_samples samples, classes in turn, a grid picture."""
    config, workdir, _ = trained  # w = 2 as in the cfg test: the same sampling program, compiled once
    out = modes.run_sample(override(copy.deepcopy(config), {"sampling.guidance_weight": 2.0}), workdir)
    x = np.load(out["path"])["samples"]
    assert x.shape == (10, 16, 16, 1) and np.all(np.isfinite(x)) and out["nfe"] == 3
    assert (workdir / "samples" / "samples_2.png").is_file()


def test_guidance_settings_fail_before_work(trained, tmp_path):
    config, workdir, _ = trained
    no_dropout = override(copy.deepcopy(config), {"training.p_uncond": 0.0, "sampling.guidance_weight": 1.0})
    with pytest.raises(ValueError, match="training.p_uncond > 0"):
        build.setup(no_dropout, tmp_path / "a")
    with pytest.raises(ValueError, match="sampling.class_label must be -1"):
        build.setup(override(copy.deepcopy(config), {"sampling.class_label": 10}), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="run --mode=train_classifier first"):
        classifier_mode.restore_classifier(config, tmp_path / "c")
    unconditional = override(copy.deepcopy(config), {"model.num_classes": 0, "training.p_uncond": 0.0,
                                                     "sampling.guidance_weight": 1.0})
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        build.setup(unconditional, tmp_path / "d")
    assert jax.process_count() == 1
