"""Checkpoints of the train state plus JSON metadata, saved asynchronously, restored verified.

Layout: <directory>/<step>/state (the train state, orbax/tensorstore) and <directory>/<step>/meta
(JSON: the caller's metadata, e.g. the data iterator's state, plus a fingerprint of the state).
The state is stored as a flat dict keyed by each leaf's path ("params/layers/q_proj/kernel",
"opt_state/1/0/mu/...") and rebuilt into the caller's tree by name, never by position, so
NamedTuples and reordered fields cannot silently swap same-shaped arrays.

Failure handling on restore, newest step first:
- a half-written step (killed mid-save) is never listed: orbax writes into a temporary folder
  and renames it when complete;
- a step whose files are unreadable or truncated, or whose restored arrays do not reproduce the
  fingerprint written at save time (bit rot, a partly overwritten file), is *corrupt*: it is moved
  to <directory>.corrupt/<step>-<unix time> with an error message and the previous step is
  tried; when no previous step is left, restore raises (naming the step) and moves nothing, so
  a run never silently starts over;
- a read that fails for a passing reason (device or host memory, a storage timeout or outage:
  RESOURCE_EXHAUSTED, UNAVAILABLE, DEADLINE_EXCEEDED, ...) raises as it is and moves nothing;
- a readable step whose array names or shapes differ from what the caller expects is a config
  mismatch (another model or optimizer), not corruption: that raises, and nothing is moved.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from rpt_jax import sharding

log = logging.getLogger(__name__)

STATE, META = "state", "meta"


def _flat(tree) -> dict:
    """{"a/b/c": leaf} of a pytree, in the tree's leaf order."""
    leaves, _ = jax.tree.flatten_with_path(tree)
    out = {jax.tree_util.keystr(p, simple=True, separator="/"): x for p, x in leaves}
    if len(out) != len(leaves):
        raise ValueError("checkpoint: two leaves of the state share a path name")
    return out


def _bits(x):
    """The raw bit pattern of an array as uint32 values (any dtype)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprint(flat: dict) -> dict:
    # Two wrapping uint32 sums per leaf: of the bit patterns, and position-weighted (odd
    # weights), so a flipped bit or swapped elements change it. Integer sums are exact, hence
    # independent of how the array is sharded or reduced.
    out = {}
    for name, x in flat.items():
        b = _bits(x).reshape(-1)
        w = jnp.arange(b.shape[0], dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
        out[name] = jnp.stack([jnp.sum(b, dtype=jnp.uint32), jnp.sum(b * w, dtype=jnp.uint32)])
    return out


def fingerprint(tree) -> dict[str, list[int]]:
    """{leaf path: [sum of bits, weighted sum of bits]} (uint32, wrapping); one device pass."""
    fp = jax.device_get(_fingerprint(_flat(tree)))
    return {k: [int(v) for v in np.asarray(fp[k])] for k in sorted(fp)}


@dataclasses.dataclass
class Restored:
    step: int
    state: Any  # the caller's tree type, arrays placed with the abstract target's shardings
    meta: dict  # the caller's metadata, as saved


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back exactly as it was written."""


# Error codes (absl / tensorstore status names) of reads that may well succeed when retried.
TRANSIENT_CODES = ("RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED",
                   "ABORTED")


def _is_transient(e: BaseException) -> bool:
    """A read error that says nothing about the checkpoint's files (memory, storage outages)."""
    return (isinstance(e, (MemoryError, TimeoutError, ConnectionError, InterruptedError))
            or any(code in str(e) for code in TRANSIENT_CODES))


