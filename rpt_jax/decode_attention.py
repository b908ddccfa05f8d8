"""A fused decode-attention kernel (Pallas, Triton backend) for the sampler's KV caches.

One kernel per cache part and layer replaces XLA's chain of score / mask / softmax / value
kernels: each program reads one cache row's keys and values for one kv head once, in blocks of
`block_k` slots, with an online softmax (flash decoding), and serves a block of the query rows
that read that cache row (the q heads of its kv head, times the g samples or contexts sharing
the row). Long caches read by few programs are split into slot ranges run in parallel. Slot
ranges and parts are combined by their log-sum-exp, so several caches (a shared prompt cache,
response blocks) give one softmax.

GPU only (Triton). On CPU it runs in Pallas' interpreter, slowly, for tests; TPU would need a
Mosaic kernel and is refused.

Shapes: b cache rows, k kv heads, h query rows per (cache row, kv head), s slots, e head_dim.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from rpt_jax import sharding

NEG = -1e30  # finite: a block with every slot masked must not turn the running max into NaN
BLOCK_K = 64  # slots per loop iteration; caches for this kernel are sized in multiples of it
BLOCK_H = 64  # query rows per program: a document row read by m contexts x G samples x q heads
# would otherwise need hundreds of accumulator rows in one program
NUM_WARPS, NUM_STAGES = 4, 2  # Triton launch options (scripts/bench_decode_attention.py --sweep)
SPLITS = 0  # slot ranges per cache row; 0: `splits_for` (enough for about PROGRAMS programs)
PROGRAMS = 512  # split long caches into slot ranges until about this many programs run (an
# H100 has 132 SMs; a few 14B kv heads per device over a handful of document rows are far fewer)


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
        if jax.default_backend() == "tpu":
            raise ValueError("sampling.attention='pallas' is a GPU (Triton) kernel; use 'xla' "
                             "on TPU")
        call = functools.partial(part_attention, block_k=block_k, block_h=block_h,
                                 splits=splits, num_warps=num_warps, num_stages=num_stages)

        def on_cpu(q, keys, values, valid, limit):  # XLA:CPU has no bf16 x bf16 -> f32 dot
            up = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))  # noqa: E731
            return call(up(q), up(keys), up(values), valid, limit, interpret=True)

        return jax.lax.platform_dependent(q, keys, values, valid, limit, cpu=on_cpu,
                                          default=functools.partial(call, interpret=False))
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


def sharded_part_attention(q, keys, values, valid, limit, **kwargs):
    """`part_attention` on each device's rows and kv heads (shard_map under the mesh set by
    `jax.set_mesh`; a custom call left to the partitioner would gather every cache)."""
    mesh = jax.sharding.get_abstract_mesh()
    fn = functools.partial(part_attention, **kwargs)
    if mesh.empty or set(mesh.axis_names) != set(sharding.AXES):
        return fn(q, keys, values, valid, limit)
    rows = sharding.spec(("batch", "kv_heads", "length", "head_dim"), keys.shape, mesh)
    flat = sharding.spec(("batch", "length"), valid.shape, mesh)
    return jax.shard_map(fn, mesh=mesh, in_specs=(rows, rows, rows, flat, flat),
                         out_specs=(rows, jax.sharding.PartitionSpec(*rows[:3])),
                         check_vma=False)(q, keys, values, valid, limit)


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


def _triton_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
