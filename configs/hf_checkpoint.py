"""RPT from any local Hugging Face Llama / Qwen2 / Qwen3 checkpoint folder, whose config.json
gives the architecture (Llama 3.x and DeepSeek-R1-Distill-Llama RoPE scaling and Qwen2.5 YaRN
included):

    python scripts/train.py --config configs/hf_checkpoint.py:/models/Llama-3.2-1B-Instruct \
        --workdir /tmp/rpt_llama --config.mesh.fsdp=4

The rest is a one-host start on CHAMP math: the paper's recipe at 32 contexts x 8 samples of up
to 1,024 + 1,024 tokens, prompts in the tokenizer's chat template when it has one, and as many
micro-batches as the update needs to fit the devices (found at start-up).
"""
import os

from rpt_jax import config as config_lib
from rpt_jax import tokenizer


def get_config(folder: str = ""):
    if not folder:
        raise ValueError("configs/hf_checkpoint.py needs the checkpoint folder: "
                         "--config configs/hf_checkpoint.py:/path/to/folder")
    c = config_lib.use_hf_checkpoint(config_lib.base_config(), folder)
    c.model.remat = "full"
    c.data.corpus = "champ"
    c.data.batch_size = 32
    c.data.max_prompt_len = 1024
    # the chat template when the folder's tokenizer config has one
    has_tokenizer = os.path.isfile(os.path.join(folder, tokenizer.TOKENIZER_JSON))
    c.data.chat_template = (has_tokenizer and
                            tokenizer.Tokenizer.from_dir(folder).chat_template is not None)
    c.sampling.prompt_buckets = (256, 512, 1024)
    c.sampling.max_new_tokens = 1024
    c.sampling.cache_blocks = 4  # decode steps read only the response blocks written so far
    c.rl.micro_batches = 0  # the fewest that fit (trainer.fit_update)
    c.num_steps = 1000
    return c
