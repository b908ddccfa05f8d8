"""Benchmark rpt_jax.reward.score (jitted) against the plain-Python reference.

    python scripts/bench_reward.py                      # 4096 samples x 2048 tokens, width 16
    python scripts/bench_reward.py --n 512 --t 1024     # smaller, for a CPU

Responses are random tokens from a random byte table (token lengths 1..width, a few special
tokens and marker pieces), each with `</think>`, a `\\boxed{...}` holding a prefix of its target,
and more tokens after it, at a random place; lengths are random in [t/2, t]. The jitted time is
the median of --repeats runs after a warm-up, inputs already on the device. The reference runs on
the first --ref-n samples (ids to bytes included) and is extrapolated per sample to --n; both
results are checked to agree on those samples.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import numpy as np

from rpt_jax import reward

MARKERS = [b"</think>", b"\\boxed{", b"{", b"}", b"</", b"think>", b"\\boxed", b"ed{"]


def make_table(rng, vocab: int, width: int) -> tuple[list[bytes], list[bool], reward.ByteTable]:
    """A random vocabulary: markers, 4 special tokens, then random byte strings of 1..width."""
    lens = np.minimum(rng.geometric(0.25, vocab), width)
    tokens = list(MARKERS) + [b"<|im_end|>", b"<|endoftext|>", b"<|im_start|>", b""]
    tokens += [rng.integers(32, 256, n, dtype=np.uint8).tobytes() for n in lens[len(tokens):]]
    special = [False] * len(MARKERS) + [True] * 4 + [False] * (vocab - len(MARKERS) - 4)
    return tokens, special, reward.byte_table_from_tokens(tokens, special, width=width)


def make_batch(rng, n: int, t: int, vocab: list[bytes], target_window: int = 64, k: int = 16):
    """Random responses with a think_end and a box (holding a target prefix) at a random place."""
    v = len(vocab)
    tokens = rng.integers(len(MARKERS) + 4, v, (n, t), dtype=np.int32)
    lengths = rng.integers(t // 2, t + 1, n).astype(np.int32)
    target_ids = rng.integers(len(MARKERS) + 4, v, (n, k))
    tb = np.zeros((n, target_window), np.uint8)
    tl = np.zeros(n, np.int32)
    bd = np.zeros((n, k), np.int32)
    for i in range(n):
        target = b"".join(vocab[j] for j in target_ids[i])[:target_window]
        tb[i, :len(target)] = np.frombuffer(target, np.uint8)
        tl[i] = len(target)
        cum = np.cumsum([len(vocab[j]) for j in target_ids[i]])
        cum = cum[cum <= tl[i]]
        bd[i, :len(cum)] = cum
        content = list(target_ids[i, :rng.integers(0, 4)])
        piece = [0, 1] + content + [3]  # "</think>", "\boxed{", content, "}"
        at = rng.integers(0, max(1, lengths[i] - len(piece)))
        tokens[i, at:at + len(piece)] = piece[:t - at]
    return tokens, lengths, tb, tl, bd


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4096, help="samples")
    p.add_argument("--t", type=int, default=2048, help="response tokens per sample")
    p.add_argument("--vocab", type=int, default=151936, help="vocabulary size")
    p.add_argument("--width", type=int, default=16, help="byte table width (longest token)")
    p.add_argument("--max-pred-bytes", type=int, default=64)
    p.add_argument("--ref-n", type=int, default=64, help="samples timed with the reference")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    rng = np.random.default_rng(a.seed)
    vocab, special, table = make_table(rng, a.vocab, a.width)
    batch = make_batch(rng, a.n, a.t, vocab)
    dev_batch = jax.device_put(batch)
    dev_table = jax.device_put(table)
    score = lambda: reward.score(*dev_batch[:2], dev_table, *dev_batch[2:],
                                 max_pred_bytes=a.max_pred_bytes)

    t0 = time.perf_counter()
    r, d = jax.block_until_ready(score())
    first = time.perf_counter() - t0
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(score())
        times.append(time.perf_counter() - t0)
    jit_s = statistics.median(times)

    tokens, lengths, tb, tl, bd = (x[:a.ref_n] for x in batch)
    t0 = time.perf_counter()
    ref_r, ref_d = reward.reference_score(
        [[vocab[i] for i in row[:k]] for row, k in zip(tokens, lengths)],
        [[special[i] for i in row[:k]] for row, k in zip(tokens, lengths)],
        [bytes(b[:k]) for b, k in zip(tb, tl)], [list(b) for b in bd],
        max_pred_bytes=a.max_pred_bytes)
    ref_per_sample = (time.perf_counter() - t0) / len(ref_r)
    np.testing.assert_array_equal(np.asarray(r)[:a.ref_n], ref_r)
    np.testing.assert_array_equal(np.asarray(d["pred_len"])[:a.ref_n],
                                  [x["pred_len"] for x in ref_d])

    dev = jax.devices()[0]
    peak = (dev.memory_stats() or {}).get("peak_bytes_in_use") if hasattr(dev, "memory_stats") else None
    print(f"device: {dev.device_kind} x{jax.device_count()} ({jax.default_backend()}), "
          f"jax {jax.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    print(f"batch: {a.n} samples x {a.t} tokens (mean length {batch[1].mean():.0f}), vocab "
          f"{a.vocab}, table width {a.width}, max_pred_bytes {a.max_pred_bytes}; "
          f"reward 1 on {np.asarray(r).mean():.1%}, closed box on "
          f"{np.asarray(d['has_box']).mean():.1%}")
    print(f"\n| implementation | {a.n} samples | per sample |\n|---|---|---|")
    print(f"| jitted score (first call, incl. compile) | {first * 1e3:.1f} ms | |")
    print(f"| jitted score (median of {a.repeats}) | {jit_s * 1e3:.1f} ms | "
          f"{jit_s / a.n * 1e6:.2f} us |")
    print(f"| plain-Python reference (timed on {len(ref_r)} samples, extrapolated) | "
          f"{ref_per_sample * a.n:.2f} s | {ref_per_sample * 1e6:.0f} us |")
    print(f"\nspeed-up: {ref_per_sample * a.n / jit_s:.0f}x"
          + (f"; device peak memory {peak / 2**30:.2f} GiB" if peak else ""))


if __name__ == "__main__":
    main()
