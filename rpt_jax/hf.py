"""Hugging Face Llama / Qwen2 / Qwen3 checkpoint folders <-> rpt_jax params (model.py's layout).

Import streams: every param is built with `jax.make_array_from_callback`, whose callback reads
only the block of the safetensors file(s) that one device shard needs, layer by layer, so no host
holds the whole model (a 14B checkpoint loads onto a mesh with host memory for a few layers).
Export gathers one layer of one tensor at a time and writes HF names and layouts, sharded above a
size, plus config.json and the tokenizer files. Only numpy and safetensors at run time; no torch.

HF layouts (per layer; rpt_jax stacks layers on a leading axis l):
  q/k/v_proj.weight [h*e, d] -> kernel [d, h, e];  q/k/v_proj.bias [h*e] -> bias [h, e]
  o_proj.weight [d, h*e] -> kernel [h, e, d];     q/k_norm.weight [e] (Qwen3) -> [e]
  gate/up_proj.weight [f, d] -> kernel [d, f];     down_proj.weight [d, f] -> kernel [f, d]
  lm_head.weight [v, d] -> lm_head [d, v];         embed_tokens, norms: same layout
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rpt_jax import model as model_lib
from rpt_jax import rope as rope_lib
from rpt_jax import sharding
from rpt_jax.tokenizer import read_json, read_tokenizer_config

# Mistral is Llama's architecture when its sliding window is off (v0.2 and later); exported
# as Llama.
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                 "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral"}
# Class defaults of transformers' Llama / Qwen2 / Qwen3 configs for keys a config.json may omit.
_DEFAULTS = {"rope_theta": 10_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
             "qwen3_head_dim": 128, "sliding_window": 4096, "max_window_layers": 28}
# An absent num_key_value_heads is the config class's default (Llama's is None); an explicit null,
# or None, means one KV head per query head.
_KV_HEADS = {"Qwen2ForCausalLM": 32, "Qwen3ForCausalLM": 32, "MistralForCausalLM": 8}
_SILU = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU
# Buffers some old checkpoints store; they are recomputed from rope_theta.
_IGNORED_SUFFIX = "rotary_emb.inv_freq"
_EMBED, _HEAD = "model.embed_tokens.weight", "lm_head.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


def default_smollm2_dir() -> pathlib.Path:
    """Where scripts/prepare_smollm2.py puts SmolLM2-135M-Instruct: $RPT_JAX_CACHE or ~/.cache/rpt_jax."""
    root = os.environ.get("RPT_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rpt_jax")
    return pathlib.Path(root) / "smollm2-135m-instruct"


# ----------------------------------------------------------------------------- config

def model_config_from_hf(folder_or_config_json) -> dict:
    """rpt_jax model fields (see config.MODEL_SHAPES) from an HF config.json, a folder or a dict.

    Supports LlamaForCausalLM (and MistralForCausalLM without a sliding window), Qwen2ForCausalLM
    (qkv biases) and Qwen3ForCausalLM (q / k norms) with full attention and plain, linear, llama3 or yarn RoPE (rpt_jax.rope); raises ValueError
    naming the key for anything rpt_jax.model does not compute.
    """
    if isinstance(folder_or_config_json, dict):
        hf, where = folder_or_config_json, "config dict"
    else:
        path = pathlib.Path(folder_or_config_json)
        path = path / "config.json" if path.is_dir() else path
        hf, where = read_json(path), str(path)

    if not isinstance(hf, dict):
        raise ValueError(f"{where}: a JSON {type(hf).__name__}, not an object of config keys")
    archs = hf.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    arch = archs[0] if archs else {v: k for k, v in ARCHITECTURES.items()}.get(hf.get("model_type"))
    if arch not in ARCHITECTURES:
        raise ValueError(f"{where}: architecture {archs or hf.get('model_type')!r} is not supported; "
                         f"rpt_jax reads {sorted(ARCHITECTURES)}")

    def need(key):
        if key not in hf:
            raise KeyError(f"{where}: missing key {key!r}")
        return hf[key]

    def reject(cond, key, why):
        if cond:
            raise ValueError(f"{where}: {key}={hf.get(key)!r} is not supported ({why})")

    reject(hf.get("hidden_act", "silu") not in _SILU, "hidden_act", "rpt_jax's MLP is SwiGLU with silu")
    reject(hf.get("mlp_bias", False), "mlp_bias", "MLP projections have no bias")
    if arch != "Qwen2ForCausalLM":
        reject(hf.get("attention_bias", False), "attention_bias",
               "this attention bias includes o_proj, which rpt_jax.model has not")
    reject(hf.get("partial_rotary_factor", 1.0) != 1.0, "partial_rotary_factor",
           "RoPE rotates the whole head")
    # transformers <5 writes rope_theta + rope_scaling; >=5 writes rope_parameters (both may be
    # present, and the same); an original_max_position_embeddings left out defaults as in HF.
    scalings = set()
    for key in ("rope_scaling", "rope_parameters"):
        rope = hf.get(key)
        if not rope:
            continue
        reject(any(isinstance(v, dict) for v in rope.values()), key, "per-layer-type RoPE")
        top, inner = (hf.get("original_max_position_embeddings"),
                      rope.get("original_max_position_embeddings"))
        if None not in (top, inner) and top != inner:  # transformers 4 takes the inner, 5 the top
            raise ValueError(f"{where}: original_max_position_embeddings={top} and {key}"
                             f"['original_max_position_embeddings']={inner} disagree")
        old = top or hf.get("max_position_embeddings")
        rope = {"original_max_position_embeddings": old, **rope}
        scalings.add(rope_lib.canonical(rope, f"{where}: {key}"))
    if len(scalings) > 1:
        raise ValueError(f"{where}: rope_scaling and rope_parameters disagree: {sorted(scalings)}")
    # transformers takes a rope_theta inside rope_parameters / rope_scaling over the top-level one.
    thetas = {f"{key}['rope_theta']": (hf.get(key) or {}).get("rope_theta")
              for key in ("rope_parameters", "rope_scaling")}
    thetas = {"rope_theta": hf.get("rope_theta"), **thetas}
    thetas = {k: float(v) for k, v in thetas.items() if v is not None}
    if len(set(thetas.values())) > 1:
        raise ValueError(f"{where}: " + " and ".join(f"{k}={v}" for k, v in thetas.items())
                         + " disagree")
    layer_types = hf.get("layer_types") or []
    reject(any(t != "full_attention" for t in layer_types), "layer_types",
           "only full attention; sliding-window layers are not implemented")
    # An absent sliding_window is the class default (4096); only an explicit null means none.
    window = hf.get("sliding_window", _DEFAULTS["sliding_window"])
    if arch == "MistralForCausalLM":
        if "sliding_window" not in hf:
            raise ValueError(f"{where}: sliding_window is absent, which transformers defaults to "
                             f"{window} (sliding-window attention is not implemented; a checkpoint "
                             f"trained without a window says \"sliding_window\": null)")
        reject(window is not None, "sliding_window", "sliding-window attention is not implemented")
    # Qwen2 / Qwen3: layer i slides iff use_sliding_window, a window and i >= max_window_layers.
    if hf.get("use_sliding_window", False) and window is not None:
        first = hf.get("max_window_layers")
        first = _DEFAULTS["max_window_layers"] if first is None else first
        reject(first < need("num_hidden_layers"), "use_sliding_window",
               f"layers >= max_window_layers={first} attend over a sliding window of {window}, "
               f"which is not implemented")

    heads = need("num_attention_heads")
    head_dim = hf.get("head_dim") or (_DEFAULTS["qwen3_head_dim"] if arch == "Qwen3ForCausalLM"
                                      else need("hidden_size") // heads)
    theta = next(iter(thetas.values()), _DEFAULTS["rope_theta"])
    return dict(
        vocab_size=need("vocab_size"),
        num_layers=need("num_hidden_layers"),
        hidden_size=need("hidden_size"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", _KV_HEADS.get(arch)) or heads,
        head_dim=head_dim,
        mlp_dim=need("intermediate_size"),
        rope_theta=theta,
        rope_scaling=scalings.pop() if scalings else "",
        rms_norm_eps=float(hf.get("rms_norm_eps", _DEFAULTS["rms_norm_eps"])),
        qkv_bias=arch == "Qwen2ForCausalLM",
        qk_norm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", _DEFAULTS["tie_word_embeddings"])),
    )


# ----------------------------------------------------------------------------- name/layout map

@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One HF tensor family. The HF tensor is [prod(rows)] or [prod(rows), prod(cols)]; the rpt_jax
    leaf (per layer) is rows + cols, or cols + rows when `transpose`."""
    path: tuple  # keys into the params dict
    name: str  # HF name; "{i}" is the layer index when `stacked`
    rows: tuple
    cols: tuple = ()
    transpose: bool = False
    stacked: bool = False

    @property
    def hf_shape(self):
        return (math.prod(self.rows),) + ((math.prod(self.cols),) if self.cols else ())

    def names(self, num_layers):
        return [self.name.format(i=i) for i in range(num_layers)] if self.stacked else [self.name]


