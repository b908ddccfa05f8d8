"""Supervised warm-up on the answer format, for a policy that has never seen it.

A randomly initialised (tiny) model never writes `</think> ... \\boxed{...}`, so every sampled
reward would be 0 and GRPO would have no signal. The warm-up trains it for a few steps, by plain
next-token cross-entropy on the response only, to answer an RPT prompt with

    <think>{thought}</think>\\boxed{<the true next token>}<eos>

built from the corpus ground truth. The thought (warmup.think) is "none" (empty) or "last_line":
the context's unfinished last line restated, e.g. for "...\\n21 * 79 =" the thought is
"21 * 79 =", so the operands the next token depends on sit right before the answer. The box holds
the true next token's id itself (never re-tokenised text), so the format the model learns is one
the reward accepts. Rows whose true token contains a brace are left out of the loss (the box
would not balance).

Shapes: B rows, P prompt tokens, R = sampling.max_new_tokens response tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rpt_jax import model, objective, sharding, train_step


def _format(tokenizer) -> tuple[list[int], list[int], list[int]]:
    """Ids of the answer format around the thought and the token: '<think>', '</think>\\boxed{',
    '}' + EOS. The response continues the prompt: no SentencePiece word-start space."""
    return (tokenizer.encode_continuation("<think>"),
            tokenizer.encode_continuation("</think>\\boxed{"),
            tokenizer.encode_continuation("}") + [tokenizer.eos_id])


def response_ids(tokenizer, context_ids, true_token: int, think: str, max_len: int):
    """One warm-up response as token ids (at most max_len), or None when it cannot be built."""
    piece = tokenizer.token_bytes(int(true_token))
    if b"{" in piece or b"}" in piece or int(true_token) in tokenizer.special_ids:
        return None
    thought = ""
    if think == "last_line":
        ids, lead = [int(i) for i in context_ids], list(tokenizer.leading_ids)
        if lead and ids[:len(lead)] == lead:  # a context starts with the BOS; the text does not
            ids = ids[len(lead):]
        thought = tokenizer.decode(ids).rsplit("\n", 1)[-1]
    elif think != "none":
        raise ValueError(f"warmup.think={think!r} is not one of ('none', 'last_line')")
    head, tail, close = _format(tokenizer)
    body = tokenizer.encode_continuation(thought, allow_special=False)
    room = max_len - len(head) - len(tail) - 1 - len(close)
    if room < 0:
        return None
    body = body[len(body) - room:] if len(body) > room else body  # keep the line's end
    return head + body + tail + [int(true_token)] + close


def make_examples(batch: dict, tokenizer, think: str, max_len: int):
    """Responses for a host batch: (tokens [B, R] int32, lengths [B] int32; 0 = row left out)."""
    b = batch["prompt_tokens"].shape[0]
    tokens = np.full((b, max_len), tokenizer.pad_id, np.int32)
    lengths = np.zeros(b, np.int32)
    for i in range(b):
        ctx = batch["context_tokens"][i][batch["context_mask"][i].astype(bool)]
        ids = response_ids(tokenizer, ctx, batch["target_tokens"][i, 0], think, max_len)
        if ids is not None:
            tokens[i, :len(ids)] = ids
            lengths[i] = len(ids)
    return tokens, lengths


def make_optimizer(lr: float) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))


def slices_for(batch_size: int, rows_per_update_slice: int, split: int) -> int:
    """Micro-batches for the warm-up's batch_size rows: the fewest whose slices hold no more rows
    than a slice of the RL update (which fits), and whole rows on each of `split` devices."""
    choices = train_step.micro_batch_choices(batch_size, split)
    return next((m for m in choices if batch_size // m <= rows_per_update_slice), choices[-1])


def make_step(model_cfg: model.ModelConfig, mesh, param_shardings, tx, micro_batches: int = 1,
              logits_chunk: int = 256):
    """Jitted fn(params, opt_state, prompt_tokens, prompt_mask, tokens, lengths) ->
    (params, opt_state, loss): one cross-entropy step on the response tokens, its gradient
    summed over `micro_batches` row slices; params and optimizer state keep the training layout.
    logits_chunk: positions per LM-head chunk (rl.logits_chunk)."""
    def loss_sum(params, batch):
        logp, _ = objective.token_logprobs(params, batch, model_cfg, 1.0, chunk=logits_chunk)
        return -jnp.sum(logp * batch["loss_mask"])

    def micro(params, batch):
        loss, grads = jax.value_and_grad(loss_sum)(params, batch)
        return (jax.lax.with_sharding_constraint(grads, param_shardings), loss,
                jnp.sum(batch["loss_mask"]))

    def step(params, opt_state, prompt_tokens, prompt_mask, tokens, lengths):
        n = tokens.shape[0]
        batch = objective.make_train_batch(prompt_tokens, prompt_mask, tokens,
                                           jnp.zeros(tokens.shape, jnp.float32), lengths,
                                           jnp.ones((n,), jnp.float32), 1)
        grads, loss, count = train_step.sum_over_slices(
            lambda mb: micro(params, mb), batch, micro_batches, mesh,
            lambda a, b: jax.tree.map(jnp.add, a, b), param_shardings)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss / count

    opt_shardings = sharding.opt_state_shardings(mesh, tx, model.param_shapes(model_cfg),
                                                 param_shardings)
    jitted = jax.jit(step, donate_argnums=(0, 1),
                     out_shardings=(param_shardings, opt_shardings, sharding.replicated(mesh)))

    def run(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)
    return run


def warm_up(params, config, model_cfg: model.ModelConfig, mesh, param_shardings, tokenizer,
            batches, log_fn=None, should_stop=None):
    """Run config.warmup.steps supervised steps over `batches` (an iterator of host batches, e.g.
    contexts.ContextIterator) and return the new params, or None when should_stop() said True
    before a step (every process must give the same answer). log_fn(step, {"loss": float}) is
    called every step (the loss is fetched, a host sync: fine for a short warm-up)."""
    from rpt_jax import contexts
    steps, max_len = int(config.warmup.steps), int(config.sampling.max_new_tokens)
    shortest = sum(map(len, _format(tokenizer))) + 1  # plus the answer token
    if steps and shortest > max_len:  # every row would be left out: a warm-up that learns nothing
        raise ValueError(f"sampling.max_new_tokens={max_len} is shorter than the warm-up's "
                         f"answer format ({shortest} tokens with {tokenizer.source}'s "
                         f"vocabulary); raise it or set warmup.steps=0")
    tx = make_optimizer(float(config.warmup.lr))
    opt_state = jax.jit(tx.init, out_shardings=sharding.opt_state_shardings(
        mesh, tx, model.param_shapes(model_cfg), param_shardings))(params)
    # the update's rows per slice fit (trainer.fit_update), so the warm-up's slices hold no more
    rows = int(config.data.batch_size)
    update_rows = rows * int(config.sampling.num_samples) // max(int(config.rl.micro_batches), 1)
    slices = slices_for(rows, update_rows, mesh.shape["data"] * mesh.shape["fsdp"])
    step_fn = make_step(model_cfg, mesh, param_shardings, tx, slices,
                        int(config.rl.logits_chunk))
    for i in range(steps):
        if should_stop is not None and should_stop():
            return None
        batch = next(batches)
        tokens, lengths = make_examples(batch, tokenizer, config.warmup.think, max_len)
        g = contexts.to_global(dict(prompt_tokens=batch["prompt_tokens"],
                                    prompt_mask=batch["prompt_mask"], tokens=tokens,
                                    lengths=lengths), mesh)
        params, opt_state, loss = step_fn(params, opt_state, g["prompt_tokens"],
                                          g["prompt_mask"], g["tokens"], g["lengths"])
        if log_fn is not None:
            log_fn(i, {"loss": float(loss)})
    return params
