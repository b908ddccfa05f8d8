"""Train with RPT: `python scripts/train.py --config configs/tiny.py --workdir /tmp/rpt_tiny`.

Resumes from the newest good checkpoint in --workdir. Override config values on the command line
(`--config.num_steps=100`). Exit status: 0 when done or stopped by SIGTERM / Ctrl-C after saving,
1 when stopped by non-finite steps (optim.max_bad_steps in a row).

Several hosts / processes: run the same command in each with --distributed (rpt_jax.multihost
says which flags). Each process reads only its share of every batch.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from rpt_jax import multihost  # noqa: E402  (its flags: --distributed and the rest)

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and caches go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    multihost.initialize()  # before any other jax call
    import jax
    from rpt_jax import config as config_lib
    from rpt_jax import trainer

    # before anything compiles
    config_lib.validate(_CONFIG.value, jax.device_count(), jax.default_backend())
    result = multihost.run(lambda: trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value))
    if result.status == "bad_steps":
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
