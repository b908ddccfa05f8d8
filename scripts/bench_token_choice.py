"""The decode step's token choice over float32 logits, alone: the softmax statistics in one pass
(a variadic online-softmax reduction, `sampling._stats_one_pass`) against two (a max, then
the chunk sums), and the whole `sampling.choose_tokens` as the platform compiles it.

  python scripts/bench_token_choice.py --rows 256 --vocab 151936

The H100 profile (BENCHMARKS.md, session 5) put the token choice at 144 us a step at the
Qwen2.5-0.5B shape, its reductions reading the 155 MB of logits about 2.5 times. Each timed
call runs `--steps` choices over their own logits in one jitted call; reported: microseconds
a step, GB/s of logits (one read each), and the largest relative difference of the chunk
masses from the two-pass ones.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from rpt_jax import sampling  # noqa: E402
from bench_sampler import bandwidth, interleaved, print_table  # noqa: E402  (same discipline)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--steps", type=int, default=8, help="choices per timed call")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    device = jax.devices()[0].device_kind
    copy_bw, read_bw = bandwidth((256 if jax.default_backend() == "cpu" else 2048) * 2**20)
    print(f"# {device}, jax {jax.__version__}, bandwidth: copy {copy_bw / 1e9:.0f} GB/s, "
          f"read {read_bw / 1e9:.0f} GB/s", flush=True)
    c = sampling._chunk(args.vocab)
    keys = jax.random.split(jax.random.key(0), args.steps)
    logits = [jax.random.normal(k, (args.rows, args.vocab), jnp.float32) * 4 for k in keys]
    cfg = dataclasses.replace(sampling.SamplingConfig(), temperature=args.temperature)
    rows_ids = jnp.arange(args.rows, dtype=jnp.int32)
    variants = {
        "stats, one pass": lambda x, t: sampling._stats_one_pass(x, c),
        "stats, two passes": lambda x, t: sampling._stats_two_pass(x, c),
        "choose_tokens": lambda x, t: sampling.choose_tokens(x, jax.random.key(1), t,
                                                             rows_ids, cfg),
    }
    runners, outs = {}, {}
    for name, fn in variants.items():
        steps = jax.jit(lambda xs, fn=fn: [fn(x, t) for t, x in enumerate(xs)])
        outs[name] = steps(logits)
        runners[name] = lambda steps=steps: jax.block_until_ready(steps(logits))
    want = outs["stats, two passes"]
    diff = {name: max(float(jnp.max(jnp.abs(got[1] - ref[1]) / jnp.maximum(ref[1], 1e-30)))
                      for got, ref in zip(outs[name], want))
            for name in ("stats, one pass", "stats, two passes")}
    times = interleaved(runners, args.repeats)
    nbytes = args.rows * args.vocab * 4
    rows = []
    for name, t in times.items():
        per_step = t / args.steps
        rows.append(f"| {name} | {args.rows}x{args.vocab} | {per_step * 1e6:.1f} "
                    f"| {nbytes / per_step / 1e9:.0f} | "
                    f"{f'{diff[name]:.1e}' if name in diff else '-'} | {device} |")
        print(rows[-1], flush=True)
    print_table("bench_token_choice.py", argv, ("variant", "logits", "us / step", "GB/s of logits",
                                                "max rel. diff of masses", "device"), rows)
    return rows


if __name__ == "__main__":
    main()
