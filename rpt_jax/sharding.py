"""Device mesh, logical-axis rules and NamedShardings for params, optimizer state and batches.

The mesh always has the three axes (data, fsdp, tensor); unused ones have size 1, so the same
code runs on one CPU, simulated CPU devices, a GPU or a TPU slice. Every weight and activation
axis has a logical name; `RULES` maps each name to mesh axes, in one place.
"""
from __future__ import annotations

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the mesh axes a batch is split over

RULES = {
    # activations: batch over the data axes; hidden replicated, MLP hidden over tensor
    "batch": BATCH,
    "length": None,
    "act_embed": None,
    "act_mlp": "tensor",
    # weights: FSDP over the hidden dim, tensor parallelism over heads / MLP / vocab
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
}


def make_mesh(config, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh of a config over `devices` (default: all), Auto axis types.

    Devices follow the TPU slice's physical axes. A mesh axis that no product of whole
    physical axes matches (tensor=4 on a v6e 8x8) splits a physical axis instead of failing,
    as jax.make_mesh does for v5e only.
    """
    from rpt_jax.config import mesh_shape  # late import: config imports nothing of ours
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(config, len(devices))
    types = (AxisType.Auto,) * 3
    try:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    except NotImplementedError:  # no assignment of whole physical axes
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, AXES, axis_types=types)


def spec(logical: tuple, shape=None, mesh=None) -> P:
    """PartitionSpec of a tensor with these logical axes.

    With `shape` and `mesh`, a mesh axis that does not divide its dimension is dropped
    (replicated); used for activations, whose sizes vary. Weights are checked strictly by
    `param_shardings` instead.
    """
    out = []
    for i, name in enumerate(logical):
        if name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in sharding.RULES")
        axes = RULES[name]
        if axes is not None and shape is not None and mesh is not None:
            size = np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)])
            if shape[i] % size:
                axes = None
        out.append(axes)
    return P(*out)


def _is_axes(x):
    return isinstance(x, tuple) and all(isinstance(a, str) for a in x)


def param_specs(axes_tree) -> dict:
    """Map a pytree of logical-axis tuples to PartitionSpecs."""
    return jax.tree.map(spec, axes_tree, is_leaf=_is_axes)


def param_shardings(mesh: Mesh, axes_tree, shapes_tree=None) -> dict:
    """NamedShardings for params; with `shapes_tree`, checks that every sharded dim divides."""
    specs = param_specs(axes_tree)
    if shapes_tree is not None:
        for (path, s), shape in zip(jax.tree.flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0],
                                    jax.tree.leaves(shapes_tree)):
            for dim, axes in zip(shape.shape, s):
                if axes is None:
                    continue
                size = np.prod([mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes)])
                if dim % size:
                    raise ValueError(f"param {jax.tree_util.keystr(path)} of shape {shape.shape}: "
                                     f"dim {dim} is not divisible by mesh axes {axes} (size {size})")
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading axis over the data axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def opt_state_shardings(mesh: Mesh, tx: optax.GradientTransformation, params_shapes, p_shardings):
    """Optimizer state sharded like the params it mirrors; counters and scalars replicated.

    Without this, `jax.jit(tx.init)` on an Auto mesh returns replicated state.
    """
    state_shapes = jax.eval_shape(tx.init, params_shapes)
    return optax.tree_map_params(tx, lambda _, s: s, state_shapes, p_shardings,
                                 transform_non_params=lambda _: replicated(mesh))


def constrain(x, logical: tuple):
    """with_sharding_constraint by logical names under the mesh set by `jax.set_mesh`; else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(AXES):
        return x
    return jax.lax.with_sharding_constraint(x, spec(logical, x.shape, mesh))


def batch_shards(mesh: Mesh) -> int:
    """How many parts `batch_sharding` splits a batch into (data * fsdp)."""
    return int(np.prod([mesh.shape[a] for a in BATCH]))


def _local_shards(mesh: Mesh) -> list[int]:
    """The batch parts (0 .. batch_shards - 1) this process's devices hold, ascending. On a TPU
    slice they need not be one block, nor held by this process alone (a tensor axis spanning
    hosts)."""
    k = batch_shards(mesh)
    index = batch_sharding(mesh, 1).addressable_devices_indices_map((k,))
    return sorted({s[0].indices(k)[0] for s in index.values()})


def process_rows(mesh: Mesh, n: int) -> np.ndarray:
    """Indices of the rows of an [n, ...] batch (split by `batch_sharding`) that this process's
    devices hold, ascending: the rows a host feeds to `host_to_global`."""
    k = batch_shards(mesh)
    if n % k:
        raise ValueError(f"a batch of {n} rows does not split over the mesh's data axes "
                         f"(data*fsdp={k})")
    size = n // k
    return np.concatenate([np.arange(i * size, (i + 1) * size) for i in _local_shards(mesh)])


def host_to_global(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """The global batch of which this process holds the rows `process_rows(mesh, n)`, in that
    order, as a jax array split by `batch_sharding`. local [n_local, ...]."""
    shards = _local_shards(mesh)
    size, rest = divmod(local.shape[0], len(shards))
    if rest or not size:
        raise ValueError(f"this process holds {len(shards)} of the batch's {batch_shards(mesh)} "
                         f"parts; its {local.shape[0]} rows do not split into them")
    shape = (size * batch_shards(mesh),) + local.shape[1:]
    where = {part: j for j, part in enumerate(shards)}

    def block(index):
        j = where[index[0].indices(shape[0])[0] // size]
        return local[j * size:(j + 1) * size][(slice(None),) + tuple(index[1:])]
    return jax.make_array_from_callback(shape, batch_sharding(mesh, local.ndim), block)


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-host) array on this host; collective when multi-host."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def any_process(flag: bool) -> bool:
    """Whether `flag` holds on some process; every process must call it (a collective when
    multi-host), so all take the same branch after it."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils
    return bool(np.any(multihost_utils.process_allgather(np.array(bool(flag)))))


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (collective, as `any_process`)."""
    return not any_process(not flag)


def on_process_zero(name: str, fn) -> None:
    """fn() on process 0 alone (a file written once to a folder the hosts share), then every
    process waits there for it (barrier `name`), so none reads it half-written."""
    if jax.process_index() == 0:
        fn()
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- memory

def device_bytes(mesh: Mesh) -> int | None:
    """Memory of the mesh's devices together, or None where the backend does not report it.
    Only this process's devices can be asked; the other processes' are taken to be alike."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    total = 0
    for d in local:
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        total += stats["bytes_limit"]
    return total * mesh.devices.size // len(local)


def stored_bytes(tree) -> int:
    """Bytes a tree of sharded arrays or ShapeDtypeStructs takes on all its devices together,
    replicas included (a data-parallel mesh holds each param once per device)."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   * len(x.sharding.device_set) for x in jax.tree.leaves(tree)))


def peak_bytes(compiled, platform: str) -> int:
    """XLA's estimate of a compiled program's peak memory on one `platform` device, in bytes:
    the peak of its buffer schedule (GPU, TPU; below the sum on TPUs), else arguments + outputs
    + temporaries - donated (XLA:CPU's reported peak leaves out the temporaries)."""
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)
    return total if platform == "cpu" else getattr(m, "peak_memory_in_bytes", 0) or total
