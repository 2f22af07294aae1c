"""Closed-form checks of algorithms/q_sharp.py (spec q_sharp.md section 4, Q1-Q12).

Toy: vocabulary {EOS, a, b} (EOS = 0), horizon H = 4 (31 terminal sequences), pi_ref a random softmax per prefix,
float64. Exact return laws and Q* by backward induction; a tabular "Q model" (exact atom log-probs per
(prefix, token)) is fed to the file's pure functions.
"""

import math

import pytest
import torch
from transformers import AutoTokenizer

from tests.harness import DT, ROOT, TokenTree, load_algorithm, max_abs, read_metrics, run_in_process, run_script

qs = load_algorithm("q_sharp")
TREE = TokenTree(vocab=3, max_len=4, eos=0)
ATOMS11 = torch.linspace(0, 1, 11, dtype=DT)
ATOMS2 = torch.tensor([0.0, 1.0], dtype=DT)
GRID = torch.tensor([0.0, 0.3, 0.5, 0.7, 1.0], dtype=DT)


def setup(binary=False, seed=0):
    theta_ref = TREE.random_logits(seed, scale=1.0).detach()
    g = torch.Generator().manual_seed(seed + 50)
    n = len(TREE.seq_list)
    R = (torch.rand(n, generator=g, dtype=DT) < 0.4).to(DT) if binary else GRID[torch.randint(0, 5, (n,), generator=g)]
    return theta_ref, R


def children(s):
    """(token, terminal?) for every action at state s."""
    return [(a, a == 0 or len(s) + 1 == TREE.L) for a in range(TREE.V)]


def exact_tables(theta_ref, R, eta, atoms):
    """Backward induction: Q*[s][a], the return pmf Zpmf[s][a] over `atoms`, and E[R | s, a]."""
    pi = torch.softmax(theta_ref, -1)
    seq_index = {s: i for i, s in enumerate(TREE.seq_list)}
    Q, pmf, mean = {}, {}, {}
    for s in sorted(TREE.states, key=len, reverse=True):
        si = TREE.states.index(s)
        Q[s], pmf[s], mean[s] = torch.zeros(3, dtype=DT), torch.zeros(3, len(atoms), dtype=DT), torch.zeros(3, dtype=DT)
        for a, terminal in children(s):
            if terminal:
                r = R[seq_index[s + (a,)]]
                Q[s][a], mean[s][a] = r, r
                pmf[s][a, (atoms - r).abs().argmin()] = 1.0
            else:
                nxt = s + (a,)
                p = pi[TREE.states.index(nxt)]
                Q[s][a] = eta * torch.logsumexp(torch.log(p) + Q[nxt] / eta, -1)
                pmf[s][a] = (p[:, None] * pmf[nxt]).sum(0)
                mean[s][a] = (p * mean[nxt]).sum()
        del si
    return Q, pmf, mean


def guided_tree_logits(theta_ref, offsets_by_state, temperature=1.0, top_k=0, outside="zero"):
    rows = [
        qs.guided_logits(theta_ref[i], offsets_by_state[s], temperature, top_k, outside)
        for i, s in enumerate(TREE.states)
    ]
    return torch.stack(rows)


def pi_star_seq(theta_ref, R, eta):
    lp_ref = TREE.seq_logprobs(theta_ref)
    return torch.softmax(lp_ref + R / eta, -1)


# ---- Q1, Q2 soft Q from return laws -----------------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.1, 0.5, 2.0])
def test_q1_q2_soft_q_of_the_exact_law_is_q_star(eta):
    theta_ref, R = setup()
    Q, pmf, _ = exact_tables(theta_ref, R, eta, ATOMS11)
    for s in TREE.states:
        assert max_abs(qs.soft_q(torch.log(pmf[s]), ATOMS11, eta), Q[s]) < 1e-12