def _tensor_map(cfg: model_lib.ModelConfig) -> list[_Tensor]:
    """Every HF tensor of a model of this config, in the order checkpoints list them."""
    d, v, f = cfg.hidden_size, cfg.vocab_size, cfg.mlp_dim
    h, k, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    layer = "model.layers.{i}."
    out = [_Tensor(("embed_tokens",), _EMBED, (v,), (d,))]
    for proj, n in (("q_proj", h), ("k_proj", k), ("v_proj", k)):
        out.append(_Tensor(("layers", proj, "kernel"), f"{layer}self_attn.{proj}.weight",
                           (n, e), (d,), transpose=True, stacked=True))
        if cfg.qkv_bias:
            out.append(_Tensor(("layers", proj, "bias"), f"{layer}self_attn.{proj}.bias",
                               (n, e), stacked=True))
    if cfg.qk_norm:
        out += [_Tensor(("layers", norm), f"{layer}self_attn.{norm}.weight", (e,), stacked=True)
                for norm in ("q_norm", "k_norm")]
    out += [
        _Tensor(("layers", "o_proj", "kernel"), f"{layer}self_attn.o_proj.weight", (d,), (h, e),
                transpose=True, stacked=True),
        _Tensor(("layers", "gate_proj", "kernel"), f"{layer}mlp.gate_proj.weight", (f,), (d,),
                transpose=True, stacked=True),
        _Tensor(("layers", "up_proj", "kernel"), f"{layer}mlp.up_proj.weight", (f,), (d,),
                transpose=True, stacked=True),
        _Tensor(("layers", "down_proj", "kernel"), f"{layer}mlp.down_proj.weight", (d,), (f,),
                transpose=True, stacked=True),
        _Tensor(("layers", "input_layernorm"), f"{layer}input_layernorm.weight", (d,), stacked=True),
        _Tensor(("layers", "post_attention_layernorm"), f"{layer}post_attention_layernorm.weight",
                (d,), stacked=True),
        _Tensor(("norm",), "model.norm.weight", (d,)),
    ]
    if not cfg.tie_embeddings:
        out.append(_Tensor(("lm_head",), _HEAD, (v,), (d,), transpose=True))
    return out


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- import

