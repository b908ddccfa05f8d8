"""Checkpointer: exact round trip by name, resharding, retention, corrupt and half-written steps."""
import glob
import logging
import os
import shutil
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from rpt_jax import checkpoint

# orbax/tensorstore report failed reads of damaged files once more at interpreter teardown
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


class TrainState(NamedTuple):  # the shape of rpt_jax.train_step.TrainState
    params: Any
    opt_state: Any
    step: Any


def make_state(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"layers": {"q_proj": {"kernel": jax.random.normal(k1, (8, 16))}},
              "norm": jnp.ones((16,), jnp.bfloat16),
              "embed_tokens": jax.random.normal(k2, (256, 16))}
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    opt_state = tx.init(params)
    # make mu and nu differ so a swap between the two would show
    opt_state = jax.tree.map(lambda x: x + 1 if x.dtype == jnp.float32 else x, opt_state)
    return TrainState(params, opt_state, jnp.asarray(7, jnp.int32))


def abstract_of(state, sharding=None):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=sharding(x) if sharding else x.sharding), state)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def saved(directory, steps, keep=5):
    ck = checkpoint.Checkpointer(directory, keep=keep)
    states = {}
    for s in steps:
        states[s] = make_state(s)
        ck.save(s, states[s], {"data": {"step": s}})
    ck.close()
    return states


def data_files(directory, step):
    return [f for f in glob.glob(os.path.join(directory, str(step), "state", "**", "d", "*"),
                                 recursive=True) if os.path.getsize(f) > 1000]


def test_round_trip_by_name_with_resharding(tmp_path):
    states = saved(tmp_path / "ck", [1, 2])
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda x: NamedSharding(mesh, P("data") if x.ndim and x.shape[0] % 8 == 0 else P())
    ck = checkpoint.Checkpointer(tmp_path / "ck")
    r = ck.restore(abstract_of(states[2], shard))
    assert r.step == 2 and r.meta == {"data": {"step": 2}}
    assert isinstance(r.state, TrainState)
    assert isinstance(r.state.opt_state[1][0], optax.ScaleByAdamState)
    assert_same(r.state, states[2])
    kernel = r.state.params["layers"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == P("data") and len(kernel.addressable_shards) == 8


def test_fingerprint_ignores_sharding_and_sees_one_bit():
    state = make_state()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(state.params["embed_tokens"], NamedSharding(mesh, P("data")))
    assert (checkpoint.fingerprint({"x": sharded})
            == checkpoint.fingerprint({"x": state.params["embed_tokens"]}))
    bits = np.asarray(state.params["embed_tokens"]).view(np.uint32).copy()
    bits[3, 5] ^= 1 << 7
    flipped = jnp.asarray(bits.view(np.float32))
    assert checkpoint.fingerprint({"x": flipped}) != checkpoint.fingerprint({"x": sharded})
    # swapping two elements keeps the plain sum but not the weighted one
    swapped = state.params["embed_tokens"].at[0, :2].set(state.params["embed_tokens"][0, 1::-1])
    a, b = checkpoint.fingerprint({"x": swapped})["x"], checkpoint.fingerprint({"x": sharded})["x"]
    assert a[0] == b[0] and a[1] != b[1]


def test_keeps_the_last_k_and_periodic_saves(tmp_path):
    ck = checkpoint.Checkpointer(tmp_path / "ck", keep=2, every=3)
    state = make_state()
    assert [s for s in range(1, 10) if ck.maybe_save(s, state, {})] == [3, 6, 9]
    ck.save(9, state, {})  # an existing step is not written twice
    ck.close()
    assert ck.all_steps() == [6, 9]


@pytest.mark.parametrize("damage", ["other_arrays", "truncate", "delete_manifest"])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    d = str(tmp_path / "ck")
    states = saved(d, [1, 2])
    step_dir = os.path.join(d, "2")
    if damage == "other_arrays":
        # valid files holding other values than the ones saved as step 2 (as a flipped bit in a
        # data file or a half-overwritten folder would): orbax restores them without complaint,
        # the fingerprint written at save time does not match
        shutil.rmtree(os.path.join(step_dir, "state"))
        shutil.copytree(os.path.join(d, "1", "state"), os.path.join(step_dir, "state"))
    elif damage == "truncate":
        for f in data_files(d, 2):
            open(f, "wb").close()
    else:
        os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))
    ck = checkpoint.Checkpointer(d)
    with caplog.at_level(logging.ERROR, logger="rpt_jax.checkpoint"):
        r = ck.restore(abstract_of(states[1]))
    assert r.step == 1
    assert_same(r.state, states[1])
    assert "checkpoint " + step_dir + " is corrupt" in caplog.text
    assert "falling back to the previous one" in caplog.text
    if damage == "other_arrays":
        assert "restored arrays differ from what was saved" in caplog.text
    assert not os.path.exists(step_dir) and len(os.listdir(d + ".corrupt")) == 1
    # the run goes on and can write step 2 again
    ck.save(2, states[2], {})
    ck.close()
    assert_same(checkpoint.Checkpointer(d).restore(abstract_of(states[2])).state, states[2])


