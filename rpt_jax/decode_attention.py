"""A fused decode-attention kernel (Pallas, Triton backend) for the sampler's KV caches.

One kernel per cache part and layer replaces XLA's chain of score / mask / softmax / value
kernels: each program reads one cache row's keys and values for one kv head once, in blocks of
`block_k` slots, with an online softmax (flash decoding), and serves a block of the query rows
that read that cache row (the q heads of its kv head, times the g samples or contexts sharing
the row). Long caches read by few programs are split into slot ranges run in parallel. Slot
ranges and parts are combined by their log-sum-exp, so several caches (a shared prompt cache,
response blocks) give one softmax. `step_attention` is the kernel over a step's own per-sample
cache: it also does the step's rope and writes its new key and value into the cache.

GPU only (Triton). On CPU it runs in Pallas' interpreter, slowly, for tests; TPU would need a
Mosaic kernel and is refused.

Shapes: b cache rows, k kv heads, h query rows per (cache row, kv head), s slots, e head_dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
try:  # Pallas' Triton backend: deprecated in jax 0.11 in favour of Mosaic GPU
    from jax.experimental.pallas import triton as plgpu
except ImportError:  # a jax without it: sampling.attention="xla" still works
    plgpu = None
from jax.sharding import PartitionSpec as P

from rpt_jax import sharding

NEG = -1e30  # finite: a block with every slot masked must not turn the running max into NaN
BLOCK_K = 64  # slots per loop iteration; caches for this kernel are sized in multiples of it
BLOCK_H = 64  # query rows per program: a document row read by m contexts x G samples x q heads
# would otherwise need hundreds of accumulator rows in one program
NUM_WARPS, NUM_STAGES = 4, 2  # Triton launch options (scripts/bench_decode_attention.py --sweep)
SPLITS = 0  # slot ranges per cache row; 0: `splits_for` (enough for about PROGRAMS programs)
PROGRAMS = 512  # split long caches into slot ranges until about this many programs run (an
# H100 has 132 SMs; a few 14B kv heads per device over a handful of document rows are far fewer)
FUSE_STEP = True  # the pallas decode step attends over its own cache with `step_attention`
# (rope, cache write and attention in one kernel) instead of XLA's rope, pad and cache updates
# around `part_attention` (scripts/bench_sampler.py --fuse-step compares them)


def _pow2_at_least(x: int, lo: int = 16) -> int:
    return max(lo, 1 << (x - 1).bit_length())


def block_size(s: int, block_k: int = BLOCK_K) -> int:
    """The largest power of two <= block_k (and >= 16) dividing s, or 0 if there is none."""
    while block_k >= 16:
        if s % block_k == 0:
            return block_k
        block_k //= 2
    return 0


def splits_for(programs: int, s: int, block_k: int) -> int:
    """Slot ranges per cache row: doubled while fewer than PROGRAMS programs would run and the
    ranges stay whole blocks."""
    n = 1
    while programs * n * 2 <= PROGRAMS and s % (n * 2 * block_k) == 0:
        n *= 2
    return n


def _kernel(q_ref, k_ref, v_ref, valid_ref, limit_ref, o_ref, lse_ref, *, block_k, scale):
    """One (cache row, kv head, block of query rows, slot range): q [h, e], keys / values and
    valid of the range [s', e] / [s'], limit [h] (absolute slots)."""
    q = q_ref[...]
    limit = limit_ref[...]
    h, e = q.shape
    span = k_ref.shape[0]
    offset = pl.program_id(3) * span  # first slot of this range
    idx = jnp.arange(block_k, dtype=jnp.int32)

    def body(j, carry):
        acc, m, l = carry
        start = j * block_k
        keys = k_ref[pl.ds(start, block_k), :]
        values = v_ref[pl.ds(start, block_k), :]
        ok = (valid_ref[pl.ds(start, block_k)] != 0)[None, :] & (
            (offset + start + idx)[None, :] < limit[:, None])  # [h, block_k]
        scores = jnp.dot(q, keys.T, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(ok, scores, NEG)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.where(ok, jnp.exp(scores - m_new[:, None]), 0.0)
        shrink = jnp.exp(m - m_new)
        acc = acc * shrink[:, None] + jnp.dot(p.astype(values.dtype), values,
                                              preferred_element_type=jnp.float32)
        return acc, m_new, l * shrink + p.sum(axis=1)

    # slots at or past the largest limit are never read
    n_blocks = jnp.clip(pl.cdiv(jnp.max(limit) - offset, block_k), 0, span // block_k)
    acc, m, l = jax.lax.fori_loop(
        0, n_blocks, body, (jnp.zeros((h, e), jnp.float32), jnp.full((h,), NEG, jnp.float32),
                            jnp.zeros((h,), jnp.float32)))
    seen = l != 0  # not `> 0`: a NaN read from the cache must come out as NaN, not as 0
    o_ref[...] = jnp.where(seen[:, None], acc / jnp.where(seen, l, 1.0)[:, None], 0.0)
    lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def part_attention(q, keys, values, valid, limit, *, block_k: int | None = None,
                   block_h: int | None = None, splits: int | None = None,
                   num_warps: int | None = None, num_stages: int | None = None,
                   interpret: bool | None = None):
    """Attention of query rows over one cache part, normalised within the part.

    q [b, k, h, e]; keys, values [b, k, s, e]; valid [b, s] bool (slots that hold a token);
    limit [b, h] int32 (query row i reads slots < limit[:, i] only). s must be a multiple of a
    power of two >= 16 (`block_size`). Returns (out [b, k, h, e] float32, lse [b, k, h] float32:
    the log of the softmax denominator, -inf for a row that sees no slot).
    splits: slot ranges per cache row (None: SPLITS, or `splits_for` if that is 0).
    block_k, block_h, num_warps, num_stages: None = the module's BLOCK_K, BLOCK_H, NUM_WARPS,
    NUM_STAGES. interpret: None = Pallas' interpreter when lowered for CPU, the Triton kernel
    for GPUs.
    """
    block_k, block_h = block_k or BLOCK_K, block_h or BLOCK_H
    b, kv, h, e = q.shape
    s = keys.shape[2]
    bk = block_size(s, block_k)
    if not bk:
        raise ValueError(f"cache of {s} slots: the pallas decode kernel needs a multiple of 16")
    if interpret is None:
        call = functools.partial(part_attention, block_k=block_k, block_h=block_h,
                                 splits=splits, num_warps=num_warps, num_stages=num_stages)
        return _on_platform(call, (q, keys, values, valid, limit), (None, None))
    hp = _pow2_at_least(h)  # Triton dots need >= 16 rows, in powers of two
    bh = min(hp, _pow2_at_least(block_h))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, hp - h), (0, 0)))
    limit = jnp.pad(limit.astype(jnp.int32), ((0, 0), (0, hp - h)))
    kernel = functools.partial(_kernel, block_k=bk, scale=e ** -0.5)
    if splits is None:
        splits = SPLITS or splits_for(b * kv * (hp // bh), s, bk)
    if s % (splits * bk):
        raise ValueError(f"cache of {s} slots does not split into {splits} ranges of whole "
                         f"{bk}-slot blocks")
    span = s // splits
    rows = lambda i, j, t, n: (n, i, j, t, 0)  # noqa: E731  (query-row block t, slot range n)
    cache = lambda i, j, t, n: (i, j, n, 0)  # noqa: E731
    sq = pl.Squeezed()  # a grid-indexed dimension the kernel does not see
    extra = {} if interpret else {"compiler_params": _triton_params(num_warps or NUM_WARPS,
                                                                    num_stages or NUM_STAGES)}
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, kv, hp // bh, splits),
        in_specs=[pl.BlockSpec((sq, sq, bh, e), lambda i, j, t, n: (i, j, t, 0)),
                  pl.BlockSpec((sq, sq, span, e), cache),
                  pl.BlockSpec((sq, sq, span, e), cache),
                  pl.BlockSpec((sq, span), lambda i, j, t, n: (i, n)),
                  pl.BlockSpec((sq, bh), lambda i, j, t, n: (i, t))],
        out_specs=[pl.BlockSpec((sq, sq, sq, bh, e), rows),
                   pl.BlockSpec((sq, sq, sq, bh), lambda i, j, t, n: (n, i, j, t))],
        out_shape=[jax.ShapeDtypeStruct((splits, b, kv, hp, e), jnp.float32),
                   jax.ShapeDtypeStruct((splits, b, kv, hp), jnp.float32)],
        interpret=interpret, name="rpt_decode_attention", **extra,
    )(q, keys, values, valid.astype(jnp.int32), limit)
    return combine(out[..., :h, :], lse[..., :h])


def step_attention(qkv, cos, sin, keys, values, valid, slot, read, *, alone: bool = True,
                   block_k: int | None = None, splits: int | None = None,
                   num_warps: int | None = None, num_stages: int | None = None,
                   interpret: bool | None = None):
    """A decode step's attention over a per-sample cache, fused with the step's rope and cache
    write (which otherwise take a rope-and-pad kernel and two cache-update kernels a layer).

    qkv [b, k, n + 2, e]: per kv head its n query heads, then its key and its value, before
    rope; cos, sin [b, e / 2] float32: the rope of each row's position; keys, values
    [b, k, s, e] and valid [b, s]: the cache; slot [b] int32: where each row's new key (roped)
    and value go; read [b] int32: each row reads the valid cache slots below it (0: none, for a
    finished row) and its new token. Returns (out [b, k, n, e] in qkv's dtype, keys, values),
    the cache updated in place. alone=False (other cache parts follow, read by
    `part_attention`): returns (out float32, lse [b, k, n] for `merge`, the queries after rope
    [b, k, n, e] in qkv's dtype, keys, values). Launch options and interpret as in
    `part_attention`.
    """
    b, kv, n2, e = qkv.shape
    s = keys.shape[2]
    bk = block_size(s, block_k or BLOCK_K)
    if not bk:
        raise ValueError(f"cache of {s} slots: the pallas decode kernel needs a multiple of 16")
    if interpret is None:
        call = functools.partial(step_attention, alone=alone, block_k=block_k, splits=splits,
                                 num_warps=num_warps, num_stages=num_stages)
        dtypes = (qkv.dtype, keys.dtype, values.dtype)
        return _on_platform(call, (qkv, cos, sin, keys, values, valid, slot, read),
                            dtypes if alone else (None, None) + dtypes)
    hp = _pow2_at_least(n2)
    if splits is None:
        splits = SPLITS or splits_for(b * kv, s, bk)
    if s % (splits * bk):
        raise ValueError(f"cache of {s} slots does not split into {splits} ranges of whole "
                         f"{bk}-slot blocks")
    span = s // splits
    sq = pl.Squeezed()
    cache = pl.BlockSpec((sq, sq, span, e), lambda i, j, m: (i, j, m, 0))
    per_row = pl.BlockSpec((sq,), lambda i, j, m: (i,))
    rope = pl.BlockSpec((sq, e // 2), lambda i, j, m: (i, 0))
    extra = {} if interpret else {"compiler_params": _triton_params(num_warps or NUM_WARPS,
                                                                    num_stages or NUM_STAGES)}
    heads = (pl.BlockSpec((sq, sq, n2 - 2, e), lambda i, j, m: (i, j, 0, 0)),
             jax.ShapeDtypeStruct((b, kv, n2 - 2, e), qkv.dtype))  # [b, k, n, e]
    if alone and splits == 1:  # the kernel writes the final output
        outs = [heads]
    else:
        outs = [(pl.BlockSpec((sq, sq, sq, hp, e), lambda i, j, m: (m, i, j, 0, 0)),
                 jax.ShapeDtypeStruct((splits, b, kv, hp, e), jnp.float32)),
                (pl.BlockSpec((sq, sq, sq, hp), lambda i, j, m: (m, i, j, 0)),
                 jax.ShapeDtypeStruct((splits, b, kv, hp), jnp.float32))]
    if not alone:
        outs.append(heads)  # the queries after rope
    outs += [(cache, jax.ShapeDtypeStruct(x.shape, x.dtype)) for x in (keys, values)]
    *out, keys, values = pl.pallas_call(
        functools.partial(_step_kernel, block_k=bk, scale=e ** -0.5, n=n2 - 2, hp=hp),
        grid=(b, kv, splits),
        in_specs=[pl.BlockSpec((sq, sq, n2, e), lambda i, j, m: (i, j, 0, 0)), rope, rope,
                  cache, cache, pl.BlockSpec((sq, span), lambda i, j, m: (i, m)),
                  per_row, per_row],
        out_specs=[spec for spec, _ in outs], out_shape=[shape for _, shape in outs],
        input_output_aliases={3: len(outs) - 2, 4: len(outs) - 1}, interpret=interpret,
        name="rpt_decode_step_attention", **extra,
    )(qkv, cos.astype(jnp.float32), sin.astype(jnp.float32), keys, values,
      valid.astype(jnp.int32), slot.astype(jnp.int32), read.astype(jnp.int32))
    if alone and splits == 1:
        return out[0], keys, values
    attn, lse = combine(out[0][..., :n2 - 2, :], out[1][..., :n2 - 2])
    if alone:
        return attn.astype(qkv.dtype), keys, values
    return attn, lse, out[2], keys, values


def _step_kernel(qkv_ref, cos_ref, sin_ref, k_ref, v_ref, valid_ref, slot_ref, read_ref,
                 *outs, block_k, scale, n, hp):
    """One (cache row, kv head, slot range) of `step_attention`: qkv [n + 2, e] (rows n, n + 1:
    the new key and value), cos, sin [e / 2], keys / values / valid of the range [s', e] / [s'],
    slot and read: scalars (absolute slots). Works on the two rope halves of e apart."""
    # alone with one slot range: (out [n, e] in qkv's dtype, caches); else (out [hp, e]
    # float32, lse [hp]) for `combine`, then (not alone) the queries after rope, then the caches
    *outs, k_out, v_out = outs
    o_ref, lse_ref, q_out = (outs + [None, None])[:3]
    half = k_ref.shape[1] // 2
    span = k_ref.shape[0]
    offset = pl.program_id(2) * span  # first slot of this range
    slot, read = slot_ref[...], read_ref[...]
    rows = jnp.arange(hp, dtype=jnp.int32)
    real = (rows < n + 2)[:, None]
    dtype = k_ref.dtype
    # [hp, half] each, the rows past n + 1 (past the block: Triton loads powers of two) zero
    x1, x2 = (plgpu.load(qkv_ref.at[pl.ds(0, hp), pl.ds(lo, half)], mask=real, other=0)
              .astype(jnp.float32) for lo in (0, half))
    cos, sin = cos_ref[...][None, :], sin_ref[...][None, :]
    q1 = (x1 * cos - x2 * sin).astype(dtype)  # rope of the queries and the key (row n)
    q2 = (x2 * cos + x1 * sin).astype(dtype)
    if q_out is not None:
        @pl.when(pl.program_id(2) == 0)
        def _queries():  # for the other parts' kernels
            for lo, q in ((0, q1), (half, q2)):
                plgpu.store(q_out.at[pl.ds(0, hp), pl.ds(lo, half)], q,
                            mask=(rows < n)[:, None])

    def pick(x, i):  # row i of x [hp, half] -> [half] (a masked sum: Triton has no row gather)
        return jnp.sum(jnp.where(rows[:, None] == i, x.astype(jnp.float32), 0.0),
                       axis=0).astype(dtype)

    k1, k2, v1, v2 = pick(q1, n), pick(q2, n), pick(x1, n + 1), pick(x2, n + 1)

    @pl.when((slot >= offset) & (slot < offset + span))
    def _write():  # the new key and value into their slot (k_out, v_out alias the cache)
        at = pl.ds(slot - offset, 1)
        k_out[at, pl.ds(0, half)] = k1[None, :]
        k_out[at, pl.ds(half, half)] = k2[None, :]
        v_out[at, pl.ds(0, half)] = v1[None, :]
        v_out[at, pl.ds(half, half)] = v2[None, :]

    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    own = (jnp.sum(f32(q1) * f32(k1)[None, :], axis=1)
           + jnp.sum(f32(q2) * f32(k2)[None, :], axis=1)) * scale  # [hp] the new token's score
    # the first slot range counts the new token (as a [hp] mask: Triton selects elementwise)
    first = jnp.full((hp,), pl.program_id(2), jnp.int32) == 0
    m = jnp.where(first, own, NEG)
    l = jnp.where(first, 1.0, 0.0)
    acc1, acc2 = (jnp.where(first[:, None], f32(v)[None, :], 0.0) for v in (v1, v2))
    idx = jnp.arange(block_k, dtype=jnp.int32)

    def body(j, carry):
        acc1, acc2, m, l = carry
        at = pl.ds(j * block_k, block_k)
        ok = (valid_ref[at] != 0) & (offset + j * block_k + idx < read)  # [block_k]
        scores = (jnp.dot(q1, k_ref[at, pl.ds(0, half)].T, preferred_element_type=jnp.float32)
                  + jnp.dot(q2, k_ref[at, pl.ds(half, half)].T,
                            preferred_element_type=jnp.float32)) * scale
        scores = jnp.where(ok[None, :], scores, NEG)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.where(ok[None, :], jnp.exp(scores - m_new[:, None]), 0.0)
        shrink = jnp.exp(m - m_new)
        p = p.astype(dtype)
        acc1 = acc1 * shrink[:, None] + jnp.dot(p, v_ref[at, pl.ds(0, half)],
                                                preferred_element_type=jnp.float32)
        acc2 = acc2 * shrink[:, None] + jnp.dot(p, v_ref[at, pl.ds(half, half)],
                                                preferred_element_type=jnp.float32)
        return acc1, acc2, m_new, l * shrink + jnp.sum(f32(p), axis=1)

    n_blocks = jnp.clip(pl.cdiv(read - offset, block_k), 0, span // block_k)
    acc1, acc2, m, l = jax.lax.fori_loop(0, n_blocks, body, (acc1, acc2, m, l))
    seen = l != 0
    inv = 1.0 / jnp.where(seen, l, 1.0)
    for lo, acc in ((0, acc1), (half, acc2)):
        out = jnp.where(seen[:, None], acc * inv[:, None], 0.0).astype(o_ref.dtype)
        if lse_ref is None:  # the query rows only (past them lies the next row's block)
            plgpu.store(o_ref.at[pl.ds(0, hp), pl.ds(lo, half)], out, mask=(rows < n)[:, None])
        else:
            o_ref[:, pl.ds(lo, half)] = out
    if lse_ref is not None:
        lse_ref[...] = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)


def sharded_part_attention(q, keys, values, valid, limit, **kwargs):
    """`part_attention` on each device's rows and kv heads (shard_map under the mesh set by
    `jax.set_mesh`; a custom call left to the partitioner would gather every cache)."""
    fn = functools.partial(part_attention, **kwargs)
    rows, mesh = _cache_spec(keys.shape)
    if mesh is None:
        return fn(q, keys, values, valid, limit)
    flat = P(rows[0], None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, rows, flat, flat),
                         out_specs=(rows, P(*rows[:3])), check_vma=False)(
        q, keys, values, valid, limit)


def sharded_step_attention(qkv, cos, sin, keys, values, valid, slot, read, **kwargs):
    """`step_attention` on each device's rows and kv heads (as `sharded_part_attention`)."""
    fn = functools.partial(step_attention, **kwargs)
    args = (qkv, cos, sin, keys, values, valid, slot, read)
    rows, mesh = _cache_spec(keys.shape)
    if mesh is None:
        return fn(*args)
    flat, each = P(rows[0], None), P(rows[0])
    outs = (rows,) * 3 if kwargs.get("alone", True) else (rows, P(*rows[:3])) + (rows,) * 3
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, flat, flat, rows, rows, flat, each, each),
                         out_specs=outs, check_vma=False)(*args)