def _checkpoint_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> the safetensors file holding it (single file or index json)."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        return {name: folder / file for name, file in weight_map.items()}
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(f"{folder}: neither model.safetensors nor model.safetensors.index.json "
                            f"(found {sorted(p.name for p in folder.iterdir())})")


def _open(path: pathlib.Path):
    """safe_open(path), its errors naming the file (a truncated download, a partial copy)."""
    try:
        return safe_open(path, framework="numpy")
    except Exception as e:  # noqa: BLE001 (safetensors raises its own SafetensorError)
        raise ValueError(f"{path}: not a readable safetensors file (truncated or partly "
                         f"copied?): {e}") from None


def check_checkpoint(folder, cfg: model_lib.ModelConfig) -> None:
    """Raise, naming the file and tensor, unless the checkpoint folder holds exactly the tensors
    of `cfg` with their shapes and float dtypes. Reads the files' headers only (cheap: run it
    before compiling)."""
    folder = pathlib.Path(folder)
    files = _checkpoint_files(folder)
    with contextlib.ExitStack() as stack:
        _check_checkpoint(folder, cfg, files, _handles(stack))


def _handles(stack: contextlib.ExitStack):
    """path -> its open safetensors file, each opened once inside `stack`."""
    opened = {}

    def handle(path):
        if path not in opened:
            if not path.exists():
                raise FileNotFoundError(f"{path} (named by the checkpoint index) does not exist")
            opened[path] = stack.enter_context(_open(path))
        return opened[path]
    return handle


