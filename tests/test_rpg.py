"""Closed-form checks of algorithms/rpg_fkl.py and rpg_rkl.py (spec rpg.md section 4, R1-R9).

Every check runs all eight variants {FKL, UFKL, RKL, URKL} x {differentiable, reinforce} through the files' own
`rpg_loss`, at theta != theta_old, with expectations by exact enumeration under the sampler pi_old.
"""

import pytest
import torch

from tests.harness import (
    DT,
    TokenTree,
    enumerate_groups,
    grad,
    kl,
    load_algorithm,
    max_abs,
    random_logits,
    read_metrics,
    run_in_process,
)

FKL, RKL = load_algorithm("rpg_fkl"), load_algorithm("rpg_rkl")
VARIANTS = {"FKL": (FKL, False), "UFKL": (FKL, True), "RKL": (RKL, False), "URKL": (RKL, True)}
FORMS = ["differentiable", "reinforce"]
ALL = [(v, f) for v in VARIANTS for f in FORMS]
TOL, GAP, BETA = 1e-10, 1e-3, 0.37


def divergence(variant, logp, loga):
    """Closed-form D(pi_theta, pi_a) from log-masses (normalized or not), with the mass terms of the U-variants."""
    p, a = logp.exp(), loga.exp()
    if variant in ("FKL", "UFKL"):
        d = (a * (loga - logp)).sum()
        return d + (p - a).sum() if variant == "UFKL" else d
    d = (p * (logp - loga)).sum()
    return d + (a - p).sum() if variant == "URKL" else d


def loss_of(variant, form, lp, lp_old, lp_anchor, adv, mask=None, level="token", clip=False, beta=BETA, **kw):
    """Our loss on a batch of sequences, aggregated as the plain sum of every term (seq_mean_token_sum_norm with
    one sequence and max_new_tokens 1 per call is exactly the per-sequence sum)."""
    mod, unnorm = VARIANTS[variant]
    mask = torch.ones_like(lp) if mask is None else mask
    return mod.rpg_loss(
        lp,
        lp_old,
        lp_anchor,
        adv,
        mask,
        1,
        int(mask.sum()),
        beta=beta,
        unnormalized=unnorm,
        form=form,
        ratio_level=level,
        clip=clip,
        loss_agg="seq_mean_token_sum_norm",
        max_new_tokens=1,
        **kw,
    )[0]


def expected_over(weights, losses):
    return sum(w * loss for w, loss in zip(weights, losses))


