"""Closed-form checks of algorithms/grpo.py (spec grpo.md section 4, T1-T11), each with a negative control."""

import math

import pytest
import torch

from tests.harness import DT, TokenTree, enumerate_groups, grad, kl, load_algorithm, max_abs, random_logits

grpo = load_algorithm("grpo")
TOL = 1e-10  # analytic identities
GAP = 1e-3  # every negative control must differ by more than this


def one_token_loss(lp, adv, lp_old=None, lp_ref=None, epsilon=0.2, epsilon_high=None, **hyperparameters):
    """grpo_loss on G one-token sequences (a categorical step), at theta = theta_old unless lp_old is given; the
    clip range as the flags give it (epsilon_high None: epsilon)."""
    lp_old = lp.detach() if lp_old is None else lp_old
    n = lp.shape[0]
    loss, _ = grpo.grpo_loss(
        lp[:, None],
        lp_old[:, None],
        None if lp_ref is None else lp_ref[:, None],
        adv,
        torch.ones(n, 1, dtype=DT),
        n,
        n,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        **hyperparameters,
    )
    return loss


# ---- T1 advantages ----------------------------------------------------------------------------------------
def test_t1_group_advantages_bessel():
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 0], dtype=DT), 4)
    expected = torch.tensor([1.4997000600, -0.4999000200, -0.4999000200, -0.4999000200], dtype=DT)
    assert max_abs(adv, expected) < 1e-9
    # negative control: the population std (ddof 0) gives 0.75 / (0.4330127 + 1e-4) = 1.7316509
    r = torch.tensor([1.0, 0, 0, 0], dtype=DT)
    population = (r[0] - r.mean()) / (r.std(correction=0) + 1e-4)
    assert abs(population.item() - 1.7316509) < 1e-6 and abs(population - adv[0]) > GAP


def test_t1_sum_and_square_sum():
    r = torch.tensor([1.0, 0, 1, 0, 0, 1, 0, 0], dtype=DT)
    adv = grpo.group_advantages(r, 8, eps=0.0)
    assert abs(adv.sum().item()) < TOL and abs(adv.pow(2).sum().item() - 7.0) < TOL


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_t1_all_equal_group_is_exactly_zero(scale):
    r = torch.tensor([0.1, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 0.0], dtype=torch.float32)
    adv = grpo.group_advantages(r, 4, scale)
    assert torch.equal(adv[:4], torch.zeros(4))
    assert (adv[4:] != 0).all()


def test_t1_none_and_batch_by_hand():
    r = torch.tensor([1.0, 0, 1, 1], dtype=DT)  # two groups of 2
    assert max_abs(grpo.group_advantages(r, 2, "none"), torch.tensor([0.5, -0.5, 0, 0], dtype=DT)) < TOL
    # batch std: mean .75, squared deviations .0625 x 3 + .5625 = .75, Bessel var .25, std .5
    expected = torch.tensor([0.5 / 0.5001, -0.5 / 0.5001, 0, 0], dtype=DT)
    assert max_abs(grpo.group_advantages(r, 2, "batch"), expected) < TOL
    # negative control: group scaling of the same batch differs
    assert max_abs(grpo.group_advantages(r, 2, "group"), expected) > GAP


def test_t1_two_pass_variance_in_float32():
    r32 = torch.full((1, 8), 10.0, dtype=torch.float32)
    r32[0, 0] += 1e-3
    adv = grpo.group_advantages(r32.view(-1), 8, eps=0.0)  # (r - mean) / std, std computed in float32
    var32 = ((r32[0, 0] - r32.mean()) / adv[0]).double().pow(2)
    var64 = r32.double().var(correction=1)  # float64 on the same float32 values
    assert abs(var32 - var64).item() / var64.item() < 1e-4
    # negative control: the one-pass E[x^2] - mean^2 in float32 is off by more than 50% (it returns 0 here)
    one_pass = (r32.pow(2).mean() - r32.mean().pow(2)).double() * 8 / 7
    assert abs(one_pass - var64).item() / var64.item() > 0.5


