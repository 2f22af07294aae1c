"""Closed-form checks of algorithms/a_star_po.py (spec a_star_po.md section 4, P1-P10).

Categorical (K arms) and token-tree policies in float64; population losses are exact expectations of the file's
own `a_star_po_loss` under a sampler mu; minimizers by L-BFGS.
"""

import math
import os
import shutil

import pytest
import torch

from tests.harness import (
    DT,
    TINY_RUN,
    TokenTree,
    grad,
    kl,
    lbfgs_minimize,
    load_algorithm,
    max_abs,
    random_logits,
    read_metrics,
    run_in_process,
    run_script,
)
from tests.test_reliability import signal_in_process, untimed

apo = load_algorithm("a_star_po")
TOL, GAP = 1e-10, 1e-3


def loss_one(lp, lp_ref, v_hat, r, beta, length_normalized=False):
    """The file's loss on one sequence given as token log-probs [1, T]. `length_normalized` feeds token means
    instead of sums (the per-token bug the tree test must catch)."""
    T = lp.shape[-1]
    scale = 1.0 / T if length_normalized else 1.0
    zero = lp.new_zeros(())
    mask = torch.ones_like(lp)
    return apo.a_star_po_loss(
        lp * scale, lp_ref * scale, mask, v_hat.view(1), r.view(1), zero, 1, T, beta2=beta, entropy_coef=0.0
    )[0]


def categorical(K=7, seed=0, beta=0.4):
    lp_ref = torch.log_softmax(random_logits(K, seed, requires_grad=False), -1)
    r = (torch.rand(K, generator=torch.Generator().manual_seed(seed + 1)) > 0.5).to(DT)
    r[0], r[1] = 1.0, 0.0  # both values present
    v_star = beta * torch.logsumexp(lp_ref + r / beta, -1)
    pi_star = torch.softmax(lp_ref + r / beta, -1)
    return lp_ref, r, v_star, pi_star


def sampler_loss(z, lp_ref, r, v_hat, beta, mu):
    lp = torch.log_softmax(z, -1)
    return sum(mu[y] * loss_one(lp[y].view(1, 1), lp_ref[y].view(1, 1), v_hat, r[y], beta) for y in range(len(r)))


# ---- P1, P2 exact V* and a biased V_hat with a fixed sampler --------------------------------------------------------
def test_p1_p2_exact_value_gives_pi_star_for_any_sampler():
    beta = 0.4
    lp_ref, r, v_star, pi_star = categorical(beta=beta)
    mu = torch.softmax(random_logits(7, 9, requires_grad=False), -1)  # arbitrary full-support sampler
    assert sampler_loss(torch.log(pi_star), lp_ref, r, v_star, beta, mu).abs() < 1e-12
    z = lbfgs_minimize(lambda z: sampler_loss(z, lp_ref, r, v_star, beta, mu), torch.zeros(7, dtype=DT))
    assert max_abs(torch.softmax(z, -1), pi_star) < 1e-8
    z_off = lbfgs_minimize(lambda z: sampler_loss(z, lp_ref, r, v_star + 0.3, beta, mu), torch.zeros(7, dtype=DT))
    assert max_abs(torch.softmax(z_off, -1), pi_star) > 0.05  # negative control (observed 0.38 in the spec)


# ---- P3 on-policy gradient ignores the offset ------------------------------------------------------------------------
def test_p3_on_policy_gradient_is_minus_2_beta_grad_j():
    beta = 0.4
    lp_ref, r, v_star, _ = categorical(beta=beta)
    theta = random_logits(7, 3)
    lp = torch.log_softmax(theta, -1)
    J = (lp.exp() * r).sum() - beta * kl(lp, lp_ref)
    for c in (0.0, 0.3, -1.7):
        w = lp.exp().detach()
        total = sum(w[y] * loss_one(lp[y].view(1, 1), lp_ref[y].view(1, 1), v_star + c, r[y], beta) for y in range(7))
        assert max_abs(grad(total, theta), -2 * beta * grad(J, theta)) < 1e-12