# ---- R1 categorical: grad E_old[loss] = -grad J, every variant x form x anchor ------------------------------
@pytest.mark.parametrize("anchor", ["old", "init"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("variant,form", ALL)
def test_r1_categorical_gradient_is_minus_grad_j(variant, form, anchor, level):
    theta, theta_old = random_logits(6, 0), random_logits(6, 1, requires_grad=False)
    lp, lp_old = torch.log_softmax(theta, -1), torch.log_softmax(theta_old, -1)
    lp_a = lp_old if anchor == "old" else torch.log_softmax(random_logits(6, 2, requires_grad=False), -1)
    R = torch.tensor([1.0, 0.0, 0.3, -0.5, 2.0, 0.0], dtype=DT)
    losses = [
        loss_of(variant, form, lp[y].view(1, 1), lp_old[y].view(1, 1), lp_a[y].view(1, 1), R[y : y + 1], level=level)
        for y in range(6)
    ]
    g = grad(expected_over(lp_old.exp(), losses), theta)
    J = (lp.exp() * R).sum() - BETA * divergence(variant, lp, lp_a)
    assert max_abs(g, -grad(J, theta)) < TOL
    # negative control: the same loss without its KL part misses beta grad D
    assert max_abs(g, -grad((lp.exp() * R).sum(), theta)) > GAP


# ---- R2 U-variants: same expected gradient, zero per-sample KL gradient at w = 1 ----------------------------
def test_r2_u_variants_have_the_same_objective_gradient():
    theta, lp_a = random_logits(6, 0), torch.log_softmax(random_logits(6, 2, requires_grad=False), -1)
    lp = torch.log_softmax(theta, -1)
    for a, b in (("FKL", "UFKL"), ("RKL", "URKL")):
        assert max_abs(grad(divergence(a, lp, lp_a), theta), grad(divergence(b, lp, lp_a), theta)) < TOL


@pytest.mark.parametrize("form", FORMS)
def test_r2_per_sample_kl_gradient_at_w_equal_1(form):
    theta = random_logits(6, 0)
    lp = torch.log_softmax(theta, -1)
    y = 3
    expected = {
        "FKL": -BETA * grad(lp[y], theta),
        "RKL": BETA * grad(lp[y], theta),
        "UFKL": torch.zeros(6, dtype=DT),
        "URKL": torch.zeros(6, dtype=DT),
    }
    for variant, e in expected.items():
        x = lp[y].view(1, 1)
        g = grad(loss_of(variant, form, x, x.detach(), x.detach(), torch.zeros(1, dtype=DT)), theta)
        assert max_abs(g, e) < TOL, variant
    assert grad(lp[y], theta).abs().max() > GAP  # so the FKL/RKL per-sample gradients are really nonzero


# ---- R3 group-mean baseline inside the importance weight ------------------------------------------------------
@pytest.mark.parametrize("G", [2, 3])
@pytest.mark.parametrize("form", FORMS)
def test_r3_group_mean_baseline_inside_w(G, form):
    theta, theta_old = random_logits(3, 3), random_logits(3, 4, requires_grad=False)
    lp, lp_old = torch.log_softmax(theta, -1), torch.log_softmax(theta_old, -1)
    R = torch.tensor([1.0, 0.0, 0.5], dtype=DT)
    tuples = enumerate_groups(3, G)
    p_old = lp_old[tuples].sum(-1).exp()
    ours, outside = [], []
    for tup in tuples:
        adv = RKL.group_mean_advantages(R[tup], G)
        x, xo = lp[tup].view(G, 1), lp_old[tup].view(G, 1)
        hyper = dict(beta=0.0, form=form, clip=False, loss_agg="seq_mean_token_sum_norm", max_new_tokens=1)
        ours.append(RKL.rpg_loss(x, xo, xo, adv, torch.ones(G, 1, dtype=DT), G, G, **hyper)[0])
        w = (x - xo).exp()  # negative control: REINFORCE with the baseline outside w, sg(w R - b) log pi
        outside.append(-((w * R[tup].view(G, 1) - R[tup].mean()).detach() * x).mean())
    g = grad(expected_over(p_old, ours), theta)
    g_er = grad((lp.exp() * R).sum(), theta)
    assert max_abs(g, -(1 - 1 / G) * g_er) < TOL
    assert max_abs(grad(expected_over(p_old, outside), theta), g) > 0.1  # biased off-policy (observed >= 0.2)


def test_r3_baseline_outside_w_agrees_on_policy():
    theta = random_logits(3, 3)
    lp = torch.log_softmax(theta, -1)
    R = torch.tensor([1.0, 0.0, 0.5], dtype=DT)
    total = 0.0
    for tup in enumerate_groups(3, 2):
        x = lp[tup]
        total = (
            total
            + x.sum().exp().detach() * -((x.detach().exp() / x.detach().exp() * R[tup] - R[tup].mean()) * x).mean()
        )
    assert max_abs(grad(total, theta), -(1 - 1 / 2) * grad((lp.exp() * R).sum(), theta)) < TOL


# ---- R4 unnormalized measures ---------------------------------------------------------------------------------
@pytest.mark.parametrize("anchor", ["old", "init"])
@pytest.mark.parametrize("variant,form", [(v, f) for v in ("UFKL", "URKL") for f in FORMS])
def test_r4_unnormalized_measures(variant, form, anchor):
    theta = random_logits(6, 0)  # pi = exp(theta): no softmax, total mass != 1
    lp_old = random_logits(6, 1, requires_grad=False) + 0.3
    lp_a = lp_old if anchor == "old" else random_logits(6, 2, requires_grad=False) - 0.2
    assert abs(lp_old.exp().sum().item() - 1) > 0.1
    R = torch.tensor([1.0, 0.0, 0.3, -0.5, 2.0, 0.0], dtype=DT)
    losses = [
        loss_of(variant, form, theta[y].view(1, 1), lp_old[y].view(1, 1), lp_a[y].view(1, 1), R[y : y + 1])
        for y in range(6)
    ]
    g = grad(expected_over(lp_old.exp(), losses), theta)  # E under pi_old / Z_old, times Z_old
    J = (theta.exp() * R).sum() - BETA * divergence(variant, theta, lp_a)
    assert max_abs(g, -grad(J, theta)) < TOL
    log_ratio_only = (theta.exp() * R).sum() - BETA * divergence(variant[1:], theta, lp_a)  # mass terms dropped
    assert max_abs(g, -grad(log_ratio_only, theta)) > GAP


# ---- R5 value identities of k3 --------------------------------------------------------------------------------
def test_r5_k3_identities():
    theta, theta_old = random_logits(6, 0), random_logits(6, 1, requires_grad=False)
    lp, lp_old = torch.log_softmax(theta, -1), torch.log_softmax(theta_old, -1)
    lp_ref = torch.log_softmax(random_logits(6, 2, requires_grad=False), -1)
    for mod in (FKL, RKL):
        k3 = mod.k3
        assert abs((lp_old.exp() * k3(lp - lp_old)).sum() - kl(lp_old, lp)) < TOL
        assert abs((lp.exp() * k3(lp_old - lp)).sum() - kl(lp, lp_old)) < TOL
        w = (lp - lp_old).exp()
        value = (lp_old.exp() * w * k3(lp_ref - lp)).sum()
        assert abs(value - kl(lp, lp_ref)) < TOL
        assert max_abs(grad(value, theta), grad(kl(lp, lp_ref), theta)) < TOL
        assert max_abs(grad(value, theta), grad(kl(lp_ref, lp), theta)) > GAP  # negative control: not the FKL
        log_w = torch.linspace(-3, 3, 13, dtype=DT)
        assert max_abs(log_w.exp() * k3(-log_w), 1 - log_w.exp() + log_w.exp() * log_w) < TOL
    same = random_logits(6, 5)
    lps = torch.log_softmax(same, -1)
    for d in (kl(lps, lps.detach()), kl(lps.detach(), lps)):
        assert grad(d, same).abs().max() < TOL


# ---- R6 token tree ----------------------------------------------------------------------------------------------
TREE = TokenTree(vocab=3, max_len=2)
R_TREE = torch.tensor([1.0, 0.0, 0.5, -1.0, 2.0, 0.0, 0.3, 1.5, -0.2], dtype=DT)


def tree_setup(seed_theta=0, on_policy=False):
    theta = TREE.random_logits(seed_theta)
    theta_old = theta.detach().clone() if on_policy else TREE.random_logits(1).detach()
    theta_init = TREE.random_logits(2).detach()
    return theta, theta_old, theta_init


def tree_expected_grad(variant, form, theta, theta_old, theta_anchor, level, adv=R_TREE, beta=BETA):
    lp, lp_old, lp_a = (TREE.token_logprobs(t) for t in (theta, theta_old, theta_anchor))
    p_old = TREE.seq_logprobs(theta_old).exp()
    losses = [
        loss_of(
            variant, form, lp[i : i + 1], lp_old[i : i + 1], lp_a[i : i + 1], adv[i : i + 1], level=level, beta=beta
        )
        for i in range(len(TREE.seq_list))
    ]
    return grad(expected_over(p_old, losses), theta)


def seq_divergence(variant, theta, theta_anchor):
    return divergence(variant, TREE.seq_logprobs(theta), TREE.seq_logprobs(theta_anchor))


@pytest.mark.parametrize("anchor", ["old", "init"])
@pytest.mark.parametrize("variant,form", ALL)
def test_r6_sequence_level_exact_off_policy(variant, form, anchor):
    theta, theta_old, theta_init = tree_setup()
    theta_a = theta_old if anchor == "old" else theta_init
    g = tree_expected_grad(variant, form, theta, theta_old, theta_a, "sequence")
    J = (TREE.seq_logprobs(theta).exp() * R_TREE).sum() - BETA * seq_divergence(variant, theta, theta_a)
    assert max_abs(g, -grad(J, theta)) < TOL


@pytest.mark.parametrize("variant,form", ALL)
def test_r6_token_level_old_anchor(variant, form):
    zero = torch.zeros_like(R_TREE)
    for on_policy in (True, False):
        theta, theta_old, _ = tree_setup(on_policy=on_policy)
        g_kl = tree_expected_grad(variant, form, theta, theta_old, theta_old, "token", adv=zero)
        exact = BETA * grad(seq_divergence(variant, theta, theta_old), theta)
        if variant in ("FKL", "UFKL") or on_policy:
            assert max_abs(g_kl, exact) < TOL  # FKL/UFKL: any theta; RKL/URKL: at theta = theta_old
        else:
            assert max_abs(g_kl, exact) > GAP  # negative control: token-local RKL is not exact off-policy
        g_r = tree_expected_grad(variant, form, theta, theta_old, theta_old, "token", beta=0.0)
        exact_r = -grad((TREE.seq_logprobs(theta).exp() * R_TREE).sum(), theta)
        if on_policy:
            assert max_abs(g_r, exact_r) < TOL
        else:
            assert max_abs(g_r, exact_r) > GAP  # negative control: the token-ratio reward term is biased off-policy


@pytest.mark.parametrize("variant,form", ALL)
def test_r6_token_level_init_anchor_is_per_state(variant, form):
    for on_policy in (False, True):
        theta, theta_old, theta_init = tree_setup(on_policy=on_policy)
        g = tree_expected_grad(variant, form, theta, theta_old, theta_init, "token", adv=torch.zeros_like(R_TREE))
        d_old = TREE.state_probs(theta_old)
        base = variant.lstrip("U")
        per_state = TREE.per_state_kl(theta_init, theta) if base == "FKL" else TREE.per_state_kl(theta, theta_init)
        assert max_abs(g, BETA * grad((d_old * per_state).sum(), theta)) < TOL
        seq = BETA * grad(seq_divergence(variant, theta, theta_init), theta)
        assert max_abs(g, seq) > 0.01  # negative control, even at theta = theta_old (observed >= 0.03)


# ---- R7 clip ------------------------------------------------------------------------------------------------------
def ppo_dual_clip(w, A, eps_low=0.2, eps_high=0.28, c=10.0):
    """Textbook PPO dual clip, written independently of the files."""
    loss = torch.max(-w * A, -torch.clamp(w, 1 - eps_low, 1 + eps_high) * A)
    return torch.min(loss, -c * A) if A < 0 else loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_r7_reinforce_mask_is_ppo_dual_clip_at_beta_0(variant):
    for w in [0.5, 0.79, 0.81, 1.0, 1.2, 1.27, 1.29, 2.0, 9.9, 10.1, 20.0]:
        for A in [1.0, -1.0, 0.3, -0.3]:
            lp = torch.tensor(w, dtype=DT).log().view(1, 1).requires_grad_()
            lp_old = torch.zeros(1, 1, dtype=DT)
            adv = torch.tensor([A], dtype=DT)
            g = grad(loss_of(variant, "reinforce", lp, lp_old, lp_old, adv, clip=True, beta=0.0), lp)
            g_ppo = grad(ppo_dual_clip(lp.exp(), adv).sum(), lp)
            assert max_abs(g, g_ppo) < TOL, (w, A)
            g_diff = grad(loss_of(variant, "differentiable", lp, lp_old, lp_old, adv, clip=True, beta=0.0), lp)
            assert max_abs(g_diff, g_ppo) < TOL, (w, A)


def test_r7_mask_follows_the_effective_advantage():
    # RKL, old anchor, w = 1.5 > 1 + eps_high, A = +0.001 but C = -beta w (log w + 1) makes A' = A + C/w < 0
    lp = torch.tensor(1.5, dtype=DT).log().view(1, 1).requires_grad_()
    lp_old, adv = torch.zeros(1, 1, dtype=DT), torch.tensor([0.001], dtype=DT)
    g = grad(loss_of("RKL", "reinforce", lp, lp_old, lp_old, adv, clip=True), lp)
    coef = 1.5 * 0.001 - BETA * 1.5 * (torch.log(torch.tensor(1.5, dtype=DT)) + 1)
    assert abs(g.item() + coef.item()) < TOL  # kept: 1 - eps_low < w < c with A' < 0
    assert abs(g.item()) > GAP  # negative control: a mask on sign(A) > 0 with w > 1 + eps_high would drop it


# ---- R8 no hidden clamp ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [15.0, -15.0])
def test_r8_large_log_ratios_pass_through(d):
    for mod in (FKL, RKL):
        assert abs(
            mod.k3(torch.tensor(d, dtype=DT)).item() - (torch.tensor(d, dtype=DT).exp().item() - 1 - d)
        ) < 1e-9 * max(1.0, abs(torch.tensor(d).exp().item()))
    lp, lp_old = torch.tensor([[d]], dtype=DT), torch.zeros(1, 1, dtype=DT)
    w = torch.tensor(d, dtype=DT).exp()
    expected = {"RKL": w * d, "URKL": w * (torch.exp(torch.tensor(-d, dtype=DT)) - 1 + d), "FKL": -d, "UFKL": w - 1 - d}
    for variant, e in expected.items():
        value = loss_of(variant, "differentiable", lp, lp_old, lp_old, torch.zeros(1, dtype=DT), beta=1.0)
        assert abs(value.item() - e.item() if torch.is_tensor(e) else value.item() - e) < 1e-9 * max(1.0, abs(float(e)))


# ---- R9 aggregation ---------------------------------------------------------------------------------------------------
HAND_LP = -torch.tensor([[1.0, 0, 0, 0], [2.0, 3.0, 4.0, 0]], dtype=DT)
HAND_MASK = torch.tensor([[1.0, 0, 0, 0], [1.0, 1, 1, 0]], dtype=DT)


def hand_loss(rows, agg, num_seqs, num_tokens):
    """FKL, old anchor, A = 0, beta = 1: every token's term is -lp = 1 | 2, 3, 4 (the grpo.md T9 batch)."""
    lp = HAND_LP[rows]
    adv = torch.zeros(lp.shape[0], dtype=DT)
    loss, _ = FKL.rpg_loss(
        lp, lp, lp, adv, HAND_MASK[rows], num_seqs, num_tokens, beta=1.0, loss_agg=agg, max_new_tokens=4
    )
    return loss.item()


def test_r9_aggregation_by_hand_and_split_over_ranks():
    assert abs(hand_loss([0, 1], "token_mean", 2, 4) - 2.5) < TOL
    assert abs(hand_loss([0, 1], "seq_mean_token_sum_norm", 2, 4) - 1.25) < TOL
    assert abs(hand_loss([0], "token_mean", 2, 4) + hand_loss([1], "token_mean", 2, 4) - 2.5) < TOL
    local_means = (hand_loss([0], "token_mean", 1, 1) + hand_loss([1], "token_mean", 1, 3)) / 2
    assert abs(local_means - 2.0) < TOL  # negative control: averaging per-rank token means


# ---- dynamic sampling: a short in-process run, the batch given to the update spied ----------------------------
@pytest.mark.parametrize("script", ["rpg_fkl", "rpg_rkl"])
def test_dynamic_sampling_fills_the_batch_with_groups_that_have_reward_variance(script, tmp_path, monkeypatch, capsys):
    """8 prompts x G = 4, one step: with --dynamic_sampling every one of the 8 groups given to the update has unequal
    rewards (advantages not all 0), after at least one extra generation batch. Negative control: without the flag,
    all-equal groups reach the update."""
    algo, seen = load_algorithm(script), []
    update = algo.update_policy
    monkeypatch.setattr(algo, "update_policy", lambda m, o, b, *a: seen.append(b) or update(m, o, b, *a))
    tiny = "--prompts_per_step 8 --num_generations 4 --num_minibatches 1 --total_steps 1 --eval_num_prompts 2"
    for on in (True, False):
        flags = [*tiny.split(), "--no_eval_kl", "--output_dir", str(tmp_path), "--run_name", f"run_{on}"]
        code, err = run_in_process(script, flags + ["--dynamic_sampling"] * on, capsys)
        assert code == 0, err[-3000:]
        row, groups = read_metrics(tmp_path / f"run_{on}")[-1], seen[-1]["advantages"].view(-1, 4)
        assert groups.shape[0] == 8 and (groups != 0).any(1).all().item() is on
        assert (row["charts/frac_reward_zero_std"] == 0) is on and (row.get("charts/gen_batches", 1) >= 2) is on
        assert (row.get("charts/frac_groups_dropped", 0) > 0) is on