@pytest.mark.parametrize("eta", [0.1, 0.5, 2.0])
def test_q2_binary_closed_form_and_bernoulli_offset(eta):
    theta_ref, R = setup(binary=True)
    Q, pmf, _ = exact_tables(theta_ref, R, eta, ATOMS2)
    p, q = torch.cat([pmf[s][:, 1] for s in TREE.states]), torch.cat([Q[s] for s in TREE.states])
    assert max_abs(eta * torch.log(1 - p + p * math.exp(1 / eta)), q) < 1e-12
    # the official code's offset from a logit f = logit(p); undefined at p in {0, 1} (leaves), so interior only
    inside = (p > 1e-9) & (p < 1 - 1e-9)
    assert inside.sum() >= 5
    f = torch.logit(p[inside])
    official = torch.log1p(torch.exp(f + 1 / eta)) - torch.log1p(torch.exp(f))
    assert max_abs(official, q[inside] / eta) < 1e-10


# ---- Q3, Q4 guided policy = pi*, KL three ways ------------------------------------------------------------------
@pytest.mark.parametrize("eta", [0.1, 0.5, 2.0])
def test_q3_q4_guided_policy_is_pi_star(eta):
    theta_ref, R = setup()
    Q, pmf, _ = exact_tables(theta_ref, R, eta, ATOMS11)
    offsets = {s: qs.soft_q(torch.log(pmf[s]), ATOMS11, eta) / eta for s in TREE.states}
    g = guided_tree_logits(theta_ref, offsets)
    assert max_abs(torch.softmax(g, -1).sum(-1), torch.ones(TREE.num_states, dtype=DT)) < 1e-12
    star = pi_star_seq(theta_ref, R, eta)
    assert max_abs(TREE.seq_logprobs(g).exp(), star) < 1e-12
    log_z = torch.logsumexp(TREE.seq_logprobs(theta_ref) + R / eta, -1)
    assert (
        abs((eta * torch.logsumexp(torch.log_softmax(theta_ref[0], -1) + Q[()] / eta, -1)) / eta - log_z) < 1e-12
    )  # V*(root) / eta = ln Z
    shifted = guided_tree_logits(theta_ref, {s: o + 3.7 * (len(s) + 1) for s, o in offsets.items()})
    assert max_abs(TREE.seq_logprobs(shifted).exp(), star) < 1e-12
    # Q4: KL three ways, the third through seq_kl along every sequence
    lp_ref = TREE.seq_logprobs(theta_ref)
    kl_seq = (star * (torch.log(star) - lp_ref)).sum()
    kl_value = (star * R).sum() / eta - log_z
    per_pos_g = g[TREE.seq_states]
    per_pos_r = theta_ref[TREE.seq_states]
    kl_chain = (star * qs.seq_kl(per_pos_g, per_pos_r, TREE.mask)).sum()
    assert abs(kl_seq - kl_value) < 1e-12 and abs(kl_seq - kl_chain) < 1e-12
    J = lambda p: (p * R).sum() - eta * (p * (torch.log(p) - lp_ref)).sum()  # noqa: E731
    assert abs(J(star) - eta * log_z) < 1e-12
    perturbed = torch.softmax(
        torch.log(star) + 0.05 * torch.randn(len(star), generator=torch.Generator().manual_seed(1), dtype=DT), -1
    )
    assert J(perturbed) < J(star) - 1e-6


