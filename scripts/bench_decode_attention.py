"""One layer's decode attention: the fused Pallas kernel against XLA's einsum path.

  python scripts/bench_decode_attention.py --rows 256 --slots 384,2048,8192

Random bf16 caches of the Qwen2.5-0.5B head shape (2 kv heads, 7 q heads each, head_dim 64) by
default. Two cases per cache length: "per-sample" (every row its own cache) and "shared" (rows /
G prompt rows of `--slots` slots read by G rows each, plus a per-sample response part of 256
slots), as the sampler's two layouts. Rows read the first `--filled` slots of the long part (a
decode step partway through; default all). Each timed call runs `--layers` layers (one cache
each, one after the other in one jitted call, as a decode step does), so the time per layer has
no dispatch in it.
Reported per case: microseconds per layer (median of interleaved rounds), the bytes of keys and
values it must read over that time, and the largest difference of the two outputs (float32).
Per-sample caches also time the whole attention of a step: "step fused" is
`decode_attention.step_attention` (rope, the cache write and the attention in one kernel) from
the QKV projection's output, "step apart" the same through XLA's rope and cache writes around
the kernel, its difference taken against "step apart".
`--sweep` times the kernel at every (block_k, num_warps, num_stages, splits) of a small grid and
prints the fastest as `best <case>: block_k:num_warps:num_stages:splits` (bench_sampler.py's
--kernel). On CPU the kernel runs in Pallas' interpreter: use small shapes and `--layers 1`,
and read only the difference column there.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
import types

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from rpt_jax import decode_attention, model, rope  # noqa: E402
from bench_sampler import bandwidth, interleaved, print_table  # noqa: E402  (same discipline)

SWEEP = {"block_k": (32, 64, 128), "num_warps": (2, 4), "num_stages": (2, 3),
         "splits": (1, 2, 4)}


def case(rows, slots, filled, g, layers, kv, nq, e, dtype, rng):
    """(q, xla parts, pallas parts, bytes read per layer): a list of each layer's parts, every
    layer's caches their own arrays (as the sampler's)."""
    keys = iter(jax.random.split(rng, 4 * layers + 1))
    normal = lambda shape: jax.random.normal(next(keys), shape, dtype)  # noqa: E731
    q = normal((rows, kv, nq, e))
    sizes = [(rows // g, slots, filled), (rows, 256, 256)] if g > 1 else [(rows, slots, filled)]
    nbytes = sum(2 * b * kv * f * e * jnp.dtype(dtype).itemsize for b, _, f in sizes)
    parts_x, parts_p = [], []
    for _ in range(layers):
        px, pp = [], []
        for b, s, f in sizes:
            k, v = normal((b, kv, s, e)), normal((b, kv, s, e))
            valid = jnp.broadcast_to(jnp.arange(s) < f, (b, s))
            px.append((k, v, valid[:, None, :]))
            pp.append((k, v, (valid, jnp.full((b, rows // b * nq), f, jnp.int32))))
        parts_x.append(px)
        parts_p.append(pp)
    return q, parts_x, parts_p, nbytes


def whole_ranges(kernel, slots) -> bool:
    """Whether every cache length splits into kernel["splits"] ranges of whole blocks."""
    splits = kernel.get("splits", 1)
    block = lambda s: decode_attention.block_size(s, kernel.get("block_k", 64))  # noqa: E731
    return all(s % (splits * block(s)) == 0 for s in slots)


def over_layers(attend):
    """jit of attend(q, parts) for each layer's parts in turn: [layers, r, k, q, e]."""
    return jax.jit(lambda q, layers: jnp.stack([attend(q, parts) for parts in layers]))


