"""rpt_jax.hf against transformers: real SmolLM2-135M logits, tiny random Qwen2 / Qwen3 and RoPE-scaled
checkpoints, export, errors.

The SmolLM2 fixture materialises the checkpoint once (scripts/prepare_smollm2.py, cached in
hf.default_smollm2_dir(); ~30 s the first time).
"""
import dataclasses
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from rpt_jax import config as config_lib
from rpt_jax import hf, model, rope, sharding

# The Gettysburg Address (Lincoln, 1863; public domain): ~330 SmolLM2 tokens of real English.
TEXT = (
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, "
    "conceived in Liberty, and dedicated to the proposition that all men are created equal. "
    "Now we are engaged in a great civil war, testing whether that nation, or any nation so "
    "conceived and so dedicated, can long endure. We are met on a great battle-field of that war. "
    "We have come to dedicate a portion of that field, as a final resting place for those who "
    "here gave their lives that that nation might live. It is altogether fitting and proper that "
    "we should do this. But, in a larger sense, we can not dedicate -- we can not consecrate -- "
    "we can not hallow -- this ground. The brave men, living and dead, who struggled here, have "
    "consecrated it, far above our poor power to add or detract. The world will little note, nor "
    "long remember what we say here, but it can never forget what they did here. It is for us "
    "the living, rather, to be dedicated here to the unfinished work which they who fought here "
    "have thus far so nobly advanced. It is rather for us to be here dedicated to the great task "
    "remaining before us -- that from these honored dead we take increased devotion to that "
    "cause for which they gave the last full measure of devotion -- that we here highly resolve "
    "that these dead shall not have died in vain -- that this nation, under God, shall have a new "
    "birth of freedom -- and that government of the people, by the people, for the people, shall "
    "not perish from the earth."
)
NUM_TOKENS = 256

forward = jax.jit(model.forward, static_argnums=2)