# ---- Q5 roll-in invariance, Monte Carlo -------------------------------------------------------------------------
def test_q5_labels_are_unbiased_under_guided_roll_in():
    eta, E = 0.3, 400_000
    theta_ref, R = setup(binary=True, seed=3)
    Q, pmf, _ = exact_tables(theta_ref, R, eta, ATOMS2)
    g = guided_tree_logits(theta_ref, {s: Q[s] / eta for s in TREE.states})
    pi_ref, pi_g = torch.softmax(theta_ref, -1), torch.softmax(g, -1)
    nxt = torch.full((TREE.num_states, 3), -1, dtype=torch.long)
    for i, s in enumerate(TREE.states):
        for a, terminal in children(s):
            if not terminal:
                nxt[i, a] = TREE.states.index(s + (a,))
    gen = torch.Generator().manual_seed(0)

    def rollout(policy_at, keep=None, keep_upto=None):
        state = torch.zeros(E, dtype=torch.long)
        toks = torch.zeros(E, TREE.L, dtype=torch.long)
        states = torch.zeros(E, TREE.L, dtype=torch.long)
        alive = torch.ones(E, dtype=torch.bool)
        length = torch.zeros(E, dtype=torch.long)
        for t in range(TREE.L):
            probs = policy_at(t)[state]
            tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            if keep is not None:
                tok = torch.where(t <= keep_upto, keep[:, t], tok)
            tok = torch.where(alive, tok, torch.zeros_like(tok))
            toks[:, t], states[:, t] = tok, state
            length += alive.long()
            ended = (tok == 0) | (t == TREE.L - 1)
            state = torch.where(alive & ~ended, nxt[state, tok].clamp(min=0), state)
            alive = alive & ~ended
        return toks, states, length

    toks, _, L = rollout(lambda t: pi_g)
    switch = (torch.rand(E, generator=gen, dtype=DT) * L).long().clamp(max=L - 1)
    toks, states, L = rollout(lambda t: pi_ref, keep=toks, keep_upto=switch)  # tokens after the switch from pi_ref
    cmask = (torch.arange(TREE.L)[None] < L[:, None]).long()
    labels_at = qs.make_targets(cmask, switch)
    seq_index = {s: i for i, s in enumerate(TREE.seq_list)}
    reward = torch.tensor([R[seq_index[tuple(row[:n].tolist())]] for row, n in zip(toks, L)], dtype=DT)
    pair = states * 3 + toks
    count = torch.zeros(TREE.num_states * 3, dtype=DT).index_add_(
        0, pair[labels_at], torch.ones_like(reward[labels_at.nonzero()[:, 0]])
    )
    total = torch.zeros(TREE.num_states * 3, dtype=DT).index_add_(0, pair[labels_at], reward[labels_at.nonzero()[:, 0]])
    exact = torch.stack([pmf[s][:, 1] for s in TREE.states]).view(-1)
    top = count.argsort(descending=True)[:2]
    for k in top:
        p = exact[k]
        se = math.sqrt(p * (1 - p) / count[k].item())
        assert abs(total[k] / count[k] - p) < 4 * se + 1e-12


# ---- Q6 limits ------------------------------------------------------------------------------------------------------
def test_q6_small_and_large_eta_limits():
    theta_ref, R = setup(seed=4)
    pi = torch.softmax(theta_ref, -1)
    Qs, _, mean = exact_tables(theta_ref, R, 1e-3, ATOMS11)
    Ql, _, _ = exact_tables(theta_ref, R, 1e4, ATOMS11)
    seq_index = {s: i for i, s in enumerate(TREE.seq_list)}
    for s in TREE.states:
        for a, _ in children(s):
            reach = [y for y in TREE.seq_list if y[: len(s) + 1] == s + (a,)]
            best = max(R[seq_index[y]].item() for y in reach)
            p_best = sum(
                math.exp(sum(math.log(pi[TREE.states.index(y[:t]), y[t]].item()) for t in range(len(s) + 1, len(y))))
                for y in reach
                if R[seq_index[y]].item() == best
            )
            assert best + 1e-3 * math.log(p_best) - 1e-12 <= Qs[s][a].item() <= best + 1e-12
            gap = Ql[s][a].item() - mean[s][a].item()
            assert -1e-12 <= gap <= 1 / (8 * 1e4) + 1e-12


# ---- Q7 negative controls --------------------------------------------------------------------------------------------
def tv(p, q):
    return 0.5 * (p - q).abs().sum().item()


def test_q7_cd_top_k_and_ordering_differ_from_pi_star():
    eta = 0.2
    theta_ref, R = setup(binary=True, seed=5)
    Q, pmf, mean = exact_tables(theta_ref, R, eta, ATOMS2)
    star = pi_star_seq(theta_ref, R, eta)
    cd = guided_tree_logits(theta_ref, {s: qs.cd_value(torch.log(pmf[s]), ATOMS2) / eta for s in TREE.states})
    assert tv(TREE.seq_logprobs(cd).exp(), star) > 0.05
    offsets = {s: Q[s] / eta for s in TREE.states}
    topk = guided_tree_logits(theta_ref, offsets, top_k=2, outside="zero")
    assert tv(TREE.seq_logprobs(topk).exp(), star) > 0.01
    # official ordering at T = 0.8: offset added before tempering, vs ours pi_ref,T e^{Q/eta} (Q of the T-sampler)
    T = 0.8
    theta_T = theta_ref / T
    Q_T, _, _ = exact_tables(theta_T, R, eta, ATOMS2)
    ours = guided_tree_logits(theta_ref, {s: Q_T[s] / eta for s in TREE.states}, temperature=T)
    target = pi_star_seq(theta_T, R, eta)
    assert max_abs(TREE.seq_logprobs(ours).exp(), target) < 1e-12
    official = torch.stack([(theta_ref[i] + Q_T[s] / eta) / T for i, s in enumerate(TREE.states)])
    assert tv(TREE.seq_logprobs(official).exp(), target) > 0.01


