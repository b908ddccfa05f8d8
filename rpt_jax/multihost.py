"""Several processes for the scripts (train.py, evaluate.py): their --distributed flags, the
start-up through jax.distributed, and stopping every process when one fails.

Run the same command in each process with --distributed. JAX finds the cluster itself on TPU
slices and under SLURM; elsewhere pass --coordinator_address=host:port, --num_processes and
--process_id (e.g. two CPU processes on one machine, with --cpu_collectives=gloo).
"""
import logging
import os
import sys

from absl import app, flags

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


def initialize() -> None:
    """Join the processes the flags describe; call it before any other jax call."""
    import jax
    if _CPU_COLLECTIVES.value:
        jax.config.update("jax_cpu_collectives_implementation", _CPU_COLLECTIVES.value)
    if _DISTRIBUTED.value:  # each process then sees every device
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif any(f.present for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
        raise app.UsageError("--coordinator_address/--num_processes/--process_id need "
                             "--distributed")


def run(fn):
    """fn()'s result. When it raises in one of several processes, log the error and exit at
    once: raising would wait in jax.distributed's shutdown barrier (5 minutes) that the other
    processes, blocked in a collective with this one, never reach. Exiting stops them too:
    their collective fails, or the coordination service misses this process's heartbeats
    (100 s) and ends them."""
    import jax
    try:
        return fn()
    except BaseException:
        if jax.process_count() == 1:
            raise
        logging.exception("process %d of %d failed", jax.process_index(), jax.process_count())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