# ---- T2 k3 values -----------------------------------------------------------------------------------------
def test_t2_k3_value_is_reverse_kl():
    lp = torch.log_softmax(random_logits(5, 0, requires_grad=False), -1)
    lp_ref = torch.log_softmax(random_logits(5, 1, requires_grad=False), -1)
    k3 = grpo.kl_term(lp, lp_ref, lp, "k3")
    assert (k3 >= 0).all()
    assert abs((lp.exp() * k3).sum() - kl(lp, lp_ref)) < TOL
    assert abs((lp.exp() * k3).sum() - kl(lp_ref, lp)) > GAP  # negative control: not the forward KL


def test_t2_k3_float32_numerics():
    for d in [1e-2, -1e-2, 1e-3, 1e-4, 1e-5]:
        exact = math.expm1(d) - d
        lp = torch.tensor([0.0], dtype=torch.float32)
        ours = grpo.kl_term(lp, lp + d, lp, "k3").item()
        assert abs(ours - exact) / exact < 0.01
    lp = torch.tensor([0.0], dtype=torch.float32)
    assert grpo.kl_term(lp, lp + 1e-6, lp, "k3").item() >= 0
    # negative control: the naive exp(d) - d - 1 loses everything at small d in float32
    d = torch.tensor(1e-4, dtype=torch.float32)
    naive = (torch.exp(d) - d - 1).item()
    assert abs(naive - (math.expm1(1e-4) - 1e-4)) / (math.expm1(1e-4) - 1e-4) > 0.1


# ---- T3 estimator gradients on a categorical --------------------------------------------------------------
def expected_kl_grad(estimator, theta, theta_old, lp_ref, importance_weight):
    """E_{y ~ pi_old}[grad kappa(y)], exact over the K outcomes."""
    lp = torch.log_softmax(theta, -1)
    lp_old = torch.log_softmax(theta_old, -1).detach()
    kappa = grpo.kl_term(lp, lp_ref, lp_old, estimator, importance_weight)
    return grad((lp_old.exp() * kappa).sum(), theta)


def test_t3_on_policy_estimator_gradients():
    theta = random_logits(5, 0)
    lp_ref = torch.log_softmax(random_logits(5, 1, requires_grad=False), -1)
    lp = torch.log_softmax(theta, -1)
    g_rkl, g_fkl = grad(kl(lp, lp_ref), theta), grad(kl(lp_ref, lp), theta)
    g1 = expected_kl_grad("k1", theta, theta, lp_ref, False)
    g2 = expected_kl_grad("k2", theta, theta, lp_ref, False)
    g3 = expected_kl_grad("k3", theta, theta, lp_ref, False)
    assert g1.abs().max() < TOL
    assert max_abs(g2, g_rkl) < TOL
    assert max_abs(g3, g_fkl) < TOL and max_abs(g3, lp.exp() - lp_ref.exp()) < TOL
    assert max_abs(g3, g_rkl) > GAP  # the key negative control: k3's gradient is not the reverse KL's


@pytest.mark.parametrize("same", [True, False])
def test_t3_importance_weighted_off_policy(same):
    theta = random_logits(5, 0)
    theta_old = theta.detach().clone() if same else random_logits(5, 2, requires_grad=False)
    lp_ref = torch.log_softmax(random_logits(5, 1, requires_grad=False), -1)
    lp = torch.log_softmax(theta, -1)
    g_rkl = grad(kl(lp, lp_ref), theta)
    for est in ("k1", "k3"):
        assert max_abs(expected_kl_grad(est, theta, theta_old, lp_ref, True), g_rkl) < TOL
    g2 = expected_kl_grad("k2", theta, theta_old, lp_ref, True)
    assert max_abs(g2, grad((lp.exp() * 0.5 * (lp_ref - lp) ** 2).sum(), theta)) < TOL
    assert max_abs(g2, g_rkl) > GAP  # negative control: rho * k2 is not the reverse-KL gradient
    if not same:  # negative control: unweighted terms off-policy match neither KL
        g_fkl = grad(kl(lp_ref, lp), theta)
        for est in ("k1", "k2", "k3"):
            g = expected_kl_grad(est, theta, theta_old, lp_ref, False)
            assert max_abs(g, g_rkl) > GAP and max_abs(g, g_fkl) > GAP


