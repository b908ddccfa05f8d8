"""Train with RPT: `python scripts/train.py --config configs/tiny.py --workdir /tmp/rpt_tiny`.

Resumes from the newest good checkpoint in --workdir. Override config values on the command line
(`--config.num_steps=100`). Exit status: 0 when done or stopped by SIGTERM / Ctrl-C after saving,
1 when stopped by non-finite steps (optim.max_bad_steps in a row).

Several hosts / processes: run the same command in each with --distributed. JAX finds the
cluster itself on TPU slices and under SLURM; elsewhere pass --coordinator_address=host:port,
--num_processes and --process_id (e.g. two CPU processes on one machine, with
--cpu_collectives=gloo). Each process reads only its share of every batch.
"""
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and caches go.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU slices, SLURM, "
    "or JAX_COORDINATOR_ADDRESS set); every host runs this same command.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "With --distributed: host:port of process 0's coordinator "
    "(default: auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "With --distributed: how many processes (default: auto).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "With --distributed: this process's id (default: auto).")
_CPU_COLLECTIVES = flags.DEFINE_enum(
    "cpu_collectives", "", ["", "gloo", "mpi"], "jax_cpu_collectives_implementation for "
    "multi-process CPU runs ('': JAX's default, gloo in recent versions).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src.xla_bridge", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import jax
    if _CPU_COLLECTIVES.value:
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    if _DISTRIBUTED.value:  # before any other jax call; each process then sees every device
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif any(f.present for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need "
                             "--distributed")
    from rpt_jax import config as config_lib
    from rpt_jax import trainer

    # before anything compiles
    config_lib.validate(_CONFIG.value, jax.device_count(), jax.default_backend())
    try:
        result = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except BaseException:
        if jax.process_count() == 1:
            raise
        # Raising would wait in jax.distributed's shutdown barrier (5 minutes) that the other
        # processes, blocked in a collective with this one, never reach. Exiting now stops them
        # too: their collective fails, or the coordination service misses this process's
        # heartbeats (100 s) and ends them.
        logging.exception("process %d of %d failed", jax.process_index(), jax.process_count())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if result.status == "bad_steps":
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
