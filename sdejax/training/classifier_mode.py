"""`sdejax --mode=train_classifier`: the noise-conditional classifier of classifier guidance, trained on
the run's data perturbed by the run's SDE (`sdejax.classifier`), with its own checkpoints in
`<workdir>/classifier/checkpoints` and an accuracy-vs-noise-level report `<workdir>/classifier/accuracy.json`.

The network is `config.classifier` (`sdejax.models.classifier`); batch size, steps, frequencies,
optimizer and EMA are the run's `training` / `optim` / `model.ema_rate` settings (override them on
the command line, e.g. `--config.training.n_iters=2000`). Sampling with `sampling.classifier_scale`
> 0 reads the classifier's EMA parameters from here.
"""
from __future__ import annotations

import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sdejax import classifier as classifier_lib
from sdejax.models import classifier as classifier_models
from sdejax.training import build, checkpoint, config as config_lib, objective as objective_lib, parallel, preemption
from sdejax.training import sources, state as state_lib, trainer, workdir_lock
from sdejax.training.writer import MetricWriter

REPORT_TIMES = 11  # accuracy at t = eps + (T − eps)·k/10, k = 0 … 10


def _training_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's config with what only the score model has switched off (snapshot samples, the digits
    monitor, the after-training report)."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.training.snapshot_sampling = False
    c.training.digits_monitor = False
    c.eval.after_training = False
    return c


def classifier_setup(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                     allow_config_change: tuple[str, ...] = ()) -> build.Setup:
    """Data, SDE, classifier, optimizer and placement of the classifier run, restored from its newest
    intact checkpoint if any."""
    config_lib.check_config(config)
    if "classifier" not in config:
        raise ValueError("--mode=train_classifier needs config.classifier (see sdejax.models.classifier.DEFAULTS)")
    config = _training_config(config)
    placement = parallel.get_placement(config.training.get("parallelism", "jit"))
    sde = build.build_sde(config)
    data = sources.get_source(config, build.stream_key(config, "split"), build.stream_key(config, "batches"))
    k = classifier_models.get_classifier(config).num_classes
    if data.num_classes != k:
        raise ValueError(f"classifier.num_classes = {k} but the data ({config.data.dataset}) have "
                         f"{data.num_classes} classes" + (" (unlabelled)" if not data.num_classes else ""))
    x = jnp.asarray(data.heldout["x"][:1])
    apply_fn, variables = classifier_models.build_classifier(config, build.stream_key(config, "init"), x)
    eps = config.training.get("eps", max(1e-5, sde.t_min))

    def objective(train: bool) -> objective_lib.Objective:
        return objective_lib.from_loss(classifier_lib.get_classifier_loss_fn(sde, apply_fn, train, eps=eps))

    tx = state_lib.get_optimizer(config.optim)
    state = state_lib.create_train_state(variables, tx, build.stream_key(config, "state"))
    t = config.training
    # `classifier.*` may change under the score model's checkpoints (checkpoint.MAY_CHANGE), not under
    # the classifier's own: its settings are also saved as "classifier_network", which is compared.
    saved = {**config.to_dict(), "classifier_network": config.classifier.to_dict()}
    ckpt = checkpoint.Checkpointer(workdir / "classifier" / "checkpoints", keep=t.get("keep_checkpoints", 1),
                                   keep_period=t.snapshot_freq if t.snapshot_freq > 0 else None,
                                   config=saved, allow_config_change=allow_config_change)
    restored = ckpt.restore(state, sharding=placement.state_sharding())
    if restored is not None:
        state, data_state = restored
        data.set_state(data_state)
    return build.Setup(config, sde, data, apply_fn, tx, state, ckpt, placement, objective_fn=objective,
                       workdir=workdir)


def accuracy_report(s: build.Setup) -> dict:
    """Accuracy of the EMA classifier on the held-out data perturbed to t (one noise draw per example,
    shared by all t) at REPORT_TIMES times from eps to T, with σ̃(t) = σ_t/α_t."""
    eps = s.config.training.get("eps", max(1e-5, s.sde.t_min))
    times = jnp.linspace(eps, s.sde.T, REPORT_TIMES)
    batches = list(s.data.eval_batches(s.config.eval.batch_size))
    x = np.concatenate([b["x"] for b in batches])
    y = np.concatenate([b["y"] for b in batches])
    log_prob = classifier_lib.classifier_log_prob_fn(s.sde, s.apply_fn, s.state.ema_params)
    acc = classifier_lib.accuracy_by_noise_level(s.sde, log_prob, jnp.asarray(x), jnp.asarray(y), times,
                                                 build.stream_key(s.config, "eval"))
    alpha, sigma = s.sde.marginal_coeffs(times)
    return {"step": int(s.state.step), "num_examples": int(x.shape[0]), "t": np.asarray(times).tolist(),
            "sigma_tilde": np.asarray(sigma / alpha).tolist(), "accuracy": np.asarray(acc).tolist()}


@workdir_lock.exclusive
def train_classifier(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                     allow_config_change: tuple[str, ...] = ()) -> dict:
    """Train the classifier to `training.n_iters` (resuming its newest checkpoint), then write the
    accuracy-vs-noise-level report."""
    workdir = pathlib.Path(workdir)
    s = classifier_setup(config, workdir, allow_config_change)
    writer, watcher = MetricWriter(workdir / "classifier"), preemption.PreemptionWatcher()
    try:
        metrics = trainer.run_steps(s, workdir / "classifier", writer, watcher)
    finally:
        watcher.close()
        writer.close()
    if not metrics["preempted"]:
        metrics["accuracy_by_noise_level"] = accuracy_report(s)
        if jax.process_index() == 0:
            from sdejax.training.modes import write_json

            write_json(workdir / "classifier" / "accuracy.json", metrics["accuracy_by_noise_level"])
    return metrics


def restore_classifier(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> tuple[Any, Any]:
    """(log_prob_fn factory params -> Partial, EMA params) of the newest classifier checkpoint in
    `<workdir>/classifier`, for `sampling.classifier_scale`."""
    s = classifier_setup(config, workdir)
    if s.checkpointer.latest_step() is None:
        raise FileNotFoundError(f"sampling.classifier_scale > 0 but no classifier checkpoint in "
                                f"{workdir / 'classifier' / 'checkpoints'}; run --mode=train_classifier first")

    def log_prob_fn(params):
        return classifier_lib.classifier_log_prob_fn(s.sde, s.apply_fn, params)

    return log_prob_fn, s.state.ema_params
