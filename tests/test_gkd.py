"""Closed-form checks of algorithms/gkd.py (spec gkd.md section 4, G1-G9; G10 in tests/test_distributed.py).

Float64 categoricals (V = 4..8) and the vocabulary-3 token tree; every divergence is the file's own `divergence` /
`gkd_loss`, every reference is written out independently here, and each check has a negative control.
"""

import math
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from tests.harness import DT, TokenTree, grad, kl, load_algorithm, max_abs, one_line_error, random_logits, run_script

gkd = load_algorithm("gkd")
TOL, GAP = 1e-10, 1e-3
KINDS = ["fkl", "rkl", "jsd", "skl", "srkl", "tv", "akl"]


def div(a, z, kind, T=1.0, beta=0.5, alpha=0.1, mu=0.5):
    return gkd.divergence(a, z, kind, beta=beta, skew_alpha=alpha, akl_mu=mu, temperature=T)


def pair(seed, V=6, rows=5, scale=1.5):
    """Teacher logits a (no grad) and student logits z (grad), [rows, V]."""
    return random_logits((rows, V), seed, scale, requires_grad=False), random_logits((rows, V), seed + 1000, scale)


def binary_entropy(b):
    return -b * math.log(b) - (1 - b) * math.log(1 - b)


def head_by_hand(t_row, mu):
    """AKL head of one teacher row, written as a plain loop over the tokens in decreasing teacher probability."""
    order = sorted(range(len(t_row)), key=lambda k: -t_row[k])
    head, mass = set(), 0.0
    for k in order:
        if mass >= mu:
            break
        head.add(k)
        mass += t_row[k]
    return head


# ---- G1 JSD(beta) bounds and symmetry -----------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_g1_jsd_bounds(beta):
    a, z = pair(1, rows=20)
    d = div(a, z.detach(), "jsd", beta=beta)
    assert (d > 0).all() and (d <= binary_entropy(beta)).all()
    assert div(a, a, "jsd", beta=beta).abs().max() < 1e-15  # 0 iff equal
    # nearly disjoint supports approach the bound H_b(beta) (so the bound is not, e.g., log 2 for every beta)
    big = torch.eye(4, dtype=DT) * 60.0
    d_far = div(big[:2], big[2:], "jsd", beta=beta)
    assert (binary_entropy(beta) - d_far).abs().max() < 1e-6
    if beta != 0.5:
        assert abs(binary_entropy(beta) - math.log(2)) > GAP  # negative control: log 2 is the wrong bound here


def test_g1_jsd_symmetric_only_at_one_half():
    a, z = pair(2)
    z = z.detach()
    assert max_abs(div(a, z, "jsd", beta=0.5), div(z, a, "jsd", beta=0.5)) < TOL
    assert max_abs(div(a, z, "jsd", beta=0.1), div(z, a, "jsd", beta=0.1)) > GAP  # negative control
    # JSD(beta)(t, s) = JSD(1 - beta)(s, t): the weights and the mixture swap together
    assert max_abs(div(a, z, "jsd", beta=0.1), div(z, a, "jsd", beta=0.9)) < TOL


# ---- G2 limits and end points --------------------------------------------------------------------------------
def test_g2_jsd_limits_are_fkl_and_rkl():
    a, z = pair(3, scale=1.0)
    z = z.detach()
    fkl, rkl = div(a, z, "fkl"), div(a, z, "rkl")
    eps = 1e-7
    assert max_abs(div(a, z, "jsd", beta=eps) / eps, fkl) < 1e-6
    assert max_abs(div(a, z, "jsd", beta=1 - eps) / eps, rkl) < 1e-6
    # the end-point branches are the exact KLs (TRL's convention) ...
    assert torch.equal(div(a, z, "jsd", beta=0.0), fkl) and torch.equal(div(a, z, "jsd", beta=1.0), rkl)
    # ... which is discontinuous in magnitude: next to the end points the raw formula is ~beta * fkl ~ 0
    assert max_abs(div(a, z, "jsd", beta=eps), fkl) > GAP and max_abs(div(a, z, "jsd", beta=1 - eps), rkl) > GAP
    # negative control for the direction: JSD(beta)/beta does not approach the reverse KL
    assert max_abs(div(a, z, "jsd", beta=eps) / eps, rkl) > GAP


