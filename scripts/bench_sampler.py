"""Sampler throughput against the memory-bandwidth roofline, with baselines side by side.

  python scripts/bench_sampler.py --preset smollm2_135m --batch 32 --prompt-len 64 \
      --new-tokens 64 --dtype float32 --compare-hf --compare-plain

Random weights. --batch counts sample rows (contexts = batch / num-samples), so new tokens/s is
comparable across --num-samples. No stop ids: every row generates --new-tokens tokens.
Every implementation is built and warmed up first, then timed in interleaved rounds (one call
of each per round, median over rounds), so a load swing on a shared machine hits all alike.
Reported: new tokens/s over the whole call (prefill included), ms per decode step (the full
call minus `sampling.prepare`, the part before the loop, over n steps), and the roofline:
the bytes a step must read (decode weights once plus the KV cache up to the current length,
averaged over the steps) over the copy bandwidth measured with jax in the same run.

--contexts-per-doc m: RPT's prompts instead, a template (16 tokens before the context, 4 after)
around contexts cut from documents of --prompt-len tokens at m positions each (evenly spaced in
the document's second half); timed as plain prompts (one prefill per context) and
document-grouped (`sampling.Prompts` with one prefix row per document) side by side.
--mean-len L: RPT's uneven response lengths instead of full-length rows: every L-th token id
stops a row (about one step in L with near-uniform random-weight sampling), so rows
finish at different steps and the loop runs until the longest is done; new tokens/s counts the
tokens generated and ms/step divides by the longest row's steps. The finished rows' share of
every later step is what the pallas attention skips (`--decode-attention xla,pallas`), and what
continuous batching (`--lanes 0,w`: w lanes take the rows in turn) does not spend at all.
Needs no ml-collections (it builds the sampler's config by hand), so it runs on a bare GPU image.
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])
from rpt_jax import decode_attention, model, sampling, sharding  # noqa: E402
from rpt_jax.config import MODEL_SHAPES  # noqa: E402  (module level imports no ml-collections)


def block(fn):
    """A zero-argument callable that runs fn() and waits for its result."""
    return lambda: jax.block_until_ready(fn())


def bandwidth(nbytes, repeats=10):
    """Bytes/s of a large array through jax: (copy: read + write, read: a sum)."""
    x = jax.random.normal(jax.random.key(0), (nbytes // 4,), jnp.float32)
    copy = jax.jit(lambda x: x * 1.0001)
    read = jax.jit(lambda x: x.sum())
    times = interleaved({"copy": block(lambda: copy(x)), "read": block(lambda: read(x))}, repeats)
    return 2 * x.nbytes / times["copy"], x.nbytes / times["read"]


def interleaved(runners, repeats):
    """{name: median seconds}: one warm-up call each, then `repeats` rounds of one call each."""
    for fn in runners.values():
        fn()
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(script, argv, header, rows):
    """The markdown result table: the jax version and command, header (column names), rows."""
    print(f"\njax {jax.__version__}; `python scripts/{script} "
          f"{' '.join(sys.argv[1:] if argv is None else argv)}`")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))


def step_bytes(mcfg, batch, contexts, prompt_len, new_tokens, cache_dtype, tail=1):
    """Bytes a decode step must read on average: compute-dtype weights + KV cache in use (a
    row's `tail` prompt tokens, fed one a step before sampling, are response-cache slots)."""
    weights = model.num_params(mcfg) * jnp.dtype(mcfg.dtype).itemsize
    per_slot = 2 * mcfg.num_layers * mcfg.num_kv_heads * mcfg.head_dim * \
        jnp.dtype(cache_dtype).itemsize
    avg_response = (tail - 1) + (new_tokens - 1) / 2
    return weights + per_slot * (contexts * prompt_len + batch * avg_response)


def rpt_runners(params, mcfg, scfg, prompts: sampling.Prompts, mesh):
    """(full sampler call, everything before its decode loop or None with lanes, (tokens
    generated, longest row)) as zero-argument callables."""
    shards = sharding.param_shardings(mesh, model.logical_axes(mcfg))
    rng = jax.random.key(0)
    full = sampling.make_sampler(mesh, mcfg, scfg, shards)
    mat, rows = sharding.batch_sharding(mesh, 2), sharding.batch_sharding(mesh, 1)
    prepare = jax.jit(lambda *a: sampling.prepare(*a, mcfg, scfg),  # compiled as `full` is
                      in_shardings=(shards, sampling.Prompts(mat, mat, rows, mat),
                                    sharding.replicated(mesh)),
                      compiler_options=scfg.compiler_options(mesh.devices.flat[0].platform))

    def run_prepare():
        with jax.set_mesh(mesh):
            return prepare(params, prompts, rng)

    out = full(params, prompts, rng)
    if not scfg.lanes:
        run_prepare()  # traced now, under the same module settings (--kernel) as `full`
    if not scfg.stop_ids:
        assert int(out.lengths.min()) == scfg.max_new_tokens, "a row stopped early"
    # the same rng every call: the same rows stop at the same steps
    lengths = (int(out.lengths.sum()), int(out.lengths.max()))
    return (block(lambda: full(params, prompts, rng)),
            None if scfg.lanes else block(run_prepare), lengths)


def document_prompts(contexts, per_doc, doc_len, vocab, rng):
    """RPT-shaped prompts: (document-grouped Prompts, the same prompts left padded, mean prompt
    tokens). prefix (16) + doc[:t] + suffix (4) for per_doc positions t per document."""
    gen = np.random.default_rng(rng)
    prefix, suffix = list(gen.integers(0, vocab, 16)), list(gen.integers(0, vocab, 4))
    ts = np.linspace(doc_len // 2, doc_len, per_doc).astype(int)
    width = len(prefix) + doc_len - 1
    doc_tokens = np.zeros((contexts // per_doc, width), np.int32)
    visible, tail, plain = [], [], []
    for d in range(contexts // per_doc):
        doc = list(gen.integers(0, vocab, doc_len))
        doc_tokens[d] = prefix + doc[:-1]
        for t in ts:
            visible.append(len(prefix) + t - 1)
            tail.append([doc[t - 1]] + suffix)
            plain.append(prefix + doc[:t] + suffix)
    p = max(map(len, plain))
    tokens = np.zeros((contexts, p), np.int32)
    mask = np.zeros((contexts, p), np.int32)
    for i, row in enumerate(plain):
        tokens[i, p - len(row):], mask[i, p - len(row):] = row, 1
    grouped = sampling.Prompts(jnp.asarray(doc_tokens), jnp.ones_like(jnp.asarray(doc_tokens)),
                               jnp.asarray(visible, jnp.int32), jnp.asarray(tail, jnp.int32))
    mean = float(np.mean([len(r) for r in plain]))
    return grouped, sampling.Prompts(jnp.asarray(tokens), jnp.asarray(mask)), mean


def trace(fn, profile_dir):
    try:
        jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
        fn()
    finally:
        jax.profiler.stop_trace()


def kernel_table(profile_dir, steps, top=30):
    """Markdown lines: device-side events of a trace summed by name, per decode step."""
    import collections
    import glob
    import gzip
    import json
    import re
    path = sorted(glob.glob(f"{profile_dir}/**/*.trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {p for p, n in procs.items() if "/device:" in n and "CPU" not in n.upper()}
    if not device_pids:  # CPU: XLA's thunks run on host threads
        device_pids = set(procs)
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["pid"] in device_pids:
            name = re.sub(r"[._]\d+$", "", e["name"])
            total[name] += e["dur"]
            count[name] += 1
    lines = [f"device events per decode step: {sum(count.values()) / steps:.0f}, "
             f"busy {sum(total.values()) / steps / 1e3:.3f} ms",
             "| us/step | calls/step | name |", "|---|---|---|"]
    for name, us in total.most_common(top):
        lines.append(f"| {us / steps:.1f} | {count[name] / steps:.1f} | {name[:90]} |")
    return lines


# ----------------------------------------------------------------------------- plain baseline
# A plain KV-cache decode, kept here as the benchmark's reference point: one stacked
# cache [l, b, s, k, e] read inside a scan over layers, the new keys / values written after it.

def plain_prefill(params, tokens, cfg, cache_size, cache_dtype):
    """Prompt [b, t] -> (float32 logits [b, t, v], cache {k, v [l, b, s, k, e], index t})."""
    b, t = tokens.shape
    h, (k, v) = model.hidden_states(params, tokens, cfg)
    pad = ((0, 0), (0, 0), (0, cache_size - t), (0, 0), (0, 0))
    cache = {"k": jnp.pad(k.astype(cache_dtype), pad), "v": jnp.pad(v.astype(cache_dtype), pad),
             "index": jnp.asarray(t, jnp.int32)}
    return model.logits_from_hidden(params, h, cfg), cache


def plain_decode(params, tokens, positions, cache, cfg):
    """One step for every row: tokens, positions [b] -> (float32 logits [b, v], cache)."""
    x = model.embed(params, tokens[:, None], cfg)
    i = cache["index"]
    slots = cache["k"].shape[2]
    valid = jnp.broadcast_to(jnp.arange(slots + 1) < i, (x.shape[0], slots + 1))
    valid = valid.at[:, -1].set(True)  # the new token itself
    cdtype = cache["k"].dtype

    def body(x, layer):
        p, k_cache, v_cache = layer
        h = model.rms_norm(x, p["input_layernorm"], cfg.rms_norm_eps)
        q, k, v = model._qkv(p, h, positions[:, None], cfg)
        k, v = k.astype(cdtype), v.astype(cdtype)
        keys, values = jnp.concatenate([k_cache, k], 1), jnp.concatenate([v_cache, v], 1)
        attn = model._attend(q.astype(cdtype), keys, values, valid[:, None]).astype(x.dtype)
        x = x + jnp.einsum("bthe,hed->btd", attn, p["o_proj"]["kernel"].astype(x.dtype))
        h = model.rms_norm(x, p["post_attention_layernorm"], cfg.rms_norm_eps)
        return x + model._mlp(p, h), (k[:, 0], v[:, 0])

    x, (k_new, v_new) = jax.lax.scan(body, x, (params["layers"], cache["k"], cache["v"]))
    cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k_new[:, :, None], (0, 0, i, 0, 0)),
             "v": jax.lax.dynamic_update_slice(cache["v"], v_new[:, :, None], (0, 0, i, 0, 0)),
             "index": i + 1}
    return model.logits_from_hidden(params, x, cfg)[:, 0], cache


def plain_runner(params, mcfg, scfg, prompts):
    """The baseline: plain_prefill + fori_loop over plain_decode."""
    n, temp = scfg.max_new_tokens, scfg.temperature
    b, p = prompts.shape

    @jax.jit
    def run(params, prompts, rng):
        logits, cache = plain_prefill(params, prompts, mcfg, p + n, scfg.cache_dtype)
        tok = jax.random.categorical(jax.random.fold_in(rng, 0), logits[:, -1] / temp)
        out = jnp.zeros((b, n), jnp.int32).at[:, 0].set(tok)

        def body(i, carry):
            tok, cache, out = carry
            lg, cache = plain_decode(params, tok, jnp.full((b,), p + i - 1), cache, mcfg)
            tok = jax.random.categorical(jax.random.fold_in(rng, i), lg / temp)
            return tok, cache, out.at[:, i].set(tok)

        return jax.lax.fori_loop(1, n, body, (tok, cache, out))[2]

    return block(lambda: run(params, prompts, jax.random.key(0)))


def hf_runner(mcfg, batch, prompt_len, new_tokens, dtype, temperature):
    """(transformers generate with random weights of the same shape, its name)."""
    import torch
    import transformers
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kw = dict(vocab_size=mcfg.vocab_size, num_hidden_layers=mcfg.num_layers,
              hidden_size=mcfg.hidden_size, num_attention_heads=mcfg.num_heads,
              num_key_value_heads=mcfg.num_kv_heads, intermediate_size=mcfg.mlp_dim,
              rope_theta=mcfg.rope_theta, rms_norm_eps=mcfg.rms_norm_eps,
              tie_word_embeddings=mcfg.tie_embeddings,
              max_position_embeddings=prompt_len + new_tokens)
    if mcfg.qkv_bias:
        hf_cfg, cls = transformers.Qwen2Config(**kw), transformers.Qwen2ForCausalLM
    else:
        hf_cfg = transformers.LlamaConfig(head_dim=mcfg.head_dim, **kw)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    net = cls(hf_cfg).to(device=device, dtype=getattr(torch, dtype)).eval()
    ids = torch.randint(0, mcfg.vocab_size, (batch, prompt_len), device=device)

    def run():
        with torch.no_grad():
            net.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                         temperature=temperature, top_k=0, top_p=1.0, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    return run, f"transformers {transformers.__version__} (torch {torch.__version__}, {device})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="smollm2_135m", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--batch", type=int, default=32, help="sample rows (contexts x samples)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--param-dtype", default=None, help="weights dtype (default: --dtype)")
    ap.add_argument("--cache-dtype", default=None, help="KV cache dtype (default: --dtype)")
    ap.add_argument("--num-samples", default="1", help="G samples per context (comma list)")
    ap.add_argument("--cache-layout", default="auto", help="comma list of auto/shared/per_sample")
    ap.add_argument("--attention", default="xla", choices=("xla", "cudnn"),
                    help="model.attention of the prefill (cudnn: GPU, bf16)")
    ap.add_argument("--decode-attention", default="xla",
                    help="comma list of SamplingConfig.attention (xla, pallas: GPU kernel)")
    ap.add_argument("--kernel", default="default",
                    help="comma list of pallas launch options block_k:num_warps:num_stages:splits"
                         " (bench_decode_attention.py --sweep prints the fastest), or default")
    ap.add_argument("--gemm", default="auto", help="comma list of SamplingConfig.gemm")
    ap.add_argument("--fuse-step", default="1",
                    help="comma list of decode_attention.FUSE_STEP (1: the pallas step with one "
                         "cache part fuses rope and the cache write into its kernel; 0: apart)")
    ap.add_argument("--split-down", default="1",
                    help="comma list of SamplingConfig.split_down (the down GEMM over K slices)")
    ap.add_argument("--prefill-chunks", type=int, default=1)
    ap.add_argument("--cache-blocks", default="1", help="comma list of SamplingConfig.cache_blocks")
    ap.add_argument("--contexts-per-doc", type=int, default=0,
                    help="RPT prompts from documents of --prompt-len tokens, m contexts each: "
                         "plain vs document-grouped (see above)")
    ap.add_argument("--mean-len", type=int, default=0,
                    help="stop rows after about this many tokens (uneven lengths, as RPT's); "
                         "new tok/s then counts the tokens generated")
    ap.add_argument("--lanes", default="0",
                    help="comma list of SamplingConfig.lanes (continuous batching; 0: all rows "
                         "at once); with --mean-len, the rows a lane serves in turn")
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compare-hf", action="store_true", help="transformers generate too")
    ap.add_argument("--compare-plain", action="store_true",
                    help="also a plain jitted fori_loop KV-cache decode (the baseline)")
    ap.add_argument("--profile", default="", help="folder: trace the first variant, print kernels")
    ap.add_argument("--bandwidth-mib", type=int, default=None,
                    help="array size for the bandwidth (default 256 CPU, 2048 otherwise)")
    args = ap.parse_args(argv)
    samples = [int(g) for g in args.num_samples.split(",")]
    for g in samples:
        if args.batch % g:
            ap.error(f"--batch {args.batch} is not a multiple of --num-samples {g}")
    cache_dtype = args.cache_dtype or args.dtype
    mcfg = model.ModelConfig(**MODEL_SHAPES[args.preset], dtype=args.dtype,
                             param_dtype=args.param_dtype or args.dtype, attention=args.attention)
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices), 1, 1), sharding.AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    mib = args.bandwidth_mib or (256 if devices[0].platform == "cpu" else 2048)
    copy_bw, read_bw = bandwidth(mib * 2**20)
    bw = max(copy_bw, read_bw)
    device = f"{len(devices)}x {devices[0].device_kind}"
    print(f"# {device}, jax {jax.__version__}, bandwidth: copy {copy_bw / 1e9:.0f} GB/s, "
          f"read {read_bw / 1e9:.0f} GB/s; {model.num_params(mcfg) / 1e6:.0f}M params", flush=True)

    params = jax.jit(model.init, static_argnums=0)(mcfg, jax.random.key(0))
    if args.mean_len and (args.compare_plain or args.compare_hf):
        ap.error("--mean-len stops rows early; the baselines always run --new-tokens")
    # near-uniform sampling from random weights: each step stops a row with p ~ 1 / mean_len
    stop_ids = tuple(range(0, mcfg.vocab_size, args.mean_len)) if args.mean_len else ()
    default_fuse = decode_attention.FUSE_STEP
    default_launch = (decode_attention.BLOCK_K, decode_attention.NUM_WARPS,
                      decode_attention.NUM_STAGES, decode_attention.SPLITS)
    runners, info = {}, {}  # name -> callable; name -> (G, decode-step floor s, prepare name)
    lengths = {}  # name -> (tokens generated, decode steps): every row runs all steps unless
    # --mean-len
    m = args.contexts_per_doc
    for g in samples:
        contexts = args.batch // g
        if m:
            if contexts % m:
                ap.error(f"{contexts} contexts (G={g}) are not a multiple of --contexts-per-doc")
            grouped, plain, mean_len = document_prompts(contexts, m, args.prompt_len,
                                                        mcfg.vocab_size, 1)
            variants = [("plain prompts", plain, contexts, mean_len),
                        (f"document-grouped, {m} contexts/doc", grouped, contexts // m,
                         grouped.tokens.shape[1])]
        else:
            prompts = jax.random.randint(jax.random.key(1), (contexts, args.prompt_len), 0,
                                         mcfg.vocab_size, jnp.int32)
            variants = [("", sampling.Prompts(prompts, jnp.ones_like(prompts)), contexts,
                         args.prompt_len)]
        for layout, blocks, attn, kernel, fuse, gemm, split, lanes, (
                label, prompts, prefix_rows, prompt_len) in itertools.product(
                    args.cache_layout.split(","), map(int, args.cache_blocks.split(",")),
                    args.decode_attention.split(","), args.kernel.split(","),
                    map(int, args.fuse_step.split(",")), args.gemm.split(","),
                    map(int, args.split_down.split(",")), map(int, args.lanes.split(",")),
                    variants):
            if lanes and blocks > 1:
                continue  # continuous batching keeps each lane's response in one block
            if attn != "pallas" and (kernel != args.kernel.split(",")[0]
                                     or fuse != int(args.fuse_step.split(",")[0])):
                continue  # launch options and fusion are the kernel's alone
            decode_attention.FUSE_STEP = bool(fuse)
            launch = default_launch if kernel == "default" else map(int, kernel.split(":"))
            (decode_attention.BLOCK_K, decode_attention.NUM_WARPS,
             decode_attention.NUM_STAGES, decode_attention.SPLITS) = launch
            scfg = sampling.SamplingConfig(
                num_samples=g, temperature=args.temperature, max_new_tokens=args.new_tokens,
                cache_dtype=cache_dtype, cache_layout=layout,
                prefill_chunks=args.prefill_chunks, cache_blocks=blocks, attention=attn,
                stop_ids=stop_ids, lanes=lanes, gemm=gemm, split_down=split)
            d, L, b, _ = prompts.check()
            shared = scfg.shared_prompt(L, b // d) and not (lanes and g == 1)
            name = (f"rpt_jax sampler {label + ' ' if label else ''}("
                    f"{'shared' if shared else 'per-sample'} prompt cache"
                    f"{f', {blocks} cache blocks' if blocks > 1 else ''}"
                    f"{', pallas attention' if attn == 'pallas' else ''}"
                    f"{f' {kernel}' if attn == 'pallas' and kernel != 'default' else ''}"
                    f"{', rope and cache write apart' if attn == 'pallas' and not fuse else ''}"
                    f"{f', {lanes} lanes' if lanes else ''}"
                    f"{f', {gemm} gemms' if gemm != 'auto' else ''}"
                    f"{f', down in {split} K slices' if split > 1 else ''}), G={g}")
            try:
                runners[name], prepare, lengths[name] = rpt_runners(
                    params, mcfg, scfg, prompts, mesh)
            except Exception as err:  # keep the other variants of a long device run
                print(f"FAILED {name}: {err!r}", flush=True)
                continue
            if prepare:
                runners[name + " prepare"] = prepare
            tail = 1 if prompts.tail is None else prompts.tail.shape[1]
            floor = step_bytes(mcfg, args.batch, prefix_rows if shared else args.batch,
                               prompt_len, args.new_tokens, cache_dtype, tail) / bw
            info[name] = (g, floor, prepare and name + " prepare")
            # one timed call now: a device run cut short before the interleaved rounds keeps it
            start = time.perf_counter()
            runners[name]()
            once = lengths[name][0] / (time.perf_counter() - start)
            print(f"built {name}: one call {once:,.0f} new tokens/s", flush=True)
    (decode_attention.BLOCK_K, decode_attention.NUM_WARPS, decode_attention.NUM_STAGES,
     decode_attention.SPLITS) = default_launch
    decode_attention.FUSE_STEP = default_fuse
    if args.compare_plain:
        prompts = jax.random.randint(jax.random.key(1), (args.batch, args.prompt_len), 0,
                                     mcfg.vocab_size, jnp.int32)
        scfg = sampling.SamplingConfig(temperature=args.temperature,
                                       max_new_tokens=args.new_tokens, cache_dtype=cache_dtype)
        runners["plain fori_loop"] = plain_runner(params, mcfg, scfg, prompts)
        info["plain fori_loop"] = (1, None, None)
    if args.compare_hf:
        run, name = hf_runner(mcfg, args.batch, args.prompt_len, args.new_tokens, args.dtype,
                              args.temperature)
        runners[name], info[name] = run, (1, None, None)
    times = interleaved(runners, args.repeats)

    command = "python scripts/bench_sampler.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = []
    for name, (g, floor, prep) in info.items():
        t = times[name]
        new, steps = lengths.get(name, (args.batch * args.new_tokens, args.new_tokens))
        ms = roof = prep_ms = ""
        if prep:
            step = (t - times[prep]) / steps
            ms = f"{step * 1e3:.2f}"
            roof = "" if args.mean_len else f"{floor / step:.0%}"
            prep_ms = f"{times[prep] * 1e3:.0f}"
        rows.append(f"| {name} | {device} | {jax.__version__} | {args.preset} | {args.batch} "
                    f"| {g} | {args.prompt_len} | {args.new_tokens} | {args.dtype} "
                    f"| {new / t:,.0f} | {prep_ms} | {ms} | {roof} | `{command}` |")
        if args.mean_len:
            print(f"{name}: {new / args.batch:.1f} tokens per row on average, {steps} steps")
        print(f"{name}: {new / t:,.0f} new tokens/s, prepare {prep_ms or '-'} ms, {ms} ms/step, "
              f"roofline {roof}", flush=True)
    if args.profile and info:
        first = next(iter(info))
        trace(runners[first], args.profile)
        try:
            print("\n".join([first] + kernel_table(args.profile, args.new_tokens)))
        except Exception as err:  # a trace without device events
            print(f"no kernel table: {err!r}")
    print("\n| implementation | device | jax | preset | batch | G | prompt | new | dtype "
          "| new tok/s | prepare ms | ms/step | roofline | command |")
    print("|" + "---|" * 14)
    print("\n".join(rows))
    return rows


if __name__ == "__main__":
    main()
