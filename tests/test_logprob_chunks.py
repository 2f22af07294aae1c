"""Issue 33: teacher-forced log-probs and entropies computed with lm_head + log-softmax per chunk of positions
(`completion_logprobs`, `--logprob_chunk_size`) equal the whole [m, C, V] log-softmax's, in the forward and the
backward, in float32 on the tiny policy, cached (prompt KV cache) and uncached (whole rows)."""

import copy

import pytest
import torch

from tests.harness import load_algorithm, max_abs
from tests.test_prompt_cache import PROMPTS, G, setup


def whole(algo, model, batch, rows, cached):
    """The reference: the whole log-softmax, its token log-probs and entropies."""
    log_softmax = algo.completion_log_softmax(model, batch, rows, 0.7, cached)
    logprobs = log_softmax.gather(-1, batch["completion_ids"][rows, : log_softmax.shape[1], None]).squeeze(-1)
    entropy = -(log_softmax.exp() * log_softmax).sum(-1)
    return logprobs, entropy


def outputs_and_gradient(model, compute):
    """(log-probs, entropies, the gradient of sum(log-probs) + 0.1 sum(entropies)) of one computation."""
    model.zero_grad()
    logprobs, entropy = compute()
    (logprobs.sum() + 0.1 * entropy.sum()).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    return logprobs.detach(), entropy.detach(), gradient


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 2, 3])
def test_chunked_logprobs_and_gradients_equal_the_whole(cached, chunk_size):
    algo, model, batch, *_ = setup("grpo")
    model = model.float()
    rows = torch.arange(len(PROMPTS) * G)[::2]
    want = outputs_and_gradient(model, lambda: whole(algo, model, batch, rows, cached))
    got = outputs_and_gradient(model, lambda: algo.completion_logprobs(model, batch, rows, 0.7, cached, chunk_size))
    # float32 relative: a chunk's lm_head matmul may block the sum differently (log-probs reach -18 here)
    for g, w in zip(got, want):
        scale = max(1.0, w.abs().max().item())
        assert max_abs(g, w) < 1e-6 * scale, (max_abs(g, w), scale)
    scale = want[2].abs().max()
    # negative control: another temperature's log-probs and gradient differ
    other = outputs_and_gradient(model, lambda: algo.completion_logprobs(model, batch, rows, 1.0, cached, chunk_size))
    assert max_abs(other[0], want[0]) > 1e-3 and max_abs(other[2], want[2]) > 1e-3 * scale


def test_one_chunk_is_bit_identical():
    """A chunk longer than the completions is one chunk: no recomputation, the same bits as chunk_size 0."""
    algo, model, batch, *_ = setup("grpo")
    model = model.float()
    rows = torch.arange(len(PROMPTS) * G)
    a = outputs_and_gradient(model, lambda: algo.completion_logprobs(model, batch, rows, 0.7, True, 0))
    b = outputs_and_gradient(model, lambda: algo.completion_logprobs(model, batch, rows, 0.7, True, 999))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def whole_log_softmax_outputs(model, batch, rows, temperature, cached=True, chunk_size=0):
    """The update's inputs as computed before --logprob_chunk_size (the whole [m, C, V] log-softmax)."""
    algo = load_algorithm("grpo")
    log_softmax = algo.completion_log_softmax(model, batch, rows, temperature, cached)
    logprobs = log_softmax.gather(-1, batch["completion_ids"][rows, : log_softmax.shape[1], None]).squeeze(-1)
    return logprobs, -(log_softmax.exp() * log_softmax).sum(-1)


def one_update(algo, model, batch, args, outputs):
    """The parameters after grpo's update_policy (SGD at --learning_rate) on a copy of `model`, with these outputs."""
    model = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    algo.update_policy(model, optimizer, batch, args, 1, algo.micro_loss, outputs)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("chunk_size", [0, 999, 2])
def test_update_equals_the_update_on_the_whole_log_softmax(chunk_size):
    """grpo's update (2 iterations, 2 mini-batches, micro-batches of 3, entropy and KL terms) with chunked log-probs:
    bit-identical parameters to the whole log-softmax's when one chunk covers the completions (0, 999), 1e-6
    relative with chunks of 2 (recomputed in the backward). Negative control: another temperature differs."""
    algo, model, batch, args, *_ = setup("grpo")
    model = model.float()
    rewards = torch.rand(len(batch["completion_ids"]), generator=torch.Generator().manual_seed(3))
    batch["advantages"] = algo.group_advantages(rewards, G)
    batch["loss_mask"] = batch["completion_mask"].clone()
    args.temperature = 1.0
    batch["ref_logprobs"] = algo.batched_logprobs(model, batch, args)  # (masked: 0 on padding)
    batch["old_logprobs"] = batch["ref_logprobs"]
    args.temperature, args.beta, args.micro_batch_size = 0.7, 0.1, 3
    args.num_iterations, args.num_minibatches, args.logprob_chunk_size = 2, 2, chunk_size
    args.learning_rate = 0.05  # (SGD; the gradient clipped to norm 1)
    init = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = one_update(algo, model, batch, args, whole_log_softmax_outputs)
    got = one_update(algo, model, batch, args, algo.completion_logprobs)
    assert (want - init).abs().max() > 1e-3  # the update moved the parameters
    if chunk_size in (0, 999):
        assert torch.equal(got, want)
    else:
        assert max_abs(got, want) < 1e-6 * max(1.0, (want - init).abs().max().item())
    args.temperature = 1.0
    other = one_update(algo, model, batch, args, algo.completion_logprobs)
    assert max_abs(other, want) > 1e-4
