"""RPT on the Qwen2.5-0.5B shape (one GPU). Point model.hf_checkpoint at a local HF folder.

    python scripts/train.py --config configs/qwen2_5_0_5b.py --workdir /tmp/rpt_qwen05 \
        --config.model.hf_checkpoint=/path/to/Qwen2.5-0.5B-Instruct
"""
from rpt_jax.config import base_config


def get_config():
    c = base_config("qwen2_5_0_5b")
    c.model.remat = "dots"
    c.model.attention = "cudnn"  # fused attention on NVIDIA GPUs; use "xla" on TPU or CPU
    c.data.corpus = "champ"
    c.data.batch_size = 64
    c.data.max_prompt_len = 1024
    c.data.chat_template = True
    c.sampling.prompt_buckets = (256, 512, 1024)
    c.sampling.max_new_tokens = 2048
    c.sampling.cache_blocks = 4  # decode steps read the response cache written so far
    # the fused decode-attention kernel (GPU; "xla" on TPU or CPU): with sampling.gemm="auto"
    # (cuBLAS matmuls) 1.17x (G = 1) to 1.21x (G = 8) the einsum path's new tokens/s on an
    # H100 (BENCHMARKS.md)
    c.sampling.attention = "pallas"
    # 512 samples of up to 1,024 + 2,048 tokens: XLA's estimate for the update on one H100 is
    # 793 GiB in one slice, 74 GiB in 16, 41 GiB in 32 (scripts/compile_aot.py, BENCHMARKS.md)
    c.rl.micro_batches = 32
    c.num_steps = 1000
    return c
