"""Train step: the on-policy gradient equals REINFORCE with a group baseline, micro-batches and
meshes give the same update, prompt and padding do not matter, bad batches are skipped, an
update that cannot fit is refused before it runs."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rpt_jax import model, objective, sharding, train_step
from rpt_jax.config import base_config

CFG = model.ModelConfig(vocab_size=64, num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2,
                        head_dim=8, mlp_dim=64, qkv_bias=True, tie_embeddings=True)
B, G, P, R = 4, 4, 6, 6
TEMPERATURE = 0.7


def make_config(mesh=(1, 1, 1), micro_batches=1, agg="token_mean", kl_coef=0.0):
    c = base_config("tiny")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.sampling.num_samples = G
    c.sampling.temperature = TEMPERATURE
    c.sampling.max_new_tokens = R
    c.rl.micro_batches = micro_batches
    c.rl.loss_agg = agg
    c.rl.kl_coef = kl_coef
    c.rl.clip_low, c.rl.clip_high = 0.2, 0.28
    c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 1e-2, 0, 0.1
    c.optim.eps = 1e-3  # keeps Adam's first step smooth in g, so 1e-5 tolerances are meaningful
    return c


def random_params(seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(("norm" in jax.tree_util.keystr(path))
                                    + rng.normal(0, 0.1, s.shape), jnp.float32),
        model.param_shapes(CFG))


def sampled(seed):
    """What the sampler and the reward hand over: prompts, samples, sampler log-probs, rewards."""
    rng = np.random.default_rng(seed)
    prompt = rng.integers(1, CFG.vocab_size, (B, P))
    pmask = np.ones((B, P), bool)
    for b, pad in enumerate([0, 2, 5, 3]):
        pmask[b, :pad] = False
        prompt[b, :pad] = 0
    samples = rng.integers(1, CFG.vocab_size, (B * G, R))
    lengths = rng.integers(1, R + 1, B * G)
    lengths[3] = 0  # a sample that stopped at once
    rewards = rng.integers(0, 2, B * G).astype(np.float32)
    rewards[4:8] = 1.0  # one group whose rewards are all equal
    logp = -rng.random((B * G, R)).astype(np.float32)
    return prompt, pmask, samples, lengths, rewards, logp


def to_batch(prompt, pmask, samples, lengths, adv, logp, keep=None):
    return objective.make_train_batch(jnp.asarray(prompt), jnp.asarray(pmask),
                                      jnp.asarray(samples), jnp.asarray(logp),
                                      jnp.asarray(lengths), jnp.asarray(adv), G, keep)


def build(config, tx=None, devices=None):
    """(step, fresh-state factory) for a config on its mesh."""
    devices = jax.devices()[:int(np.prod([config.mesh.data, config.mesh.fsdp,
                                          config.mesh.tensor]))] if devices is None else devices
    mesh = sharding.make_mesh(config, devices)
    tx = tx or train_step.make_optimizer(config.optim, config.num_steps)
    ps = sharding.param_shardings(mesh, model.logical_axes(CFG), model.param_shapes(CFG))
    shardings = train_step.state_shardings(mesh, tx, model.param_shapes(CFG), ps)
    step = train_step.make_train_step(config, CFG, mesh, shardings, tx, logits_chunk=4)
    return step, (lambda params: train_step.init_train_state(params, tx, mesh, ps)), mesh


def host(tree):
    return jax.tree.map(lambda x: np.array(x, np.float64), tree)


def assert_trees_close(a, b, rtol, atol):
    for (path, x), y in zip(jax.tree.leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def sgd_step():
    """One device, one micro-batch, token_mean, plain SGD with lr 1: new params = params - grad."""
    return build(make_config(), tx=optax.sgd(1.0))


def reference_plain_grad(params, prompt, pmask, samples, lengths, adv):
    """-grad of sum(adv * log p(response tokens)) / #tokens, each row laid out afresh: its real
    prompt tokens then its response, right padded, positions 0.. (no objective code)."""
    rows, targets = [], []
    for n in range(B * G):
        real = list(prompt[n // G][pmask[n // G]])
        resp = list(samples[n, :lengths[n]])
        rows.append(real + resp)
        targets.append([(len(real) - 1 + j, tok) for j, tok in enumerate(resp)])
    width = max(len(r) for r in rows)
    tokens = np.zeros((B * G, width), np.int32)
    seg = np.zeros((B * G, width), np.int32)
    for n, r in enumerate(rows):
        tokens[n, :len(r)] = r
        seg[n, :len(r)] = 1
    count = sum(len(t) for t in targets)
    idx = np.array([(n, i, tok) for n, t in enumerate(targets) for i, tok in t])

    def objective_value(p):
        logits = model.forward(p, jnp.asarray(tokens), CFG, segment_ids=jnp.asarray(seg))
        logq = jax.nn.log_softmax(logits / TEMPERATURE, axis=-1)
        logp = logq[idx[:, 0], idx[:, 1], idx[:, 2]]
        return -jnp.sum(jnp.asarray(adv)[idx[:, 0]] * logp) / count, logp

    grads, logp = jax.jit(jax.grad(objective_value, has_aux=True))(params)
    sampler_logp = np.zeros((B * G, R), np.float32)
    for k, (n, i, tok) in enumerate(idx):
        sampler_logp[n, i - (len(rows[n]) - lengths[n] - 1)] = logp[k]
    return grads, sampler_logp


def test_on_policy_gradient_is_reinforce_with_group_baseline(sgd_step):
    step, init, _ = sgd_step
    params = random_params(0)
    prompt, pmask, samples, lengths, rewards, _ = sampled(0)
    adv = np.asarray(objective.group_advantages(jnp.asarray(rewards), G))
    want_grad, logp = reference_plain_grad(params, prompt, pmask, samples, lengths, adv)
    before = host(params)
    state, metrics = step(init(params), to_batch(prompt, pmask, samples, lengths, adv, logp))
    got_grad = jax.tree.map(lambda old, new: old - new, before, host(state.params))
    assert_trees_close(got_grad, host(want_grad), rtol=1e-4, atol=1e-7)
    assert float(optax.tree.norm(want_grad)) > 1e-3  # not a vacuous comparison
    assert metrics["finite"] and metrics["applied"] and int(state.step) == 1
    assert metrics["logp_gap_max"] < 1e-5 and metrics["clip_frac"] == 0
    assert abs(metrics["approx_kl"]) < 1e-9
    groups = rewards.reshape(B, G)
    assert metrics["zero_adv_group_frac"] == np.mean(groups.min(1) == groups.max(1)) > 0
    assert metrics["loss_tokens"] == lengths.sum()


@pytest.mark.parametrize("mesh,micro", [((1, 1, 1), 1), ((1, 1, 1), 2), ((2, 2, 2), 2)])
def test_shared_prompt_forward_gives_the_reinforce_gradient(mesh, micro, monkeypatch):
    """rl.share_prompt: each context's prompt is computed once for its G samples (G / micro in
    a micro-batch of rows m, m + micro, ...), and the update is still the plain reference's."""
    calls = []
    shared = model.hidden_states_shared_prompt
    monkeypatch.setattr(model, "hidden_states_shared_prompt",
                        lambda *a: calls.append(a[-2:]) or shared(*a))
    config = make_config(mesh=mesh, micro_batches=micro)
    config.rl.share_prompt = True
    step, init, _ = build(config, tx=optax.sgd(1.0))
    params = random_params(0)
    prompt, pmask, samples, lengths, rewards, _ = sampled(0)
    adv = np.asarray(objective.group_advantages(jnp.asarray(rewards), G))
    want_grad, logp = reference_plain_grad(params, prompt, pmask, samples, lengths, adv)
    before = host(params)
    state, metrics = step(init(params), to_batch(prompt, pmask, samples, lengths, adv, logp),
                          prompt_len=P)
    assert calls and calls[0] == (G // micro, P)  # traced with the shared prompt
    got_grad = jax.tree.map(lambda old, new: old - new, before, host(state.params))
    assert_trees_close(got_grad, host(want_grad), rtol=1e-4, atol=1e-7)
    assert metrics["logp_gap_max"] < 1e-5 and metrics["applied"]


def test_prompt_positions_and_tail_do_not_change_the_update(sgd_step):
    step, init, _ = sgd_step
    params = random_params(1)
    prompt, pmask, samples, lengths, rewards, logp = sampled(1)
    adv = objective.group_advantages(jnp.asarray(rewards), G)
    batch = to_batch(prompt, pmask, samples, lengths, adv, logp)
    assert float(jnp.sum(batch["loss_mask"][:, :P - 1])) == 0  # the prompt never gets a loss
    state_a, m_a = step(init(params), batch)
    # Tokens after each response's end, padding inside the prompt, and old log-probs where the
    # loss mask is 0 are all changed.
    rng = np.random.default_rng(9)
    samples2 = np.where(np.arange(R)[None] < lengths[:, None], samples,
                        rng.integers(1, CFG.vocab_size, samples.shape))
    prompt2 = np.where(pmask, prompt, rng.integers(1, CFG.vocab_size, prompt.shape))
    batch2 = to_batch(prompt2, pmask, samples2, lengths, adv, logp)
    batch2["old_logprobs"] = jnp.where(batch2["loss_mask"] > 0, batch2["old_logprobs"],
                                       jnp.asarray(rng.normal(size=batch2["loss_mask"].shape),
                                                   jnp.float32))
    assert not np.array_equal(batch2["tokens"], batch["tokens"])
    state_b, m_b = step(init(params), batch2)
    assert_trees_close(host(state_b.params), host(state_a.params), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(m_b["loss"], m_a["loss"], rtol=1e-6)


def test_non_finite_batch_leaves_state_unchanged(sgd_step):
    step, init, _ = sgd_step
    prompt, pmask, samples, lengths, rewards, logp = sampled(2)
    adv = np.array(objective.group_advantages(jnp.asarray(rewards), G))
    adv[0] = np.nan
    state = init(random_params(2))
    before = host(state)
    state, metrics = step(state, to_batch(prompt, pmask, samples, lengths, adv, logp))
    assert not metrics["finite"] and not metrics["applied"]
    assert_trees_close(host(state), before, rtol=0, atol=0)
    # Every group dropped (DAPO): nothing to learn, the state stays as it was, but it is finite.
    keep = jnp.zeros(B * G, bool)
    state, metrics = step(state, to_batch(prompt, pmask, samples, lengths, np.nan_to_num(adv),
                                          logp, keep))
    assert metrics["finite"] and not metrics["applied"] and metrics["loss_tokens"] == 0
    assert_trees_close(host(state), before, rtol=0, atol=0)


@pytest.mark.parametrize("agg", objective.AGGREGATIONS)
def test_four_micro_batches_equal_one_batch(agg, sgd_step):
    prompt, pmask, samples, lengths, rewards, logp = sampled(3)
    adv = objective.group_advantages(jnp.asarray(rewards), G, "dr_grpo")
    keep = objective.group_keep_mask(jnp.asarray(rewards), G)
    batch = to_batch(prompt, pmask, samples, lengths, adv, logp, keep)
    params = random_params(3)
    one = sgd_step if agg == "token_mean" else build(make_config(agg=agg), tx=optax.sgd(1.0))
    four = build(make_config(agg=agg, micro_batches=4), tx=optax.sgd(1.0))
    (s1, m1), (s4, m4) = [fn(init(params), batch) for fn, init, _ in (one, four)]
    assert_trees_close(host(s4.params), host(s1.params), rtol=1e-5, atol=1e-7)
    assert m1["clip_frac"] > 0 and m1["grad_norm"] > 1e-3
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5, atol=1e-7, err_msg=k)


@pytest.fixture(scope="module")
def adamw_reference():
    """One device, one micro-batch, the configured AdamW: (batch, params, state after 2 steps)."""
    prompt, pmask, samples, lengths, rewards, logp = sampled(4)
    adv = objective.group_advantages(jnp.asarray(rewards), G)
    batch = to_batch(prompt, pmask, samples, lengths, adv, logp)
    step, init, _ = build(make_config())
    state = init(random_params(4))
    for _ in range(2):
        state, metrics = step(state, batch)
    return batch, host(state), host(metrics)


@pytest.mark.parametrize("mesh", [(2, 2, 2), (8, 1, 1)])
def test_eight_devices_give_the_one_device_update(mesh, adamw_reference):
    batch, want, want_metrics = adamw_reference
    step, init, m = build(make_config(mesh=mesh, micro_batches=2))
    state = init(random_params(4))
    # Optimizer moments are sharded exactly like their params, not replicated.
    adam = state.opt_state[1][0]
    for tree in (adam.mu, adam.nu):
        for p, s in zip(jax.tree.leaves(state.params), jax.tree.leaves(tree)):
            assert s.sharding.is_equivalent_to(p.sharding, p.ndim)
    assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(state.params)) \
        or mesh == (8, 1, 1)
    for _ in range(2):
        state, metrics = step(state, batch)
    assert state.opt_state[1][0].mu["layers"]["q_proj"]["kernel"].sharding.is_equivalent_to(
        state.params["layers"]["q_proj"]["kernel"].sharding, 4)
    assert_trees_close(host(state), want, rtol=1e-5, atol=1e-5)
    for k in want_metrics:
        np.testing.assert_allclose(metrics[k], want_metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_kl_to_an_identical_reference_is_zero_and_changes_nothing(sgd_step):
    prompt, pmask, samples, lengths, rewards, logp = sampled(5)
    adv = objective.group_advantages(jnp.asarray(rewards), G)
    batch = to_batch(prompt, pmask, samples, lengths, adv, logp)
    params = random_params(5)
    step_kl, init_kl, _ = build(make_config(kl_coef=0.5), tx=optax.sgd(1.0))
    with pytest.raises(ValueError, match="ref_logprobs"):
        step_kl(init_kl(params), batch)
    # The reference model is the policy itself: log-probs as the trainer computes them.
    logp_now, _ = jax.jit(objective.token_logprobs, static_argnums=(2, 3, 4))(
        params, batch, CFG, TEMPERATURE, 4)
    with_ref = dict(batch, ref_logprobs=logp_now)
    s_kl, m_kl = step_kl(init_kl(params), with_ref)
    s_plain, _ = sgd_step[0](sgd_step[1](params), batch)
    assert abs(float(m_kl["kl_ref"])) < 1e-6
    # d k3 / d logp = 1 - exp(ref - logp) = 0 at ref == logp: the update is the plain one.
    assert_trees_close(host(s_kl.params), host(s_plain.params), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("agg", objective.AGGREGATIONS)
def test_shared_prompt_update_equals_whole_rows_with_kl_and_every_aggregation(agg):
    """The shared-prompt update reads only the columns from the last prompt token on; with a KL
    term (its reference log-probs sliced alike) and each aggregation it equals the whole rows'."""
    prompt, pmask, samples, lengths, rewards, logp = sampled(6)
    adv = objective.group_advantages(jnp.asarray(rewards), G)
    rng = np.random.default_rng(6)
    batch = to_batch(prompt, pmask, samples, lengths, adv, logp)
    batch["ref_logprobs"] = batch["old_logprobs"] + jnp.asarray(
        rng.normal(0, 0.1, batch["old_logprobs"].shape), jnp.float32) * batch["loss_mask"]
    params = random_params(6)
    config = make_config(agg=agg, kl_coef=0.3)
    step, init, _ = build(config, tx=optax.sgd(1.0))
    (s_whole, m_whole), (s_shared, m_shared) = [step(init(params), batch, prompt_len=n)
                                                for n in (0, P)]
    # float32 sums in another order: ~3e-6 on updates of ~0.1
    assert_trees_close(host(s_shared.params), host(s_whole.params), rtol=1e-4, atol=1e-5)
    assert m_whole["kl_ref"] > 1e-4
    for k in m_whole:
        np.testing.assert_allclose(m_shared[k], m_whole[k], rtol=1e-4, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------- optimizer

def test_schedule_and_weight_decay_mask():
    optim = make_config().optim
    optim.warmup_steps, optim.schedule, optim.lr = 10, "cosine", 1.0
    sched = train_step.make_schedule(optim, num_steps=110)
    np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)],
                               [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    optim.schedule = "constant"
    np.testing.assert_allclose(train_step.make_schedule(optim, 110)(100), 1.0)
    # Zero gradients: AdamW moves only by weight decay, lr * wd * p, and not on norms or biases.
    optim.warmup_steps, optim.weight_decay, optim.lr = 0, 0.1, 0.5
    tx = train_step.make_optimizer(optim, 100)
    params = random_params(6)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["layers"]["q_proj"]["kernel"],
                               -0.05 * params["layers"]["q_proj"]["kernel"], rtol=1e-6)
    assert not jnp.any(updates["layers"]["q_proj"]["bias"])
    assert not jnp.any(updates["norm"]) and not jnp.any(updates["layers"]["input_layernorm"])
    # Global-norm clipping at optim.grad_clip = 1: a gradient of norm 10 is scaled to norm 1
    # before Adam (visible in Adam's first moment, (1 - b1) * g).
    optim.weight_decay = 0.0
    tx = train_step.make_optimizer(optim, 100)
    g = jax.tree.map(lambda p: jnp.full_like(p, 1.0), params)
    g = jax.tree.map(lambda x: x * 10 / optax.tree.norm(g), g)
    _, state = tx.update(g, tx.init(params), params)
    np.testing.assert_allclose(optax.tree.norm(state[1][0].mu), 1 - optim.b1, rtol=1e-5)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)