def _prepare_module():
    path = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "prepare_smollm2.py"
    spec = importlib.util.spec_from_file_location("prepare_smollm2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _torch_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(np.array(ids))).logits.float().numpy()


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _tree_equal(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


# ----------------------------------------------------------------------------- SmolLM2-135M

@pytest.fixture(scope="session")
def smollm2_dir():
    return _prepare_module().prepare()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    cfg = model.ModelConfig(**hf.model_config_from_hf(smollm2_dir))
    return cfg, hf.load_params(smollm2_dir, cfg)


@pytest.fixture(scope="session")
def smollm2_torch(smollm2_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return tokenizer, hf_model.eval()


def test_prepare_smollm2_never_replaces_a_foreign_folder(tmp_path):
    """--out pointing at a folder of other things is refused before any work, force or not."""
    prepare = _prepare_module().prepare
    (tmp_path / "mine.txt").write_text("keep me")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="holds other things than a checkpoint folder"):
            prepare(tmp_path, force=force)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_smollm2_config_matches_preset(smollm2_dir):
    got = hf.model_config_from_hf(smollm2_dir)
    want = config_lib.model_shape("smollm2_135m")
    assert got.pop("rms_norm_eps") == pytest.approx(want.pop("rms_norm_eps"), rel=1e-6)
    assert got == want


def test_smollm2_logits_match_transformers(smollm2, smollm2_torch):
    cfg, params = smollm2
    tokenizer, hf_model = smollm2_torch
    ids = tokenizer(TEXT, return_tensors="np").input_ids[:, :NUM_TOKENS]
    assert ids.shape == (1, NUM_TOKENS)
    ref = _torch_logits(hf_model, ids)[0]
    ours = np.asarray(forward(params, jnp.asarray(ids), cfg))[0]
    max_abs = np.abs(ours - ref).max()
    logp_ref, logp_ours = _log_softmax(ref.astype(np.float64)), _log_softmax(ours.astype(np.float64))
    kl = (np.exp(logp_ref) * (logp_ref - logp_ours)).sum(-1)  # KL(hf || ours) per position
    print(f"SmolLM2 {NUM_TOKENS} tokens: max |logit error| {max_abs:.2e}, "
          f"KL(hf||ours) max {kl.max():.2e} mean {kl.mean():.2e}")
    assert max_abs < 2e-3
    assert kl.max() < 1e-5
    np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_smollm2_predicts_paris(smollm2, smollm2_torch):
    cfg, params = smollm2
    tokenizer, _ = smollm2_torch
    ids = tokenizer("The capital of France is", return_tensors="np").input_ids
    logp = _log_softmax(np.asarray(forward(params, jnp.asarray(ids), cfg))[0, -1])
    paris = tokenizer(" Paris").input_ids
    assert len(paris) == 1 and logp.argmax() == paris[0]
    assert logp[paris[0]] == pytest.approx(-0.26, abs=0.02)


def test_smollm2_streams_into_fsdp_shardings(smollm2_dir, smollm2):
    cfg, params = smollm2
    config = config_lib.base_config("smollm2_135m")
    config.mesh.update(data=1, fsdp=8, tensor=1)
    mesh = sharding.make_mesh(config)
    shardings = sharding.param_shardings(mesh, model.logical_axes(cfg), model.param_shapes(cfg))
    sharded = hf.load_params(smollm2_dir, cfg, shardings)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(shardings)):
        assert got.sharding == want
    assert _tree_equal(sharded, params)


def test_llama_export_with_tokenizer_reloads_in_transformers(tmp_path, smollm2_dir, smollm2_torch):
    """A random tied Llama (norms perturbed) exported with SmolLM2's tokenizer files."""
    cfg = model.ModelConfig(**config_lib.model_shape("tiny"))
    rng = np.random.default_rng(0)  # numpy, not model.init: eager jax ops compile per shape
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.normal(1.0 if "norm" in jax.tree_util.keystr(path) else 0.0,
                                               0.1, s.shape), jnp.float32),
        model.param_shapes(cfg))
    out = hf.save_params(params, cfg, tmp_path / "export", tokenizer_dir=smollm2_dir,
                         max_shard_bytes=100_000)
    names = {p.name for p in out.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json", "model.safetensors.index.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    # Special token ids read from the tokenizer files, as the original checkpoint has them.
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["max_position_embeddings"] == 8192
    assert _tree_equal(hf.load_params(out, cfg), params)

    tokenizer, _ = smollm2_torch
    np.testing.assert_array_equal(transformers.AutoTokenizer.from_pretrained(out)(TEXT).input_ids,
                                  tokenizer(TEXT).input_ids)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(cfg)
    np.testing.assert_allclose(_torch_logits(reloaded, ids),
                               np.asarray(forward(params, jnp.asarray(ids), cfg)), atol=2e-5, rtol=0)


# ----------------------------------------------------------------------------- tiny Qwen2

QWEN = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rope_theta=50_000.0, rms_norm_eps=1e-5,
            tie_word_embeddings=False, max_position_embeddings=512)


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    """A random Qwen2 saved by transformers in several shards: (folder, torch model, cfg)."""
    torch.manual_seed(0)
    hf_model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN)).eval()
    with torch.no_grad():  # transformers inits biases to 0 and norms to 1: make them informative
        for name, p in hf_model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("qwen2")
    hf_model.save_pretrained(folder, safe_serialization=True, max_shard_size="40KB")
    assert (folder / "model.safetensors.index.json").exists()
    cfg = model.ModelConfig(**hf.model_config_from_hf(folder))
    return folder, hf_model, cfg


@pytest.fixture(scope="module")
def qwen2_params(qwen2):
    folder, _, cfg = qwen2
    return hf.load_params(folder, cfg)


def _ids(cfg, b=2, t=24):
    return np.array(jax.random.randint(jax.random.key(1), (b, t), 0, cfg.vocab_size))


def test_qwen2_config(qwen2):
    _, _, cfg = qwen2
    assert (cfg.qkv_bias, cfg.tie_embeddings, cfg.head_dim, cfg.num_kv_heads) == (True, False, 16, 2)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.mlp_dim) == (50_000.0, 1e-5, 128)


def test_qwen2_logits_match_transformers(qwen2, qwen2_params):
    _, hf_model, cfg = qwen2
    ids = _ids(cfg)
    ours = np.asarray(forward(qwen2_params, jnp.asarray(ids), cfg))
    np.testing.assert_allclose(ours, _torch_logits(hf_model, ids), atol=2e-5, rtol=0)


