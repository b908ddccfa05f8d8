"""The decode step's four matmuls per layer at decode's few rows, alone: cuBLAS against XLA's
Triton GEMMs (`sampling.gemm`), and the down projection split over K by hand.

  python scripts/bench_decode_gemms.py --preset qwen2_5_0_5b --rows 256

At 256 rows the H100 profile (BENCHMARKS.md) puts these GEMMs at 32 us a layer against an
11 us weight-read floor, the down projection at 0.83 TB/s. Each timed call runs `--layers`
layers of one projection (one weight each, as a decode step does) in one jitted call, built
with the variant's XLA options; reported: microseconds per layer, the weights' GB/s, and the
largest difference from the plain product (float32). "down split k" computes x @ w as k
partial products over slices of K (one batched GEMM) summed in float32, the split-K that XLA's
Triton GEMMs choose, with the sum left for the next fusion (here: the residual add).
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from rpt_jax import sampling  # noqa: E402
from rpt_jax.config import MODEL_SHAPES  # noqa: E402
from bench_sampler import bandwidth, interleaved, print_table  # noqa: E402  (same discipline)

def projections(shape: dict) -> dict:
    """name -> (K, N) of the decode step's matmuls (decoding_weights' fused layout)."""
    d, f = shape["hidden_size"], shape["mlp_dim"]
    h, k, e = shape["num_heads"], shape["num_kv_heads"], shape["head_dim"]
    return {"qkv": (d, (h + 2 * k) * e), "o": (h * e, d), "gate_up": (d, 2 * f), "down": (f, d)}


def layers_of(product, options):
    """jit of residual + product(x_i, w_i) for every layer i in turn: [rows, N] float32."""
    def run(xs, ws, residual):
        for x, w in zip(xs, ws):
            residual = residual + product(x, w).astype(jnp.float32)
        return residual
    return jax.jit(run, compiler_options=options or None)


def split_k(k: int):
    def product(x, w):
        r, n = x.shape[0], w.shape[1]
        parts = jnp.einsum("rsk,skn->srn", x.reshape(r, k, -1), w.reshape(k, -1, n),
                           preferred_element_type=jnp.float32)
        return parts.sum(0)
    return product


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="qwen2_5_0_5b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--gemm", default="cublas,xla", help="comma list of sampling.gemm settings")
    ap.add_argument("--splits", default="2,4,8", help="comma list of K splits of the down GEMM")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0].device_kind
    copy_bw, read_bw = bandwidth((256 if jax.default_backend() == "cpu" else 2048) * 2**20)
    print(f"# {device}, jax {jax.__version__}, bandwidth: copy {copy_bw / 1e9:.0f} GB/s, "
          f"read {read_bw / 1e9:.0f} GB/s", flush=True)
    platform = jax.devices()[0].platform
    keys = iter(jax.random.split(jax.random.key(0), 8 * args.layers))
    rows = []
    for name, (k, n) in projections(MODEL_SHAPES[args.preset]).items():
        xs = [jax.random.normal(next(keys), (args.rows, k), dtype) for _ in range(args.layers)]
        ws = [jax.random.normal(next(keys), (k, n), dtype) * k ** -0.5
              for _ in range(args.layers)]
        zero = jnp.zeros((args.rows, n), jnp.float32)
        products = {"plain": lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)}
        if name == "down":
            products.update({f"split {s}": split_k(s) for s in map(int, args.splits.split(","))
                             if k % s == 0})
        runners, diffs, want = {}, {}, None
        for gemm in args.gemm.split(","):
            for label, product in products.items():
                options = sampling.SamplingConfig(gemm=gemm).compiler_options(platform)
                fn = layers_of(product, options)
                got = fn(xs, ws, zero)
                want = got if want is None else want
                variant = f"{name} {label}, {gemm}"
                diffs[variant] = float(jnp.max(jnp.abs(got - want)))
                runners[variant] = lambda fn=fn: fn(xs, ws, zero).block_until_ready()
        times = interleaved(runners, args.repeats)
        nbytes = k * n * dtype.itemsize
        for variant, t in times.items():
            per_layer = t / args.layers
            rows.append(f"| {variant} | {args.rows} | {k}x{n} | {per_layer * 1e6:.1f} "
                        f"| {nbytes / per_layer / 1e9:.0f} | {diffs[variant]:.1e} | {device} |")
            print(rows[-1], flush=True)
    print_table("bench_decode_gemms.py", argv, ("matmul", "rows", "weight", "us / layer",
                                                "GB/s of weights", "max diff", "device"), rows)
    return rows


if __name__ == "__main__":
    main()