# ---- P4 token tree: the sequence sum recovers the soft-Bellman policy ------------------------------------------------
def test_p4_token_tree_soft_bellman():
    beta, tree = 0.5, TokenTree(vocab=3, max_len=2)
    theta_ref = tree.random_logits(1).detach()
    R = torch.rand(len(tree.seq_list), generator=torch.Generator().manual_seed(2), dtype=DT)
    lp_ref = tree.token_logprobs(theta_ref)
    mu = torch.softmax(random_logits(len(tree.seq_list), 4, requires_grad=False), -1)  # sampler over 9 sequences
    v_star = beta * torch.logsumexp(tree.seq_logprobs(theta_ref) + R / beta, -1)

    def population(theta, length_normalized=False):
        lp = tree.token_logprobs(theta)
        return sum(
            mu[i] * loss_one(lp[i : i + 1], lp_ref[i : i + 1], v_star, R[i], beta, length_normalized)
            for i in range(len(R))
        )

    # soft-Bellman: pi*(a2|a1) = pi_ref(a2|a1) e^{R/beta} / Z(a1), pi*(a1) proportional to pi_ref(a1) Z(a1)
    ref = torch.softmax(theta_ref, -1)
    first = [s for s in tree.states if len(s) == 1]
    second = torch.stack(
        [
            ref[tree.states.index(s)] * torch.exp(R[[tree.seq_list.index(s + (a,)) for a in range(3)]] / beta)
            for s in first
        ]
    )
    Z = second.sum(-1)
    star_first = ref[0] * Z / (ref[0] * Z).sum()
    star = torch.cat([star_first.view(1, 3), second / Z[:, None]])

    def tree_policy(theta):
        return torch.softmax(theta, -1)[[tree.states.index(()), *[tree.states.index(s) for s in first]]]

    fit = lbfgs_minimize(population, torch.zeros(tree.num_states, 3, dtype=DT))
    assert max_abs(tree_policy(fit), star) < 1e-8
    fit_mean = lbfgs_minimize(lambda t: population(t, True), torch.zeros(tree.num_states, 3, dtype=DT))
    assert max_abs(tree_policy(fit_mean), star) > 0.05  # negative control: a token-mean Delta (observed 0.2)


# ---- P5 sampler frozen at pi*: safe when V_hat <= V* -------------------------------------------------------------------
def test_p5_frozen_sampler_prefers_a_low_value_baseline():
    beta = 0.4
    lp_ref, r, v_star, pi_star = categorical(beta=beta)

    def best_of_restarts(v_hat):
        fits = [
            lbfgs_minimize(
                lambda z: sampler_loss(z, lp_ref, r, v_hat, beta, pi_star),
                random_logits(7, 20 + k, requires_grad=False),
            )
            for k in range(6)
        ]
        losses = [sampler_loss(z, lp_ref, r, v_hat, beta, pi_star).item() for z in fits]
        return torch.softmax(fits[min(range(6), key=losses.__getitem__)], -1)

    assert max_abs(best_of_restarts(v_star - 0.3), pi_star) < 1e-8
    assert max_abs(best_of_restarts(v_star + 0.3), pi_star) > 0.05  # negative control (observed 0.52)


# ---- P6, P7 stage 1 -------------------------------------------------------------------------------------------------------
def test_p6_value_estimate_closed_forms():
    N = 8
    rows = torch.tensor([[1.0] * k + [0.0] * (N - k) for k in range(N + 1)], dtype=DT)
    for beta1 in (0.5, 0.1, 2.0):
        k = torch.arange(N + 1, dtype=DT)
        expected = beta1 * torch.log(1 - k / N + k / N * math.exp(1 / beta1))
        assert max_abs(apo.value_estimate(rows, beta1), expected) < 1e-12
    r = torch.rand(5, N, generator=torch.Generator().manual_seed(0), dtype=DT)
    assert (r.max(-1).values - apo.value_estimate(r, 1e-3)).abs().max() <= 1e-3 * math.log(N) + 1e-12
    assert (r.mean(-1) - apo.value_estimate(r, 1e4)).abs().max() < 1e-4
    assert torch.equal(apo.value_estimate(r, 0.5, "mean"), r.mean(-1))  # --value_estimator mean: beta1 unused
    with pytest.raises(ValueError, match="unknown value estimator 'softmax'"):  # a misspelling is not the soft max
        apo.value_estimate(r, 0.5, "softmax")
    # Jensen: p = 0.3, N = 8, beta1 = 0.5
    p, beta1 = 0.3, 0.5
    v_star = beta1 * math.log(1 - p + p * math.exp(1 / beta1))
    expected_v_hat = sum(
        math.comb(N, k) * p**k * (1 - p) ** (N - k) * apo.value_estimate(rows[k : k + 1], beta1).item()
        for k in range(N + 1)
    )
    assert abs(v_star - 0.535229) < 1e-6 and abs(expected_v_hat - 0.499968) < 1e-6