def test_qwen2_streams_into_any_sharding(qwen2, qwen2_params):
    """Mesh (2, 2, 2): the rule shardings, and shardings that cut every inner axis (head_dim too)."""
    folder, _, cfg = qwen2
    config = config_lib.base_config("tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config)
    rules = sharding.param_shardings(mesh, model.logical_axes(cfg), model.param_shapes(cfg))
    # The last three axes of every leaf over (data, fsdp, tensor); 1-d leaves stay partly replicated.
    inner = jax.tree.map(
        lambda s: NamedSharding(mesh, P(*([None] * max(0, len(s.shape) - 3)),
                                        *sharding.AXES[-min(3, len(s.shape)):])),
        model.param_shapes(cfg))
    for shardings in (rules, inner):
        loaded = hf.load_params(folder, cfg, shardings)
        for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings)):
            assert got.sharding == want
        assert _tree_equal(loaded, qwen2_params)


def test_qwen2_export_round_trip(tmp_path, qwen2, qwen2_params):
    _, hf_model, cfg = qwen2
    out = hf.save_params(qwen2_params, cfg, tmp_path / "export", max_shard_bytes=50_000)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    assert len(list(out.glob("model-*.safetensors"))) > 2
    assert _tree_equal(hf.load_params(out, cfg), qwen2_params)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(cfg)
    np.testing.assert_array_equal(_torch_logits(reloaded, ids), _torch_logits(hf_model, ids))

    # Saved again into the same folder: one file under the limit, the old shards and index gone;
    # bfloat16 on disk loads back as the rounded values.
    out16 = hf.save_params(qwen2_params, cfg, out, dtype="bfloat16")
    assert [p.name for p in out16.glob("model*")] == ["model.safetensors"]
    with safe_open(out16 / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("lm_head.weight").get_dtype() == "BF16"
    cfg16 = model.ModelConfig(**{**vars(cfg), "param_dtype": "bfloat16"})
    rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16), qwen2_params)
    assert _tree_equal(hf.load_params(out16, cfg16), rounded)


# ----------------------------------------------------------------------------- tiny Qwen3