def test_memory_check_compiles_once_and_names_the_fix(caplog):
    """check_memory compiles the update for shapes alone; the first real step with those
    shapes compiles nothing more; over the limit, the error names the key and its next value."""
    step, fresh, _ = build(make_config(micro_batches=1))
    state = fresh(random_params(0))
    abstract = _abstract(state)
    shapes = objective.train_batch_shapes(B, P, R, G)
    prompt, pmask, samples, lengths, rewards, logp = sampled(1)
    batch = to_batch(prompt, pmask, samples, lengths, rewards - 0.5, logp)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == \
        jax.tree.map(lambda x: (x.shape, x.dtype), batch)

    def compiles():
        return sum("Finished XLA compilation of jit(step)" in r.getMessage()
                   for r in caplog.records)

    with jax.log_compiles(True), caplog.at_level(logging.DEBUG):
        peak = step.check_memory(abstract, shapes, P)
        assert compiles() == 1
        step(state, batch, P)
        assert compiles() == 1
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    assert peak >= state_bytes  # the state is an argument (donated, so not counted twice)
    assert step.check_memory(abstract, shapes, P, bytes_per_device=peak) == peak
    with pytest.raises(ValueError, match=r"16 rows x 12 tokens in rl.micro_batches=1 slices .* "
                                         r"needs .* GiB a device .*next valid: 2\)"):
        step.check_memory(abstract, shapes, P, bytes_per_device=peak - 1)