# ---- G3 gradients w.r.t. the student logits ------------------------------------------------------------------
def closed_form_grad(kind, a, z, T, beta=0.5, alpha=0.1, mu=0.5):
    """d D / d z for each row, written from the spec's formulas (s = softmax(z/T), t = softmax(a/T))."""
    t, s = torch.softmax(a / T, -1), torch.softmax(z.detach() / T, -1)

    def centred(g):  # the softmax Jacobian applied to g
        return s * (g - (s * g).sum(-1, keepdim=True))

    rkl = (s * (s / t).log()).sum(-1, keepdim=True)
    if kind == "fkl":
        g = s - t
    elif kind == "rkl":
        g = s * ((s / t).log() - rkl)
    elif kind == "jsd":
        m = beta * t + (1 - beta) * s
        g = (1 - beta) * s * ((s / m).log() - (s * (s / m).log()).sum(-1, keepdim=True))
    elif kind == "skl":
        m = alpha * t + (1 - alpha) * s
        g = (1 - alpha) * s * ((s * t / m).sum(-1, keepdim=True) - t / m)
    elif kind == "srkl":
        m = (1 - alpha) * t + alpha * s
        g = centred((s / m).log() + 1 - alpha * s / m)
    elif kind == "tv":
        g = centred(0.5 * torch.sign(s - t))
    elif kind == "akl":
        w_head = torch.zeros(t.shape[0], 1, dtype=DT)
        for i in range(t.shape[0]):
            head = head_by_hand(t[i].tolist(), mu)
            gap = (t[i] - s[i]).abs()
            g_head = sum(gap[k] for k in head)
            w_head[i] = g_head / gap.sum()
        g = w_head * (s - t) + (1 - w_head) * s * ((s / t).log() - rkl)
    return g / T


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("kind", KINDS)
def test_g3_gradient_matches_closed_form(kind, T):
    a, z = pair(4, V=7)
    beta = 0.3 if kind == "jsd" else 0.5  # an asymmetric beta, so a swapped weight would show
    g = grad(div(a, z, kind, T=T, beta=beta).sum(), z)
    expected = closed_form_grad(kind, a, z, T, beta=beta)
    assert max_abs(g, expected) < TOL
    assert g.sum(-1).abs().max() < 1e-12  # softmax: every row sums to 0
    if T != 1.0:
        assert max_abs(g, expected * T) > GAP  # negative control: the gradient without the 1/T factor


def test_g3_negative_control_directions_differ():
    a, z = pair(5)
    g_f, g_r = grad(div(a, z, "fkl").sum(), z), grad(div(a, z, "rkl").sum(), z)
    assert max_abs(g_f, g_r) > GAP
    assert max_abs(g_f, closed_form_grad("rkl", a, z, 1.0)) > GAP


def test_g3_akl_weights_are_detached():
    """With the weights back-propagated the gradient would differ: compute that version by hand and compare."""
    a, z = pair(6)
    ours = grad(div(a, z, "akl").sum(), z)
    t, s = torch.softmax(a, -1), torch.softmax(z, -1)
    head = gkd.akl_head_mask(t, 0.5).to(DT)
    g_h, g_t = ((t - s).abs() * head).sum(-1), ((t - s).abs() * (1 - head)).sum(-1)
    attached = (g_h * kl(t.log(), s.log()) + g_t * kl(s.log(), t.log())) / (g_h + g_t)
    assert max_abs(grad(attached.sum(), z), ours) > GAP


# ---- G4 direction pinning against torch's kl_div --------------------------------------------------------------
def test_g4_fkl_is_kl_teacher_student_and_kl_div_argument_order():
    a, z = pair(7)
    z = z.detach()
    lt, ls = torch.log_softmax(a, -1), torch.log_softmax(z, -1)
    hand = (lt.exp() * (lt - ls)).sum(-1)
    ours_f, ours_r = div(a, z, "fkl"), div(a, z, "rkl")
    assert max_abs(ours_f, hand) < TOL
    torch_f = torch.stack([F.kl_div(ls[i], lt[i], reduction="sum", log_target=True) for i in range(5)])
    torch_swapped = torch.stack([F.kl_div(lt[i], ls[i], reduction="sum", log_target=True) for i in range(5)])
    assert max_abs(ours_f, torch_f) < TOL
    assert max_abs(ours_r, torch_swapped) < TOL  # swapped arguments give the OTHER direction ...
    assert max_abs(ours_f, torch_swapped) > GAP  # ... negative control: not the forward KL


# ---- G5 AKL head mask -------------------------------------------------------------------------------------
T5 = torch.tensor([0.1, 0.6, 0.05, 0.25], dtype=DT)
S5 = torch.tensor([0.4, 0.2, 0.3, 0.1], dtype=DT)