# ---- T4 token tree ----------------------------------------------------------------------------------------
def tree_expected_grad(tree, theta, theta_ref, estimator, importance_weight):
    """E_{y ~ pi_theta}[grad sum_t kappa_t] on-policy (theta_old = theta), sequence weights detached."""
    lp = tree.token_logprobs(theta)
    lp_ref = tree.token_logprobs(theta_ref).detach()
    kappa = grpo.kl_term(lp, lp_ref, lp.detach(), estimator, importance_weight) * tree.mask
    w = tree.seq_logprobs(theta).exp().detach()
    return grad((w * kappa.sum(-1)).sum(), theta)


def test_t4_token_tree_per_state_gradients():
    tree = TokenTree(vocab=3, max_len=2)
    theta, theta_ref = tree.random_logits(0), tree.random_logits(1).detach()
    d = tree.state_probs(theta).detach()
    per_state_fkl = grad((d * tree.per_state_kl(theta_ref, theta)).sum(), theta)
    per_state_rkl = grad((d * tree.per_state_kl(theta, theta_ref)).sum(), theta)
    seq_rkl, seq_fkl = grad(tree.seq_kl(theta, theta_ref), theta), grad(tree.seq_kl(theta_ref, theta), theta)
    g_k3 = tree_expected_grad(tree, theta, theta_ref, "k3", False)
    g_k3w = tree_expected_grad(tree, theta, theta_ref, "k3", True)
    g_k2 = tree_expected_grad(tree, theta, theta_ref, "k2", False)
    assert max_abs(g_k3, per_state_fkl) < TOL
    assert max_abs(g_k3w, per_state_rkl) < TOL and max_abs(g_k2, per_state_rkl) < TOL
    for g in (g_k3, g_k3w):  # negative controls: none of them is a sequence-level KL gradient
        assert max_abs(g, seq_rkl) > GAP and max_abs(g, seq_fkl) > GAP


def test_t4_score_function_gives_sequence_kl_and_k3_value():
    tree = TokenTree(vocab=3, max_len=2)
    theta, theta_ref = tree.random_logits(0), tree.random_logits(1).detach()
    slp, slp_ref = tree.seq_logprobs(theta), tree.seq_logprobs(theta_ref)
    w = slp.exp().detach()
    # documentation: the sequence k1 as a detached reward in a score function is the sequence reverse-KL gradient
    score = (w * (slp - slp_ref).detach() * slp).sum()
    assert max_abs(grad(score, theta), grad(tree.seq_kl(theta, theta_ref), theta)) < TOL
    # value: E[sum_t k3_t] is the sequence reverse KL
    lp, lp_ref = tree.token_logprobs(theta), tree.token_logprobs(theta_ref)
    k3 = (grpo.kl_term(lp, lp_ref, lp, "k3") * tree.mask).sum(-1)
    assert abs((w * k3).sum() - tree.seq_kl(theta, theta_ref)) < TOL
    assert abs((w * k3).sum() - tree.seq_kl(theta_ref, theta)) > GAP  # negative control


# ---- T5 surrogate gradient and aggregation weights --------------------------------------------------------
def test_t5_categorical_surrogate_gradient():
    z = random_logits(5, 3)
    y = torch.tensor([0, 2, 2, 4])
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 0, 1], dtype=DT), 4)
    loss = one_token_loss(torch.log_softmax(z, -1)[y], adv, beta=0.0)
    pi = torch.softmax(z, -1).detach()
    expected = -sum(adv[i] * (torch.nn.functional.one_hot(y[i], 5).to(DT) - pi) for i in range(4)) / 4
    assert max_abs(grad(loss, z), expected) < TOL
    assert max_abs(grad(loss, z), expected * 4) > GAP  # negative control: missing 1/G


