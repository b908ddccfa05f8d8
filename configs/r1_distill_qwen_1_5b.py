"""DeepSeek-R1-Distill-Qwen-1.5B: the paper's proxy model for entropy filtering, also trainable.

Sized for 8 H100s (fsdp 8) by compiling it for them on a CPU machine (scripts/compile_aot.py,
BENCHMARKS.md): XLA's estimate is 15 GiB a GPU for the sampler and 41 GiB for the update with
rl.micro_batches=16 (8: 76 GiB of 80; 1: 213 GiB).

    python scripts/prepare_data.py --config configs/r1_distill_qwen_1_5b.py --workdir DIR \
        --config.model.hf_checkpoint=/path/to/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.data.corpus_path=/path/to/omnimath.jsonl
"""
from rpt_jax.config import base_config


def get_config():
    c = base_config("r1_distill_qwen_1_5b")
    c.model.remat = "full"
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.data.corpus = "local"  # an OmniMATH export: --config.data.corpus_path=omnimath.jsonl
    c.data.text_fields = ("problem", "solution")  # its records' fields, joined
    c.data.batch_size = 64
    c.data.chat_template = True
    c.sampling.max_new_tokens = 4096
    c.sampling.cache_blocks = 4  # decode steps read the response cache written so far
    c.rl.micro_batches = 16  # 512 samples of up to 4,096 + 4,096 tokens (see above)
    return c
