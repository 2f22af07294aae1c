"""Every sampler draws from the law every log-prob assumes: softmax(logits / T) (Q#: pi_ref e^{Q/eta} normalised).

At T in {0.5, 1, 1.7} and a fixed seed, N = 3000 completions of one prompt are drawn with each script's own
sampler; at two fixed states (the prompt, and the prompt followed by its most frequent first token) every token's
count must lie within 5 binomial standard deviations (+1) of N p under the law computed here from the model's
logits. Negative control: the same counts against the law with T ignored (T = 1) break the bound.
"""

import math

import pytest
import torch

from common import TINY_POLICY
from tests.harness import load_algorithm

N, PROMPT, ETA = 3000, "12+34=", 0.5
POLICY_SAMPLERS = ["grpo", "rpg_fkl", "rpg_rkl", "pmd_mean", "a_star_po", "dpo_kl", "gkd"]
SAMPLERS = POLICY_SAMPLERS + ["a_star_po:external_noise", "q_sharp:guided"]


def setup(algo, T):
    from transformers import AutoTokenizer

    args = algo.Args(max_new_tokens=2, temperature=T, gen_batch_size=N, bf16=False)
    return AutoTokenizer.from_pretrained(TINY_POLICY), algo.load_model(TINY_POLICY, args), args


def draw(sampler: str, T: float):
    """(tokens [N, 2] drawn by the script's own sampler, law(prefix) -> the probabilities it should follow)."""
    name, _, kind = sampler.partition(":")
    algo = load_algorithm(name)
    tok, model, args = setup(algo, T)
    prompt = tok(PROMPT)["input_ids"]
    eos = torch.tensor([tok.eos_token_id])

    @torch.no_grad()
    def logits(prefix):
        return model(input_ids=torch.tensor([prompt + prefix])).logits[0, -1].double()

    if kind == "guided":
        torch.manual_seed(0)
        backbone = algo.load_model(TINY_POLICY, args).base_model
        qmodel = algo.QModel(backbone, "q", 2, model.config.vocab_size)
        torch.nn.init.normal_(qmodel.head.weight, std=0.5)  # a non-trivial learned law
        args.eta, args.top_k = ETA, 0
        u = torch.rand(N, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        toks, _, _ = algo.sample(
            model, qmodel, [prompt] * N, u, "qsharp", ETA, args, torch.tensor([0.0, 1.0]), eos, tok.pad_token_id
        )

        @torch.no_grad()
        def law(prefix, temperature):
            h = backbone(input_ids=torch.tensor([prompt + prefix])).last_hidden_state[0, -1]
            log_pmf = qmodel.head(h).view(-1, 2).double().log_softmax(-1)
            q = ETA * torch.logsumexp(log_pmf + torch.tensor([0.0, 1.0], dtype=torch.float64) / ETA, -1)
            return torch.softmax(logits(prefix) / temperature + q / ETA, -1)

        return toks, law
    gen = torch.Generator().manual_seed(2)
    extra = {}
    if kind == "external_noise":  # stage 1: inverse CDF from per-prompt noise instead of a generator
        extra = {"uniforms": torch.rand(N, 2, generator=gen, dtype=torch.float64)}
        gen = None
    batch = algo.sample_batch(model, [prompt] * N, args, eos, tok.pad_token_id, gen, **extra)
    return batch["completion_ids"][:, :2], lambda prefix, temperature: torch.softmax(logits(prefix) / temperature, -1)


def within_bound(tokens: torch.Tensor, p: torch.Tensor) -> bool:
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    return bool(((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1).all())


@pytest.mark.parametrize("T", [0.5, 1.0, 1.7])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampler_law(sampler, T):
    toks, law = draw(sampler, T)
    assert toks.shape == (N, 2)
    first = toks[:, 0]
    mode = torch.bincount(first).argmax().item()
    second = toks[first == mode, 1]
    assert second.numel() > 300
    assert within_bound(first, law([], T)), "first token"
    assert within_bound(second, law([mode], T)), "second token"
    if T != 1.0:  # negative control: the law with the temperature ignored is rejected at the same seed
        assert not within_bound(first, law([], 1.0))
        assert not within_bound(second, law([mode], 1.0))


def test_bound_is_five_sigma():
    """The bound itself: a law shifted by 6 standard deviations on one token is rejected, one at 4 is not."""
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    tokens = torch.cat([torch.full((1500,), 0), torch.full((900,), 1), torch.full((600,), 2)])
    assert within_bound(tokens, p)
    sd = math.sqrt(3000 * 0.5 * 0.5)
    for shift, ok in ((4, True), (6, False)):
        k = round(shift * sd)
        moved = torch.cat([torch.full((1500 + k,), 0), torch.full((900 - k,), 1), torch.full((600,), 2)])
        assert within_bound(moved, p) == ok
