"""The one config structure every preset shares, the model shapes, and validation.

A config has the sections model, mesh, data, sampling, reward, rl, optim, warmup, checkpoint,
eval and logging, plus `seed` (every random choice flows from it) and `num_steps`. Presets in
configs/ start from `base_config()` and override values; they never add keys, so a reader learns
the structure once. `validate` checks a config before anything is compiled.
"""
from __future__ import annotations

import logging
import math

log = logging.getLogger(__name__)
_WARNED = set()  # (preset, changed fields) already warned about

# Architectures of the Llama / Qwen2 families, in Hugging Face's terms.
MODEL_SHAPES = {
    "tiny": dict(
        vocab_size=512, num_layers=4, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
        mlp_dim=384, rope_theta=10_000.0, rms_norm_eps=1e-6, qkv_bias=False, tie_embeddings=True),
    "smollm2_135m": dict(
        vocab_size=49152, num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, head_dim=64,
        mlp_dim=1536, rope_theta=100_000.0, rms_norm_eps=1e-5, qkv_bias=False, tie_embeddings=True),
    "qwen2_5_0_5b": dict(
        vocab_size=151936, num_layers=24, hidden_size=896, num_heads=14, num_kv_heads=2,
        head_dim=64, mlp_dim=4864, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=True),
    "r1_distill_qwen_1_5b": dict(
        vocab_size=151936, num_layers=28, hidden_size=1536, num_heads=12, num_kv_heads=2,
        head_dim=128, mlp_dim=8960, rope_theta=10_000.0, rms_norm_eps=1e-6, qkv_bias=True,
        tie_embeddings=False),
    "r1_distill_qwen_14b": dict(
        vocab_size=152064, num_layers=48, hidden_size=5120, num_heads=40, num_kv_heads=8,
        head_dim=128, mlp_dim=13824, rope_theta=1_000_000.0, rms_norm_eps=1e-5, qkv_bias=True,
        tie_embeddings=False),
}

HF_PRESET = "hf_checkpoint"  # model.preset of a config whose architecture came from a checkpoint

CHOICES = {
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "dots"),
    "model.attention": ("xla", "cudnn"),
    "sampling.attention": ("xla", "pallas"),
    "sampling.cache_layout": ("auto", "shared", "per_sample"),
    "sampling.gemm": ("auto", "cublas", "xla"),
    "sampling.cache_dtype": ("float32", "bfloat16", "float16"),
    "reward.kind": ("prefix_match", "first_token", "dense", "conditional_dense"),
    "rl.advantage": ("grpo", "dr_grpo"),
    "rl.loss_agg": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
    "optim.schedule": ("constant", "cosine"),
    "warmup.think": ("none", "last_line"),
    "eval.split": ("train", "validation", "test"),  # rpt_jax.corpora.SPLITS
}
# sampler tuning keys a hand-written config may leave out (SamplingConfig's defaults apply)
OPTIONAL = {"sampling.attention", "sampling.cache_layout", "sampling.lanes", "sampling.refill",
            "sampling.gemm", "sampling.split_down", "sampling.cache_blocks"}


def model_shape(name: str) -> dict:
    """The architecture fields of a named model shape; raises on an unknown name."""
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(MODEL_SHAPES)}")
    return {"rope_scaling": "", "qk_norm": False, **MODEL_SHAPES[name]}  # Llama / Qwen2 defaults


