"""Configs: every preset loads through config_flags with overrides and validates; bad ones fail by key."""
import dataclasses
import pathlib
import re

import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from rpt_jax import config as rc
from rpt_jax import model

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = {  # preset file -> a device count it is meant for
    "tiny": 1, "smollm2_135m": 1, "qwen2_5_0_5b": 8, "r1_distill_qwen_1_5b": 8,
    "r1_distill_qwen_14b": 64,  # v5p-128: 64 chips
}


def load(name, *overrides, suffix=""):
    argv = ["prog", f"--config={ROOT / 'configs' / name}.py{suffix}", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True,
                                    sys_argv=argv)  # overrides are read from argv, not sys.argv
    fv(argv)
    return fv.config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_share_structure_and_validate(name):
    c = load(name)
    base = rc.base_config()
    assert sorted(c.keys()) == sorted(base.keys())
    for section in base.keys():
        if hasattr(base[section], "keys"):
            assert sorted(c[section].keys()) == sorted(base[section].keys()), section
    rc.validate(c, PRESETS[name])
    assert model.ModelConfig.from_config(c.model).vocab_size == c.model.vocab_size


def test_overrides_from_the_command_line():
    c = load("tiny", "--config.optim.lr=0.003", "--config.mesh.tensor=2")
    assert c.optim.lr == 0.003 and c.mesh.tensor == 2
    with pytest.raises(Exception):
        load("tiny", "--config.optim.no_such_key=1")


def test_paper_recipe_in_14b_preset():
    c = load("r1_distill_qwen_14b")
    assert (c.data.batch_size, c.sampling.num_samples, c.optim.lr) == (256, 8, 1e-6)
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay) == (0.9, 0.999, 0.01)
    assert (c.rl.clip_low, c.sampling.temperature, c.rl.kl_coef) == (0.2, 0.8, 0.0)
    assert (c.data.max_prompt_len, c.sampling.max_new_tokens) == (4096, 8192)


@pytest.mark.parametrize("change, devices, message", [
    ({"data.batch_size": 6}, 4, "data.batch_size=6 is not divisible by the data axes"),
    ({"mesh.tensor": 3}, 3, "model.num_heads=4 is not divisible by the tensor axis"),
    ({"mesh.data": 3}, 8, "does not divide the 8 devices"),
    ({"mesh.data": -1, "mesh.fsdp": -1}, 8, "at most one of"),
    ({"rl.loss_agg": "mean"}, 1, "rl.loss_agg='mean' is not one of"),
    ({"model.preset": "gpt5"}, 1, "unknown model preset 'gpt5'"),
    ({"model.preset": "hf_checkpoint"}, 1, "model.preset='hf_checkpoint' needs model.hf_checkpoint"),
    ({"model.rope_scaling": '{"rope_type": "dynamic"}'}, 1, "model.rope_scaling: RoPE scaling"),
    ({"sampling.top_p": 0.0}, 1, "sampling.top_p"),
    ({"data.max_prompt_len": 4096}, 1, "sampling.prompt_buckets"),
    ({"rl.micro_batches": 3}, 1, "rl.micro_batches=3"),
    ({"rl.micro_batches": -1}, 1, "rl.micro_batches=-1"),
    ({"model.attention": "cudnn"}, 1, "model.attention='cudnn' needs model.dtype bfloat16"),
    ({"sampling.attention": "triton"}, 1, "sampling.attention='triton' is not one of"),
    ({"sampling.cache_layout": "paged"}, 1, "sampling.cache_layout='paged' is not one of"),
    ({"sampling.gemm": "cutlass"}, 1, "sampling.gemm='cutlass' is not one of"),
    ({"sampling.cache_dtype": "bf16"}, 1, "sampling.cache_dtype='bf16' is not one of"),
    ({"sampling.num_samples": 1}, 1, "sampling.num_samples=1: GRPO's group baseline needs"),
    ({"sampling.num_samples": 0}, 1, "sampling.num_samples must be positive, got 0"),
    ({"eval.num_samples": 0}, 1, "eval.num_samples must be positive, got 0"),
    ({"model.num_kv_heads": 0}, 1, "model.num_kv_heads must be positive, got 0"),
    ({"eval.num_examples": 0}, 1, "eval.num_examples must be positive, got 0"),
    ({"checkpoint.keep": 0}, 1, "checkpoint.keep must be positive, got 0"),
    ({"sampling.top_k": -1}, 1, "sampling.top_k must be >= 0, got -1"),
    ({"eval.thresholds": (1.5, 1.0, 0.5)}, 1, "eval.thresholds=(1.5, 1.0, 0.5) must be strictly"),
    ({"sampling.prompt_buckets": ()}, 1, "sampling.prompt_buckets=() must include a bucket"),
    ({"sampling.lanes": 6, "sampling.cache_layout": "per_sample"}, 4,
     "sampling.lanes=6 must be 0 or a positive multiple of 4"),
    ({"sampling.lanes": 8}, 4, "sampling.lanes=8 must be 0 or a positive multiple of 16"),
    ({"sampling.lanes": 16, "eval.num_samples": 3}, 4,  # slots of 4 and of 3 samples: 12
     "sampling.lanes=16 must be 0 or a positive multiple of 48"),
    ({"sampling.lanes": 16, "sampling.cache_blocks": 2}, 4, "set sampling.cache_blocks=1"),
    ({"sampling.split_down": 5}, 1, "sampling.split_down=5 must be >= 1 and divide "
     "model.mlp_dim=384"),
    ({"data.contexts_per_doc": 4, "sampling.prefill_chunks": 8}, 1, "sampling.prefill_chunks=8 "
     "must be >= 1 and divide the prompt rows the sampler prefills, data.batch_size / "
     "data.contexts_per_doc = 4"),
    ({"logging.profile_start": 2, "logging.profile_steps": 0}, 1,
     "logging.profile_steps=0 must be >= 1"),
    ({"data.target_window": 0}, 1, "data.target_window must be positive, got 0"),
    ({"data.entropy_top_k": 0}, 1, "data.entropy_top_k must be positive, got 0"),
    ({"rl.logits_chunk": 0}, 1, "rl.logits_chunk must be positive, got 0"),
    ({"reward.max_pred_bytes": 0}, 1, "reward.max_pred_bytes must be positive, got 0"),
    ({"sampling.cache_blocks": 0}, 1, "sampling.cache_blocks must be positive, got 0"),
    ({"sampling.refill": -1}, 1, "sampling.refill must be >= 0, got -1"),
    ({"rl.adv_eps": -1.0}, 1, "rl.adv_eps must be >= 0, got -1.0"),
    ({"seed": -1}, 1, "seed must be >= 0, got -1"),
    ({"optim.b2": 1.0}, 1, "optim.b2 must be in [0, 1), got 1.0"),
    ({"reward.think_end": ""}, 1, "reward.think_end='' must have 1..64 bytes"),
    ({"data.corpus_path": "my.txt"}, 1, "data.corpus_path='my.txt' is read only with "
     "data.corpus='local'"),
    ({"sampling.prompt_buckets": (1, 4096)}, 1, "each must be at least 2 tokens"),
    ({"eval.split": "valid"}, 1, "eval.split='valid' is not one of"),
    ({"logging.every": 0}, 1, "logging.every must be positive, got 0"),
])
def test_bad_config_names_the_key(change, devices, message):
    c = load("tiny")
    with c.unlocked():
        for key, value in change.items():
            *section, name = key.split(".")
            (c[section[0]] if section else c)[name] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        rc.validate(c, devices)