def _cache_spec(shape):
    """(PartitionSpec of a [b, k, s, e] cache, mesh) under the rpt_jax mesh set by
    `jax.set_mesh`, or (None, None) without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or set(mesh.axis_names) != set(sharding.AXES):
        return None, None
    return sharding.spec(("batch", "kv_heads", "length", "head_dim"), shape, mesh), mesh


def combine(out, lse):
    """n results over disjoint slot sets -> the one softmax over their union.

    out [n, ..., e], lse [n, ...] -> (out [..., e], lse [...]); a row that sees no slot in any
    set gets out 0 and lse -inf, and a NaN in any set stays NaN.
    """
    if out.shape[0] == 1:
        return out[0], lse[0]
    top = lse.max(axis=0)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)
    total = weights.sum(axis=0)
    seen = total != 0
    safe = jnp.where(seen, total, 1.0)
    return ((out * (weights / safe)[..., None]).sum(axis=0),
            jnp.where(seen, top + jnp.log(safe), -jnp.inf))


def merge(parts):
    """One softmax over several parts: [(out [..., e], lse [...])] -> out [..., e] float32."""
    return combine(jnp.stack([o for o, _ in parts]), jnp.stack([lse for _, lse in parts]))[0]


def _on_platform(call, args, out_dtypes):
    """call(*args, interpret=...): the Triton kernel on GPUs; on CPU Pallas' interpreter with
    floating args in float32 (XLA:CPU has no bf16 x bf16 -> f32 dot) and the outputs cast to
    out_dtypes (None: as they come); refused on TPU (it would need a Mosaic kernel)."""
    if jax.default_backend() == "tpu":
        raise ValueError("sampling.attention='pallas' is a GPU (Triton) kernel; use 'xla' on TPU")
    if plgpu is None:
        raise ValueError(f"sampling.attention='pallas' needs Pallas' Triton backend, which jax "
                         f"{jax.__version__} does not have; use sampling.attention='xla'")

    def on_cpu(*args):
        up = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
        outs = call(*[up(x) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in args],
                    interpret=True)
        return tuple(o if d is None else o.astype(d) for o, d in zip(outs, out_dtypes))

    return jax.lax.platform_dependent(*args, cpu=on_cpu,
                                      default=functools.partial(call, interpret=False))


def _triton_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
