"""Tiny RPT run on CPU: a 0.85M-parameter decoder on synthetic arithmetic text.

    python scripts/train.py --config configs/tiny.py --workdir /tmp/rpt_tiny

Builds its corpus and tokenizer itself, warms the model up on the answer format with a short
supervised phase, then runs GRPO; the reward rises within a few minutes on 2 CPU cores.
"""
from rpt_jax.config import base_config


def get_config():
    c = base_config("tiny")
    c.seed = 0
    c.num_steps = 60
    c.model.dtype = "float32"
    c.data.corpus = "synthetic_arithmetic"
    c.data.template = "short"  # v0 alone is ~150 tokens under the 512-id tokenizer
    c.data.batch_size = 16
    c.data.max_prompt_len = 128
    c.data.target_window = 16
    c.data.target_tokens = 4
    c.data.min_context = 4
    c.sampling.num_samples = 4
    c.sampling.temperature = 1.0
    c.sampling.max_new_tokens = 32
    c.sampling.prompt_buckets = (64, 128)
    c.sampling.cache_dtype = "float32"
    c.reward.max_pred_bytes = 16
    c.rl.dynamic_sampling_start = 0
    c.optim.lr = 1e-3
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 5
    c.checkpoint.every = 20
    c.eval.every = 20
    c.eval.num_examples = 64
    c.eval.num_samples = 4
    return c
