"""Compile the sampler and the GRPO update for a GPU or a TPU slice on a machine without one.

XLA compiles for a device it knows only from a description, so a CPU machine can check what a
device session would otherwise spend its minutes (or a slice's hours) finding out: that the
programs compile for that device and mesh, that they fit its memory (XLA's estimate of the peak
per device), and how many kernels (GPU) or ops (TPU) one decode step runs, by kind.
- GPUs (`--target h100_sxm`, `h200`: scripts/gpu_targets/*.txtpb; the CUDA plugin, no GPU):
  the Pallas decode-attention kernel goes through Triton to machine code, the cuDNN attention
  calls are accepted. --devices N: N GPUs of one host.
- TPUs (`--target v5e:2x2`, `v6e:4x4`, `v5p:4x4x4`, `v4:2x2x1`: any topology libtpu knows,
  multi-host slices included; libtpu, no TPU): the slice's chips, their hosts and links.
No timing and no autotuning: a real device may pick other GEMM tilings or fusions.

    pip install "jax[cuda12]==$(python -c 'import jax; print(jax.__version__)')"  # or jax[tpu]
    python scripts/compile_aot.py sampler --preset qwen2_5_0_5b --batch 256 --prompt-len 128 \
        --new-tokens 256 --num-samples 1,8 --decode-attention xla,pallas
    python scripts/compile_aot.py update --preset qwen2_5_0_5b --batch 16 --seq-len 1024 \
        --prompt-len 512 --attention cudnn --share-prompt 0,1
    python scripts/compile_aot.py update --target v5p:4x4x4 --mesh 1,16,4 \
        --preset r1_distill_qwen_14b --batch 2048 --seq-len 12288 --prompt-len 4096 \
        --micro-batches 32 --remat full --share-prompt 1  # the paper's update on a v5p-128
    python scripts/compile_aot.py config --config configs/r1_distill_qwen_14b.py \
        --target v5p:4x4x4 --set rl.micro_batches=16  # a config's own update and sampler

`config` compiles what `scripts/train.py --config` would run, through the trainer's own memory
checks (against the target chip's memory): the update for the largest prompt bucket, then the
sampler, beside the optimizer state. `--set key=value` overrides the config (Python literals).

--mesh data,fsdp,tensor lays the devices out as a config's mesh section does (-1: the rest).
Prints, per variant, the compile time, the peak device memory against the device's memory,
the custom calls, and for every loop the kernels its body launches per iteration (the
sampler's decode loop: kernels per decode step). --dump DIR writes the HLO.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import sys
import time
from types import SimpleNamespace

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the plugins must not look for a device

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rpt_jax import model, objective, sampling, sharding, train_step  # noqa: E402
from rpt_jax.config import MODEL_SHAPES  # noqa: E402

TARGETS = os.path.join(os.path.dirname(__file__), "gpu_targets")
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all",
               "opt-barrier", "partition-id", "replica-id"}

PROBLEMS: list[str] = []  # the variants that failed or do not fit (the exit status)
# GiB of memory per device (compile-only devices do not report it)
DEVICE_GIB = {"H100": 80, "H200": 141, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
              "TPU v5p": 95, "TPU v6 lite": 32}


def target_devices(target: str, devices: int = 1) -> list:
    """Compile-only devices: `devices` GPUs of one host for a GPU description in gpu_targets/,
    else the chips of the TPU topology named `target` (e.g. v5e:2x2)."""
    from jax.experimental import topologies
    path = os.path.join(TARGETS, f"{target}.txtpb")
    if os.path.exists(path):
        with open(path) as f:
            spec = f.read()
        try:
            return topologies.get_topology_desc("rpt", "cuda", target_config=spec,
                                                topology=f"1x1x{devices}").devices
        except Exception as e:  # the CUDA plugin is missing, or cannot read the description
            raise SystemExit(f"no compile-only CUDA devices ({type(e).__name__}: {e}); install "
                             f"the CUDA plugin: pip install 'jax[cuda12]=={jax.__version__}'")
    if not re.fullmatch(r"v\d+[a-z]*:\d+(x\d+)*", target):
        gpus = sorted(f[:-6] for f in os.listdir(TARGETS) if f.endswith(".txtpb"))
        raise SystemExit(f"--target {target!r}: neither a GPU description ({', '.join(gpus)}) "
                         f"nor a TPU topology such as v5e:2x2 or v5p:4x4x4")
    try:
        return topologies.get_topology_desc(topology_name=target, platform="tpu").devices
    except Exception as e:  # libtpu is missing, or does not know the topology
        raise SystemExit(f"no compile-only TPU devices for {target!r} ({type(e).__name__}: "
                         f"{str(e)[:300]}); install libtpu: pip install "
                         f"'jax[tpu]=={jax.__version__}'")


def target_mesh(devices: list, layout: str) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of `devices` for --mesh "d,f,t" (-1: the devices left)."""
    d, f, t = (int(x) for x in layout.split(","))
    return sharding.make_mesh(SimpleNamespace(mesh=SimpleNamespace(data=d, fsdp=f, tensor=t)),
                              devices)