def test_every_position_per_document_is_a_valid_choice():
    c = load("tiny")
    c.data.positions_per_doc = 0  # every candidate position (the paper's entropy filter)
    rc.validate(c, 1)


def test_cudnn_attention_needs_gpus():
    c = load("tiny")
    c.model.attention, c.model.dtype = "cudnn", "bfloat16"
    with pytest.raises(ValueError, match="model.attention='cudnn' needs NVIDIA GPUs, these "
                                         "devices are 'cpu'"):
        rc.validate(c, 1, "cpu")
    rc.validate(c, 1, "gpu")
    rc.validate(c, 1)  # no platform: a compile ahead of time for GPUs from a CPU host


def test_eval_splits_are_the_corpora_splits():
    from rpt_jax import corpora
    assert rc.CHOICES["eval.split"] == corpora.SPLITS


def test_unknown_model_shape():
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        rc.base_config("nope")


def test_preset_override_alone_is_named(caplog):
    """model.preset is a label: overriding it alone keeps the fields, and validate says so once.
    An unknown label is refused."""
    c = rc.base_config("tiny")
    rc._WARNED.clear()  # an earlier test may have warned about the same change
    with caplog.at_level("WARNING", logger=rc.__name__):
        rc.validate(c, 1)
        assert not caplog.records
        c.model.preset = "smollm2_135m"
        rc.validate(c, 1)
        rc.validate(c, 1)
    assert len(caplog.records) == 1
    assert "model.preset='smollm2_135m' is a label" in caplog.text
    assert "'vocab_size': 512" in caplog.text and "'num_layers': 4" in caplog.text
    c.model.preset = "nope"
    with pytest.raises(ValueError, match="unknown model preset 'nope'"):
        rc.validate(c, 1)


def test_sampler_tuning_keys_are_optional():
    """A hand-written config without the sampler's tuning keys still validates (defaults)."""
    c = load("tiny")
    with c.unlocked():
        for key in ("attention", "cache_layout", "lanes", "refill", "gemm", "split_down",
                    "cache_blocks"):
            del c.sampling[key]
    rc.validate(c, 1)
    from rpt_jax.sampling import SamplingConfig
    assert SamplingConfig.from_config(c.sampling).attention == "xla"


def test_hf_checkpoint_config_takes_the_folders_architecture(tmp_path, smol):
    """configs/hf_checkpoint.py:<folder>: shape and RoPE scaling from its config.json, the chat
    template when its tokenizer has one; command-line overrides still apply."""
    import jax

    from rpt_jax import hf, rope
    yarn = rope.canonical({"rope_type": "yarn", "factor": 4.0,
                           "original_max_position_embeddings": 64})
    cfg = model.ModelConfig(**{**rc.model_shape("tiny"), "vocab_size": 49152, "rope_scaling": yarn})
    params = jax.eval_shape(lambda: model.init(cfg, jax.random.key(0)))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), params)
    smol[1].save(tmp_path / "tok")
    folder = hf.save_params(params, cfg, tmp_path / "ckpt", tokenizer_dir=tmp_path / "tok")
    c = load("hf_checkpoint", "--config.data.batch_size=8", suffix=f":{folder}")
    assert (c.model.preset, c.model.hf_checkpoint, c.data.chat_template) == (
        "hf_checkpoint", str(folder), True)
    assert c.data.batch_size == 8
    got = model.ModelConfig.from_config(c.model)
    assert dataclasses.replace(got, remat="none", dtype="float32") == cfg
    rc.validate(c, 1)
    with pytest.raises(flags.IllegalFlagValueError, match="needs the checkpoint folder"):
        load("hf_checkpoint")
