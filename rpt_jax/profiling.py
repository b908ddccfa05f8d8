"""jax.profiler traces of chosen training steps: config.logging.profile_start (the first step
traced; -1: none) and profile_steps (how many).

The trace goes to <workdir>/profile/plugins/profile/<time>/<host>.xplane.pb, one file per host,
for TensorBoard's profile plugin or Perfetto. Each step is a `StepTraceAnnotation` named
"rpt_step", so the profile's step view splits the run by training step. Step 0 includes the
compilations; start at 1 or later to see the steady state.
"""
from __future__ import annotations

import contextlib
import logging
import os

import jax

log = logging.getLogger(__name__)


class StepProfiler:
    """`with profiler.step(s): ...` around a training step's device work."""

    def __init__(self, directory: str, start: int = -1, steps: int = 1):
        self.directory, self.start = directory, int(start)
        self.stop_after = self.start + int(steps) - 1  # the last step traced
        self.active = False

    @contextlib.contextmanager
    def step(self, step: int):
        # a resumed run may start inside the window
        if 0 <= self.start <= step <= self.stop_after and not self.active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self.active = True
            log.info("profiling steps %d-%d into %s", step, self.stop_after, self.directory)
        try:
            with jax.profiler.StepTraceAnnotation("rpt_step", step_num=step):
                yield
        finally:
            if step >= self.stop_after:
                self.close()

    def close(self):
        """Stop a trace still running (a run that ended or failed inside the window)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
