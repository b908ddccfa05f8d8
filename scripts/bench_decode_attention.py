"""One layer's decode attention: the fused Pallas kernel against XLA's einsum path.

  python scripts/bench_decode_attention.py --rows 256 --slots 384,2048,8192

Random bf16 caches of the Qwen2.5-0.5B head shape (2 kv heads, 7 q heads each, head_dim 64) by
default. Two cases per cache length: "per-sample" (every row its own cache, all slots
written) and "shared" (rows / G prompt rows of `--slots` slots read by G rows each, plus a
per-sample response part of 256 slots), as the sampler's two layouts. Reported per case: time
of one call (median of interleaved rounds), the bytes of keys and values it must read over that
time, and the largest difference of the two outputs (float32). On CPU the kernel runs in Pallas'
interpreter: use small shapes, and read only the difference column there.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from rpt_jax import model  # noqa: E402
from bench_sampler import bandwidth, interleaved  # noqa: E402  (same timing discipline)


def case(rows, slots, g, kv, nq, e, dtype, rng):
    """(q, xla parts, pallas parts, bytes read) of one layer's attention."""
    keys = iter(jax.random.split(rng, 8))
    normal = lambda shape: jax.random.normal(next(keys), shape, dtype)  # noqa: E731
    q = normal((rows, kv, nq, e))
    parts_x, parts_p, nbytes = [], [], 0
    sizes = [(rows // g, slots), (rows, 256)] if g > 1 else [(rows, slots)]
    for b, s in sizes:
        k, v = normal((b, kv, s, e)), normal((b, kv, s, e))
        valid = jnp.ones((b, s), bool)
        parts_x.append((k, v, valid[:, None, :]))
        parts_p.append((k, v, (valid, jnp.full((b, rows // b * nq), s, jnp.int32))))
        nbytes += 2 * k.size * k.dtype.itemsize
    return q, parts_x, parts_p, nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256, help="query rows (samples)")
    ap.add_argument("--slots", default="384,2048,8192", help="comma list of cache lengths")
    ap.add_argument("--num-samples", type=int, default=8, help="G of the shared case")
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--q-per-kv", type=int, default=7)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    device = f"{jax.devices()[0].device_kind}"
    copy_bw, read_bw = bandwidth((256 if jax.default_backend() == "cpu" else 2048) * 2**20)
    print(f"# {device}, jax {jax.__version__}, bandwidth: copy {copy_bw / 1e9:.0f} GB/s, "
          f"read {read_bw / 1e9:.0f} GB/s", flush=True)
    xla = jax.jit(model._decode_attend)
    pallas = jax.jit(model._decode_attend_pallas)
    rows = []
    for slots in map(int, args.slots.split(",")):
        for g in (1, args.num_samples):
            q, px, pp, nbytes = case(args.rows, slots, g, args.kv_heads, args.q_per_kv,
                                     args.head_dim, jnp.dtype(args.dtype), jax.random.key(slots))
            want, got = xla(q, px), pallas(q, pp)
            diff = float(jnp.max(jnp.abs(want - got)))
            runners = {"xla": lambda: xla(q, px).block_until_ready(),
                       "pallas": lambda: pallas(q, pp).block_until_ready()}
            times = interleaved(runners, args.repeats)
            name = f"{'per-sample' if g == 1 else f'shared G={g} + 256 response slots'}"
            for impl, t in times.items():
                rows.append(f"| {impl} | {name} | {slots} | {args.rows} | {t * 1e6:.1f} "
                            f"| {nbytes / t / 1e9:.0f} | {diff:.2e} | {device} |")
                print(rows[-1], flush=True)
    print(f"\njax {jax.__version__}; `python scripts/bench_decode_attention.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    print("| attention | cache | slots | rows | us / call | GB/s of k, v | max diff | device |")
    print("|" + "---|" * 8)
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
