"""Throughput and model-FLOPs utilisation (MFU) of the GRPO update step.

    python scripts/bench_train_step.py --preset qwen2_5_0_5b --batch 16 --seq-len 1024 \
        --dtype bfloat16 --remat none,dots,full --micro-batches 1

Random weights and a random batch (every response token counts in the loss). Each variant
(remat x micro-batches x attention) is compiled, warmed up, then timed `--steps` times with a
block on the result; the median is reported. Model FLOPs = 6 * params * tokens (params include
the tied embedding, i.e. the LM head; attention's own FLOPs are not counted, as is usual for
MFU). MFU is given against the nominal dense bf16 peak of the device kind (--peak-tflops
overrides) and against a bf16 matmul measured in the same run.

`--share-prompt 0,1` compares rl.share_prompt off and on (each context's prompt computed once for
its G samples; tok/s and MFU still count every row's prompt tokens, so they show the saving).

`--attention cudnn` sets model.attention="cudnn": jax.nn.dot_product_attention's fused cuDNN
kernel for the full-sequence pass (NVIDIA GPUs, bf16); "xla" is the portable einsum attention.

Needs no ml-collections (the config is a plain namespace), so it runs on the GPU image.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rpt_jax import model, objective, sharding, train_step  # noqa: E402
from rpt_jax.config import MODEL_SHAPES  # noqa: E402  (no ml-collections at import)

NOMINAL_PEAK = {"H100": 989e12, "H200": 989e12}  # dense bf16 FLOP/s, vendor datasheets


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="qwen2_5_0_5b", choices=sorted(MODEL_SHAPES))
    p.add_argument("--batch", type=int, default=16, help="rows (samples) per step")
    p.add_argument("--seq-len", type=int, default=1024, help="prompt + response tokens per row")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--group", type=int, default=8, help="samples per context (G)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--remat", default="none", help="comma list of none|dots|full")
    p.add_argument("--micro-batches", default="1", help="comma list")
    p.add_argument("--attention", default="xla", help="comma list of xla|cudnn")
    p.add_argument("--logits-chunk", default="256", help="comma list: positions per LM-head chunk")
    p.add_argument("--share-prompt", default="0",
                   help="comma list of 0|1: rl.share_prompt (each prompt computed once per G)")
    p.add_argument("--breakdown", action="store_true",
                   help="also time the decoder body, the LM head and the optimizer apart")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=0.0,
                   help="nominal peak; default by device kind (H100/H200: 989)")
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--out", default="", help="append one JSON line per variant here")
    return p.parse_args(argv)


def _median_time(fn, *args, reps=5, warmup=2):
    """Median seconds of fn(*args) with a block on the result, after warm-up calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops(n: int, dtype) -> float:
    """Achieved FLOP/s of n x n x n matmuls on random data: 20 per timed call, median of 5."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)

    @jax.jit
    def f(a, b):  # a chain, so no product can be skipped or overlapped away
        def body(_, x):
            return (x @ b) * 1e-3
        return jax.lax.fori_loop(0, 20, body, a)

    return 20 * 2 * n ** 3 / _median_time(f, a, b, warmup=3)


def random_batch(args, vocab, rng):
    B = args.batch // args.group
    R = args.seq_len - args.prompt_len
    prompt = jax.random.randint(rng, (B, args.prompt_len), 0, vocab)
    samples = jax.random.randint(jax.random.fold_in(rng, 1), (args.batch, R), 0, vocab)
    logp = -jax.random.uniform(jax.random.fold_in(rng, 2), (args.batch, R)) * 3
    adv = jax.random.normal(jax.random.fold_in(rng, 3), (args.batch,))
    return jax.jit(objective.make_train_batch, static_argnums=6)(
        prompt, jnp.ones_like(prompt, bool), samples, logp, jnp.full((args.batch,), R), adv,
        args.group)


def breakdown(args, cfg, state, tx, batch, chunk):
    """Seconds of the parts of a step, each jitted alone: decoder body fwd+bwd; LM head + loss
    fwd+bwd as the step runs it (fused) and as logprobs_from_hidden + remat would; AdamW."""
    params = state.params
    h, _ = jax.jit(model.hidden_states, static_argnums=2)(
        params, batch["tokens"], cfg, batch["positions"], batch["segment_ids"])
    w = batch["loss_mask"] * batch["advantages"][:, None]

    @jax.jit
    def body(p):
        def f(p):
            h, _ = model.hidden_states(p, batch["tokens"], cfg, batch["positions"],
                                       batch["segment_ids"])
            return jnp.sum(h.astype(jnp.float32) * 1e-3)
        return jax.grad(f)(p)

    @jax.jit
    def head(p, h):
        def f(p, h):
            logp, _ = objective.logprobs_from_hidden(p, h, batch["tokens"], batch["loss_mask"],
                                                     cfg, 0.8, chunk)
            return jnp.sum(logp * w)
        return jax.grad(f, argnums=(0, 1))(p, h)

    @jax.jit
    def head_fused(p, h):
        def f(p, h):
            return objective.fused_policy_loss(p, h, batch, cfg, 0.8, chunk=chunk)[0]
        return jax.grad(f, argnums=(0, 1))(p, h)

    @jax.jit
    def adam(p, opt_state):
        updates, opt_state = tx.update(p, opt_state, p)
        return jax.tree.map(jnp.add, p, updates), opt_state

    return dict(body_fwd_bwd_s=_median_time(body, params),
                head_fwd_bwd_s=_median_time(head, params, h),
                head_fused_s=_median_time(head_fused, params, h),
                adamw_s=_median_time(adam, params, state.opt_state))


def run_variant(args, remat, micro, attention, chunk, peak, mm, share=False):
    base = dict(MODEL_SHAPES[args.preset])
    cfg = model.ModelConfig(**base, dtype=args.dtype, param_dtype="float32", remat=remat,
                            attention=attention)
    config = SimpleNamespace(
        mesh=SimpleNamespace(data=-1, fsdp=1, tensor=1),
        sampling=SimpleNamespace(temperature=0.8, num_samples=args.group,
                                 max_new_tokens=args.seq_len - args.prompt_len),
        rl=SimpleNamespace(loss_agg="token_mean", clip_low=0.2, clip_high=0.2, kl_coef=0.0,
                           entropy_coef=0.0, micro_batches=micro, share_prompt=share),
        optim=SimpleNamespace(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                              grad_clip=1.0, warmup_steps=0, schedule="constant"))
    mesh = sharding.make_mesh(config)
    shapes = model.param_shapes(cfg)
    ps = sharding.param_shardings(mesh, model.logical_axes(cfg), shapes)
    params = jax.jit(model.init, static_argnums=0, out_shardings=ps)(cfg, jax.random.key(0))
    tx = train_step.make_optimizer(config.optim, 1000)
    state = train_step.init_train_state(params, tx, mesh, ps)
    del params
    step = train_step.make_train_step(config, cfg, mesh,
                                      train_step.state_shardings(mesh, tx, shapes, ps), tx,
                                      logits_chunk=chunk)
    batch = random_batch(args, cfg.vocab_size, jax.random.key(1))
    t = time.perf_counter()
    state, metrics = step(state, batch, args.prompt_len)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup - 1):
        state, metrics = step(state, batch, args.prompt_len)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        state, metrics = step(state, batch, args.prompt_len)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t)
    parts = breakdown(args, cfg, state, tx, batch, chunk) if args.breakdown else {}
    step_s = statistics.median(times)
    tokens = args.batch * args.seq_len
    flops = 6 * model.num_params(cfg) * tokens / step_s
    stats = jax.devices()[0].memory_stats() or {}  # the process's peak so far, all variants
    return dict(preset=args.preset, device=jax.devices()[0].device_kind, batch=args.batch,
                seq_len=args.seq_len, dtype=args.dtype, remat=remat, micro_batches=micro,
                attention=attention, logits_chunk=chunk, share_prompt=share, compile_s=compile_s,
                step_s=step_s, step_s_min=min(times), tokens_per_s=tokens / step_s,
                model_tflops=flops / 1e12, mfu_nominal=flops / peak if peak else None,
                mfu_measured_matmul=flops / mm, peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
                loss=float(metrics["loss"]), finite=bool(metrics["finite"]), **parts)


def main(argv=None):
    args = parse_args(argv)
    kind = jax.devices()[0].device_kind
    peak = args.peak_tflops * 1e12 or next((v for k, v in NOMINAL_PEAK.items() if k in kind), 0)
    mm = matmul_flops(args.matmul_size, jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32)
    print(f"device {kind}; {args.dtype} matmul {args.matmul_size}^3: {mm / 1e12:.1f} TFLOP/s; "
          f"nominal peak {peak / 1e12:.0f} TFLOP/s; params "
          f"{model.num_params(model.ModelConfig(**MODEL_SHAPES[args.preset])) / 1e6:.1f}M",
          flush=True)
    rows = []
    for attention in args.attention.split(","):
        for remat in args.remat.split(","):
            for micro in [int(m) for m in args.micro_batches.split(",")]:
                for chunk, share in itertools.product(
                        [int(c) for c in args.logits_chunk.split(",")],
                        [bool(int(x)) for x in args.share_prompt.split(",")]):
                    try:
                        r = run_variant(args, remat, micro, attention, chunk, peak, mm, share)
                    except Exception as e:  # report and go on to the next variant
                        r = dict(remat=remat, micro_batches=micro, attention=attention,
                                 logits_chunk=chunk, share_prompt=share,
                                 error=f"{type(e).__name__}: {str(e)[:300]}")
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(r) + "\n")
    print(f"\n{'attention':9} {'remat':5} {'micro':5} {'chunk':5} {'share':5} {'step s':>8} "
          f"{'tok/s':>9} "
          f"{'TFLOP/s':>8} {'MFU nom':>7} {'MFU mm':>7} {'peak GiB':>8} {'compile s':>9}")
    for r in rows:
        head = (f"{r['attention']:9} {r['remat']:5} {r['micro_batches']:5} "
                f"{r['logits_chunk']:5} {str(r['share_prompt'])[0]:5}")
        if "error" in r:
            print(f"{head} {r['error']}")
            continue
        nom = f"{r['mfu_nominal']:.1%}" if r["mfu_nominal"] else "n/a"
        print(f"{head} {r['step_s']:8.4f} {r['tokens_per_s']:9.0f} {r['model_tflops']:8.1f} "
              f"{nom:>7} {r['mfu_measured_matmul']:7.1%} {r['peak_gib']:8.1f} "
              f"{r['compile_s']:9.1f}")
        if "body_fwd_bwd_s" in r:
            print(f"{'':9}   parts (s): body fwd+bwd {r['body_fwd_bwd_s']:.4f}, LM head+loss fwd+bwd "
                  f"fused {r['head_fused_s']:.4f} (unfused {r['head_fwd_bwd_s']:.4f}), "
                  f"AdamW {r['adamw_s']:.4f}")


if __name__ == "__main__":
    main()