def base_config(model: str = "tiny"):
    """The full config structure with defaults from the paper's recipe where it gives one."""
    import ml_collections  # lazy: the rest of this module runs where ml-collections is absent
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_steps = 1000

    # preset names the shape whose fields follow it; they are copied here, so an override of
    # model.preset alone changes the label, not the shape (override the fields themselves)
    c.model = ml_collections.ConfigDict(dict(
        preset=model, **model_shape(model),
        dtype="bfloat16", param_dtype="float32", remat="none", init_std=0.02,
        attention="xla",  # "cudnn": fused attention for training/prefill on NVIDIA GPUs (bf16)
        hf_checkpoint="",  # a Hugging Face checkpoint folder to start from; "" = random init
    ))

    # Mesh axes (data, fsdp, tensor); -1 takes every device the others leave.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

    c.data = ml_collections.ConfigDict(dict(
        corpus="synthetic_arithmetic",  # a corpus builder name (see rpt_jax.corpora)
        corpus_path="",  # for corpus="local": a .txt/.jsonl file or folder
        text_fields=("text",),  # for corpus="local" .jsonl: fields joined into a document
        data_dir="",  # where TFDS writes prepared corpora; "" = <workdir>/tfds
        tokenizer="",  # a tokenizer.json or HF folder; "" = the model checkpoint's / built-in
        batch_size=256,  # contexts per step (global, over all hosts)
        max_prompt_len=4096,  # tokens, template included
        target_window=64,  # bytes of ground-truth continuation kept per example
        target_tokens=16,  # ground-truth tokens whose boundaries are kept
        min_context=8,  # tokens before the first position that may be chosen
        positions_per_doc=8,  # <= 0: every candidate position
        contexts_per_doc=1,  # m > 1: rows in groups of m positions of one document (one prefill)
        template="v0",  # a name in contexts.TEMPLATES, or a text with {prompt_content}
        chat_template=False,  # wrap the prompt in the tokenizer's chat template
        entropy_threshold=0.0,  # keep positions whose proxy top-k entropy exceeds this (nats)
        entropy_top_k=16,
        proxy_checkpoint="",  # HF folder of the proxy model for entropy filtering; "" = off
    ))

    c.sampling = ml_collections.ConfigDict(dict(
        num_samples=8,  # G, samples per context
        temperature=0.8, top_k=0, top_p=1.0, greedy=False,
        max_new_tokens=8192,
        stop_strings=(),  # stop tokens besides the tokenizer's EOS, as text: one token each
        prompt_buckets=(256, 1024, 4096),  # prompt lengths are padded up to one of these
        cache_dtype="bfloat16",
        # speed / memory knobs of rpt_jax.sampling.SamplingConfig (see its comments)
        cache_layout="auto",  # auto / shared / per_sample prompt cache
        prefill_chunks=1,  # prefill the prompt rows in this many sequential slices
        cache_blocks=1,  # response cache blocks; > 1 for long responses (reads fewer slots)
        attention="xla",  # decode attention: "pallas" = fused GPU kernel (Triton)
        # continuous batching: decode the batch's rows through this many lanes, a finished
        # row's lane taking the next row (0 = all rows at once); for RPT's uneven lengths, and
        # for batches whose caches do not fit at once. A multiple of data*fsdp, and of
        # num_samples*data*fsdp with a shared prompt (lanes in slots of num_samples).
        lanes=0,
        refill=0,  # free slots per device refilled together (0 = an eighth of them)
        gemm="auto",  # GPU matmuls of the sampler: cublas / xla (Triton GEMM fusions) / auto:
        # cublas with attention="pallas", else xla
        split_down=1,  # decode's down projection as this many GEMMs over slices of mlp_dim
    ))

    c.reward = ml_collections.ConfigDict(dict(
        kind="prefix_match",
        think_end="</think>",
        max_pred_bytes=64,
    ))

    c.rl = ml_collections.ConfigDict(dict(
        advantage="grpo", adv_eps=1e-6,
        dynamic_sampling=True, dynamic_sampling_start=500,  # DAPO: drop groups of equal rewards
        clip_low=0.2, clip_high=0.2,
        kl_coef=0.0, entropy_coef=0.0,
        loss_agg="token_mean",
        # gradient accumulation over this many slices of the batch; 0: the fewest that fit the
        # devices' memory, found by compiling the update at start-up (trainer.fit_update)
        micro_batches=1,
        logits_chunk=256,  # positions per LM-head chunk in the loss (memory vs speed)
        # compute each context's prompt once for its G samples in the update's forward and
        # backward instead of once per sample (G / micro_batches per micro-batch; whole rows
        # when micro_batches does not divide G or leaves one sample per context)
        share_prompt=True,
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-6, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01, grad_clip=1.0,
        warmup_steps=0, schedule="constant", max_bad_steps=5,
    ))

    # Supervised warm-up on the answer format before RL, for models that have never seen it
    # (the tiny preset starts from random weights); see rpt_jax.warmup. steps=0: off.
    c.warmup = ml_collections.ConfigDict(dict(steps=0, lr=1e-3, think="last_line"))
    c.checkpoint = ml_collections.ConfigDict(dict(every=50, keep=3))
    c.eval = ml_collections.ConfigDict(dict(
        every=100, num_examples=200, num_samples=8, split="validation",
        thresholds=(0.5, 1.0, 1.5), proxy_checkpoint=""))
    c.logging = ml_collections.ConfigDict(dict(
        every=1, tensorboard=True, jsonl=True,
        # every this many steps (0: never) the first samples_contexts contexts of the batch with
        # their G samples, predictions and rewards go to <workdir>/samples.jsonl and TensorBoard
        samples_every=50, samples_contexts=1,
        # jax.profiler trace of steps profile_start .. + profile_steps - 1 into
        # <workdir>/profile (rpt_jax.profiling); -1: none; step 0 includes the compilations
        profile_start=-1, profile_steps=3))
    return c


def use_hf_checkpoint(config, folder: str):
    """Start config from the Hugging Face checkpoint `folder`: model.hf_checkpoint, and the
    architecture fields (RoPE scaling included) from its config.json, model.preset
    "hf_checkpoint". Raises naming the file and key for what rpt_jax.model cannot run."""
    from rpt_jax import hf  # numpy, safetensors, tokenizers
    for key, value in hf.model_config_from_hf(folder).items():
        config.model[key] = value
    config.model.preset = HF_PRESET
    config.model.hf_checkpoint = str(folder)
    return config


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node[part]
    return node


