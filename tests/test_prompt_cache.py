"""The rollout machinery must be invisible in the numbers. Each distinct prompt is prefilled once and its KV cache
copied to the rows that continue it (in sampling, the reference/old log-probs and the training forward), finished
rows leave the decoding batch, and each forward is trimmed to its longest completion: the same samples, log-probs
and gradients as full [prompt; completion] rows, checked in float64 on the tiny policy with prompts of different
lengths (left padding), groups, and shuffled rows (micro-batches).
"""

import pytest
import torch

from common import TINY_POLICY
from tests.harness import SCRIPTS, load_algorithm, max_abs

CACHED = [s for s in SCRIPTS if hasattr(load_algorithm(s), "batched_logprobs")]  # prompt-cached log-probs
SAMPLERS = [s for s in SCRIPTS if hasattr(load_algorithm(s), "sample_batch")] + ["q_sharp"]
PROMPTS = ("12+34=", "5+6=", "99+99=", "7+80=")
G, H = 3, 5


def setup(name: str):
    from transformers import AutoTokenizer

    algo = load_algorithm(name)
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    args = algo.Args(max_new_tokens=H, temperature=1.0, gen_batch_size=7, micro_batch_size=5, bf16=False)
    model = algo.load_model(TINY_POLICY, args, trainable=True).double()
    prompts = [tok(p)["input_ids"] for p in PROMPTS for _ in range(G)]
    eos = torch.tensor([tok.eos_token_id])
    batch = algo.sample_batch(model, prompts, args, eos, tok.pad_token_id, torch.Generator().manual_seed(0))
    return algo, model, batch, args, tok, prompts


def reference_sample(model, prompt_rows, uniforms, eos):
    """The plainest sampler: one full forward per token over each unpadded row, inverse CDF of softmax(logits)."""
    out = []
    for p, u in zip(prompt_rows, uniforms):
        seq = list(p)
        for t in range(H):
            cdf = torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].double(), -1).cumsum(-1)
            seq.append(min(int(torch.searchsorted(cdf, u[t : t + 1])), cdf.numel() - 1))
            if seq[-1] in eos.tolist():
                break
        out.append(seq[len(p) :])
    return out


@pytest.mark.parametrize("name", SAMPLERS)
def test_compacting_sampler_draws_the_same_tokens_from_the_same_noise(name):
    """Row compaction (finished rows leave the batch) and the shared prefill change nothing: given the same noise,
    the sampler returns exactly the tokens of a plain full-forward sampler (Q#: its own sampler of pi_ref, whose
    per-sample noise makes its data independent of the world size). Negative control: other noise."""
    algo, model, _, args, tok, prompts = setup(name if name != "q_sharp" else "grpo")
    algo = load_algorithm(name)
    u = torch.rand(len(prompts), H, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eos = torch.tensor([tok.eos_token_id])
    with torch.no_grad():
        if name == "q_sharp":
            ids, mask, _ = algo.sample(model, None, prompts, u, "ref", 1.0, args, None, eos, tok.pad_token_id)
        else:
            batch = algo.sample_batch(model, prompts, args, eos, tok.pad_token_id, uniforms=u)
            ids, mask = batch["completion_ids"], batch["completion_mask"]
        want = reference_sample(model, prompts, u, eos)
        other = reference_sample(model, prompts, u.flip(0), eos)
    got = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    assert got == want and any(len(w) < H for w in want) and any(len(w) > 1 for w in want)  # rows finish early
    assert got != other


@pytest.mark.parametrize("name", CACHED)
def test_log_probs_and_gradients_equal_the_full_rows(name):
    algo, model, batch, *_ = setup(name)
    rows = torch.randperm(len(PROMPTS) * G, generator=torch.Generator().manual_seed(1))[:8]  # a shuffled micro-batch
    wrong = dict(batch, prompt_index=batch["prompt_index"].roll(G))  # negative control: rows on the wrong prompt
    out = {}
    for key, b, cached in (("shared", batch, True), ("full", batch, False), ("wrong", wrong, True)):
        model.zero_grad()
        lsm = algo.completion_log_softmax(model, b, rows, 1.0, cached)
        lp = lsm.gather(-1, b["completion_ids"][rows, : lsm.shape[1], None]).squeeze(-1)
        (lp * b["completion_mask"][rows, : lp.shape[1]]).sum().backward()
        out[key] = lsm.detach(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    longest = int(batch["completion_mask"][rows].sum(-1).max())  # trimmed to the micro-batch's longest completion
    assert out["shared"][0].shape == (8, longest, model.config.vocab_size)
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
    algo, model, batch, args, *_ = setup(name)
    whole = algo.batched_logprobs(model, batch, algo.Args(micro_batch_size=1000, bf16=False))
    assert max_abs(algo.batched_logprobs(model, batch, args), whole) < 1e-12
    with torch.no_grad():
        rows = torch.arange(len(whole))
        full = algo.completion_logprobs(model, batch, rows, 1.0, False)[0]
    assert max_abs(full * batch["completion_mask"][:, : full.shape[1]], whole[:, : full.shape[1]]) < 1e-10