def test_qwen3_matches_transformers(tmp_path):
    """Qwen3 (an RMSNorm on each query and key head before RoPE, no biases): logits, sharded
    loading and export against transformers."""
    torch.manual_seed(0)
    hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN, head_dim=16)).eval()
    with torch.no_grad():  # informative norms: q_norm and k_norm differ from 1 and each other
        for name, p in hf_model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path / "in", safe_serialization=True, max_shard_size="40KB")
    cfg = model.ModelConfig(**hf.model_config_from_hf(tmp_path / "in"))
    assert (cfg.qk_norm, cfg.qkv_bias, cfg.head_dim) == (True, False, 16)
    params = hf.load_params(tmp_path / "in", cfg)
    assert params["layers"]["q_norm"].shape == (cfg.num_layers, 16)
    ids = _ids(cfg)
    ours = np.asarray(forward(params, jnp.asarray(ids), cfg))
    np.testing.assert_allclose(ours, _torch_logits(hf_model, ids), atol=2e-5, rtol=0)
    plain = np.asarray(forward(params, jnp.asarray(ids), dataclasses.replace(cfg, qk_norm=False)))
    assert np.abs(plain - ours).max() > 50 * 2e-5  # the norms matter

    config = config_lib.base_config("tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config)
    shardings = sharding.param_shardings(mesh, model.logical_axes(cfg), model.param_shapes(cfg))
    assert _tree_equal(hf.load_params(tmp_path / "in", cfg, shardings), params)

    out = hf.save_params(params, cfg, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Qwen3ForCausalLM"]
    assert model.ModelConfig(**hf.model_config_from_hf(out)) == cfg
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="both qkv_bias and qk_norm"):
        hf.hf_config(dataclasses.replace(cfg, qkv_bias=True), "float32")


def test_qwen3_head_dim_defaults_to_128(tmp_path):
    """A Qwen3 config.json without head_dim: Qwen3Config's class default 128, not hidden // heads."""
    torch.manual_seed(0)
    hf_model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**dict(QWEN, num_hidden_layers=1)))
    hf_model.eval().save_pretrained(tmp_path, safe_serialization=True)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written.pop("head_dim") == 128 != QWEN["hidden_size"] // QWEN["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    assert transformers.AutoConfig.from_pretrained(tmp_path).head_dim == 128
    cfg = model.ModelConfig(**hf.model_config_from_hf(tmp_path))
    assert cfg.head_dim == 128
    ids = _ids(cfg)
    ours = np.asarray(forward(hf.load_params(tmp_path, cfg), jnp.asarray(ids), cfg))
    np.testing.assert_allclose(ours, _torch_logits(hf_model, ids), atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Qwen3", "Mistral"])
@pytest.mark.parametrize("written", ["absent", "null"])
def test_num_key_value_heads_defaults_as_transformers(tmp_path, arch, written):
    """An absent num_key_value_heads is the class default (Qwen2/3: 32, Mistral: 8, Llama: the
    query heads); an explicit null is the query heads. Read as transformers reads config.json."""
    hf_cfg = getattr(transformers, f"{arch}Config")(**dict(QWEN, num_attention_heads=64,
                                                         head_dim=16, sliding_window=None))
    d = hf_cfg.to_dict()
    d["architectures"] = [f"{arch}ForCausalLM"]
    del d["num_key_value_heads"]
    if written == "null":
        d["num_key_value_heads"] = None
    (tmp_path / "config.json").write_text(json.dumps(d))
    expected = (64 if arch == "Llama" or written == "null" else
                {"Qwen2": 32, "Qwen3": 32, "Mistral": 8}[arch])
    assert hf.model_config_from_hf(tmp_path)["num_kv_heads"] == expected
    if (arch, written) != ("Mistral", "null"):  # transformers 5 refuses a null there (4: heads)
        assert transformers.AutoConfig.from_pretrained(tmp_path).num_key_value_heads == expected


def test_mistral_without_a_sliding_window_is_llama(tmp_path):
    torch.manual_seed(0)
    mistral = transformers.MistralConfig(**QWEN, head_dim=16, sliding_window=None)
    hf_model = transformers.MistralForCausalLM(mistral).eval()
    hf_model.save_pretrained(tmp_path, safe_serialization=True)
    cfg = model.ModelConfig(**hf.model_config_from_hf(tmp_path))
    assert (cfg.qkv_bias, cfg.qk_norm, cfg.head_dim) == (False, False, 16)
    ids = _ids(cfg)
    ours = np.asarray(forward(hf.load_params(tmp_path, cfg), jnp.asarray(ids), cfg))
    np.testing.assert_allclose(ours, _torch_logits(hf_model, ids), atol=2e-5, rtol=0)
    written = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match="sliding_window=4096 is not supported"):
        hf.model_config_from_hf({**written, "sliding_window": 4096})
    # No sliding_window key: MistralConfig's default window of 4096, not "no window".
    absent = {k: v for k, v in written.items() if k != "sliding_window"}
    assert transformers.MistralConfig.from_dict(dict(absent)).sliding_window == 4096
    with pytest.raises(ValueError, match="sliding_window is absent, which transformers defaults to 4096"):
        hf.model_config_from_hf(absent)


# ----------------------------------------------------------------------------- RoPE scalings

# Llama 3.x's, linear interpolation's and YaRN's parameters, with a short original context so
# that the 40 positions of the check reach the scaled frequencies.
SCALINGS = {
    "llama3": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=16),
    "linear": dict(factor=2.0),
    "yarn": dict(factor=4.0, original_max_position_embeddings=16, beta_fast=16.0),
}


@pytest.mark.parametrize("kind, model_type", [("llama3", "llama"), ("linear", "llama"),
                                              ("yarn", "qwen2")])