# ---- Q8, Q9, Q10 heads, binning, targets -----------------------------------------------------------------------------
def test_q8_two_atoms_are_the_bce_head():
    f = torch.linspace(-3, 3, 7, dtype=DT, requires_grad=True)
    logits = torch.stack([torch.zeros_like(f), f], -1)
    assert max_abs(torch.softmax(logits, -1)[:, 1], torch.sigmoid(f)) < 1e-15
    y = torch.tensor([0, 1, 1, 0, 1, 0, 1])
    ours = qs.dist_loss(torch.log_softmax(logits, -1).unsqueeze(1), y, torch.ones(7, 1), 7)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(f, y.to(DT))
    assert abs(ours - bce) < 1e-12
    freq = 0.3  # gradient 0 exactly at the empirical success frequency
    g = torch.tensor(math.log(freq / (1 - freq)), dtype=DT, requires_grad=True)
    lg = torch.log_softmax(torch.stack([torch.zeros_like(g), g]), -1).view(1, 1, 2).expand(10, 1, 2)
    labels = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    loss = qs.dist_loss(lg, labels, torch.ones(10, 1), 10)
    assert abs(torch.autograd.grad(loss, g)[0].item()) < 1e-12


def test_q9_binning():
    atoms = torch.linspace(0, 1, 11, dtype=DT)
    idx, clamped = qs.atom_bin(torch.tensor([0.0, 0.3, 0.7, 1.0], dtype=DT), atoms)
    assert idx.tolist() == [0, 3, 7, 10] and not clamped.any()
    five = torch.linspace(0, 1, 5, dtype=DT)
    assert qs.atom_bin(torch.tensor([0.375], dtype=DT), five)[0].item() == 1  # tie -> lower atom (0.25)
    assert round(0.375 * 4) / 4 == 0.5  # negative control: the official round-half-to-even picks 0.5
    sym = torch.linspace(-1, 1, 5, dtype=DT)
    idx, clamped = qs.atom_bin(torch.tensor([-1.0, -0.4, 2.0], dtype=DT), sym)
    assert idx.tolist() == [0, 1, 4] and clamped.tolist() == [False, False, True]
    r = torch.tensor(0.33, dtype=DT)  # off-grid: Q moves by at most half the atom spacing
    binned = atoms[qs.atom_bin(r.view(1), atoms)[0]]
    for eta in (0.1, 1.0):
        exact = qs.soft_q(torch.tensor([0.0], dtype=DT), r.view(1), eta)
        approx = qs.soft_q(torch.tensor([0.0], dtype=DT), binned, eta)
        assert abs(exact - approx) <= 0.05 + 1e-12


def test_q10_targets():
    cmask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    switch = torch.tensor([1, 3, 0])
    t = qs.make_targets(cmask, switch)
    assert t.tolist() == [[False, True, True, False], [False, False, False, True], [True, False, False, False]]
    only = qs.make_targets(cmask, switch, only_switch=True)
    assert only.sum(-1).tolist() == [1, 1, 1] and only[0, 1] and only[1, 3] and only[2, 0]


# ---- exact maximum likelihood: every label weighs the same ------------------------------------------------------
def collection(theta_ref, reroll=True):
    """Every outcome of one collection from pi_ref, exactly (the TokenTree's EOS ends sequences at any depth): a
    response y' ~ pi_ref, the switch c ~ Unif{0..|y'|-1}, y'_0..y'_c kept and the rest re-sampled from pi_ref (as
    `collect` does in every round; reroll=False: y' kept whole). Returns (probability, final sequence, c) of each."""
    lp, tok_lp = TREE.seq_logprobs(theta_ref), TREE.token_logprobs(theta_ref)
    prob, seq, switch = [], [], []
    for i, first in enumerate(TREE.seq_list):
        for c in range(len(first)):
            for k, y in enumerate(TREE.seq_list):
                if y[: c + 1] == first[: c + 1] and (reroll or k == i):
                    prob.append(lp[i].exp() / len(first) * (tok_lp[k, c + 1 :].sum().exp() if reroll else 1))
                    seq.append(k)
                    switch.append(c)
    return torch.stack(prob), torch.tensor(seq), torch.tensor(switch)