def test_g5_akl_hand_example():
    head = gkd.akl_head_mask(T5, 0.5)
    assert head.tolist() == [False, True, False, False]
    a, z = T5.log(), S5.log()
    assert abs(div(a, z, "fkl").item() - 0.6600226) < 1e-7 and abs(div(a, z, "rkl").item() - 0.7806941) < 1e-7
    assert abs(div(a, z, "akl", mu=0.5).item() - 0.7368135) < 1e-7
    # negative control: the mask built in sorted order [1, 0, 0, 0] but applied to the unsorted gap vector
    gap = (T5 - S5).abs()
    sorted_mask = torch.tensor([1.0, 0, 0, 0], dtype=DT)
    g_h, g_t = (gap * sorted_mask).sum(), (gap * (1 - sorted_mask)).sum()
    buggy = (g_h * div(a, z, "fkl") + g_t * div(a, z, "rkl")) / (g_h + g_t)
    assert abs(buggy.item() - 0.7477837) < 1e-7 and abs(buggy.item() - 0.7368135) > GAP


def test_g5_akl_head_mask_on_random_rows_and_the_crossing_token():
    t = torch.softmax(random_logits((50, 8), 8, 2.0, requires_grad=False), -1)
    for mu in (0.1, 0.5, 0.9):
        mask = gkd.akl_head_mask(t, mu)
        for i in range(50):
            assert {k for k in range(8) if mask[i, k]} == head_by_hand(t[i].tolist(), mu)
    # the head reaches mu exactly with the crossing token included, and not more
    assert gkd.akl_head_mask(torch.tensor([0.2, 0.5, 0.3], dtype=DT), 0.5).tolist() == [False, True, False]
    assert gkd.akl_head_mask(torch.tensor([0.2, 0.45, 0.35], dtype=DT), 0.5).tolist() == [False, True, True]


def test_g5_akl_crossing_token_is_in_the_head():
    """t sorted: 0.35 (token 2), 0.30 (token 0), ...; cumulative 0.35, 0.65: token 0 crosses mu = 0.5 and is in our
    head. Negative control: the released AKL code's rule (cumulative mass <= mu, the top token forced in) has
    head {2} and another AKL value."""
    t, s = torch.tensor([0.30, 0.10, 0.35, 0.25], dtype=DT), torch.tensor([0.6, 0.05, 0.3, 0.05], dtype=DT)
    a, z = t.log(), s.log()
    assert gkd.akl_head_mask(t, 0.5).tolist() == [True, False, True, False]
    assert abs(div(a, z, "akl", mu=0.5).item() - 0.2913624) < 1e-7
    gap, released = (t - s).abs(), torch.tensor([0.0, 0, 1, 0], dtype=DT)  # only 0.35 has cumulative mass <= 0.5
    other = ((gap * released).sum() * div(a, z, "fkl") + (gap * (1 - released)).sum() * div(a, z, "rkl")) / gap.sum()
    assert abs(other.item() - 0.2597779) < 1e-7 and abs(other.item() - 0.2913624) > GAP


def test_g5_akl_is_zero_at_equality():
    a = random_logits((3, 5), 9, requires_grad=False)
    z = a.clone().requires_grad_(True)
    d = div(a, z, "akl")
    assert d.abs().max() < 1e-15 and grad(d.sum(), z).abs().max() < 1e-15


# ---- G6 masked reduction, ranks and chunks -------------------------------------------------------------------
def ragged(seed=10, B=4, C=5, V=6):
    a = random_logits((B, C, V), seed, 1.5, requires_grad=False)
    z = random_logits((B, C, V), seed + 1, 1.5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=DT)
    return a, z, mask


def loss_of(a, z, mask, n, kind="jsd", beta=0.5, chunk_size=0, ids=None):
    """gkd_loss of teacher logits a and student logits z at T = 1 (ids: the batch tokens, for the log-prob stat)."""
    ids = torch.zeros(mask.shape, dtype=torch.long) if ids is None else ids
    log_t, log_s = torch.log_softmax(a, -1), torch.log_softmax(z, -1)
    return gkd.gkd_loss(log_t, log_s, mask, ids, n, divergence=kind, beta=beta, divergence_chunk_size=chunk_size)


