"""Scalar metrics to <workdir>/metrics.jsonl and TensorBoard event files; process 0 writes.

One JSON object per line: {"step": int, "kind": "train" | "eval" | "warmup", "time": unix
seconds, <name>: number, ...} (a non-finite value as the string "nan" / "inf"). Sampled
rollouts to read (`write_samples`) go to <workdir>/samples.jsonl, one context a line, and to
TensorBoard's text tab. On resume from step s the records a killed run wrote after s are
dropped (from the JSONL files, and TensorBoard is told to purge them), so each step appears
once; a fresh run (no checkpoint) starts them all anew.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import time

import jax
import numpy as np

JSONL = "metrics.jsonl"
SAMPLES = "samples.jsonl"
TB_DIR = "tensorboard"


def _scalar(v) -> float | int | None:
    v = np.asarray(v)
    if v.size != 1:
        return None
    v = v.reshape(()).item()
    if isinstance(v, bool):
        return int(v)
    return v


class MetricsWriter:
    """Append scalars by step. workdir: where metrics.jsonl and tensorboard/ go.

    resume_step: the step training resumes from (records after it are dropped); None on a fresh
    run (earlier records and event files are removed). Only process 0 writes; other processes'
    calls do nothing.
    """

    def __init__(self, workdir, *, tensorboard: bool = True, jsonl: bool = True,
                 resume_step: int | None = None, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = self._samples = self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path, tb_dir = os.path.join(workdir, JSONL), os.path.join(workdir, TB_DIR)
        samples = os.path.join(workdir, SAMPLES)
        if resume_step is None:  # stale records of a run that never reached a checkpoint
            for f in glob.glob(os.path.join(tb_dir, "events.out.tfevents.*")) + [path, samples]:
                if os.path.isfile(f):
                    os.remove(f)
        else:
            _truncate_after(path, resume_step)
            _truncate_after(samples, resume_step)
        if jsonl:
            self._jsonl = open(path, "a", buffering=1)
            self._samples = open(samples, "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter
            purge = None if resume_step is None else resume_step + 1
            # the suffix: a writer opened within the same second (a quick resume) would
            # otherwise take the same file name, and overwrite its records
            self._tb = SummaryWriter(tb_dir, purge_step=purge, flush_secs=10,
                                     filename_suffix=f".{time.time_ns()}")

    def write(self, step: int, metrics: dict, kind: str = "train") -> None:
        """Log every scalar entry of `metrics` (arrays of one element included) at `step`."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items()}
        values = {k: v for k, v in values.items() if v is not None}
        if self._jsonl is not None:  # JSON has no NaN / inf: "nan", "inf" there
            record = {"step": int(step), "kind": kind, "time": round(time.time(), 3), **{
                k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
                for k, v in values.items()}}
            self._jsonl.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(_tag(kind, k), v, int(step))

    def write_samples(self, step: int, records: list[dict]) -> None:
        """Log rollouts to read (rollout.records: one dict per context) at `step`."""
        if not self.enabled:
            return
        if self._samples is not None:
            for i, rec in enumerate(records):
                self._samples.write(json.dumps({"step": int(step), "context_index": i, **rec})
                                    + "\n")
        if self._tb is not None:
            for i, rec in enumerate(records):
                self._tb.add_text(f"samples/{i}", _markdown(rec), int(step))

    def flush(self) -> None:
        for f in (self._jsonl, self._samples, self._tb):
            if f is not None:
                f.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._samples):
            if f is not None:
                f.close()
        self._jsonl = self._samples = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _markdown(rec: dict) -> str:
    """One context's rollouts as Markdown for TensorBoard's text tab."""
    quote = lambda text: "    " + str(text).replace("\n", "\n    ")  # noqa: E731 (a code block)
    lines = ["**context** (its end):", "", quote(rec["context"]), "",
             f"**true continuation:** `{rec['target']!r}`", ""]
    for g, s in enumerate(rec["samples"]):
        lines += [f"**sample {g}**: reward {s['reward']:g}, prediction `{s['prediction']!r}`, "
                  f"{s['tokens']} tokens{'' if s['finished'] else ' (truncated)'}", "",
                  quote(s["response"]), ""]
    return "\n".join(lines)


def _tag(kind: str, name: str) -> str:
    """TensorBoard tag "<kind>/<name>" (not doubled; characters TensorBoard rejects replaced)."""
    tag = name if name.startswith(kind + "/") else f"{kind}/{name}"
    return re.sub(r"[^A-Za-z0-9_./-]", "_", tag.replace("@", "_at_"))


def _truncate_after(path: str, step: int) -> None:
    """Drop records with step > `step` (written by a run that died before its next checkpoint)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_samples(workdir) -> list[dict]:
    """The records of samples.jsonl (`write_samples`), in file order."""
    return _read_jsonl(os.path.join(workdir, SAMPLES))


def read_metrics(workdir, kind: str | None = "train") -> list[dict]:
    """The records of metrics.jsonl (of one kind, or all with kind=None), in file order. A line
    that does not parse (cut short by a kill, or still being written by a live run) is skipped."""
    return [r for r in _read_jsonl(os.path.join(workdir, JSONL))
            if kind is None or r.get("kind") == kind]


def _read_jsonl(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