def fitted_law(theta_ref, R, weighting, reroll=True):
    """argmin over tabular return laws p(. | s, a) of the EXPECTED `dist_loss` of one collection: the loss is
    -sum_z m(s, a, z) log p(z | s, a) with m the expected label mass that dist_loss puts on (s, a, z) (its gradient
    w.r.t. a table of log-pmfs), minimised by p = m / sum_z m (Gibbs' inequality)."""
    prob, k, c = collection(theta_ref, reroll)
    table = torch.zeros(TREE.num_states, TREE.V, len(ATOMS11), dtype=DT, requires_grad=True)
    log_pmf = table[TREE.seq_states[k], TREE.tokens[k]] * prob[:, None, None]  # each outcome weighted by its prob
    loss = qs.dist_loss(log_pmf, qs.atom_bin(R[k], ATOMS11)[0], qs.make_targets(TREE.mask[k], c), 1, 1, weighting)
    mass = -torch.autograd.grad(loss, table)[0]
    return mass / mass.sum(-1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1])
def test_label_weighting_is_the_exact_maximum_likelihood(seed):
    theta_ref, R = setup(seed=seed)
    theta_ref = theta_ref.detach()
    _, pmf, _ = exact_tables(theta_ref, R, 1.0, ATOMS11)
    exact = torch.stack([pmf[s] for s in TREE.states])  # pi_ref's return law at every (state, token)
    assert max_abs(fitted_law(theta_ref, R, "labels"), exact) < 1e-12  # the default
    # negative controls: the official per-sequence weights 1/|T_i| (|T_i| depends on the continuation's length);
    # and keeping round 1's own tokens after the switch (c uniform over that sequence's own length)
    assert max_abs(fitted_law(theta_ref, R, "sequences"), exact) > 1e-3
    assert max_abs(fitted_law(theta_ref, R, "labels", reroll=False), exact) > 1e-3


@pytest.mark.parametrize("weighting", ["labels", "sequences"])
def test_q_model_step_is_independent_of_micro_batching(weighting, monkeypatch):
    """One Q-model step (SGD, lr 1) on 8 sequences of different label counts: one micro-batch or three give the same
    update, since the step's label count is counted before any loss is formed. Negative control: each micro-batch
    normalised by its own label count."""
    from types import SimpleNamespace

    from common import TINY_POLICY

    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "5+6=", "99+99=")]
    completions = [[17, 18, 19][: 1 + i % 3] + [tok.eos_token_id] for i in range(8)]  # 2 to 4 tokens
    examples = [
        dict(prompt_id=i % 3, completion=c, switch=i % 2, reward=float(i % 2)) for i, c in enumerate(completions)
    ]
    kw = dict(q_batch_size=8, learning_rate=1.0, max_grad_norm=0.0, bf16=False, q_loss_weighting=weighting)

    def step(micro_batch_size):
        args = qs.Args(micro_batch_size=micro_batch_size, **kw)
        run = SimpleNamespace(args=args, rank=0, world=1, train_prompts=prompts, tokenizer=tok)
        q = tiny_q("q").double().train()
        qs.train_q_epoch(
            q, torch.optim.SGD(q.parameters(), lr=1.0), examples, run, ATOMS2, torch.tensor([tok.eos_token_id]), seed=0
        )
        return q.head.weight.detach().clone()

    whole = step(8)
    assert max_abs(step(3), whole) < 1e-12
    if weighting == "labels":
        real = qs.dist_loss

        def local_counts(log_pmf, bins, mask, num_seqs, num_labels=None, weighting="labels"):
            return real(log_pmf, bins, mask, num_seqs, None, weighting)  # each micro-batch's own count

        monkeypatch.setattr(qs, "dist_loss", local_counts)
        assert max_abs(step(3), whole) > 1e-4


# ---- Q11 the tiny model: cached V-type scoring, both heads through the sampler ------------------------------------
def tiny_q(head):
    from common import TINY_POLICY

    torch.manual_seed(0)
    bb = qs.load_model(TINY_POLICY, qs.Args()).base_model
    q = qs.QModel(bb, head, 2, 101)
    torch.nn.init.normal_(q.head.weight, std=0.5)
    return q.eval()


