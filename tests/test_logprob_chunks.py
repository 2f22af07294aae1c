"""Issue 33: teacher-forced log-probs and entropies computed with lm_head + log-softmax per chunk of positions
(`completion_logprobs`, `--logprob_chunk_size`) equal the whole [m, C, V] log-softmax's, in the forward and the
backward, in float32 on the tiny policy, cached (prompt KV cache) and uncached (whole rows)."""

import pytest
import torch

from tests.harness import max_abs
from tests.test_prompt_cache import PROMPTS, G, setup


def whole(algo, model, batch, rows, cached):
    """The reference: the whole log-softmax, its token log-probs and entropies."""
    log_softmax = algo.completion_log_softmax(model, batch, rows, 0.7, cached)
    logprobs = algo.token_logprobs(log_softmax, batch["completion_ids"][rows])
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
