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


def test_slices_hold_no_more_rows_than_an_update_slice():
    # 16 contexts; the update's slices of 16, 8 or 2 rows (G = 4: 1, 8, 32 micro-batches)
    assert warmup.slices_for(16, 64, 2) == 1
    assert warmup.slices_for(16, 8, 2) == 2
    assert warmup.slices_for(16, 2, 2) == 8
    assert warmup.slices_for(16, 1, 2) == 8  # whole rows on each device: the most there are


def test_micro_batched_step_equals_one_slice():
    """The warm-up step summed over 4 row slices on a (2, 2, 2) mesh equals the one-slice step:
    the mean cross-entropy over all response tokens."""
    import jax
    import numpy as np
    from rpt_jax import model, sharding
    from rpt_jax.config import base_config
    cfg = model.ModelConfig(vocab_size=64, num_layers=1, hidden_size=32, num_heads=4,
                            num_kv_heads=2, head_dim=8, mlp_dim=64)
    config = base_config("tiny")
    config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 2
    mesh = sharding.make_mesh(config)
    shapes = model.param_shapes(cfg)
    p_sh = sharding.param_shardings(mesh, model.logical_axes(cfg), shapes)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    prompt, mask = rng.integers(1, 64, (16, 6)), np.ones((16, 6), bool)
    mask[3, :4] = False
    tokens, lengths = rng.integers(1, 64, (16, 5)), rng.integers(0, 6, 16)
    tx = warmup.make_optimizer(1e-2)
    out = []
    for slices in (1, 4):
        p = jax.device_put(params, p_sh)
        step = warmup.make_step(cfg, mesh, p_sh, tx, slices, logits_chunk=2)
        opt = jax.jit(tx.init, out_shardings=sharding.opt_state_shardings(mesh, tx, shapes, p_sh))
        p, _, loss = step(p, opt(p), prompt, mask, tokens, lengths)
        out.append((jax.device_get(p), float(loss)))
    np.testing.assert_allclose(out[0][1], out[1][1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[0][0], out[1][0])
    assert not np.allclose(out[0][0]["norm"], params["norm"])  # the step changed the params