def mesh_shape(config, num_devices: int) -> tuple[int, int, int]:
    """Resolve the (data, fsdp, tensor) mesh shape; -1 takes the devices the others leave."""
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    names = ("mesh.data", "mesh.fsdp", "mesh.tensor")
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one of {names} may be -1, got {sizes}")
    for name, s in zip(names, sizes):
        if s == 0 or s < -1:
            raise ValueError(f"{name} must be a positive size or -1, got {s}")
    fixed = 1
    for s in sizes:
        fixed *= s if s != -1 else 1
    if num_devices % fixed:
        raise ValueError(f"mesh {sizes} does not divide the {num_devices} devices")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
    if sizes[0] * sizes[1] * sizes[2] != num_devices:
        raise ValueError(f"mesh {tuple(sizes)} needs {sizes[0] * sizes[1] * sizes[2]} devices, "
                         f"have {num_devices}")
    return tuple(sizes)


POSITIVE = ("model.num_heads", "model.num_kv_heads", "model.head_dim", "model.hidden_size",
            "model.num_layers", "model.mlp_dim", "model.vocab_size", "data.batch_size",
            "data.max_prompt_len", "data.target_window", "data.target_tokens",
            "data.entropy_top_k", "sampling.num_samples",
            "sampling.max_new_tokens", "sampling.temperature", "sampling.cache_blocks",
            "reward.max_pred_bytes", "rl.logits_chunk", "optim.max_bad_steps", "eval.num_samples",
            "eval.num_examples", "checkpoint.keep", "logging.every", "logging.samples_contexts",
            "num_steps")
NON_NEGATIVE = ("seed", "optim.lr", "optim.eps", "optim.weight_decay", "optim.warmup_steps",
                "sampling.top_k", "sampling.refill", "rl.kl_coef", "rl.adv_eps", "rl.clip_low",
                "rl.clip_high", "warmup.steps", "warmup.lr", "eval.every", "checkpoint.every",
                "logging.samples_every")