def _norm_index(index, shape):
    """A device shard's index (tuple of slices, maybe shorter than shape) -> [(start, stop)]."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    out = []
    for s, n in zip(index, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((start, stop))
    return out


def _read_block(sl, spec: _Tensor, ranges) -> np.ndarray:
    """Read the HF block behind rpt_jax leaf ranges [(start, stop)] (one layer) in leaf layout.

    The rows (or cols) group of the HF tensor is the flattening of several leaf axes: read the
    contiguous span covering the first axis's range, reshape, then cut the inner axes.
    """
    nr, nc = len(spec.rows), len(spec.cols)
    rr, cr = (ranges[nc:], ranges[:nc]) if spec.transpose else (ranges[:nr], ranges[nr:])

    def span(dims, rng):
        inner = math.prod(dims[1:])
        return slice(rng[0][0] * inner, rng[0][1] * inner)

    hf_index = (span(spec.rows, rr),) + ((span(spec.cols, cr),) if nc else ())
    block = sl[hf_index]
    shape = (rr[0][1] - rr[0][0],) + spec.rows[1:]
    cut = (slice(None),) + tuple(slice(a, b) for a, b in rr[1:])
    if nc:
        shape += (cr[0][1] - cr[0][0],) + spec.cols[1:]
        cut += (slice(None),) + tuple(slice(a, b) for a, b in cr[1:])
    block = block.reshape(shape)[cut]
    if spec.transpose:
        block = block.transpose(tuple(range(nr, nr + nc)) + tuple(range(nr)))
    return block


def _stored(name: str, cfg, files) -> str:
    """The stored tensor that holds param `name`: a tied checkpoint may store its embeddings as
    lm_head.weight alone (transformers 5 loads the embeddings from it)."""
    if name == _EMBED and cfg.tie_embeddings and _EMBED not in files and _HEAD in files:
        return _HEAD
    return name


def _check_checkpoint(folder, cfg, files, handles) -> None:
    """Every expected tensor present with its HF shape and a float dtype; nothing unexpected. A
    tied checkpoint's stored lm_head.weight is checked like embed_tokens (its values while
    loading)."""
    expected = {}
    for spec in _tensor_map(cfg):
        for name in spec.names(cfg.num_layers):
            expected[_stored(name, cfg, files)] = spec.hf_shape
    if cfg.tie_embeddings and _HEAD in files:
        expected[_HEAD] = (cfg.vocab_size, cfg.hidden_size)
    missing = [n for n in expected if n not in files]
    if missing:
        raise KeyError(f"{folder}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
                       f"{missing[:5]} (config: tie_embeddings={cfg.tie_embeddings}, "
                       f"qkv_bias={cfg.qkv_bias}, num_layers={cfg.num_layers})")
    for name, file in files.items():
        if name in expected or name.endswith(_IGNORED_SUFFIX):
            continue
        raise ValueError(f"{file}: unexpected tensor {name!r} (no rpt_jax param for it; "
                         f"tie_embeddings={cfg.tie_embeddings}, qkv_bias={cfg.qkv_bias}, "
                         f"num_layers={cfg.num_layers})")
    keys = {}  # file -> its tensor names
    for name, shape in expected.items():
        f = handles(files[name])
        if files[name] not in keys:
            keys[files[name]] = set(f.keys())
        if name not in keys[files[name]]:
            raise KeyError(f"{files[name]}: tensor {name!r} listed in the index is not in the file")
        sl = f.get_slice(name)
        if tuple(sl.get_shape()) != shape:
            raise ValueError(f"{files[name]}: tensor {name!r} has shape {tuple(sl.get_shape())}, "
                             f"the config needs {shape}")
        if sl.get_dtype() not in _FLOAT_DTYPES:
            raise ValueError(f"{files[name]}: tensor {name!r} has dtype {sl.get_dtype()}, "
                             f"expected one of {_FLOAT_DTYPES}")


def load_params(folder, cfg: model_lib.ModelConfig, shardings=None) -> dict:
    """Read an HF checkpoint folder into rpt_jax params of dtype cfg.param_dtype.

    shardings: a pytree like `model.param_shapes(cfg)` of jax Shardings (e.g.
    `sharding.param_shardings(mesh, model.logical_axes(cfg))`), or None for the first local
    device. Each device shard is read straight from disk. A tied checkpoint may store
    lm_head.weight too: a copy of embed_tokens is ignored (the model multiplies by embed_tokens);
    a different one raises ValueError as its blocks are read (transformers would then untie them
    and use the stored head). One storing lm_head.weight alone gives the embeddings from it.
    """
    folder = pathlib.Path(folder)
    shapes = model_lib.param_shapes(cfg)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: one, shapes)
    elif jax.tree.structure(shardings) != jax.tree.structure(shapes):
        raise ValueError(f"shardings tree {jax.tree.structure(shardings)} does not match the "
                         f"params tree {jax.tree.structure(shapes)}")
    dtype = jnp.dtype(cfg.param_dtype)
    files = _checkpoint_files(folder)
    params = {}
    with contextlib.ExitStack() as stack:
        handle = _handles(stack)
        _check_checkpoint(folder, cfg, files, handle)
        for spec in _tensor_map(cfg):
            shape = _get(shapes, spec.path).shape
            cache = {}  # partially replicated shardings ask for the same block on several devices

            def callback(index, spec=spec, shape=shape, cache=cache):
                ranges = _norm_index(index, shape)
                key = tuple(ranges)
                if key not in cache:
                    name = _stored(spec.name, cfg, files)
                    if spec.stacked:  # fill layer by layer: one layer's block is the only extra copy
                        (l0, l1), inner = ranges[0], ranges[1:]
                        block = np.empty([b - a for a, b in ranges], dtype)
                        for i in range(l0, l1):
                            li = name.format(i=i)
                            block[i - l0] = _read_block(handle(files[li]).get_slice(li), spec,
                                                        inner)
                    else:
                        block = _read_block(handle(files[name]).get_slice(name), spec, ranges)
                    block = np.ascontiguousarray(block, dtype)
                    if name == _EMBED and cfg.tie_embeddings and _HEAD in files:
                        head = _read_block(handle(files[_HEAD]).get_slice(_HEAD), spec, ranges)
                        if not np.array_equal(np.asarray(head, dtype), block, equal_nan=True):
                            raise ValueError(
                                f"{files[_HEAD]}: tie_word_embeddings is true but the stored "
                                f"{_HEAD!r} differs from {_EMBED!r} (transformers then unties "
                                f"them and uses the stored head); set tie_word_embeddings to "
                                f"false in config.json, or drop {_HEAD!r}")
                    cache[key] = block
                return cache[key]

            leaf = jax.make_array_from_callback(shape, _get(shardings, spec.path), callback)
            _set(params, spec.path, leaf)
    _check_finite(params, cfg, files)
    return params


def _check_finite(params, cfg, files) -> None:
    """Raise, naming the tensors, if any param holds a NaN or an infinity (a damaged or badly
    converted checkpoint would otherwise load and only show as NaN losses). One jitted pass."""
    specs = _tensor_map(cfg)
    leaves = [_get(params, s.path) for s in specs]
    per_layer = lambda x: ~jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))  # noqa: E731
    replicated = [_replicated(leaf.sharding) for leaf in leaves]
    bad = jax.jit(lambda xs: [per_layer(x) if s.stacked else ~jnp.all(jnp.isfinite(x))
                              for s, x in zip(specs, xs)], out_shardings=replicated)(leaves)
    named = []
    for spec, flags in zip(specs, jax.device_get(bad)):
        names = spec.names(cfg.num_layers)
        named += [_stored(n, cfg, files) for n, b in zip(names, np.atleast_1d(flags)) if b]
    if named:
        raise ValueError(f"{len(named)} tensor(s) hold NaN or infinite values, e.g. "
                         + ", ".join(f"{files[n]}: {n!r}" for n in named[:3]))


def _replicated(s: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The same devices, every value on each (so every process can read a small result)."""
    return sharding.replicated(s.mesh) if isinstance(s, jax.sharding.NamedSharding) else s


