"""DeepSeek-R1-Distill-Qwen-1.5B: the paper's proxy model for entropy filtering, also trainable.

    python scripts/prepare_data.py --config configs/r1_distill_qwen_1_5b.py --workdir DIR \
        --config.model.hf_checkpoint=/path/to/DeepSeek-R1-Distill-Qwen-1.5B
"""
from rpt_jax.config import base_config


def get_config():
    c = base_config("r1_distill_qwen_1_5b")
    c.model.remat = "full"
    c.mesh.fsdp = -1
    c.mesh.data = 1
    c.data.corpus = "local"  # an OmniMATH export: --config.data.corpus_path=omnimath.jsonl
    c.data.batch_size = 64
    c.data.chat_template = True
    c.sampling.max_new_tokens = 4096
    c.sampling.cache_blocks = 4  # decode steps read the response cache written so far
    return c
