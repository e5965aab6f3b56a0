"""Command line: `sdejax --config=CONFIG.py --workdir=DIR --mode=train|eval|sample|fid_stats|train_classifier|train_autoencoder`.

Without `--config` the quick-start config `configs/default_toy.py` of the source checkout is used
(train an MLP score model on the 2-D two-mode mixture, then write samples, bits/dim and
`metrics.json` into the workdir). Config fields can be overridden on the command line, e.g.
`--config.training.n_iters=2000`.

Multi-process runs (several GPU hosts, TPU pods) start the same command on every host; the
processes find each other through `--coordinator_address/--num_processes/--process_id`, the
environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, or, with
`--distributed`, JAX's cluster auto-detection (SLURM, Open MPI, Kubernetes, Cloud TPU).
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

CHECKOUT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = CHECKOUT / "configs" / "default_toy.py"
MODES = ("train", "eval", "sample", "fid_stats", "train_classifier", "train_autoencoder")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", str(DEFAULT_CONFIG), "Config file (ml_collections).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, samples and metrics.")
flags.DEFINE_enum("mode", "train", list(MODES), "Run mode: train, eval, sample, fid_stats (reference "
                  "Inception statistics of config.eval.fid_split for FID/KID), or train_classifier (the "
                  "noise-conditional classifier of config.classifier, for sampling.classifier_scale), or "
                  "train_autoencoder (the autoencoder of config.autoencoder and its latent scale, for a latent "
                  "diffusion run with config.latent).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_bool("distributed", False, "Initialise jax.distributed from the cluster environment "
                  "(SLURM, Open MPI, Kubernetes, Cloud TPU pods) when no address/count/id is given.")
flags.DEFINE_list("allow_config_change", [], "Config keys (or sections, e.g. 'model.') that may differ from the "
                  "config saved with the checkpoint, for a deliberate change on resume or in eval/sample mode; "
                  "other changes to the model, SDE, preconditioning, objective or data are refused.")
flags.mark_flags_as_required(["workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # orbax logs every write at INFO; keep the progress bar readable
        logging.set_verbosity(logging.WARNING)
    from sdejax.training import parallel

    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                    auto=FLAGS.distributed)

    from sdejax.evaluation import workflow
    from sdejax.training import autoencoder_mode, classifier_mode, modes, trainer

    run_mode = {"train": trainer.train_model, "eval": modes.run_eval, "sample": modes.run_sample,
                "fid_stats": workflow.fid_stats, "train_classifier": classifier_mode.train_classifier,
                "train_autoencoder": autoencoder_mode.train_autoencoder}[FLAGS.mode]
    allow = {} if FLAGS.mode == "fid_stats" else {"allow_config_change": tuple(FLAGS.allow_config_change)}
    result = run_mode(FLAGS.config, FLAGS.workdir, **allow)
    import jax  # pylint: disable=import-outside-toplevel

    if jax.process_index() == 0:
        print(json.dumps(result, indent=2, sort_keys=True, default=str))


def run() -> None:
    """Console-script entry point (`sdejax`). Config files import shared pieces as `configs.*`
    (as score_sde's did from its root), so the checkout root goes on the import path."""
    if (CHECKOUT / "configs").is_dir() and str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    app.run(main)


if __name__ == "__main__":
    run()