def replace_folder(out, write) -> pathlib.Path:
    """write(folder) into a new folder beside `out`, then put it in `out`'s place (a link: its
    target's). A failure leaves `out` as it was and no temporary folder behind."""
    out = pathlib.Path(os.path.realpath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    new = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(new, ignore_errors=True)
    try:
        write(new)
        if out.is_dir():
            shutil.rmtree(out)
        new.rename(out)
    finally:
        shutil.rmtree(new, ignore_errors=True)  # left only by a failure
    return out


# ----------------------------------------------------------------------------- export

def _hf_tensor(leaf, spec: _Tensor, layer, dtype) -> np.ndarray:
    """One HF tensor (one layer of a stacked leaf) in HF layout, on the host."""
    block = sharding.to_host(leaf[layer] if spec.stacked else leaf)
    nr, nc = len(spec.rows), len(spec.cols)
    if spec.transpose:
        block = block.transpose(tuple(range(nc, nc + nr)) + tuple(range(nc)))
    return np.ascontiguousarray(block.reshape(spec.hf_shape).astype(dtype))


def _token_id(tokenizer_json: dict, token) -> int | None:
    """Id of a special token (str or {"content": str}) from tokenizer.json, or None."""
    content = token.get("content") if isinstance(token, dict) else token
    if not isinstance(content, str):
        return None
    for added in tokenizer_json.get("added_tokens", []):
        if added.get("content") == content:
            return added["id"]
    vocab = tokenizer_json.get("model", {}).get("vocab")
    return vocab.get(content) if isinstance(vocab, dict) else None


def hf_config(cfg: model_lib.ModelConfig, dtype: str, tokenizer_dir=None,
              max_position_embeddings=None) -> dict:
    """The config.json transformers needs for these params (Qwen2 with qkv_bias, Qwen3 with
    qk_norm, else Llama).

    max_position_embeddings does not change default-RoPE logits; it only informs other tools.
    None takes it from tokenizer_dir's config.json or tokenizer_config.json, else 32768.
    """
    if cfg.qkv_bias and cfg.qk_norm:
        raise ValueError("no Hugging Face architecture has both qkv_bias and qk_norm")
    arch = ("Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.qkv_bias
            else "LlamaForCausalLM")
    out = {
        "architectures": [arch],
        "model_type": ARCHITECTURES[arch],
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        # Both spellings: transformers <5 reads rope_theta (+ rope_scaling), >=5 rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": rope_lib.hf_params(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
        "initializer_range": cfg.init_std, "use_cache": True,
        "torch_dtype": dtype, "dtype": dtype,
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = rope_lib.parse(cfg.rope_scaling)
    if arch != "LlamaForCausalLM":
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
    if arch != "Qwen2ForCausalLM":
        out.update(attention_bias=False, mlp_bias=False)
    tok_dir = pathlib.Path(tokenizer_dir) if tokenizer_dir is not None else None
    tok_config = {}
    if tok_dir is not None:
        tok_config = read_tokenizer_config(tok_dir)  # special_tokens_map.json merged in
    if max_position_embeddings is None and tok_dir is not None and (tok_dir / "config.json").exists():
        max_position_embeddings = read_json(tok_dir / "config.json").get("max_position_embeddings")
    if max_position_embeddings is None and 0 < tok_config.get("model_max_length", 0) < 1e7:
        max_position_embeddings = int(tok_config["model_max_length"])
    out["max_position_embeddings"] = int(max_position_embeddings or 32768)
    if tok_dir is not None and (tok_dir / "tokenizer.json").exists():
        tok_json = read_json(tok_dir / "tokenizer.json")
        for key in ("bos", "eos", "pad"):
            token_id = _token_id(tok_json, tok_config.get(f"{key}_token"))
            if token_id is not None:
                out[f"{key}_token_id"] = token_id
    return out


def save_params(params, cfg: model_lib.ModelConfig, folder, tokenizer_dir=None,
                max_shard_bytes: int = 2 * 1024**3, dtype=None, max_position_embeddings=None):
    """Write params as an HF checkpoint folder that transformers' from_pretrained loads.

    Writes model.safetensors, or model-0000i-of-0000n.safetensors plus
    model.safetensors.index.json when the tensors exceed max_shard_bytes; config.json (see
    `hf_config`); and the tokenizer files found in tokenizer_dir. dtype: the tensors' dtype
    ("float32", "bfloat16", ...; default cfg.param_dtype). Tensors are gathered one layer at a
    time. Multi-host: every process must call this (the gathers are collective); only process
    0 writes. Returns the folder path.
    """
    folder = pathlib.Path(folder)
    shapes = model_lib.param_shapes(cfg)
    got = jax.tree.map(lambda x: tuple(x.shape), params)
    want = jax.tree.map(lambda x: x.shape, shapes)
    if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
        raise ValueError(f"params do not match the config: shapes {got} vs {want}")
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    writer = jax.process_index() == 0

    # Plan the shards from shapes alone, so file names can carry the count.
    entries = []  # (hf name, spec, layer), in checkpoint order: embeddings, layer by layer, head
    specs = _tensor_map(cfg)
    entries += [(s.name, s, None) for s in specs if not s.stacked and s.path == ("embed_tokens",)]
    for i in range(cfg.num_layers):
        entries += [(s.name.format(i=i), s, i) for s in specs if s.stacked]
    entries += [(s.name, s, None) for s in specs if not s.stacked and s.path != ("embed_tokens",)]
    shards, size = [[]], 0
    for entry in entries:
        nbytes = math.prod(entry[1].hf_shape) * dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes

    if writer:
        folder.mkdir(parents=True, exist_ok=True)
        for old in [*folder.glob("model*.safetensors"), *folder.glob("model.safetensors.index.json")]:
            old.unlink()  # a stale index or shard from an earlier save would shadow this one
    n = len(shards)
    weight_map, total = {}, 0
    for j, shard in enumerate(shards):
        file = "model.safetensors" if n == 1 else f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        tensors = {name: _hf_tensor(_get(params, spec.path), spec, layer, dtype)
                   for name, spec, layer in shard}
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({name: file for name in tensors})
        if writer:
            save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors

    def finish():
        if n > 1:
            with open(folder / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2)
        config = hf_config(cfg, str(dtype), tokenizer_dir, max_position_embeddings)
        with open(folder / "config.json", "w") as f:
            json.dump(config, f, indent=2)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                src = pathlib.Path(tokenizer_dir) / name
                if src.exists():
                    shutil.copyfile(src, folder / name)

    sharding.on_process_zero("rpt_jax save_params", finish)  # none returns before it is written
    return folder