def test_no_good_step_left_raises_and_moves_nothing(tmp_path):
    """A run whose only checkpoint is corrupt stops instead of starting over from step 0."""
    d = str(tmp_path / "ck")
    states = saved(d, [1])
    for f in data_files(d, 1):
        open(f, "wb").close()
    with pytest.raises(checkpoint.CorruptCheckpoint, match=r"ck/1 is corrupt .* no earlier step"):
        checkpoint.Checkpointer(d).restore(abstract_of(states[1]))
    assert os.path.isdir(os.path.join(d, "1")) and not os.path.exists(d + ".corrupt")
    assert checkpoint.Checkpointer(tmp_path / "empty").restore(abstract_of(states[1])) is None


@pytest.mark.parametrize("error", [
    ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2.0GiB"),
    ValueError("UNAVAILABLE: storage.googleapis.com: connection reset"), TimeoutError("read")])
def test_a_passing_read_error_moves_nothing(tmp_path, monkeypatch, error):
    """Device memory or a storage outage during restore is not corruption: it raises as it is,
    every step stays, and the retry restores the newest."""
    d = str(tmp_path / "ck")
    states = saved(d, [1, 2])
    ck = checkpoint.Checkpointer(d)
    real = ck._mgr.restore
    monkeypatch.setattr(ck._mgr, "restore", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(type(error), match=str(error)[:10]):
        ck.restore(abstract_of(states[2]))
    assert ck.all_steps() == [1, 2] and not os.path.exists(d + ".corrupt")
    monkeypatch.setattr(ck._mgr, "restore", real)
    r = ck.restore(abstract_of(states[2]))
    assert r.step == 2
    assert_same(r.state, states[2])


def test_half_written_step_is_ignored(tmp_path):
    d = str(tmp_path / "ck")
    states = saved(d, [1, 2])
    # what a kill -9 during an async save leaves: the step's temporary folder, never renamed
    shutil.copytree(os.path.join(d, "2"), os.path.join(d, "3.orbax-checkpoint-tmp"))
    for f in data_files(d, 2)[:1]:
        os.remove(f.replace(os.path.join(d, "2"), os.path.join(d, "3.orbax-checkpoint-tmp")))
    ck = checkpoint.Checkpointer(d)
    assert ck.all_steps() == [1, 2]
    assert ck.restore(abstract_of(states[2])).step == 2
    ck.save(3, states[2], {})
    ck.close()
    assert checkpoint.Checkpointer(d).all_steps() == [1, 2, 3]


def test_other_config_raises_and_moves_nothing(tmp_path):
    d = str(tmp_path / "ck")
    saved(d, [1])
    other = make_state()._replace(params={"norm": jnp.ones((4,))})
    with pytest.raises(ValueError, match="does not match this config"):
        checkpoint.Checkpointer(d).restore(abstract_of(other))
    bigger = jax.tree.map(lambda x: jnp.zeros((x.shape[0] + 1,) + x.shape[1:], x.dtype)
                          if x.ndim else x, make_state())
    with pytest.raises(ValueError, match=r"embed_tokens: saved \(256, 16\)"):
        checkpoint.Checkpointer(d).restore(abstract_of(bigger))
    assert checkpoint.Checkpointer(d).all_steps() == [1]
