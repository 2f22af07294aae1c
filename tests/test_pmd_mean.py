"""Closed-form checks of algorithms/pmd_mean.py (spec pmd_mean.md section 4, P1-P11; P12 in test_distributed).

One prompt, a K-arm softmax policy pi_z, float64. Population losses are exact expectations under pi_t of the
file's own `pmd_loss`; minimizers by L-BFGS; the closed form uses the Lambert W function.
"""

import math

import pytest
import torch

from tests.harness import (
    DT,
    bisect,
    enumerate_groups,
    grad,
    kl,
    lambert_w0_exp,
    lbfgs_minimize,
    load_algorithm,
    max_abs,
    random_logits,
)

pmd = load_algorithm("pmd_mean")
TOL, GAP = 1e-10, 1e-3


def closed_form(pi_t, r, tau, lengths=None):
    """PMD-mean population step: pi_t u, u = W0(lambda L e^a) / (lambda L), sum pi_t u = 1 (L = 1 unweighted).
    Returns (pi_next, lambda)."""
    a = (r - (pi_t * r).sum()) / tau
    L = torch.ones_like(r) if lengths is None else lengths
    u = lambda lam: lambert_w0_exp(math.log(lam) + torch.log(L) + a) / (lam * L)  # noqa: E731
    log_lam = bisect(lambda x: (pi_t * u(math.exp(x))).sum().item() - 1.0, -40.0, 40.0)
    lam = math.exp(log_lam)
    return pi_t * u(lam), lam


def population_loss(z, lp_t, r, tau, adv, lengths=None):
    """E_{y ~ pi_t}[l(y)] with the file's pmd_loss, one sequence per arm: its first token is the arm (log-ratio
    log pi_z(y) - log pi_t(y)) and L(y) - 1 more tokens with log-ratio 0, so Delta is the arm's log-ratio and the
    length is L(y)."""
    lp = torch.log_softmax(z, -1)
    K = lp.shape[0]
    L = [1] * K if lengths is None else [int(x) for x in lengths]
    width = max(L)
    total = 0.0
    for y in range(K):
        x, x_old, mask = (torch.zeros(1, width, dtype=DT) for _ in range(3))
        x = x.clone()
        x[0, 0], x_old[0, 0] = lp[y], lp_t[y]
        mask[0, : L[y]] = 1.0
        loss = pmd.pmd_loss(x, x_old, mask, adv[y : y + 1], 1, L[y], tau=tau, length_norm=True, max_new_tokens=width)
        total = total + lp_t[y].exp() * loss[0]
    return total


def setup(K=6, seed=0):
    lp_t = torch.log_softmax(random_logits(K, seed, requires_grad=False), -1)
    r = torch.rand(K, generator=torch.Generator().manual_seed(seed + 100), dtype=DT)
    return lp_t, r


def argmin_probs(loss_fn, K):
    return torch.softmax(lbfgs_minimize(loss_fn, torch.zeros(K, dtype=DT)), -1)


# ---- P1-P3 population minimizer ----------------------------------------------------------------------------------
def test_p1_p3_population_minimizer_is_the_lambert_w_closed_form():
    tau = 0.3
    lp_t, r = setup()
    pi_t = lp_t.exp()
    adv = r - (pi_t * r).sum()  # exact mean baseline
    pi_hat = argmin_probs(lambda z: population_loss(z, lp_t, r, tau, adv), 6)
    pi_cf, lam = closed_form(pi_t, r, tau)
    assert abs(pi_cf.sum().item() - 1) < 1e-12 and lam > 0
    assert max_abs(pi_hat, pi_cf) < 1e-8
    # optimizer-free: (a - v) e^{-v} = lambda for every arm, v = log(pi / pi_t)
    a, v = (r - (pi_t * r).sum()) / tau, torch.log(pi_cf / pi_t)
    assert max_abs((a - v) * torch.exp(-v), torch.full_like(a, lam)) < 1e-10

    # P2: it maximizes E r - tau KL(pi || pi_t) - (tau lambda / 2) chi2(pi || pi_t)
    def neg_objective(z):
        p = torch.softmax(z, -1)
        return -((p * r).sum() - tau * kl(torch.log(p), lp_t) - tau * lam / 2 * ((p - pi_t) ** 2 / pi_t).sum())

    assert max_abs(argmin_probs(neg_objective, 6), pi_cf) < 1e-8
    # P3 negative control: not the exact mirror-descent step pi_t e^{r/tau} / Z
    exact = torch.softmax(lp_t + r / tau, -1)
    assert max_abs(pi_cf, exact) > GAP