def validate(config, num_devices: int, platform: str | None = None) -> tuple[int, int, int]:
    """Check a config against itself and the device count; return the resolved mesh shape.

    platform: the devices' (jax.default_backend()); None skips the checks that need it, as for
    a compile ahead of time for other devices. Raises ValueError naming the offending key.
    Cheap: call it before any compilation.
    """
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if key in OPTIONAL and name not in config[section]:
            continue
        if _get(config, key) not in allowed:
            raise ValueError(f"{key}={_get(config, key)!r} is not one of {allowed}")
    def present(key):
        section, name = key.split(".") if "." in key else ("", key)
        return key not in OPTIONAL or name in config[section]

    for key in filter(present, POSITIVE):
        if _get(config, key) <= 0:
            raise ValueError(f"{key} must be positive, got {_get(config, key)}")
    for key in filter(present, NON_NEGATIVE):
        if _get(config, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {_get(config, key)}")
    for key in ("optim.b1", "optim.b2"):
        if not 0.0 <= _get(config, key) < 1.0:
            raise ValueError(f"{key} must be in [0, 1), got {_get(config, key)}")
    if not 1 <= len(config.reward.think_end.encode()) <= 64:
        raise ValueError(f"reward.think_end={config.reward.think_end!r} must have 1..64 bytes")
    if config.data.corpus_path and config.data.corpus != "local":
        raise ValueError(f"data.corpus_path={config.data.corpus_path!r} is read only with "
                         f"data.corpus='local' (got {config.data.corpus!r})")
    buckets = tuple(config.sampling.prompt_buckets)
    if any(b < 2 for b in buckets):
        raise ValueError(f"sampling.prompt_buckets={buckets}: each must be at least 2 tokens")
    thresholds = tuple(config.eval.thresholds)
    if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
        raise ValueError(f"eval.thresholds={thresholds} must be strictly increasing")
    if config.logging.profile_start >= 0 and config.logging.profile_steps < 1:
        raise ValueError(f"logging.profile_steps={config.logging.profile_steps} must be >= 1 "
                         f"when logging.profile_start={config.logging.profile_start} traces")
    m = config.model
    if m.preset == HF_PRESET and not m.hf_checkpoint:
        raise ValueError(f"model.preset={HF_PRESET!r} needs model.hf_checkpoint (the folder whose "
                         f"config.json gave the architecture)")
    if m.preset != HF_PRESET:
        changed = {k: getattr(m, k) for k, v in model_shape(m.preset).items() if getattr(m, k) != v}
        key = (m.preset, tuple(sorted(changed.items())))
        if changed and key not in _WARNED:  # a deliberate variant, or a surprise after
            _WARNED.add(key)                # overriding the preset alone
            log.warning("model.preset=%r is a label: the model is built from the model fields, "
                        "which differ from that shape's in %s", m.preset, changed)
    from rpt_jax import rope  # numpy + jax.numpy only
    rope.parse(m.rope_scaling, "model.rope_scaling")
    data, fsdp, tensor = mesh_shape(config, num_devices)
    if m.attention == "cudnn" and m.dtype == "float32":
        raise ValueError("model.attention='cudnn' needs model.dtype bfloat16 or float16")
    if m.attention == "cudnn" and platform not in (None, "gpu", "cuda"):
        raise ValueError(f"model.attention='cudnn' needs NVIDIA GPUs, these devices are "
                         f"{platform!r}: set model.attention='xla'")
    if m.num_heads % m.num_kv_heads:
        raise ValueError(f"model.num_heads={m.num_heads} is not a multiple of "
                         f"model.num_kv_heads={m.num_kv_heads}")
    for key in ("num_heads", "num_kv_heads", "mlp_dim", "vocab_size"):
        if getattr(m, key) % tensor:
            raise ValueError(f"model.{key}={getattr(m, key)} is not divisible by the tensor axis "
                             f"(mesh.tensor={tensor})")
    if m.hidden_size % fsdp:
        raise ValueError(f"model.hidden_size={m.hidden_size} is not divisible by mesh.fsdp={fsdp}")
    if config.data.batch_size % (data * fsdp):
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by the data "
                         f"axes of the mesh (data*fsdp={data * fsdp})")
    m = config.data.contexts_per_doc
    if m < 1 or config.data.batch_size % m or (config.data.batch_size // m) % (data * fsdp):
        raise ValueError(f"data.contexts_per_doc={m} must be >= 1 and divide "
                         f"data.batch_size={config.data.batch_size} into a number of documents "
                         f"divisible by the mesh's data axes (data*fsdp={data * fsdp}), so each "
                         f"device samples whole documents")
    chunks, rows = config.sampling.get("prefill_chunks", 1), config.data.batch_size // m
    if chunks < 1 or rows % chunks:
        raise ValueError(f"sampling.prefill_chunks={chunks} must be >= 1 and divide the prompt "
                         f"rows the sampler prefills, data.batch_size / data.contexts_per_doc = "
                         f"{rows}")
    samples = config.data.batch_size * config.sampling.num_samples
    micro = config.rl.micro_batches
    if micro < 0 or micro and (samples % micro or (samples // micro) % (data * fsdp)):
        raise ValueError(f"data.batch_size*sampling.num_samples={samples} must split into "
                         f"rl.micro_batches={config.rl.micro_batches} slices, each divisible by "
                         f"data*fsdp={data * fsdp}")
    lanes = config.sampling.get("lanes", 0)
    # a shared prompt's lanes come in slots of G (auto may pick it: long prompts), for training's
    # G and the evaluation's, which samples through the same lanes
    gs = {int(config.sampling.num_samples), int(config.eval.num_samples)}
    slot = 1 if config.sampling.get("cache_layout", "auto") == "per_sample" else math.lcm(*gs)
    if lanes < 0 or lanes % (slot * data * fsdp):
        names = "sampling.num_samples" + (" and eval.num_samples" if len(gs) > 1 else "")
        why = (f" times {slot} ({names}: the slots of a shared prompt; or set "
               "sampling.cache_layout=per_sample)") if slot > 1 else ""
        raise ValueError(f"sampling.lanes={lanes} must be 0 or a positive multiple of "
                         f"{slot * data * fsdp}: the mesh's data axes (data*fsdp={data * fsdp})"
                         f"{why}")
    if lanes and config.sampling.get("cache_blocks", 1) != 1:
        raise ValueError(f"sampling.lanes={lanes} keeps each lane's response in one cache "
                         f"block: set sampling.cache_blocks=1")
    split = config.sampling.get("split_down", 1)
    if split < 1 or config.model.mlp_dim % split:
        raise ValueError(f"sampling.split_down={split} must be >= 1 and divide "
                         f"model.mlp_dim={config.model.mlp_dim}")
    if config.sampling.num_samples < 2:
        raise ValueError(f"sampling.num_samples={config.sampling.num_samples}: GRPO's group "
                         "baseline needs at least 2 samples per context")
    if not 0.0 < config.sampling.top_p <= 1.0:
        raise ValueError(f"sampling.top_p must be in (0, 1], got {config.sampling.top_p}")
    if not buckets or max(buckets) < config.data.max_prompt_len:
        raise ValueError(f"sampling.prompt_buckets={buckets} must include a bucket >= "
                         f"data.max_prompt_len={config.data.max_prompt_len}")
    return data, fsdp, tensor