@pytest.mark.parametrize("agg", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_t5_token_weights_per_aggregation(agg):
    lens = torch.tensor([1, 3, 2])
    mask = (torch.arange(4)[None] < lens[:, None]).to(DT)
    lp = torch.zeros(3, 4, dtype=DT, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=DT)
    loss, _ = grpo.grpo_loss(
        lp, lp.detach(), None, adv, mask, 3, int(lens.sum()), beta=0.0, loss_agg=agg, max_new_tokens=4
    )
    weight = {
        "seq_mean_token_mean": 1.0 / (3 * lens[:, None].to(DT)),
        "token_mean": 1.0 / lens.sum().to(DT),
        "seq_mean_token_sum_norm": torch.tensor(1.0 / (3 * 4), dtype=DT),
    }[agg]
    expected = -adv[:, None] * weight * mask
    assert max_abs(grad(loss, lp), expected) < TOL


# ---- T6 clipping ------------------------------------------------------------------------------------------
def test_t6_clip_regions_with_asymmetric_eps():
    rho = torch.tensor([1.25, 1.30, 0.79, 0.81, 0.75, 1.5], dtype=DT)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0], dtype=DT)
    clipped = torch.tensor([False, True, True, False, False, False])
    lp_old = torch.zeros(6, dtype=DT)
    lp = rho.log().requires_grad_()
    n = 6
    loss = one_token_loss(lp, adv, lp_old=lp_old, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_agg="token_mean")
    g = grad(loss, lp)
    expected = torch.where(clipped, torch.zeros(n, dtype=DT), -rho * adv / n)
    assert max_abs(g, expected) < TOL
    # negative control: with the symmetric 0.2 clip, rho = 1.25 with A > 0 would be clipped
    g_sym = grad(one_token_loss(lp, adv, lp_old=lp_old, beta=0.0, epsilon=0.2, loss_agg="token_mean"), lp)
    assert abs(g_sym[0] - g[0]) > GAP
    # other clip ranges move the regions: epsilon 0.1 also clips rho = 0.81 with A < 0; 1.3 stays inside 1 + 0.4
    wide = one_token_loss(lp, adv, lp_old=lp_old, beta=0.0, epsilon=0.1, epsilon_high=0.4, loss_agg="token_mean")
    clipped = torch.tensor([False, False, True, True, False, False])
    expected = torch.where(clipped, torch.zeros(n, dtype=DT), -rho * adv / n)
    assert max_abs(grad(wide, lp), expected) < TOL
    _, stats = grpo.grpo_loss(
        lp[:, None],
        lp_old[:, None],
        None,
        adv,
        torch.ones(n, 1, dtype=DT),
        n,
        n,
        beta=0.0,
        epsilon_low=0.2,
        epsilon_high=0.28,
    )
    assert abs(stats["clipfrac_high"] - 1 / 6) < TOL and abs(stats["clipfrac_low"] - 1 / 6) < TOL
    assert abs(stats["clipfrac"] - 2 / 6) < TOL


# ---- T7, T8 expected gradient over all groups -------------------------------------------------------------
def expected_group_grad(theta, r, G, beta=0.0, lp_ref=None, **kw):
    """sum over every G-tuple of P(tuple) * grad grpo_loss(tuple), at theta = theta_old, scale_rewards none."""
    lp_all = torch.log_softmax(theta, -1)
    total = 0.0
    for tup in enumerate_groups(theta.shape[0], G):
        p = lp_all[tup].sum().exp().detach()
        adv = grpo.group_advantages(r[tup], G, "none")
        total = total + p * one_token_loss(
            lp_all[tup], adv, beta=beta, lp_ref=None if lp_ref is None else lp_ref[tup], **kw
        )
    return grad(total, theta)