def test_g6_masked_token_mean():
    a, z, mask = ragged()
    n = int(mask.sum())
    ids = torch.randint(0, 6, mask.shape, generator=torch.Generator().manual_seed(0))
    loss, stats = loss_of(a, z, mask, n, ids=ids)
    d = div(a, z, "jsd")
    assert abs(loss - d[mask.bool()].mean()) < TOL
    # positions outside the mask contribute nothing: garbage there changes neither the loss nor the gradient
    a2, z2 = a.clone(), z.detach().clone()
    k = int((mask == 0).sum())
    a2[mask == 0] = random_logits((k, 6), 20, 10.0, requires_grad=False)
    z2[mask == 0] = random_logits((k, 6), 21, 10.0, requires_grad=False)
    z2.requires_grad_(True)
    loss2, _ = loss_of(a2, z2, mask, n)
    assert abs(loss2 - loss) < TOL
    g = grad(loss2, z2)
    assert g[mask == 0].abs().max() == 0 and max_abs(g[mask == 1], grad(loss, z)[mask == 1]) < TOL
    # the logged metrics are token means of the exact quantities
    lt, ls = torch.log_softmax(a, -1), torch.log_softmax(z.detach(), -1)
    assert abs(stats["kl_teacher_fkl_exact"] - kl(lt, ls)[mask.bool()].mean()) < TOL
    assert abs(stats["kl_teacher_rkl_exact"] - kl(ls, lt)[mask.bool()].mean()) < TOL
    assert abs(stats["entropy_teacher"] - (-(lt.exp() * lt).sum(-1))[mask.bool()].mean()) < TOL
    teacher_lp = lt.gather(-1, ids[..., None]).squeeze(-1)[mask.bool()]
    assert abs(stats["charts/teacher_logprob_mean"] - teacher_lp.mean()) < TOL
    student_lp = ls.gather(-1, ids[..., None]).squeeze(-1)[mask.bool()]
    assert abs(stats["charts/teacher_logprob_mean"] - student_lp.mean()) > GAP  # negative control: the student's


def test_g6_two_ranks_equal_one():
    a, z, mask = ragged()
    n = int(mask.sum())
    whole, _ = loss_of(a, z, mask, n)
    parts = [loss_of(a[sl], z[sl], mask[sl], n)[0] for sl in (slice(0, 2), slice(2, 4))]
    assert abs(sum(parts) - whole) < TOL
    assert max_abs(grad(sum(parts), z), grad(whole, z)) < TOL
    # negative control: averaging per-rank token means of a ragged batch
    local = [loss_of(a[sl], z[sl], mask[sl], int(mask[sl].sum()))[0] for sl in (slice(0, 2), slice(2, 4))]
    assert abs(sum(local) / 2 - whole) > GAP


@pytest.mark.parametrize("kind", ["jsd", "akl"])
def test_g6_chunked_divergence_equals_one_chunk(kind):
    a, z, mask = ragged()
    n = int(mask.sum())
    whole, s1 = loss_of(a, z, mask, n, kind=kind)
    chunked, s2 = loss_of(a, z, mask, n, kind=kind, chunk_size=2)
    assert abs(whole - chunked) < TOL and max_abs(grad(whole, z), grad(chunked, z)) < TOL
    assert all(abs(s1[k] - s2[k]) < TOL for k in s1)


# ---- G7 data-source coin ----------------------------------------------------------------------------------
def test_g7_coin():
    steps = range(1, 2001)
    assert all(gkd.on_policy_coin(1, s, 1.0) for s in steps)
    assert not any(gkd.on_policy_coin(1, s, 0.0) for s in steps)
    half = [gkd.on_policy_coin(1, s, 0.5) for s in steps]
    assert abs(sum(half) / 2000 - 0.5) < 4 * math.sqrt(0.25 / 2000)
    # a function of (seed, step) only: no rank, no world size, no state, so a resumed run draws the same coins
    assert [gkd.on_policy_coin(1, s, 0.5) for s in steps] == half
    assert [gkd.on_policy_coin(2, s, 0.5) for s in steps] != half  # negative control: the seed matters
    import inspect

    assert list(inspect.signature(gkd.on_policy_coin).parameters) == ["seed", "step", "lmbda"]


# ---- G8 the loss is exactly the named divergence ----------------------------------------------------------
def test_g8_loss_is_textbook_js_and_nothing_else():
    P, Q = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    M = [(p + q) / 2 for p, q in zip(P, Q)]
    js = 0.5 * sum(p * math.log(p / m) for p, m in zip(P, M)) + 0.5 * sum(q * math.log(q / m) for q, m in zip(Q, M))
    a = torch.tensor(P, dtype=DT).log().view(1, 1, 3)
    z = torch.tensor(Q, dtype=DT).log().view(1, 1, 3)
    loss, _ = loss_of(a, z, torch.ones(1, 1, dtype=DT), 1, kind="jsd", beta=0.5)
    assert abs(loss.item() - js) < TOL
    ce = -sum(p * math.log(q) for p, q in zip(P, Q))
    assert abs(loss.item() - (0.5 * js + 0.5 * ce)) > GAP  # negative control: TRL's old Liger mix 0.5 CE + 0.5 JSD


