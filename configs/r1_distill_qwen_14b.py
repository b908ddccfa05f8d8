"""The paper's run: DeepSeek-R1-Distill-Qwen-14B on OmniMATH, GRPO, 1,000 steps (arXiv 2506.08007).

256 contexts x G=8, lr 1e-6, AdamW (0.9, 0.999), wd 0.01, clip 0.2, temperature 0.8, prompt 4,096,
response 8,192, no KL, no entropy bonus, DAPO dynamic sampling from step 500. Sized for a TPU
slice, v5p-128 (64 chips, 16 hosts: mesh fsdp=16 x tensor=4 x data=rest), by compiling it for
that slice on a CPU machine (scripts/compile_aot.py, BENCHMARKS.md): XLA's estimate is 58 GiB
a chip for the sampler and 67 GiB for the update with rl.micro_batches=32, of 95 GiB (16 micro-
batches need 148 GiB). On a larger slice the data axis takes the rest: check it the same way.

    python scripts/train.py --config configs/r1_distill_qwen_14b.py --workdir /mnt/bucket/rpt14b \
        --config.model.hf_checkpoint=/path/to/DeepSeek-R1-Distill-Qwen-14B \
        --config.data.corpus_path=/path/to/omnimath.jsonl \
        --config.data.proxy_checkpoint=/path/to/DeepSeek-R1-Distill-Qwen-1.5B

The proxy scores every position's entropy for data.entropy_threshold (the paper's filter used
R1-Distill-Qwen-1.5B): run scripts/prepare_data.py with the same flags first; it scores every
position once, and the run reads those scores. The workdir is a local path on every host: a
bucket mounted there (gcsfuse) serves, a gs:// URL does not.
"""
from rpt_jax.config import base_config


def get_config():
    c = base_config("r1_distill_qwen_14b")
    c.model.remat = "full"
    c.mesh.data = -1
    c.mesh.fsdp = 16
    c.mesh.tensor = 4
    c.data.corpus = "local"  # an OmniMATH export (.jsonl): each record's problem, then solution
    c.data.text_fields = ("problem", "solution")
    c.data.batch_size = 256
    c.data.max_prompt_len = 4096
    c.data.chat_template = True
    c.data.entropy_threshold = 0.5  # the paper keeps high-entropy positions; threshold not stated
    c.sampling.num_samples = 8
    c.sampling.temperature = 0.8
    c.sampling.max_new_tokens = 8192
    c.sampling.cache_blocks = 4  # decode steps read the response cache written so far
    c.rl.micro_batches = 32  # 16 does not fit a v5p chip's 95 GiB (compile_aot.py)
    c.rl.dynamic_sampling_start = 500
    c.num_steps = 1000
    return c
