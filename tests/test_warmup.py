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


def test_sentencepiece_responses_add_no_word_start_spaces():
    """A SentencePiece vocabulary encodes each piece of the response as a continuation: the
    bytes are exactly the format the reward reads (a '▁' before '}' put the box's end off a
    token boundary)."""
    from test_tokenizer import _metaspace_tokenizer
    tok = _metaspace_tokenizer()
    true = tok.token_to_id("▁the")
    ids = warmup.response_ids(tok, tok.encode("the café"), true, "none", 64)
    assert ids[-1] == tok.eos_id
    assert b"".join(tok.token_bytes(i) for i in ids[:-1]) == b"<think></think>\\boxed{ the}"


def test_a_response_too_short_for_the_format_is_named(builtin):
    from rpt_jax.config import base_config
    config = base_config("tiny")
    config.sampling.max_new_tokens, config.warmup.steps = 4, 10
    with pytest.raises(ValueError, match="sampling.max_new_tokens=4 is shorter than the "
                                         "warm-up's answer format"):
        warmup.warm_up(None, config, None, None, None, builtin, iter(()))