# ---- G9 on-policy per-token RKL vs the sequence KL (MiniLLM) ---------------------------------------------------
def test_g9_per_token_rkl_is_the_per_state_gradient_not_the_sequence_kl():
    tree = TokenTree(vocab=3, max_len=2)
    q = tree.random_logits(11)  # student
    p = tree.random_logits(12).detach()  # teacher
    w = tree.seq_logprobs(q).exp().detach()  # sampling is detached
    ours = 0.0
    for i in range(len(tree.seq_list)):
        states = tree.seq_states[i : i + 1]
        loss, _ = loss_of(p[states], q[states], tree.mask[i : i + 1], 1, kind="rkl")
        ours = ours + w[i] * loss
    g_ours = grad(ours, q)
    d = tree.state_probs(q).detach()
    g_state = grad((d * tree.per_state_kl(q, p)).sum(), q)
    assert max_abs(g_ours, g_state) < TOL
    g_seq = grad(tree.seq_kl(q, p), q)
    assert max_abs(g_ours, g_seq) > GAP  # negative control: not the gradient of the sequence-level KL
    # the sequence gradient is the MiniLLM score-function form with the reward-to-go of log(q/p)
    log_ratio = (tree.token_logprobs(q) - tree.token_logprobs(p)).detach()
    to_go = log_ratio.flip(-1).cumsum(-1).flip(-1)
    surrogate = (w[:, None] * to_go * tree.token_logprobs(q)).sum()
    assert max_abs(grad(surrogate, q), g_seq) < TOL