def step_runners(rows, parts, filled, kv, nq, e, dtype, rng):
    """{name: (first output, runner)} of a step's whole attention over per-sample parts [(k, v,
    (valid, limit))]: the fused kernel, and XLA's rope and cache writes around the kernel. Each
    variant's caches (copies) are donated and fed back call after call, as the sampler's decode
    loop carries them: an undonated cache would be copied whole by every call."""
    qkv = jax.random.normal(rng, (rows, kv, nq + 2, e), dtype)
    positions = jnp.full((rows,), 1000 + filled, jnp.int32)
    slot = jnp.full((rows,), filled, jnp.int32)
    spec = types.SimpleNamespace(head_dim=e, rope_theta=1e6, rope_scaling="")  # rope.angles' fields
    cos, sin = rope.angles(positions, spec)
    masks = [m for ((_, _, m),) in parts]

    def fused(qkv, caches, masks):
        outs, new = [], []
        for (k, v), (valid, _) in zip(caches, masks):
            out, k, v = decode_attention.step_attention(qkv, cos, sin, k, v, valid, slot, slot)
            outs.append(out)
            new.append((k, v))
        return jnp.stack(outs), new

    def apart(qkv, caches, masks):
        q = rope.apply_rows(qkv[:, :, :nq], positions, spec)
        new_k = rope.apply_rows(qkv[:, :, nq:nq + 1], positions, spec)
        write = lambda c, x: jax.lax.dynamic_update_slice(c, x, (0, 0, filled, 0))  # noqa: E731
        outs, new = [], []
        for (k, v), (valid, limit) in zip(caches, masks):
            k, v = write(k, new_k), write(v, qkv[:, :, nq + 1:])
            outs.append(model._decode_attend_pallas(q, [(k, v, (
                valid.at[:, filled].set(True), jnp.full_like(limit, filled + 1)))]).astype(dtype))
            new.append((k, v))
        return jnp.stack(outs), new

    out = {}
    for name, fn in (("step fused", fused), ("step apart", apart)):
        fn = jax.jit(fn, donate_argnums=1)
        state = [[(jnp.copy(k), jnp.copy(v)) for ((k, v, _),) in parts]]

        def run(fn=fn, state=state):
            result, state[0] = fn(qkv, state[0], masks)
            return result

        out[name] = (run(), lambda run=run: run().block_until_ready())
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="query rows (samples)")
    ap.add_argument("--slots", default="384,2048,8192", help="comma list of cache lengths")
    ap.add_argument("--filled", type=int, default=0, help="slots read (0: all)")
    ap.add_argument("--num-samples", default="1,8", help="comma list of G (1: per-sample)")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--q-per-kv", type=int, default=7)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="time a grid of kernel launch options")
    args = ap.parse_args(argv)
    device = f"{jax.devices()[0].device_kind}"
    copy_bw, read_bw = bandwidth((256 if jax.default_backend() == "cpu" else 2048) * 2**20)
    print(f"# {device}, jax {jax.__version__}, bandwidth: copy {copy_bw / 1e9:.0f} GB/s, "
          f"read {read_bw / 1e9:.0f} GB/s", flush=True)
    variants = {"xla": ({}, over_layers(model._decode_attend))}
    grid = [dict(zip(SWEEP, c)) for c in itertools.product(*SWEEP.values())] if args.sweep \
        else [{}]
    for kernel in grid:
        name = "pallas" + "".join(f" {k}={v}" for k, v in kernel.items())
        variants[name] = (kernel, over_layers(functools.partial(model._decode_attend_pallas,
                                                                 **kernel)))
    rows = []
    for slots, g in itertools.product(map(int, args.slots.split(",")),
                                      sorted(set(map(int, args.num_samples.split(","))))):
        filled = min(args.filled or slots, slots)
        q, px, pp, nbytes = case(args.rows, slots, filled, g, args.layers, args.kv_heads,
                                 args.q_per_kv, args.head_dim, jnp.dtype(args.dtype),
                                 jax.random.key(slots))
        want = variants["xla"][1](q, px)
        runners, diffs = {}, {}
        for name, (kernel, fn) in variants.items():
            if not whole_ranges(kernel, [slots, 256] if g > 1 else [slots]):
                continue
            inputs = px if name == "xla" else pp
            try:
                got = fn(q, inputs)
            except Exception as err:  # a launch option Triton cannot compile: skip it
                print(f"FAILED {name}: {type(err).__name__}: {str(err)[:200]}", flush=True)
                continue
            diffs[name] = float(jnp.max(jnp.abs(want - got)))
            runners[name] = lambda fn=fn, inputs=inputs: fn(q, inputs).block_until_ready()
        if g == 1 and not args.sweep:  # a step's whole attention, the new token in slot
            step_slot = min(filled, slots - 1)  # `step_slot` (reads the slots before it)
            steps = step_runners(args.rows, pp, step_slot, args.kv_heads, args.q_per_kv,
                                 args.head_dim, jnp.dtype(args.dtype), jax.random.key(7))
            for name, (first, run) in steps.items():
                diffs[name] = float(jnp.max(jnp.abs(first.astype(jnp.float32) - steps[
                    "step apart"][0].astype(jnp.float32))))
                runners[name] = run
        times = interleaved(runners, args.repeats)
        label = f"{'per-sample' if g == 1 else f'shared G={g} + 256 response slots'}"
        for name, t in times.items():
            per_layer = t / args.layers
            rows.append(f"| {name} | {label} | {slots} | {filled} | {args.rows} "
                        f"| {per_layer * 1e6:.1f} | {nbytes / per_layer / 1e9:.0f} "
                        f"| {diffs[name]:.2e} | {device} |")
            print(rows[-1], flush=True)
        if args.sweep:
            best = min((t, n) for n, t in times.items() if n != "xla")[1]
            options = variants[best][0]
            print(f"best {label} {slots}: " + ":".join(str(options[k]) for k in SWEEP),
                  flush=True)
    print_table("bench_decode_attention.py", argv,
                ("attention", "cache", "slots", "read", "rows", "us / layer", "GB/s of k, v",
                 "max diff", "device"), rows)
    return rows


if __name__ == "__main__":
    main()