def test_p4_partition_baseline_with_exact_log_partition_recovers_the_exact_step():
    tau = 0.3
    lp_t, r = setup(seed=1)
    log_z = torch.logsumexp(lp_t + r / tau, -1)
    adv = r - tau * log_z
    exact = torch.softmax(lp_t + r / tau, -1)
    assert population_loss(lp_t + r / tau, lp_t, r, tau, adv).abs().item() < TOL  # zero loss at the exact step
    assert max_abs(argmin_probs(lambda z: population_loss(z, lp_t, r, tau, adv), 6), exact) < 1e-8


# ---- P5, P6 gradients -----------------------------------------------------------------------------------------------
def test_p5_gradient_at_theta_old_is_the_policy_gradient():
    tau = 0.3
    lp_t, r = setup(seed=2)
    pi_t = lp_t.exp()
    z = lp_t.clone().requires_grad_()
    g = grad(population_loss(z, lp_t, r, tau, r - (pi_t * r).sum()), z)
    assert max_abs(g, -grad((torch.softmax(z, -1) * r).sum(), z)) < 1e-12


@pytest.mark.parametrize("length_norm", [True, False])
def test_p5_per_sample_gradient_off_policy(length_norm):
    tau, y, A = 0.3, 2, 0.7
    lp_t, _ = setup(seed=3)
    z = random_logits(6, 4)
    lp = torch.log_softmax(z, -1)
    x, x_old = lp[y].view(1, 1), lp_t[y].view(1, 1)
    ones, adv = torch.ones(1, 1, dtype=DT), torch.tensor([A], dtype=DT)
    loss = pmd.pmd_loss(x, x_old, ones, adv, 1, 1, tau=tau, length_norm=length_norm, max_new_tokens=4)[0]
    L = 1 if length_norm else 4
    delta = (lp[y] - lp_t[y]).detach()
    expected = -(A - tau * delta) / L * (torch.nn.functional.one_hot(torch.tensor(y), 6).to(DT) - lp.exp().detach())
    assert max_abs(grad(loss, z), expected) < 1e-12


def test_p6_kimi_identity():
    tau, y, A = 0.3, 1, -0.4
    lp_t, _ = setup(seed=5)
    z = random_logits(6, 6)
    lp = torch.log_softmax(z, -1)
    x, x_old = lp[y].view(1, 1), lp_t[y].view(1, 1)
    ones, adv = torch.ones(1, 1, dtype=DT), torch.tensor([A], dtype=DT)
    loss = pmd.pmd_loss(x, x_old, ones, adv, 1, 1, tau=tau, length_norm=True, max_new_tokens=1)[0]
    delta = lp[y] - lp_t[y]
    kimi = grad((A - tau * delta) ** 2, z)  # Kimi k1.5's squared loss = 2 tau x ours
    assert max_abs(grad(2 * tau * loss, z), kimi) < 1e-12
    assert max_abs(kimi, -2 * tau * (A * grad(lp[y], z) - tau / 2 * grad(delta**2, z))) < 1e-12


# ---- P7 group baselines over all groups ------------------------------------------------------------------------------
def group_population_loss(z, lp_t, r, tau, n, baseline):
    """E over all K^n groups from pi_t of the mean per-sequence loss with the file's group advantages."""
    lp = torch.log_softmax(z, -1)
    total = 0.0
    for tup in enumerate_groups(lp.shape[0], n):
        adv = pmd.pmd_advantages(r[tup], n, baseline, tau)
        ones = torch.ones(n, 1, dtype=DT)
        loss = pmd.pmd_loss(lp[tup].view(n, 1), lp_t[tup].view(n, 1), ones, adv, n, n, tau=tau, length_norm=True)[0]
        total = total + lp_t[tup].sum().exp() * loss
    return total


def test_p7_loo_and_mean_incl_self_minimizers():
    tau, n = 0.5, 3
    lp_t = torch.log_softmax(random_logits(3, 7, requires_grad=False), -1)
    r = torch.tensor([0.0, 1.0, 0.3], dtype=DT)
    pi_t = lp_t.exp()
    loo = argmin_probs(lambda z: group_population_loss(z, lp_t, r, tau, n, "loo"), 3)
    assert max_abs(loo, closed_form(pi_t, r, tau)[0]) < 1e-8
    incl = argmin_probs(lambda z: group_population_loss(z, lp_t, r, tau, n, "mean_incl_self"), 3)
    assert max_abs(incl, closed_form(pi_t, r, tau * n / (n - 1))[0]) < 1e-8
    assert max_abs(incl, closed_form(pi_t, r, tau)[0]) > GAP  # negative control: same tau differs


