"""rpt_jax.warmup: the answer-format responses, by hand."""
import pytest

from rpt_jax import tokenizer as tok_lib
from rpt_jax import warmup


@pytest.fixture(scope="module")
def builtin():
    return tok_lib.builtin_tokenizer(512)


@pytest.mark.parametrize("bos", [False, True])
def test_response_thinks_the_contexts_last_line(builtin, monkeypatch, bos):
    """The thought is the context's last line as text: a tokenizer's BOS (Llama's), with which
    every context starts, is not part of it."""
    lead = [builtin.token_to_id("<|im_start|>")] if bos else []  # a special token as BOS
    monkeypatch.setattr(type(builtin), "leading_ids", property(lambda self: tuple(lead)))
    true = builtin.encode(" =")[0]
    for text in ("12 + 30", "7 * 8 = 56.\n12 + 30"):
        ids = warmup.response_ids(builtin, lead + builtin.encode(text), true, "last_line", 64)
        assert builtin.decode(ids) == "<think>12 + 30</think>\\boxed{ =}<|endoftext|>"
    ids = warmup.response_ids(builtin, lead + builtin.encode("12 + 30"), true, "none", 64)
    assert builtin.decode(ids) == "<think></think>\\boxed{ =}<|endoftext|>"