def test_p6_nonpositive_beta1_and_beta2_are_errors():
    """beta1 -> 0 tends to the max, not the mean: beta1 <= 0 is refused, naming the estimator of the mean; so is
    beta2 <= 0 and a prompt budget below the step's, all before any model loads (check_args)."""
    for beta1 in (0.0, -0.1):
        with pytest.raises(ValueError, match="estimator 'mean'"):
            apo.value_estimate(torch.zeros(1, 2), beta1)
        with pytest.raises(apo.UserError, match="--beta1 must be > 0.*--value_estimator mean"):
            apo.check_args(apo.Args(beta1=beta1), 1)
    apo.check_args(apo.Args(beta1=0.0, value_estimator="mean"), 1)  # beta1 unused by the mean
    with pytest.raises(apo.UserError, match="--beta2 must be > 0"):
        apo.check_args(apo.Args(beta2=0.0), 1)
    with pytest.raises(apo.UserError, match="--prompts_per_step 256 > --max_train_prompts 16"):
        apo.check_args(apo.Args(max_train_prompts=16), 1)


def test_p7_filter_drops_exactly_the_unsolved_prompts():
    r = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 0, 0.5]])
    assert apo.solved_mask(r).tolist() == [False, True, False, True, True]


# ---- P8, P9 the script: cache and world-size independent stage 1 ---------------------------------------------------------
STAGE1 = [*TINY_RUN, "--total_steps", "1", "--max_train_prompts", "12", "--num_ref_samples", "3"]


def read_cache(path):
    import json

    with open(path) as f:
        return [json.loads(line) for line in f][1:]


def stage1_row(run_dir):
    """The step-0 row of the stage-1 metrics (logged after the step-0 eval row)."""
    return next(r for r in read_metrics(run_dir) if "charts/stage1_generated" in r)