def test_micro_batches_lower_the_update_peak():
    """XLA's peak estimate falls with rl.micro_batches (activations of one slice at a time)."""
    peaks = []
    for micro in (1, 8):
        step, fresh, _ = build(make_config(micro_batches=micro))
        abstract = _abstract(fresh(random_params(0)))
        peaks.append(step.check_memory(abstract, objective.train_batch_shapes(16, P, 64, G), P))
    assert peaks[1] < 0.5 * peaks[0], peaks


def test_update_the_compiler_refuses_is_a_clear_error(monkeypatch):
    """A TPU compiler refuses programs over HBM: that becomes a ValueError naming the fix;
    other compiler errors pass through unchanged."""
    step, fresh, _ = build(make_config(micro_batches=2))
    abstract = _abstract(fresh(random_params(0)))
    shapes = objective.train_batch_shapes(B, P, R, G)

    def refuse(self, *args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used "
                           "99.1G of 95.7G hbm.")

    monkeypatch.setattr(jax.stages.Lowered, "compile", refuse)
    with pytest.raises(ValueError, match=r"micro_batches=2 slices .* the compiler refused it "
                                         r"\(RESOURCE_EXHAUSTED: .*next valid: 4\)"):
        step.check_memory(abstract, shapes, P)

    def broken(self, *args, **kwargs):
        raise RuntimeError("INTERNAL: something else")

    monkeypatch.setattr(jax.stages.Lowered, "compile", broken)
    with pytest.raises(RuntimeError, match="INTERNAL: something else"):
        step.check_memory(abstract, shapes, P)