# ---- data sources, tokenizer check, flag bounds -----------------------------------------------------------------
def tokenizer(path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token  # as the script's Run
    return tok


def test_dataset_completions_layout():
    from common import TINY_POLICY
    from common.tasks import arithmetic_task, encode_prompts

    tok = tokenizer(TINY_POLICY)
    ex = arithmetic_task().train[:6]
    prompts = encode_prompts(tok, ex, True, 16, "train")
    eos = torch.tensor([tok.eos_token_id])
    b = gkd.make_batch(prompts, gkd.encode_completions(tok, ex, 4), eos, tok.pad_token_id)
    assert gkd.decode(tok, b) == [e.answer for e in ex]
    assert not b["truncated"].any()
    assert b["completion_mask"].sum(-1).tolist() == [len(e.answer) + 1 for e in ex]  # digits + EOS
    with pytest.raises(gkd.UserError, match="max_new_tokens"):
        gkd.encode_completions(tok, ex, 2)


def test_tokenizer_mismatch_is_an_error():
    from common import TINY_POLICY, TINY_TEACHER

    s, t = tokenizer(TINY_POLICY), tokenizer(TINY_TEACHER)
    gkd.check_same_vocabulary(s, t)  # the shipped pair passes, before and after the models load
    gkd.check_same_vocabulary(s, t, 101, 101)
    with pytest.raises(gkd.UserError, match="logit"):
        gkd.check_same_vocabulary(s, t, 101, 128)
    t.add_tokens(["<extra>"])
    with pytest.raises(gkd.UserError, match="tokenizer differs"):
        gkd.check_same_vocabulary(s, t)


def test_flag_bounds():
    gkd.check_args(gkd.Args(divergence_chunk_size=0, lmbda=0.0, beta=1.0, akl_mu=1.0, skew_alpha=0.0), 1)
    bad = {
        "divergence_chunk_size": -1,
        "lmbda": 1.5,
        "beta": -0.1,
        "skew_alpha": 1.0,
        "akl_mu": 0.0,
        "prompts_per_step": 3,
    }
    for k, v in bad.items():
        with pytest.raises(gkd.UserError, match=k):
            gkd.check_args(gkd.Args(**{k: v}, num_minibatches=2), 1)


def test_script_reports_a_tokenizer_mismatch_in_one_line(tmp_path):
    from transformers import AutoTokenizer

    from common import TINY_TEACHER

    teacher = tmp_path / "teacher"
    shutil.copytree(TINY_TEACHER, teacher)
    tok = AutoTokenizer.from_pretrained(teacher)
    tok.add_special_tokens({"eos_token": "<eot>"})
    tok.save_pretrained(teacher)
    out = tmp_path / "runs"
    proc = run_script("gkd", "--teacher_name_or_path", str(teacher), "--output_dir", str(out), "--total_steps", "1")
    assert "tokenizer differs" in one_line_error(proc)
    assert not os.path.exists(out) or not os.listdir(out)


# ---- O1-O4 on-policy distillation by policy gradient (--update pg): expected gradients by enumeration -----------
def opd_setup(seed=31):
    """A vocabulary-3 tree with EOS (token 0) ending sequences at depths 1, 2 and 3; student q (grad), teacher p."""
    tree = TokenTree(vocab=3, max_len=3, eos=0)
    return tree, tree.random_logits(seed), tree.random_logits(seed + 1).detach()


def opd_expected_grad(tree, q, p, discount, bonus=None, length_norm=False):
    """sum_y q(y) grad l(y): the exact expected gradient of opd_loss at theta = theta_old, one sequence at a time
    (num_seqs 1), the sampling detached; length_norm (a negative control) divides each sequence's loss by its length."""
    lp, lp_teacher = tree.token_logprobs(q), tree.token_logprobs(p).detach()
    w = tree.seq_logprobs(q).exp().detach()
    bonus = torch.zeros(len(w), dtype=DT) if bonus is None else bonus
    total = 0.0
    for i in range(len(w)):
        row = slice(i, i + 1)
        mask = tree.mask[row]
        loss, _ = gkd.opd_loss(lp[row], lp[row].detach(), lp_teacher[row], mask, bonus[row], 1, 1, discount=discount)
        total = total + w[i] * loss / (mask.sum() if length_norm else 1)
    return grad(total, q)


def supervised_rkl_expected_grad(tree, q, p):
    """The same expectation for the supervised update: gkd_loss with --divergence rkl, summed over each sequence."""
    w = tree.seq_logprobs(q).exp().detach()
    total = 0.0
    for i in range(len(w)):
        states = tree.seq_states[i : i + 1]
        loss, _ = loss_of(p[states], q[states], tree.mask[i : i + 1], 1, kind="rkl")
        total = total + w[i] * loss
    return grad(total, q)


def test_o1_discount_one_is_the_sequence_kl_gradient():
    tree, q, p = opd_setup()
    assert set(tree.mask.sum(-1).tolist()) == {1.0, 2.0, 3.0}  # EOS at several depths
    g = opd_expected_grad(tree, q, p, discount=1)
    g_seq = grad(tree.seq_kl(q, p), q)
    assert max_abs(g, g_seq) < TOL
    # negative controls: the per-token reward without its future (discount 0), and a per-sequence length norm
    assert max_abs(opd_expected_grad(tree, q, p, discount=0), g_seq) > GAP
    assert max_abs(opd_expected_grad(tree, q, p, discount=1, length_norm=True), g_seq) > GAP


def test_o2_discount_zero_is_the_per_state_gradient_and_the_supervised_rkl():
    tree, q, p = opd_setup()
    g0 = opd_expected_grad(tree, q, p, discount=0)
    d = tree.state_probs(q)
    kl_states = tree.per_state_kl(q, p)
    g_state = grad((d.detach() * kl_states).sum(), q)  # the state law held fixed
    assert max_abs(g0, g_state) < TOL
    assert max_abs(g0, supervised_rkl_expected_grad(tree, q, p)) < TOL  # the same expectation as supervised rkl
    # discount 1 - discount 0 = the future-state term sum_s grad d(s) KL_s, here not small
    future = grad((d * kl_states.detach()).sum(), q)
    g1 = opd_expected_grad(tree, q, p, discount=1)
    assert max_abs(g1 - g0, future) < TOL and future.abs().max() > 0.1
    assert max_abs(g1, g_state) > GAP  # negative control
    # equal in expectation only: on one sequence the sampled-token gradient is not the exact per-state one
    lp = tree.token_logprobs(q)
    one = slice(5, 6)
    loss, _ = gkd.opd_loss(lp[one], lp[one].detach(), tree.token_logprobs(p)[one], tree.mask[one], torch.zeros(1), 1, 1)
    states = tree.seq_states[one]
    sup, _ = loss_of(p[states], q[states], tree.mask[one], 1, kind="rkl")
    assert max_abs(grad(loss, q), grad(sup, q)) > GAP


@pytest.mark.parametrize("discount", [0, 1])
def test_o3_task_reward_bonus(discount):
    """bonus = w R(y) in every token's advantage: the expected gradient gains -w grad E_q R (both discounts)."""
    tree, q, p = opd_setup()
    R = (tree.tokens[:, 0] == 2).to(DT) + 0.5 * (tree.mask.sum(-1) == 2)  # a reward of the sequence
    w = 0.7
    g = opd_expected_grad(tree, q, p, discount, bonus=w * R)
    expected_reward = (tree.seq_logprobs(q).exp() * R).sum()
    assert max_abs(g, opd_expected_grad(tree, q, p, discount) - w * grad(expected_reward, q)) < TOL
    assert max_abs(g, opd_expected_grad(tree, q, p, discount)) > GAP  # negative control: the bonus is used


def test_o4_clipped_ratio_and_stats():
    """Off theta_old: gradient -rho A grad lp / num_seqs where unclipped, 0 where the ratio left [1 - eps, 1 + eps] in
    A's direction; the stats are token means (k1 = log q_old - log p_T). Negative control: the unclipped gradient."""
    lp = torch.tensor([[-1.0, -0.5, -2.0, -0.1]], dtype=DT, requires_grad=True)
    lp_old = torch.tensor([[-1.5, -0.5, -1.0, -0.3]], dtype=DT)  # ratios e^0.5, 1, e^-1, e^0.2
    lp_teacher = torch.tensor([[-0.2, -0.9, -2.5, -0.4]], dtype=DT)  # A = 1.3, -0.4, -1.5, -0.1 (discount 0)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=DT)
    loss, stats = gkd.opd_loss(lp, lp_old, lp_teacher, mask, torch.zeros(1), 2, 3, epsilon=0.2)
    ratio, A = (lp - lp_old).exp().detach(), (lp_teacher - lp_old)
    unclipped = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=DT)  # token 0: rho > 1.2, A > 0; token 2: rho < 0.8, A < 0
    assert max_abs(grad(loss, lp), -ratio * A * unclipped / 2) < TOL
    assert max_abs(grad(loss, lp), -ratio * A * mask / 2) > GAP
    assert abs(stats["clipfrac"] - 2 / 3) < TOL
    assert abs(stats["kl_teacher_rkl_k1"] - ((lp_old - lp_teacher) * mask).sum() / 3) < TOL
    assert abs(stats["charts/teacher_logprob_mean"] - (lp_teacher * mask).sum() / 3) < TOL