def test_q11_cached_candidate_scoring_equals_recomputation():
    from transformers import DynamicCache

    from common import TINY_POLICY

    q = tiny_q("v")
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "5+6=")]
    b = qs.make_batch(prompts, None, torch.tensor([tok.eos_token_id]), tok.pad_token_id)
    ids, attn = b["prompt_ids"], b["prompt_mask"]
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    with torch.no_grad():
        q.hidden(ids, attn, pos, cache=cache)
        cached = qs.score_candidates(q, cache, attn, pos[:, -1:], chunk=1)
        for b in range(2):
            full = torch.cat([ids[b : b + 1].repeat(101, 1), torch.arange(101)[:, None]], 1)
            a = torch.cat([attn[b : b + 1].repeat(101, 1), torch.ones(101, 1, dtype=torch.long)], 1)
            direct = q(full, a, (a.cumsum(-1) - 1).clamp(min=0))[:, -1]
            assert torch.allclose(cached[b], direct, rtol=1e-5, atol=1e-5)  # float32, other batch shapes
        again = qs.score_candidates(q, cache, attn, pos[:, -1:], chunk=1)  # the prefix cache was not touched
        pairs = qs.score_candidates(q, cache, attn, pos[:, -1:], chunk=2)  # two rows per forward
    assert torch.equal(cached, again)
    assert torch.allclose(pairs, cached, rtol=1e-5, atol=1e-5)  # float32, another batch shape


def test_q11_both_heads_give_the_same_guided_policy_for_the_same_pmfs():
    """A Q-type head whose output is, by construction, the V-type pmfs of the first state: the sampler must
    produce the same first tokens and KL from either head."""
    from common import TINY_POLICY

    v = tiny_q("v")
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    ref = qs.load_model(TINY_POLICY, qs.Args())
    prompts = [tok("12+34=")["input_ids"]] * 64
    from transformers import DynamicCache

    ids = torch.tensor(prompts[:1])
    attn, pos = torch.ones_like(ids), torch.arange(ids.shape[1])[None]
    cache = DynamicCache()
    with torch.no_grad():
        v.hidden(ids, attn, pos, cache=cache)
        pmf = qs.score_candidates(v, cache, attn, pos[:, -1:], chunk=1)[0]  # [V, A]
    q = tiny_q("q")
    with torch.no_grad():
        q.head.weight.zero_()
        q.head.bias.copy_(pmf.reshape(-1))  # log_softmax of log-probs is the same log-probs
    args = qs.Args(max_new_tokens=1, max_prompt_length=16, score_batch_size=8, bf16=False)
    atoms = torch.tensor([0.0, 1.0])
    u = torch.rand(64, 1, generator=torch.Generator().manual_seed(0), dtype=DT)
    eos = torch.tensor([tok.eos_token_id])
    fixed = dict(args=args, atoms=atoms, eos=eos, pad=tok.pad_token_id)  # the sampler's fixed context
    out_v = qs.sample(ref, v, prompts, u, "qsharp", 0.1, **fixed)
    out_q = qs.sample(ref, q, prompts, u, "qsharp", 0.1, **fixed)
    assert torch.equal(out_v[0], out_q[0]) and max_abs(out_v[2], out_q[2]) < 1e-5
    plain = qs.sample(ref, None, prompts, u, "ref", 0.1, **fixed)
    assert plain[2].abs().max() == 0 and out_v[2].min() > 0  # guidance moved away from pi_ref, with a KL cost


