"""The shared prompt cache (`prefill`): each distinct prompt is encoded once and its KV cache copied to the rows
that continue it, in generation, the reference/old log-probs and the training forward. It must be invisible:
the same log-probs, gradients and samples as full [prompt; completion] rows, checked in float64 on the tiny
policy with prompts of different lengths (left padding), groups, and shuffled rows (micro-batches).
"""

import pytest
import torch

from common import TINY_POLICY
from tests.harness import SCRIPTS, load_algorithm, max_abs

CACHED = [s for s in SCRIPTS if hasattr(load_algorithm(s), "prefill")]
PROMPTS = ("12+34=", "5+6=", "99+99=", "7+80=")
G = 3


def setup(name: str, prompt_cache: bool = True):
    algo = load_algorithm(name)
    tok = algo.load_tokenizer(TINY_POLICY)
    model = algo.load_model(TINY_POLICY, "cpu", trainable=True).double()
    args = algo.Args()
    args.max_new_tokens, args.temperature, args.gen_batch_size, args.prompt_cache = 5, 1.0, 7, prompt_cache
    prompts = [tok(p)["input_ids"] for p in PROMPTS for _ in range(G)]
    batch = algo.sample_batch(model, prompts, args, torch.tensor([tok.eos_token_id]), tok.pad_token_id,
                              torch.Generator().manual_seed(0), "cpu", algo.contextlib.nullcontext)
    return algo, model, batch


@pytest.mark.parametrize("name", CACHED)
def test_generation_is_the_same_with_and_without_the_prompt_cache(name):
    _, _, shared = setup(name, prompt_cache=True)
    _, _, full = setup(name, prompt_cache=False)
    assert shared["prompt_ids"].shape[0] == len(PROMPTS)  # stored once per distinct prompt
    assert torch.equal(shared["prompt_index"], torch.arange(len(PROMPTS)).repeat_interleave(G))
    for key in ("completion_ids", "completion_mask", "input_ids", "attention_mask"):
        assert torch.equal(shared[key], full[key]), key


@pytest.mark.parametrize("name", CACHED)
def test_log_probs_and_gradients_equal_the_full_rows(name):
    algo, model, batch = setup(name)
    rows = torch.randperm(len(PROMPTS) * G, generator=torch.Generator().manual_seed(1))[:8]  # a shuffled micro-batch
    wrong = dict(batch, prompt_index=batch["prompt_index"].roll(G))  # negative control: rows on the wrong prompt
    out = {}
    for key, b, cached in (("shared", batch, True), ("full", batch, False), ("wrong", wrong, True)):
        model.zero_grad()
        lsm = algo.completion_log_softmax(model, b, rows, 1.0, cached)
        lp = algo.token_logprobs(lsm, b["completion_ids"][rows])
        (lp * b["completion_mask"][rows]).sum().backward()
        out[key] = lsm.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert out["shared"][0].shape == (8, batch["completion_ids"].shape[1], model.config.vocab_size)
    assert max_abs(out["shared"][0], out["full"][0]) < 1e-10
    assert max_abs(out["wrong"][0], out["full"][0]) > 1e-2
    # Gradients: Llama's RMSNorm computes in float32 even in a float64 model, so summing the G copies' gradient
    # before (shared) or after (full rows) a norm's backward rounds differently, at float32's relative 1e-7
    scale = out["full"][1].abs().max()
    assert max_abs(out["shared"][1], out["full"][1]) < 1e-5 * scale and scale > 1e-3
    assert max_abs(out["wrong"][1], out["full"][1]) > 1e-2 * scale

    # negative control: completion positions not offset by the prompt's length
    unshifted = dict(batch, prompt_mask=torch.zeros_like(batch["prompt_mask"]).index_fill_(1, torch.tensor([0]), 1))
    with torch.no_grad():
        assert max_abs(algo.completion_log_softmax(model, unshifted, rows, 1.0, True), out["full"][0]) > 1e-2


@pytest.mark.parametrize("name", CACHED)
def test_batched_logprobs_in_micro_batches(name):
    algo, model, batch = setup(name)
    whole = algo.batched_logprobs(model, batch, 1.0, 1000)
    assert max_abs(algo.batched_logprobs(model, batch, 1.0, 5), whole) < 1e-12
    assert max_abs(algo.batched_logprobs(model, batch, 1.0, 5, prompt_cache=False), whole) < 1e-10