def test_scaled_rope_matches_transformers(tmp_path, kind, model_type):
    """Logits of a random checkpoint with a RoPE scaling, loaded and exported: transformers'
    logits, the same config from old-style (rope_theta + rope_scaling) config.json files."""
    torch.manual_seed(0)
    shape = {k: v for k, v in QWEN.items() if k != "rope_theta"}
    hf_cfg = transformers.AutoConfig.for_model(
        model_type, **shape, rope_parameters=dict(SCALINGS[kind], rope_type=kind, rope_theta=5e4))
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    hf_model.save_pretrained(tmp_path / "in", safe_serialization=True)
    cfg = model.ModelConfig(**hf.model_config_from_hf(tmp_path / "in"))
    assert rope.parse(cfg.rope_scaling) == dict(SCALINGS[kind], rope_type=kind)
    params = hf.load_params(tmp_path / "in", cfg)
    ids = _ids(cfg, t=40)
    ours = np.asarray(forward(params, jnp.asarray(ids), cfg))
    np.testing.assert_allclose(ours, _torch_logits(hf_model, ids), atol=2e-5, rtol=0)
    plain = np.asarray(forward(params, jnp.asarray(ids), dataclasses.replace(cfg, rope_scaling="")))
    assert np.abs(plain - ours).max() > 50 * 2e-5  # the scaling matters at these positions

    out = hf.save_params(params, cfg, tmp_path / "out")
    assert model.ModelConfig(**hf.model_config_from_hf(out)) == cfg
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=2e-5, rtol=0)

    # transformers < 5 wrote rope_theta + rope_scaling ("type" in older files), with
    # original_max_position_embeddings left to default to max_position_embeddings
    written = json.loads((tmp_path / "in" / "config.json").read_text())
    written.pop("rope_parameters")
    old = dict(SCALINGS[kind], type=kind)
    default = old.pop("original_max_position_embeddings", None)
    if default:
        written["max_position_embeddings"] = default
    old_style = hf.model_config_from_hf({**written, "rope_theta": 5e4, "rope_scaling": old})
    assert model.ModelConfig(**old_style) == cfg


# ----------------------------------------------------------------------------- errors

@pytest.fixture
def qwen2_copy(tmp_path, qwen2, qwen2_params):
    """An editable single-file export: (folder, {name: array})."""
    _, _, cfg = qwen2
    folder = hf.save_params(qwen2_params, cfg, tmp_path / "ckpt")
    with safe_open(folder / "model.safetensors", framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return folder, tensors


def _rewrite(folder, tensors):
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(qwen2, qwen2_copy):
    folder, tensors = qwen2_copy
    del tensors["model.layers.1.mlp.up_proj.weight"]
    _rewrite(folder, tensors)
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf.load_params(folder, qwen2[2])


def test_non_finite_weights_are_named(qwen2, qwen2_copy):
    """A NaN or an infinity anywhere is refused at load, naming the tensor (and layer)."""
    folder, tensors = qwen2_copy
    up = tensors["model.layers.1.mlp.up_proj.weight"]
    up[3, 5] = np.nan
    tensors["model.norm.weight"][0] = -np.inf
    _rewrite(folder, tensors)
    with pytest.raises(ValueError, match=r"2 tensor\(s\) hold NaN or infinite values, e\.g\. "
                                         r".*model\.safetensors: 'model\.layers\.1\.mlp\.up_proj"
                                         r"\.weight', .*'model\.norm\.weight'"):
        hf.load_params(folder, qwen2[2])


def test_checkpoint_checked_from_headers_and_truncated_files_named(qwen2, qwen2_copy):
    """check_checkpoint reads headers only and names what is wrong; a truncated file is named."""
    folder, tensors = qwen2_copy
    _, _, cfg = qwen2
    hf.check_checkpoint(folder, cfg)
    del tensors["model.norm.weight"]
    _rewrite(folder, tensors)
    with pytest.raises(KeyError, match=r"missing from the checkpoint, e.g. \['model\.norm"):
        hf.check_checkpoint(folder, cfg)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    for fn in (hf.check_checkpoint, hf.load_params):
        with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors "
                                             r"file \(truncated or partly copied\?\)"):
            fn(folder, cfg)


def test_config_json_of_the_wrong_form_is_named(qwen2, tmp_path):
    folder, _, _ = qwen2
    config = json.loads((folder / "config.json").read_text())
    assert hf.model_config_from_hf({**config, "architectures": "Qwen2ForCausalLM"}) == \
        hf.model_config_from_hf(config)  # a string, as some hand-written configs have it
    (tmp_path / "config.json").write_text(json.dumps([config]))
    with pytest.raises(ValueError, match=r"config\.json: a JSON list, not an object"):
        hf.model_config_from_hf(tmp_path)


def test_wrong_shape_names_tensor_and_file(qwen2, qwen2_copy):
    folder, tensors = qwen2_copy
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), np.float32)
    _rewrite(folder, tensors)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor "
                                         r"'model\.layers\.0\.self_attn\.k_proj\.weight' has "
                                         r"shape \(64, 64\), the config needs \(32, 64\)"):
        hf.load_params(folder, qwen2[2])