class Checkpointer:
    """orbax CheckpointManager for (state pytree, JSON metadata) with verified restore.

    directory: where steps go (created). keep: how many recent steps to keep (max_to_keep).
    every: save period in steps for `maybe_save`. async_save: write in a background thread
    (`wait` blocks until written; `close` waits too).
    """

    def __init__(self, directory, *, keep: int = 3, every: int = 0, async_save: bool = True):
        if keep < 1:
            raise ValueError(f"checkpoint.keep={keep} must be >= 1")
        self.directory = os.path.abspath(os.fspath(directory))
        self.every = int(every)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self._mgr = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(
            self.directory, options=self._options,
            item_handlers={STATE: ocp.StandardCheckpointHandler(),
                           META: ocp.JsonCheckpointHandler()})

    # ------------------------------------------------------------------ saving
    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state, meta: dict | None = None) -> None:
        """Save `state` (any pytree of arrays) and `meta` (JSON-serialisable) as `step`.

        Returns once the arrays are copied off the device buffers (the caller may donate them);
        files are written in the background. Saving an existing step replaces nothing: skipped.
        """
        step = int(step)
        if step in self._mgr.all_steps():
            log.debug("checkpoint %d already exists in %s; not saving it again", step,
                      self.directory)
            return
        flat = _flat(state)
        meta = {"user": dict(meta or {}), "fingerprint": fingerprint(flat), "time": time.time()}
        self._mgr.save(step, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(flat), META: ocp.args.JsonSave(meta)}), force=True)

    def maybe_save(self, step: int, state, meta: dict | None = None) -> bool:
        """Save when `step` is a multiple of `every` (every <= 0: never). Returns whether it did."""
        if self.every > 0 and step % self.every == 0:
            self.save(step, state, meta)
            return True
        return False

    def wait(self) -> None:
        """Block until every pending save is fully on disk."""
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.wait_until_finished()
        self._mgr.close()

    # ------------------------------------------------------------------ restoring
    def restore(self, abstract_state) -> Restored | None:
        """The newest good checkpoint, or None when there is none.

        abstract_state: the target tree of jax.ShapeDtypeStruct (with .sharding for the
        placement wanted, e.g. from jax.eval_shape plus shardings). Corrupt steps are moved
        aside and the previous one is tried (CorruptCheckpoint when none is left); a config
        mismatch raises ValueError; a passing read error raises as it is (module docstring).
        """
        flat_abstract = _flat(abstract_state)
        treedef = jax.tree.structure(abstract_state)
        names = list(flat_abstract)
        steps = sorted(self._mgr.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                flat, meta = self._restore_step(step, flat_abstract)
            except CorruptCheckpoint as e:
                if i == len(steps) - 1:
                    raise CorruptCheckpoint(
                        f"checkpoint {self._step_dir(step)} is corrupt ({e}) and no earlier step "
                        f"is left to fall back to; move {self.directory} aside (or use a new "
                        f"workdir) to start over") from e
                log.error("checkpoint %s is corrupt (%s); falling back to the previous one",
                          self._step_dir(step), e)
                self._quarantine(step)
                continue
            state = jax.tree.unflatten(treedef, [flat[n] for n in names])
            log.info("restored checkpoint %s", self._step_dir(step))
            return Restored(step, state, meta["user"])
        return None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _restore_step(self, step: int, flat_abstract: dict):
        try:
            out, error = self._read_step(step, flat_abstract), None
        except CorruptCheckpoint as e:
            out, error = None, e
        # Every process takes the same branch on a corrupt step: one that cannot read it must not
        # leave the others waiting in the fingerprint's collective below. (A transient error
        # raises on its process alone; multihost.run then ends the others.)
        if sharding.any_process(error is not None):
            raise error or CorruptCheckpoint("unreadable on another process")
        flat, meta = dict(out[STATE]), out[META]
        if not isinstance(meta, dict) or "fingerprint" not in meta or "user" not in meta:
            raise CorruptCheckpoint("metadata JSON lacks its fingerprint")
        got = fingerprint(flat)
        bad = [n for n in got if got[n] != meta["fingerprint"].get(n)]
        if bad:
            raise CorruptCheckpoint(f"restored arrays differ from what was saved: {bad[:5]}")
        return flat, meta

    def _read_step(self, step: int, flat_abstract: dict):
        """orbax's restore of the step on this process; CorruptCheckpoint if it cannot."""
        try:
            saved = self._mgr.item_metadata(step)[STATE].tree
        except Exception as e:  # unreadable metadata: a damaged step, unless the error passes
            if _is_transient(e):
                raise
            raise CorruptCheckpoint(f"metadata unreadable: {type(e).__name__}: {e}") from e
        _check_matches(self._step_dir(step), saved, flat_abstract)
        try:
            return self._mgr.restore(step, args=ocp.args.Composite(**{
                STATE: ocp.args.StandardRestore(flat_abstract), META: ocp.args.JsonRestore()}))
        except Exception as e:
            if _is_transient(e):
                raise
            raise CorruptCheckpoint(f"restore failed: {type(e).__name__}: {e}") from e

    def _quarantine(self, step: int) -> None:
        """Move a corrupt step out of the manager's folder (kept for inspection, never reused)."""
        def move():
            dest = os.path.join(self.directory + ".corrupt", f"{step}-{int(time.time())}")
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(self._step_dir(step), dest)
            log.error("moved corrupt checkpoint %d to %s", step, dest)

        sharding.on_process_zero(f"rpt_jax_quarantine_{step}", move)
        self._mgr.reload()


def _check_matches(where: str, saved: dict, flat_abstract: dict) -> None:
    """Raise ValueError when a checkpoint holds other arrays than the caller expects."""
    missing = sorted(set(flat_abstract) - set(saved))
    extra = sorted(set(saved) - set(flat_abstract))
    shapes = [f"{n}: saved {tuple(saved[n].shape)} {saved[n].dtype}, expected "
              f"{tuple(flat_abstract[n].shape)} {np.dtype(flat_abstract[n].dtype)}"
              for n in flat_abstract if n in saved and
              (tuple(saved[n].shape) != tuple(flat_abstract[n].shape)
               or np.dtype(saved[n].dtype) != np.dtype(flat_abstract[n].dtype))]
    if missing or extra or shapes:
        raise ValueError(
            f"checkpoint {where} does not match this config (another model or optimizer?): "
            f"missing {missing[:5]}, unexpected {extra[:5]}, shape/dtype {shapes[:5]}. Use a "
            f"fresh --workdir or the config that wrote it.")