# ---- Q12 the script: one round on 1 and 2 ranks collects the same data ------------------------------------------------
def test_q12_dataset_is_independent_of_world_size(tmp_path, capsys):
    import json

    from tests.harness import tiny_flags

    # 9 eval prompts x 2 samples in chunks of 4 rows: rank 0 runs 3 chunks, rank 1 two (the Q model must stay
    # gathered across chunks: one all-gather per chunk left rank 0 waiting for rank 1)
    flags = [*tiny_flags("q_sharp"), "--output_dir", str(tmp_path), "--eval_num_prompts", "9", "--gen_batch_size", "4"]
    code, err = run_in_process("q_sharp", [*flags, "--run_name", "one"], capsys)
    assert code == 0, err[-3000:]
    two = run_script("q_sharp", *flags, "--run_name", "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    evals = [[r for r in read_metrics(tmp_path / n) if "eval/pass@1" in r] for n in ("one", "two")]
    assert [r["eval/pass@1"] for r in evals[0]] == [r["eval/pass@1"] for r in evals[1]] and len(evals[0]) == 2
    read = lambda p: sorted(json.dumps(x, sort_keys=True) for x in torch.load(p, weights_only=False)["examples"])  # noqa: E731
    assert read(tmp_path / "one" / "final" / "trainer_state.pt") == read(
        tmp_path / "two" / "final" / "trainer_state.pt"
    )
    assert ROOT


# ---- sampling from a finished run -------------------------------------------------------------------------------
def test_sample_from_a_run_reproduces_its_final_eval(tmp_path, capsys):
    """`--sample_from RUN --eta` (the run's eta and seed) draws exactly the samples of the run's final eval: its
    completions, pass@1 and mean exact KL. A --prompts_file of the same held-out prompts gives the same samples,
    reward None where a row has no answer. Negative control: another --seed draws other samples."""
    import json

    from common.tasks import arithmetic_task
    from tests.harness import tiny_flags

    flags = [*tiny_flags("q_sharp"), "--output_dir", str(tmp_path), "--run_name", "r", "--log_completions", "16"]
    code, err = run_in_process("q_sharp", flags, capsys)
    assert code == 0, err[-3000:]
    run = tmp_path / "r"

    def read(path):
        return [json.loads(line) for line in open(path)]

    def sample_run(*flags):
        code, err = run_in_process("q_sharp", ["--sample_from", str(run), *flags], capsys)
        assert code == 0, err[-3000:]

    sample_run("--eta", "0.1")
    rows, last = read(run / "samples_eta0.1.jsonl"), read_metrics(run)[-1]
    logged = [r for r in read(run / "completions.jsonl") if r["step"] == last["step"]]
    assert [r["completion"] for r in rows] == [r["completion"] for r in logged] and len(rows) == 16
    assert sum(r["reward"] >= 1 for r in rows) / len(rows) == last["eval/pass@1"]
    assert abs(sum(r["kl"] for r in rows) / len(rows) - last["eval/kl_init_rkl_exact_seq"]) < 1e-9
    assert min(min(r["token_kl"]) for r in rows) >= 0 and max(len(r["token_kl"]) for r in rows) <= 4  # per token
    prompts = [{"prompt": e.prompt} | ({"answer": e.answer} if i else {}) for i, e in enumerate(arithmetic_task().eval)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts[:8]))
    sample_run("--prompts_file", str(tmp_path / "prompts.jsonl"), "--samples_out", str(tmp_path / "file.jsonl"))
    from_file = read(tmp_path / "file.jsonl")
    assert [r["completion"] for r in from_file] == [r["completion"] for r in rows]
    assert [r["reward"] for r in from_file] == [None, None] + [r["reward"] for r in rows[2:]]
    sample_run("--seed", "2", "--samples_out", str(tmp_path / "seed2.jsonl"))
    assert [r["completion"] for r in read(tmp_path / "seed2.jsonl")] != [r["completion"] for r in rows]


# ---- the frontier comparison the script logs ------------------------------------------------------------------------
def test_kl_at_equal_reward_interpolates_the_pareto_front():
    front = [(0.3, 0.0), (0.5, 1.0), (0.7, 3.0), (0.6, 8.0)]  # the last point is dominated (more KL, less pass@1)
    assert qs.kl_at_equal_reward(front, 0.4) == pytest.approx(0.5)
    assert qs.kl_at_equal_reward(front, 0.65) == pytest.approx(2.5)  # between (0.5, 1) and (0.7, 3), not (0.6, 8)
    assert math.isnan(qs.kl_at_equal_reward(front, 0.75)) and math.isnan(qs.kl_at_equal_reward(front, 0.2))
    # negative control: interpolating the raw eta-ordered points through the dominated one gives another answer
    assert abs(qs.kl_at_equal_reward(front, 0.65) - (3.0 + (8.0 - 3.0) * (0.65 - 0.7) / (0.6 - 0.7))) > 1