def test_unexpected_and_ignored_tensors(qwen2, qwen2_copy, qwen2_params):
    folder, tensors = qwen2_copy
    _, _, cfg = qwen2
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    _rewrite(folder, tensors)
    assert _tree_equal(hf.load_params(folder, cfg), qwen2_params)  # inv_freq buffers are skipped
    tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
    _rewrite(folder, tensors)
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.o_proj\.bias'"):
        hf.load_params(folder, cfg)


def test_tied_config_with_a_stored_head(qwen2, qwen2_copy, qwen2_params):
    """tie_word_embeddings with an lm_head.weight stored too: a copy of embed_tokens is ignored;
    a different one is refused (transformers then unties them and uses the stored head), even
    when only one shard of a sharded load differs."""
    folder, tensors = qwen2_copy
    _, _, cfg = qwen2
    written = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**written, "tie_word_embeddings": True}))
    tied = model.ModelConfig(**hf.model_config_from_hf(folder))
    assert tied == dataclasses.replace(cfg, tie_embeddings=True)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    np.testing.assert_array_equal(reloaded.lm_head.weight.detach().numpy(), tensors["lm_head.weight"])
    pattern = (r"model\.safetensors: tie_word_embeddings is true but the stored 'lm_head\.weight' "
               r"differs from 'model\.embed_tokens\.weight'")
    with pytest.raises(ValueError, match=pattern):
        hf.load_params(folder, tied)

    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    _rewrite(folder, tensors)
    params = hf.load_params(folder, tied)
    assert "lm_head" not in params
    np.testing.assert_array_equal(params["embed_tokens"], qwen2_params["embed_tokens"])

    config = config_lib.base_config("tiny")
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(config)
    shardings = sharding.param_shardings(mesh, model.logical_axes(tied), model.param_shapes(tied))
    tensors["lm_head.weight"][-1, -1] += 1.0
    _rewrite(folder, tensors)
    with pytest.raises(ValueError, match=pattern):
        hf.load_params(folder, tied, shardings)
    tensors["lm_head.weight"] = np.zeros((8, 64), np.float32)
    _rewrite(folder, tensors)
    with pytest.raises(ValueError, match=r"lm_head\.weight' has shape \(8, 64\)"):
        hf.load_params(folder, tied)

    # lm_head.weight alone: transformers takes the embeddings from it, and so does rpt_jax
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight") * 2.0
    _rewrite(folder, tensors)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    embed = reloaded.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(embed, tensors["lm_head.weight"])
    np.testing.assert_array_equal(hf.load_params(folder, tied, shardings)["embed_tokens"], embed)


def test_integer_dtype_and_missing_index_file(qwen2, qwen2_copy):
    folder, tensors = qwen2_copy
    tensors["model.norm.weight"] = np.ones(64, np.int32)
    _rewrite(folder, tensors)
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' has dtype I32"):
        hf.load_params(folder, qwen2[2])
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {name: "model-00001-of-00002.safetensors" for name in tensors}}))
    with pytest.raises(FileNotFoundError, match=r"model-00001-of-00002\.safetensors"):
        hf.load_params(folder, qwen2[2])