# ---- P8 length weights -------------------------------------------------------------------------------------------------
def test_p8_length_weighted_minimizer():
    tau = 0.3
    lp_t, r = setup(seed=8)
    pi_t = lp_t.exp()
    L = torch.tensor([3.0, 5, 1, 8, 2, 4], dtype=DT)
    adv = r - (pi_t * r).sum()
    pi_hat = argmin_probs(lambda z: population_loss(z, lp_t, r, tau, adv, lengths=L), 6)
    assert max_abs(pi_hat, closed_form(pi_t, r, tau, L)[0]) < 1e-8
    assert max_abs(pi_hat, closed_form(pi_t, r, tau)[0]) > GAP  # negative control: the unweighted closed form


# ---- P9 binary rewards -------------------------------------------------------------------------------------------------
TABLE = {
    1.0: [(0.05, 0.120484, 0.125161), (0.5, 0.713759, 0.731059), (0.95, 0.980793, 0.981006)],
    0.3: [(0.05, 0.311613, 0.596017), (0.5, 0.914496, 0.965555), (0.95, 0.997903, 0.998126)],
    0.1: [(0.05, 0.566578, 0.999138), (0.5, 0.996679, 0.999955), (0.95, 0.999996, 0.999998)],
}


@pytest.mark.parametrize("tau", list(TABLE))
def test_p9_binary_reward_table(tau):
    r = torch.tensor([1.0, 0.0], dtype=DT)
    for p, pmd_mean_p, exact_p in TABLE[tau]:
        pi_t = torch.tensor([p, 1 - p], dtype=DT)
        assert abs(closed_form(pi_t, r, tau)[0][0].item() - pmd_mean_p) < 1e-6
        assert abs(torch.softmax(pi_t.log() + r / tau, -1)[0].item() - exact_p) < 1e-6


def test_p9_monotone_improvement():
    for seed in range(8):
        lp_t, r = setup(K=5, seed=seed)
        pi_t = lp_t.exp()
        pi_next = closed_form(pi_t, r, 0.05 + seed / 4)[0]
        assert (pi_next * r).sum() >= (pi_t * r).sum() - 1e-12


# ---- P10, P11 advantages -----------------------------------------------------------------------------------------------
def openkimi_float32_partition(r, tau):
    """Reference of the published computation (negative control): float32, shift by the group max, mean of the
    other samples' exponentials clamped at 1e-8."""
    x = (r / tau).float()
    mx = x.max()
    e = torch.exp(x - mx)
    n = r.numel()
    loo_mean = ((e.sum() - e) / (n - 1)).clamp(min=1e-8)
    return (r.float() - tau * (torch.log(loo_mean) + mx)).double()


def test_p10_unique_best_partition_advantage():
    r = torch.tensor([1.0, -1.0, -1.0, -1.0], dtype=DT)
    adv = pmd.pmd_advantages(r, 4, "partition", 0.01)
    assert abs(adv[0].item() - 2.0) < 1e-12
    published = openkimi_float32_partition(r, 0.01)
    assert abs(published[0].item() - 0.184) < 1e-3 and abs(published[0].item() - adv[0].item()) > GAP
    for seed in range(5):  # independent loop implementation on random groups, rewards in float32 as in training
        g = torch.Generator().manual_seed(seed)
        rr, tau = torch.rand(6, generator=g), 0.05 + 0.2 * seed
        ours = pmd.pmd_advantages(rr, 6, "partition", tau)
        for i in range(6):
            others = torch.cat([rr[:i], rr[i + 1 :]]).double() / tau
            expected = rr[i].double() - tau * (torch.logsumexp(others, 0) - math.log(5))
            assert abs(ours[i].double() - expected).item() < 1e-6


def test_p11_baselines_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=DT)
    assert max_abs(pmd.pmd_advantages(r, 4, "loo"), torch.tensor([2, -2, -2, 2], dtype=DT) / 3) < 1e-15
    assert max_abs(pmd.pmd_advantages(r, 4, "mean_incl_self"), torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=DT)) < 1e-15
