"""Tiny RPT run on CPU: a 0.85M-parameter decoder on synthetic arithmetic text.

    python scripts/train.py --config configs/tiny.py --workdir /tmp/rpt_tiny

Builds its corpus (rpt_jax.corpora, synthetic_arithmetic) and a 512-id BPE tokenizer itself,
teaches the random model the answer format with a 200-step supervised warm-up (rpt_jax.warmup:
"<think>{the unfinished line}</think>\\boxed{<true next token>}"), then runs 100 GRPO steps of
16 contexts x 4 samples. Measured on 2 CPU cores: about 2 minutes when they are free (3-4 when
shared); the sampled reward rises from about 0.26 (mean of steps 1-10) to 0.42-0.46 (steps
91-100), eval reasoning accuracy from about 30% to 37-49% (README.md).
"""
from rpt_jax.config import base_config


def get_config():
    c = base_config("tiny")
    c.seed = 0
    c.num_steps = 100
    c.model.dtype = "float32"
    c.data.corpus = "synthetic_arithmetic"
    c.data.template = "short"  # v0 alone is ~150 tokens under the 512-id tokenizer
    c.data.batch_size = 16
    c.data.max_prompt_len = 64  # the template and ~5 lines of context
    c.data.target_window = 16
    c.data.target_tokens = 4
    c.data.min_context = 4
    c.sampling.num_samples = 4
    c.sampling.temperature = 1.0
    c.sampling.max_new_tokens = 24  # the warm-up's answers take 10-16 tokens
    c.sampling.prompt_buckets = (64,)  # one shape: one compilation of each step function
    c.sampling.cache_dtype = "float32"
    c.reward.max_pred_bytes = 16
    c.rl.dynamic_sampling_start = 0
    c.optim.lr = 2e-4  # 3e-4 collapsed in 1 of 3 runs (grad norm 59, reward 0.09 at the end)
    c.optim.weight_decay = 0.0
    c.optim.warmup_steps = 5
    c.warmup.steps = 200
    c.warmup.lr = 1e-3
    c.checkpoint.every = 25
    c.eval.every = 50
    c.eval.num_examples = 128
    c.eval.num_samples = 4
    return c