@pytest.mark.parametrize("change, error, pattern", [
    ({"architectures": ["GemmaForCausalLM"]}, ValueError, "GemmaForCausalLM"),
    ({"architectures": ["Qwen3ForCausalLM"], "attention_bias": True}, ValueError,
     "attention_bias=True is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ValueError,
     r"rope_scaling: RoPE scaling 'llama3' needs \['low_freq_factor', 'high_freq_factor'\]"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, ValueError,
     "rope_parameters: RoPE scaling 'dynamic' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 4.0}}, ValueError, "disagree"),
    ({"original_max_position_embeddings": 16, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}}, ValueError,
     r"original_max_position_embeddings=16 and rope_scaling\['original_max_position_embeddings'"
     r"\]=8 disagree"),
    ({"use_sliding_window": True, "max_window_layers": 1, "sliding_window": 64,
      "layer_types": None}, ValueError, "use_sliding_window"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, ValueError, "layer_types"),
    ({"rope_parameters": {"full_attention": {"rope_theta": 1e4}}}, ValueError, "per-layer-type"),
    ({"hidden_act": "gelu"}, ValueError, "hidden_act"),
    ({"hidden_size": None}, KeyError, "'hidden_size'"),
])
def test_unsupported_configs_are_named(qwen2, change, error, pattern):
    folder, _, _ = qwen2
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    with pytest.raises(error, match=pattern):
        hf.model_config_from_hf(config)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_nested_rope_theta(qwen2, key):
    """rope_theta inside rope_parameters (or rope_scaling) is the one transformers uses: taken
    when it is the only one, and a disagreeing top-level rope_theta is refused."""
    folder, _, _ = qwen2
    written = json.loads((folder / "config.json").read_text())
    written.pop("rope_parameters")
    nested = {**written, key: {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e4}}

    def hf_theta(config):
        return transformers.Qwen2Config.from_dict(json.loads(json.dumps(config))).rope_parameters["rope_theta"]

    assert hf.model_config_from_hf(nested)["rope_theta"] == hf_theta(nested) == 5e4
    assert hf.model_config_from_hf({**nested, "rope_theta": 5e4})["rope_theta"] == 5e4
    both = {**nested, "rope_theta": 1e4}
    assert hf_theta(both) == 5e4
    with pytest.raises(ValueError, match=rf"rope_theta=10000\.0 and {key}\['rope_theta'\]=50000\.0 "
                                         r"disagree"):
        hf.model_config_from_hf(both)


def test_swish_is_silu(qwen2):
    folder, _, _ = qwen2
    written = json.loads((folder / "config.json").read_text())
    from transformers.activations import ACT2FN as act
    x = torch.linspace(-6, 6, 101)
    torch.testing.assert_close(act["swish"](x), act["silu"](x), rtol=0, atol=0)
    assert hf.model_config_from_hf({**written, "hidden_act": "swish"}) == hf.model_config_from_hf(written)


# (extra config.json keys, whether transformers puts some layer in sliding attention)
SLIDING = [
    ({"use_sliding_window": True, "sliding_window": 64}, False),  # max_window_layers: 28
    ({"use_sliding_window": True, "sliding_window": None, "max_window_layers": 0}, False),
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 4}, False),
    ({"use_sliding_window": False, "sliding_window": 64, "max_window_layers": 0}, False),
    ({"use_sliding_window": True, "max_window_layers": 2}, True),  # sliding_window: 4096
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}, True),
]


@pytest.mark.parametrize("extra, slides", SLIDING)
@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_use_sliding_window_as_transformers_reads_it(model_type, extra, slides):
    """Accepted as full attention iff transformers slides no layer: layer i slides iff
    use_sliding_window, a sliding_window that is not null and i >= max_window_layers."""
    config = dict(model_type=model_type, vocab_size=64, hidden_size=64, intermediate_size=64,
                  num_hidden_layers=4, num_attention_heads=4, head_dim=16, **extra)
    layer_types = transformers.AutoConfig.for_model(**json.loads(json.dumps(config))).layer_types
    assert any(t == "sliding_attention" for t in layer_types) == slides
    if slides:
        with pytest.raises(ValueError, match="use_sliding_window=True is not supported"):
            hf.model_config_from_hf(config)
    else:
        assert hf.model_config_from_hf(config)["num_layers"] == 4


def test_config_json_round_trip(qwen2, smollm2_dir):
    """hf_config -> transformers' config class -> model_config_from_hf gives the same fields."""
    _, _, cfg = qwen2
    scaled = [dataclasses.replace(cfg, rope_scaling=rope.canonical(dict(s, rope_type=kind)))
              for kind, s in SCALINGS.items()]
    for source in (cfg, model.ModelConfig(**hf.model_config_from_hf(smollm2_dir)), *scaled):
        written = hf.hf_config(source, "float32")
        hf_cfg = transformers.AutoConfig.for_model(written.pop("model_type"), **written).to_dict()
        fields = hf.model_config_from_hf({**hf_cfg, "architectures": written["architectures"]})
        assert model.ModelConfig(**fields) == source


def test_save_rejects_mismatched_params(tmp_path, qwen2, qwen2_params):
    _, _, cfg = qwen2
    bad = dict(qwen2_params, norm=jnp.ones(32))
    with pytest.raises(ValueError, match="do not match the config"):
        hf.save_params(bad, cfg, tmp_path / "bad")