def device_gib(device) -> float | None:
    kind = device.device_kind
    return next((v for k, v in sorted(DEVICE_GIB.items(), key=lambda kv: -len(kv[0]))
                 if k in kind), None)


def computations(hlo: str) -> dict:
    """{computation name: its instruction lines} of an HLO module's text."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name, comps[head.group(1)] = head.group(1), []
        elif line.startswith("}"):
            name = None
        elif name:
            comps[name].append(line.strip())
    return comps


def kernel_kind(op: str, line: str) -> str:
    if op == "fusion":
        custom = re.search(r'"kind":"(\w+)"', line)
        return custom.group(1) if custom else re.search(r"kind=(\w+)", line).group(1)
    if op == "custom-call":
        return re.search(r'custom_call_target="([^"]+)"', line).group(1)
    return op


def loop_kernels(hlo: str) -> list[tuple[str, str, collections.Counter]]:
    """[(loop body, trip count or '?', Counter of kernel kinds its body launches per iteration)]
    for every while loop; a nested loop counts as one entry of its own, not in its parent."""
    comps = computations(hlo)

    def tally(comp, counts):
        for line in comps[comp]:
            m = re.match(r"(?:ROOT )?%[\w.\-]+ = .*? ([\w\-]+)\(", line)
            if not m or m.group(1) in NOT_KERNELS or m.group(1) == "while":
                continue
            op = m.group(1)
            if op in ("call", "conditional"):  # their kernels (a conditional: its first branch)
                for callee in re.findall(r"(?:to_apply|branch_computations|calls)=\{?%([\w.\-]+)",
                                         line):
                    tally(callee, counts)
                continue
            counts[kernel_kind(op, line)] += 1
        return counts

    loops = []
    for line in hlo.splitlines():
        if " while(" in line:
            body = re.search(r"body=%([\w.\-]+)", line).group(1)
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            loops.append((body, trip.group(1) if trip else "?",
                          tally(body, collections.Counter())))
    return loops


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def report(name: str, compiled, seconds: float, dump: str, mesh, estimate=None):
    """estimate: bytes a device by rpt_jax's own pre-compile check (the sampler's), or None."""
    hlo = compiled.as_text()
    calls = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', hlo))
    peak = sharding.peak_bytes(compiled, mesh.devices.flat[0].platform)
    gib = device_gib(mesh.devices.flat[0])
    ours = f"; pre-compile estimate {size(estimate)}" if estimate else ""
    print(f"\n## {name}\ncompiled in {seconds:.1f} s; peak memory {size(peak)} a "
          f"device (XLA's estimate){f' of {gib} GiB' if gib else ''}{ours}; custom calls: "
          f"{', '.join(f'{k} x{v}' for k, v in sorted(calls.items())) or 'none'}")
    if gib and peak > gib * 2**30:
        PROBLEMS.append(name)
        print(f"DOES NOT FIT: XLA's peak estimate {size(peak)} is above the {gib} GiB a device")
    for body, trip, kinds in loop_kernels(hlo):
        top = ", ".join(f"{k} {v}" for k, v in kinds.most_common())
        unit = "ops" if mesh.devices.flat[0].platform == "tpu" else "kernels"
        print(f"loop {body} (trips {trip}): {sum(kinds.values())} {unit} per iteration: {top}")
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, re.sub(r"[^\w.=-]+", "_", name) + ".hlo.txt"), "w") as f:
            f.write(hlo)


def abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def compile_one(name: str, lower, args, mesh, estimate=None):
    """Report lower().compile(); a variant that fails (one that does not fit the device's
    memory: RESOURCE_EXHAUSTED) is reported in a line and the next one runs."""
    start = time.perf_counter()
    try:
        with jax.set_mesh(mesh):
            compiled = lower().compile()
    except Exception as e:  # noqa: BLE001 (XLA's errors have no narrower common type)
        PROBLEMS.append(name)
        print(f"\n## {name}\nFAILED after {time.perf_counter() - start:.1f} s: "
              f"{type(e).__name__}: {str(e).splitlines()[0][:400]}", flush=True)
        return
    report(name, compiled, time.perf_counter() - start, args.dump, mesh, estimate)


def compile_sampler(args, mesh):
    mcfg = model.ModelConfig(**MODEL_SHAPES[args.preset], dtype=args.dtype,
                             param_dtype=args.dtype, attention=args.attention)
    shards = sharding.param_shardings(mesh, model.logical_axes(mcfg))
    params = abstract(model.param_shapes(mcfg), shards)
    mat = sharding.batch_sharding(mesh, 2)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    for g, attention, layout, blocks, lanes, gemm, split_down in itertools.product(
            [int(x) for x in args.num_samples.split(",")], args.decode_attention.split(","),
            args.cache_layout.split(","), [int(x) for x in args.cache_blocks.split(",")],
            [int(x) for x in args.lanes.split(",")], args.gemm.split(","),
            [int(x) for x in args.split_down.split(",")]):
        if lanes and blocks > 1:
            continue  # not a valid combination (SamplingConfig says why)
        scfg = sampling.SamplingConfig(num_samples=g, temperature=0.8,
                                       max_new_tokens=args.new_tokens, attention=attention,
                                       cache_layout=layout, cache_blocks=blocks, lanes=lanes,
                                       gemm=gemm, split_down=split_down)
        tokens = jax.ShapeDtypeStruct((args.batch // g, args.prompt_len), jnp.int32,
                                      sharding=mat)
        prompts = sampling.Prompts(tokens, tokens)
        compile_one(f"sampler G={g} attention={attention} cache_layout={layout} "
                    f"cache_blocks={blocks} lanes={lanes} gemm={gemm} split_down={split_down}",
                    lambda: sampling.make_sampler(mesh, mcfg, scfg, shards).jitted.lower(
                        params, prompts, rng), args, mesh,
                    sampling.peak_bytes(sampling.memory_bytes(
                        mcfg, scfg, args.batch // g, args.prompt_len, mesh.shape["fsdp"],
                        data=mesh.shape["data"]))
                    // mesh.devices.size)


def compile_update(args, mesh):
    for attention, remat, share, micro in itertools.product(
            args.attention.split(","), args.remat.split(","),
            [bool(int(x)) for x in args.share_prompt.split(",")],
            [int(x) for x in args.micro_batches.split(",")]):
        cfg = model.ModelConfig(**MODEL_SHAPES[args.preset], dtype=args.dtype,
                                param_dtype="float32", remat=remat, attention=attention)
        G, R = args.group, args.seq_len - args.prompt_len
        config = SimpleNamespace(
            sampling=SimpleNamespace(temperature=0.8, num_samples=G, max_new_tokens=R),
            rl=SimpleNamespace(loss_agg="token_mean", clip_low=0.2, clip_high=0.2, kl_coef=0.0,
                               entropy_coef=0.0, micro_batches=micro,
                               share_prompt=share),
            optim=SimpleNamespace(lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01,
                                  grad_clip=1.0, warmup_steps=0, schedule="constant"))
        shapes = model.param_shapes(cfg)
        ps = sharding.param_shardings(mesh, model.logical_axes(cfg), shapes)
        tx = train_step.make_optimizer(config.optim, 1000)
        shards = train_step.state_shardings(mesh, tx, shapes, ps)
        step = train_step.make_train_step(config, cfg, mesh, shards, tx)
        state = train_step.abstract_state(cfg, tx, shards)
        n, p = args.batch, args.prompt_len
        batch = objective.train_batch_shapes(n // G, p, R, G)
        batch = abstract(batch, jax.tree.map(lambda _: sharding.batch_sharding(mesh, 1), batch))
        compile_one(f"update attention={attention} remat={remat} share_prompt={int(share)} "
                    f"micro_batches={micro}",
                    lambda: step.jitted.lower(state, batch, p), args, mesh)


def load_config(path: str, overrides: list[str]):
    """A configs/*.py file's get_config() with --set key=value overrides (Python literals);
    `file.py:arg` calls get_config(arg), as config_flags does (configs/hf_checkpoint.py:DIR)."""
    import ast
    import runpy
    path, colon, arg = path.partition(".py:")
    get_config = runpy.run_path(path + ".py" if colon else path)["get_config"]
    config = get_config(arg) if colon else get_config()
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string
        node, parts = config, key.split(".")
        for part in parts:
            if not hasattr(node, "keys") or part not in node:
                raise SystemExit(f"--set {item}: the config has no key {key!r}")
            parent, node = node, node[part]
        parent[parts[-1]] = value
    return config


def compile_config(args, devices):
    """A config's own programs on the target, through the trainer's own checks: the update for
    the largest prompt bucket (trainer.check_update_memory against the chip's memory), then
    the sampler (its pre-compile formula, less the optimizer state, and XLA's estimate)."""
    from rpt_jax import config as config_lib, trainer  # ml-collections
    config = load_config(args.config, args.set)
    config_lib.validate(config, len(devices))
    mesh = sharding.make_mesh(config, devices)
    gib = device_gib(devices[0])
    limit = int(gib * 2**30) if gib else None
    print(f"# {args.config}{''.join(' ' + s for s in args.set)}: mesh (data, fsdp, tensor) = "
          f"{tuple(mesh.shape.values())}, {config.model.preset}")
    P = trainer.largest_prompt(config)
    start = time.perf_counter()
    try:
        config, (model_cfg, p_shardings, _, abstract, _), peak = trainer.fit_update(
            config, mesh, limit)
        print(f"\n## update, prompt bucket {P}, rl.micro_batches={config.rl.micro_batches}\n"
              f"fits: {size(peak)} a device (XLA's estimate){f' of {gib} GiB' if gib else ''}, "
              f"compiled in {time.perf_counter() - start:.1f} s")
    except train_step.DoesNotFit as e:
        PROBLEMS.append(f"update, prompt bucket {P}")
        print(f"\n## update, prompt bucket {P}\nDOES NOT FIT: {e}")
        model_cfg, p_shardings, _, _, abstract = trainer.make_state(config, mesh)
    scfg = sampling.SamplingConfig.from_config(config.sampling)
    B = int(config.data.batch_size)
    if int(config.data.contexts_per_doc) > 1:
        print("(the sampler is compiled for one prompt row per context; document-grouped rows "
              "are checked when the run starts)")
    kept = sharding.stored_bytes(abstract.opt_state)
    if limit:
        try:
            sampling.check_memory(model_cfg, scfg, B, P, limit * mesh.devices.size,
                                  mesh.shape["fsdp"], data=mesh.shape["data"], reserved_bytes=kept)
        except ValueError as e:
            PROBLEMS.append(f"sampler, prompt bucket {P}")
            print(f"\n## sampler, prompt bucket {P}\nDOES NOT FIT by the pre-compile formula: {e}")
            return
    estimate = sampling.peak_bytes(sampling.memory_bytes(
        model_cfg, scfg, B, P, mesh.shape["fsdp"], data=mesh.shape["data"])) // mesh.devices.size
    tokens = jax.ShapeDtypeStruct((B, P), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    params = abstract.params
    compile_one(f"sampler, prompt bucket {P} (with the optimizer state beside it: "
                f"{size(kept // mesh.devices.size)} a device)",
                lambda: sampling.make_sampler(mesh, model_cfg, scfg, p_shardings).jitted.lower(
                    params, sampling.Prompts(tokens, tokens), rng), args, mesh, estimate)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=("sampler", "update", "config"))
    ap.add_argument("--config", help="config: a configs/*.py file (file.py:arg: get_config(arg))")
    ap.add_argument("--set", action="append", default=[],
                    help="config: key=value override, e.g. --set rl.micro_batches=16")
    ap.add_argument("--target", default="h100_sxm",
                    help="a GPU description in scripts/gpu_targets (h100_sxm, h200) or a TPU "
                         "topology (v5e:2x2, v6e:4x4, v5p:4x4x4, ...)")
    ap.add_argument("--devices", type=int, default=1, help="GPU targets: GPUs of one host")
    ap.add_argument("--mesh", default="-1,1,1",
                    help="data,fsdp,tensor, -1: the devices left (--mesh=-1,16,4)")
    ap.add_argument("--preset", default="qwen2_5_0_5b", choices=sorted(MODEL_SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=None,
                    help="rows: samples (contexts x G); default 256 sampler, 16 update")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--attention", default="xla",
                    help="model.attention, comma list (xla, cudnn): prefill / update")
    sampler = ap.add_argument_group("sampler")
    sampler.add_argument("--new-tokens", type=int, default=256)
    sampler.add_argument("--num-samples", default="1", help="G, comma list")
    sampler.add_argument("--decode-attention", default=None,
                         help="comma list (default: xla,pallas on GPUs, xla on TPUs)")
    sampler.add_argument("--cache-layout", default="auto", help="comma list")
    sampler.add_argument("--cache-blocks", default="1", help="comma list")
    sampler.add_argument("--lanes", default="0", help="comma list (continuous batching)")
    sampler.add_argument("--gemm", default="auto", help="comma list (SamplingConfig.gemm)")
    sampler.add_argument("--split-down", default="1",
                         help="comma list (SamplingConfig.split_down)")
    update = ap.add_argument_group("update")
    update.add_argument("--seq-len", type=int, default=1024)
    update.add_argument("--group", type=int, default=8, help="G samples per context")
    update.add_argument("--remat", default="dots", help="comma list")
    update.add_argument("--micro-batches", default="1", help="comma list")
    update.add_argument("--share-prompt", default="0,1", help="comma list of 0/1")
    ap.add_argument("--dump", default="", help="folder for the compiled HLO texts")
    args = ap.parse_args(argv)
    PROBLEMS.clear()
    args.batch = args.batch or (256 if args.what == "sampler" else 16)
    devices = target_devices(args.target, args.devices)
    if args.what == "config":
        if not args.config:
            ap.error("config needs --config configs/<name>.py")
        compile_config(args, devices)
        return _status()
    mesh = target_mesh(devices, args.mesh)
    tpu = devices[0].platform == "tpu"
    args.decode_attention = args.decode_attention or ("xla" if tpu else "xla,pallas")
    hosts = len({d.process_index for d in devices})
    print(f"# {args.target}: {len(devices)} x {devices[0].device_kind} on {hosts} host(s) "
          f"(compile only), mesh (data, fsdp, tensor) = {tuple(mesh.shape.values())}, "
          f"jax {jax.__version__}, {args.preset} {args.dtype}")
    (compile_sampler if args.what == "sampler" else compile_update)(args, mesh)
    return _status()


def _status() -> int:
    """The exit status: 1 when a variant failed to compile or does not fit."""
    if PROBLEMS:
        print(f"\n{len(PROBLEMS)} variant(s) failed or do not fit: {PROBLEMS}")
    return int(bool(PROBLEMS))


if __name__ == "__main__":
    sys.exit(main())