# ---- K1-K3 the teacher's top K and one tail bucket (--teacher_top_k) ----------------------------------------------
def top_k_div(a, z, K, kind, **kw):
    """D over the top-K buckets from teacher / student logits, through the script's top_k_buckets."""
    log_t, log_s = torch.log_softmax(a, -1), torch.log_softmax(z, -1)
    top, index = log_t.topk(K)
    bt, bs = gkd.top_k_buckets(top, index, log_s)
    return gkd.divergence_from_log_probs(bt, bs, kind, **kw)


@pytest.mark.parametrize("kind", KINDS)
def test_k1_all_tokens_is_the_full_divergence(kind):
    a, z = pair(40, V=7)
    full, ours = div(a, z, kind, beta=0.3), top_k_div(a, z, 7, kind, beta=0.3)
    assert max_abs(ours, full) < 1e-12 and max_abs(grad(ours.sum(), z), grad(full.sum(), z)) < 1e-12
    # K = V - 1 is exact too (its tail bucket is one token); negative control: K = 3
    assert max_abs(top_k_div(a, z, 6, kind, beta=0.3), full) < 1e-12
    assert max_abs(top_k_div(a, z, 3, kind, beta=0.3), full) > GAP


def buckets_by_hand(t_row, s_row, K):
    """The K + 1 bucket probabilities of one row, written out: the teacher's K most probable tokens, then the rest."""
    top = sorted(range(len(t_row)), key=lambda k: -t_row[k])[:K]
    bt = [t_row[k] for k in top] + [1 - sum(t_row[k] for k in top)]
    bs = [s_row[k] for k in top] + [1 - sum(s_row[k] for k in top)]
    return bt, bs