@pytest.mark.parametrize("G", [2, 3])
def test_t7_group_mean_baseline_factor(G):
    theta = random_logits(3, 4)
    r = torch.tensor([1.0, 0.0, 0.5], dtype=DT)
    g = expected_group_grad(theta, r, G)
    g_er = grad((torch.softmax(theta, -1) * r).sum(), theta)
    assert max_abs(g, -(1 - 1 / G) * g_er) < TOL
    assert max_abs(g, -g_er) > GAP  # negative control: the group mean including self is biased by (1 - 1/G)


def bisect_lambda(pi_ref, r, beta, c):
    lo, hi = c * r.max().item() + 1e-15, c * r.max().item() + beta * 10 + 10
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = (beta * pi_ref / (mid - c * r)).sum().item()
        lo, hi = (mid, hi) if s > 1 else (lo, mid)
    return 0.5 * (lo + hi)


@pytest.mark.parametrize("G", [2, 3])
def test_t8_stationary_points_show_which_kl(G):
    beta, c = 0.3, 1 - 1 / G
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=DT)
    lp_ref = torch.log_softmax(random_logits(4, 5, requires_grad=False), -1)
    pi_ref = lp_ref.exp()
    pi_f = beta * pi_ref / (bisect_lambda(pi_ref, r, beta, c) - c * r)
    pi_r = pi_ref * torch.exp(c * r / beta)
    pi_r = pi_r / pi_r.sum()
    pi_star = pi_ref * torch.exp(r / beta)
    pi_star = pi_star / pi_star.sum()
    assert abs(pi_f.sum().item() - 1) < 1e-12

    def g(pi, iw):
        return expected_group_grad(
            pi.log().clone().requires_grad_(),
            r,
            G,
            beta=beta,
            lp_ref=lp_ref,
            kl_estimator="k3",
            kl_importance_weight=iw,
        )

    assert g(pi_f, False).abs().max() < TOL  # default k3: stationary at the forward-KL solution
    assert g(pi_r, False).abs().max() > GAP
    assert g(pi_r, True).abs().max() < TOL  # importance-weighted k3: stationary at pi_ref e^{c r / beta}
    assert g(pi_f, True).abs().max() > GAP and g(pi_star, True).abs().max() > GAP  # observed 1.8e-2, 3.8e-3


# ---- T9, T10 aggregation and invariance -------------------------------------------------------------------
HAND = torch.tensor([[1.0, 0, 0, 0], [2.0, 3.0, 4.0, 0]], dtype=DT)
HAND_MASK = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]], dtype=DT)


@pytest.mark.parametrize(
    "agg,value", [("seq_mean_token_mean", 2.0), ("token_mean", 2.5), ("seq_mean_token_sum_norm", 1.25)]
)
def test_t9_aggregation_by_hand(agg, value):
    assert abs(grpo.aggregate(HAND, HAND_MASK, agg, 2, 4, 4).item() - value) < TOL


def test_t10_split_over_ranks_with_global_counts():
    parts = [grpo.aggregate(HAND[i : i + 1], HAND_MASK[i : i + 1], "token_mean", 2, 4, 4) for i in range(2)]
    assert abs(sum(parts).item() - 2.5) < TOL
    # negative control: averaging per-rank token means of ragged batches gives 2.0
    local = [
        grpo.aggregate(HAND[i : i + 1], HAND_MASK[i : i + 1], "token_mean", 1, HAND_MASK[i].sum().item(), 4)
        for i in range(2)
    ]
    assert abs(sum(local).item() / 2 - 2.0) < TOL and abs(sum(local).item() / 2 - 2.5) > GAP


# ---- T11 value 0, gradient not ----------------------------------------------------------------------------
def test_t11_on_policy_loss_value_zero_gradient_nonzero():
    z = random_logits(5, 6)
    y = torch.tensor([0, 1, 1, 3, 4, 4, 2, 0])
    adv = grpo.group_advantages(torch.tensor([1.0, 0, 1, 0, 0, 0, 1, 1], dtype=DT), 4)
    loss = one_token_loss(torch.log_softmax(z, -1)[y], adv, beta=0.0)
    assert abs(loss.item()) < 1e-12
    assert grad(loss, z).norm() > GAP