def test_p8_p9_stage1_cache_and_world_size(tmp_path, capsys):
    code, err = run_in_process("a_star_po", [*STAGE1, "--output_dir", str(tmp_path), "--run_name", "one"], capsys)
    assert code == 0, err[-3000:]
    two = run_script("a_star_po", *STAGE1, "--output_dir", str(tmp_path), "--run_name", "two", nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    cache = str(tmp_path / "one" / "value_estimates.jsonl")  # in the run folder, beside checkpoints/ and final
    assert read_cache(cache) == read_cache(tmp_path / "two" / "value_estimates.jsonl")  # per-prompt sampling noise
    assert len(read_cache(cache)) == 12 and stage1_row(tmp_path / "one")["charts/stage1_generated"] == 12 * 3
    assert os.readlink(tmp_path / "one" / "final") == os.path.join("checkpoints", "step_000001")
    # the same run folder, resumed: stage 1 is read from its cache, nothing generated, nothing logged again
    resume = ["--resume", str(tmp_path / "one"), "--total_steps", "2"]
    code, err, out = run_in_process("a_star_po", resume, capsys, stdout=True)
    assert code == 0, err[-3000:]
    assert f"read from {cache}" in out
    assert [r["step"] for r in read_metrics(tmp_path / "one")] == [0, 0, 1, 2]
    assert os.readlink(tmp_path / "one" / "final") == os.path.join("checkpoints", "step_000002")
    # another run given the cache: reads it, generates nothing, writes no cache of its own
    again = [*STAGE1, "--output_dir", str(tmp_path), "--run_name", "again", "--value_cache", cache]
    code, err, out = run_in_process("a_star_po", again, capsys, stdout=True)
    assert code == 0, err[-3000:]
    assert "read from" in out and stage1_row(tmp_path / "again")["charts/stage1_generated"] == 0
    assert stage1_row(tmp_path / "again")["charts/value_mean"] == stage1_row(tmp_path / "one")["charts/value_mean"]
    assert not os.path.exists(tmp_path / "again" / "value_estimates.jsonl")
    # a cache written under other settings: a one-line error before anything is written
    other = [*STAGE1, "--num_ref_samples", "4", "--output_dir", str(tmp_path), "--run_name", "other"]
    code, err = run_in_process("a_star_po", [*other, "--value_cache", cache], capsys)
    assert str(code).startswith("error: ") and "written with other settings" in str(code)  # (sys.exit's line)
    assert not os.path.exists(tmp_path / "other")


# ---- P10 stage 1 stopped and resumed; bad cache files -----------------------------------------------------------------
def test_p10_sigterm_in_stage1_keeps_the_finished_prompts_and_resume_completes_them(tmp_path, capsys):
    """SIGTERM during stage 1 (one prompt per chunk): exit 143 with a `stopped:` line, the finished prompts kept in
    the cache; --resume samples only the others and ends with the cache and the step-1 row of an uninterrupted run."""
    flags = [
        *STAGE1,
        "--max_train_prompts",
        "100",
        "--num_ref_samples",
        "4",
        "--gen_batch_size",
        "4",
        "--output_dir",
        str(tmp_path),
    ]
    code, err = run_in_process("a_star_po", [*flags, "--run_name", "full"], capsys)
    assert code == 0, err[-3000:]
    cache = tmp_path / "term" / "value_estimates.jsonl"

    def ready():  # three prompts of stage 1 finished
        return cache.exists() and cache.read_text().count("\n") >= 3

    rc, err = signal_in_process("a_star_po", [*flags, "--run_name", "term"], capsys, ready)  # SIGTERM
    assert rc == 143 and "stopped: SIGTERM: stage 1 has" in err, err[-3000:]
    kept, want = read_cache(cache), read_cache(tmp_path / "full" / "value_estimates.jsonl")
    assert 2 <= len(kept) < 100 and kept == want[: len(kept)]  # the finished part, with its values
    code, err = run_in_process("a_star_po", ["--resume", str(tmp_path / "term")], capsys)
    assert code == 0, err[-3000:]
    assert cache.read_text() == (tmp_path / "full" / "value_estimates.jsonl").read_text()
    assert stage1_row(tmp_path / "term")["charts/stage1_generated"] == (100 - len(kept)) * 4
    # every row as in the uninterrupted run (step 0 once: its eval and its stage-1 row), but the count of
    # stage-1 samples generated by this process
    rows = {name: untimed(read_metrics(tmp_path / name)) for name in ("full", "term")}
    for r in rows["full"] + rows["term"]:
        r.pop("charts/stage1_generated", None)
    assert [r["step"] for r in rows["term"]] == [0, 0, 1]
    assert rows["full"] == rows["term"]


def test_p10_killed_in_stage1_resumes_with_its_finished_prompts(tmp_path, capsys):
    """What SIGKILL during stage 1 leaves: no checkpoint, the step-0 eval row, the cache of the finished prompts
    with a cut last line (the append in flight). --resume starts the run again at step 0 in the same folder
    (a warning), drops the cut line (a warning), samples only the prompts still missing and ends as the
    uninterrupted run (cache and rows)."""
    flags = [*STAGE1, "--max_train_prompts", "40", "--num_ref_samples", "2", "--output_dir", str(tmp_path)]
    code, err = run_in_process("a_star_po", [*flags, "--run_name", "full"], capsys)
    assert code == 0, err[-3000:]
    full, run = tmp_path / "full", tmp_path / "kill"
    shutil.copytree(full, run, symlinks=True)
    shutil.rmtree(run / "checkpoints")
    os.remove(run / "final")
    lines = (full / "value_estimates.jsonl").read_text().splitlines(keepends=True)
    (run / "value_estimates.jsonl").write_text("".join(lines[:11]) + lines[11][:20])  # 10 prompts and a cut one
    (run / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines(keepends=True)[0])
    code, err = run_in_process("a_star_po", ["--resume", str(run)], capsys)
    assert code == 0, err[-3000:]
    assert "has no checkpoint: starting at step 0" in err and "dropping the cut last line" in err
    assert (run / "value_estimates.jsonl").read_text() == "".join(lines)
    assert stage1_row(run)["charts/stage1_generated"] == (40 - 10) * 2
    rows = {name: untimed(read_metrics(tmp_path / name)) for name in ("full", "kill")}
    for r in rows["full"] + rows["kill"]:
        r.pop("charts/stage1_generated", None)
    assert rows["full"] == rows["kill"]


@pytest.mark.parametrize("case", ["directory", "cut header", "broken line", "not UTF-8"])
def test_p10_bad_value_cache_is_an_error_before_stage1(tmp_path, capsys, case):
    """(A cut LAST line is what a kill leaves: it is dropped with a warning, test_p10_killed_in_stage1_...)"""
    path = tmp_path / "cache.jsonl"
    if case == "directory":
        path.mkdir()
    else:  # (the header's settings need not match: the file is refused before they are compared)
        broken = b'{"meta": {}}\n{"pro\n{"prompt_id": 0, "rewards": [0.0, 1.0, 0.0], "v_hat": 0.3}\n'
        cut_header = b'{"meta": {"task": "ari'
        path.write_bytes({"broken line": broken, "cut header": cut_header, "not UTF-8": b"\xff\xfe\x00"}[case])
    flags = [*STAGE1, "--value_cache", str(path), "--output_dir", str(tmp_path / "out"), "--run_name", "r"]
    code, err = run_in_process("a_star_po", flags, capsys)
    message = {"directory": "is a directory", "broken line": "line 2, is not JSON"}.get(case, "truncated or corrupt")
    assert isinstance(code, str) and code.startswith("error: ") and message in code and "Traceback" not in err, code
    assert not (tmp_path / "out" / "r").exists()  # before stage 1: no run folder, no model loaded