def test_k2_top_k_against_its_closed_form():
    a, z = pair(41, V=8, rows=6)
    t, s = torch.softmax(a, -1).tolist(), torch.softmax(z.detach(), -1).tolist()
    K = 3
    for kind in ("fkl", "rkl", "tv", "jsd"):
        ours = top_k_div(a, z.detach(), K, kind, beta=0.3)
        renormalized, teacher_only = [], []
        for i in range(6):
            bt, bs = buckets_by_hand(t[i], s[i], K)
            if kind == "fkl":
                want = sum(x * math.log(x / y) for x, y in zip(bt, bs))
            elif kind == "rkl":
                want = sum(y * math.log(y / x) for x, y in zip(bt, bs))
            elif kind == "tv":
                want = 0.5 * sum(abs(x - y) for x, y in zip(bt, bs))
            else:
                m = [0.3 * x + 0.7 * y for x, y in zip(bt, bs)]
                want = 0.3 * sum(x * math.log(x / c) for x, c in zip(bt, m))
                want += 0.7 * sum(y * math.log(y / c) for y, c in zip(bs, m))
            assert abs(ours[i].item() - want) < TOL
            # the other conventions: both renormalized over the top K; the teacher renormalized, the student raw
            rt, rs = [x / sum(bt[:K]) for x in bt[:K]], [y / sum(bs[:K]) for y in bs[:K]]
            renormalized.append(sum(x * math.log(x / y) for x, y in zip(rt, rs)))
            teacher_only.append(sum(x * math.log(x / y) for x, y in zip(rt, bs[:K])))
        assert (ours <= div(a, z.detach(), kind, beta=0.3) + 1e-12).all()  # data processing: <= the full D
        if kind == "fkl":  # negative controls: the other conventions give other values
            assert max_abs(ours, torch.tensor(renormalized, dtype=DT)) > GAP
            assert max_abs(ours, torch.tensor(teacher_only, dtype=DT)) > GAP


def test_k3_top_k_forward_kl_gradient():
    """grad_z of the bucketed KL(t || s) = s - t~, t~ = t on the top K and t_tail s_k / s_tail off it (the teacher's
    tail spread like the student's). Negative control: the full forward KL's s - t."""
    a, z = pair(42, V=8)
    K = 3
    t, s = torch.softmax(a, -1), torch.softmax(z.detach(), -1)
    in_top = torch.zeros_like(t, dtype=torch.bool).scatter(-1, t.topk(K).indices, True)
    t_tail = 1 - (t * in_top).sum(-1, keepdim=True)
    s_tail = 1 - (s * in_top).sum(-1, keepdim=True)
    t_filled = torch.where(in_top, t, t_tail * s / s_tail)
    g = grad(top_k_div(a, z, K, "fkl").sum(), z)
    assert max_abs(g, s - t_filled) < TOL
    assert max_abs(g, s - t) > GAP


def test_k4_script_top_k_of_every_token_is_the_full_run(tmp_path, capsys):
    """One step of the script with --teacher_top_k above the vocabulary (K = V: every token and a tail bucket of
    rounding) logs the full run's loss, KLs, teacher entropy and teacher log-prob, to float32's tail rounding (1 - the
    top-K sum, ~1e-7, times a log-ratio: 2e-5 relative); K = 1 does not (negative control: the loss moves by 3e-4,
    the KL(s || t) stat by ~1, the tiny teacher and student being peaked)."""
    from tests.harness import TINY_RUN, read_metrics, run_in_process

    rows = {}
    for name, extra in (("full", []), ("all", ["--teacher_top_k", "100000"]), ("one", ["--teacher_top_k", "1"])):
        flags = [
            *TINY_RUN,
            "--total_steps",
            "1",
            "--eval_every",
            "0",
            "--output_dir",
            str(tmp_path),
            "--run_name",
            name,
        ]
        code, err = run_in_process("gkd", [*flags, *extra], capsys)
        assert code == 0, err[-2000:]
        rows[name] = read_metrics(tmp_path / name)[1]
    pairs = {
        "losses/loss": "losses/loss",
        "losses/kl_teacher_fkl_exact": "losses/kl_teacher_fkl_top_k",
        "losses/kl_teacher_rkl_exact": "losses/kl_teacher_rkl_top_k",
        "losses/entropy_teacher": "losses/entropy_teacher_top_k",
        "charts/teacher_logprob_mean": "charts/teacher_logprob_mean_top_k",
    }
    for full, top_k in pairs.items():
        assert abs(rows["full"][full] - rows["all"][top_k]) < 2e-5 * max(1, abs(rows["full"][full])), full
    assert abs(rows["full"]["losses/loss"] - rows["one"]["losses/loss"]) > 1e-4
    assert abs(rows["full"]["losses/kl_teacher_rkl_exact"] - rows["one"]["losses/kl_teacher_rkl_top_k"]) > GAP
    assert rows["one"]["losses/kl_teacher_fkl_top_k"] < rows["full"]["losses/kl_teacher_fkl_exact"]  # (<= D)
