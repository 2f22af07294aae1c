"""The training loops, end to end: which model produces which log-probs, at which temperature, over which tokens,
with which masks and normalizers, feeding which loss.

Each script runs two steps in this process (its own `main`, unchanged) on the tiny policy in float64, with AdamW
replaced by plain SGD (so an update is minus lr times the gradient) and spies that only record: what the sampler
returned and the trained model's parameters before and after each update. The test then recomputes the second
step independently -- one unpadded forward per row of the initial model (reference / teacher / pi_ref) and of the
rollout policy, at the run's temperature (0.7), with its own completion mask (up to and including the first EOS),
its own rewards (the answer is computed from the prompt text) -- feeds them to the script's pure loss function,
and checks (a) the logged loss / KL / advantage statistics and (b) the parameter update against that recomputation.
The second step is the one checked because at the first step the policy still IS the reference. The last eval's
pass@1 and exact KL to the initial policy are recomputed from its samples the same way.
Negative controls (`test_negative_controls_*`): the reference replaced by the policy, the temperature dropped and
the mask shifted by one token each change the recomputation by far more than the tolerance.
"""

import dataclasses
import inspect
import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

from common import TINY_POLICY, TINY_TEACHER
from tests.harness import load_algorithm, read_metrics, run_in_process

T = 0.7  # every run samples and scores at this temperature: a loop that drops it cannot pass
LR, CLIP = 0.05, 0.3  # SGD steps of norm <= 0.015 (CLIP is no script's default: the clip must use the flag)
RTOL = 1e-6
COMMON = [
    "--total_steps",
    "2",
    "--eval_every",
    "0",
    "--eval_num_prompts",
    "4",
    "--eval_samples_per_prompt",
    "2",
    "--temperature",
    str(T),
    "--learning_rate",
    str(LR),
    "--max_grad_norm",
    str(CLIP),
    "--micro_batch_size",
    "64",
    "--num_minibatches",
    "1",
]
FLAGS = {  # two passes over each rollout (num_iterations 2), so old log-probs matter; grpo also with one pass
    "grpo": ["--prompts_per_step", "4", "--num_generations", "4", "--num_iterations", "2", "--beta", "0.3"],
    "grpo:mu1": ["--prompts_per_step", "4", "--num_generations", "4", "--beta", "0.3", "--loss_agg", "token_mean"],
    # two mini-batches per pass: each optimizer step normalized by its own mini-batch's sequences and tokens
    "grpo:mb2": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --num_minibatches 2 --beta 0.3".split(),
    # one pass in two mini-batches: the second is off-policy, so the rollout's log-probs are needed
    "grpo:mb2mu1": "--prompts_per_step 4 --num_generations 4 --num_minibatches 2 --beta 0.3".split(),
    # the KL in the reward: r - beta sum_t k1_t of the rollout policy, before the group mean and std
    "grpo:reward": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --beta 0.3 --kl_placement reward".split(),
    "rpg_fkl": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --kl_anchor init --beta 0.3".split(),
    "rpg_rkl": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --kl_anchor init --beta 0.3".split(),
    "pmd_mean": ["--prompts_per_step", "4", "--num_generations", "4", "--num_iterations", "2"],
    "pmd_mean:mb2": "--prompts_per_step 4 --num_generations 4 --num_minibatches 2".split(),
    # the paper's anchor (the rollout policy) over two mini-batches, on a batch refilled by dynamic sampling
    "rpg_fkl:old": "--prompts_per_step 4 --num_generations 4 --num_minibatches 2 --beta 0.3 --dynamic_sampling".split(),
    "a_star_po": [
        "--prompts_per_step",
        "8",
        "--num_iterations",
        "2",
        "--max_train_prompts",
        "16",
        "--num_ref_samples",
        "4",
        "--beta2",
        "0.05",
        "--entropy_coef",
        "0.01",
    ],
    "dpo_kl": ["--prompts_per_step", "4", "--num_generations", "4", "--num_iterations", "2"],
    "gkd": ["--prompts_per_step", "8", "--num_iterations", "2", "--beta", "0.2"],  # JSD(0.5) is symmetric
    "gkd:data": "--prompts_per_step 8 --beta 0.2 --lmbda 0".split(),  # off-policy: the dataset's answers
    "gkd:seq_kd": "--prompts_per_step 8 --beta 0.2 --lmbda 0 --seq_kd".split(),  # the teacher's samples
    # policy gradient on the sampled-token reverse KL, reward-to-go, with a task reward and two passes (clipping)
    "gkd:pg": "--prompts_per_step 8 --update pg --opd_discount 1 --task_reward_weight 0.5 --num_iterations 2".split(),
}


# ---- running a script with spies ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def float64_rms_norm(monkeypatch):
    """Llama's RMSNorm computes in float32 even in a float64 model; in float64 the script's batched, prompt-cached
    forwards and the unpadded forwards here then agree to ~1e-12 instead of float32's ~1e-7."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    def forward(self, h):
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(LlamaRMSNorm, "forward", forward)


def flat(model) -> torch.Tensor:
    model = getattr(model, "module", model)
    return torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])


@dataclasses.dataclass
class Record:
    samples: list  # (number of updates before the call, sampler output, its positional arguments)
    updates: list  # (parameters before, parameters after, the batch dict given to the update)
    rows: list  # metrics.jsonl
    run_dir: str
    seeds: list = dataclasses.field(default_factory=list)  # (calling function and line, stream, keys, seed)
    generators: list = dataclasses.field(default_factory=list)  # (calling function, initial seed of its generator)
    models: list = dataclasses.field(default_factory=list)  # (updates so far, calling function, the sampling model)


def caller_name() -> str:
    """The name of the function that called the spy that calls this."""
    return sys._getframe(2).f_code.co_name


def run_spied(name, flags, tmp_path, monkeypatch, capsys, sampler="sample_batch", update=None) -> Record:
    algo = load_algorithm(name)
    update = update or {"dpo_kl": "update_pairs"}.get(name, "update_policy")  # DPO's update trains on pairs
    rec = Record([], [], [], str(tmp_path / "run"))
    real_load, real_sample, real_update = algo.load_model, getattr(algo, sampler), getattr(algo, update)
    real_seed_of = algo.seed_of

    def load_model(*a, **k):  # float64: the recomputation below agrees to rounding (1e-12), not float32's 1e-6
        model = real_load(*a, **k)
        return model.double() if isinstance(model, torch.nn.Module) else model

    def sample(*a, **k):
        rec.models.append((len(rec.updates), caller_name(), flat(a[0])))
        out = real_sample(*a, **k)
        rec.samples.append((len(rec.updates), out, a))
        generator = inspect.signature(real_sample).bind(*a, **k).arguments.get("generator")
        if generator is not None:
            rec.generators.append((caller_name(), generator.initial_seed()))
        return out

    def seed_spy(args, stream, *keys):
        caller = sys._getframe(1)  # (not inspect.stack(): it reads the source of every frame, 0.2 s a call)
        seed = real_seed_of(args, stream, *keys)
        rec.seeds.append((f"{caller.f_code.co_name}:{caller.f_lineno}", stream, keys, seed))
        return seed

    def update_spy(model, *a, **k):
        before = flat(model)
        out = real_update(model, *a, **k)
        batch = next((x for x in a if isinstance(x, (dict, list))), None)
        rec.updates.append((before, flat(model), batch))
        return out

    monkeypatch.setattr(algo, "load_model", load_model)
    monkeypatch.setattr(algo, sampler, sample)
    monkeypatch.setattr(algo, update, update_spy)
    monkeypatch.setattr(algo, "seed_of", seed_spy)
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, **k: torch.optim.SGD(params, lr=lr))
    code, err = run_in_process(name, [*COMMON, *flags, "--output_dir", str(tmp_path), "--run_name", "run"], capsys)
    assert code == 0, err[-3000:]
    rec.rows = read_metrics(rec.run_dir)
    return rec


def check_streams(rec, sampler_calls: bool = True, training_samples: bool = True) -> None:
    """Random streams: no two places that draw a seed ever get the same one (a collision silently makes two streams
    one: before streams had names, rank 0's sampler, the prompt draw and the first mini-batch shuffle of a step
    shared a seed); the training sampler's noise differs at every step; the eval's noise is the same at every eval."""
    sites = {}
    for site, _, _, seed in rec.seeds:
        sites.setdefault(seed, set()).add(site)
    assert len(sites) >= 3 and all(len(s) == 1 for s in sites.values()), [s for s in sites.values() if len(s) > 1]
    if sampler_calls:
        evals = {seed for caller, seed in rec.generators if caller == "evaluate"}
        train = [seed for caller, seed in rec.generators if caller != "evaluate"]
        assert len(evals) == 1 and not evals & set(train), (evals, train)
        assert len(train) >= 2 * training_samples and len(set(train)) == len(train), train


def check_sampler_models(rec, case: str) -> None:
    """Every rollout and every eval sample comes from the current policy (its parameters after the updates so far),
    except GKD's step-0 eval of the teacher (`eval/teacher_pass@1`) and its --seq_kd rollouts, which come from the
    teacher. (A*-PO's stage 1 samples pi_ref before any update: the same parameters.)"""
    teacher = flat(tiny(TINY_TEACHER))
    for n, caller, params in rec.models:
        current = rec.updates[n - 1][1] if n else rec.updates[0][0]
        if case.startswith("gkd") and n == 0 and caller == "evaluate" and torch.equal(params, teacher):
            continue
        want = teacher if "--seq_kd" in FLAGS[case] and caller != "evaluate" else current
        assert torch.equal(params, want), f"{caller} sampled from another model after {n} updates"


# ---- independent recomputation ----------------------------------------------------------------------------------
_models = {}


def tiny(path=TINY_POLICY, params=None):
    """A fresh float64 copy of a shipped model, optionally with the given flat parameters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    model.eval()
    if params is not None:
        torch.nn.utils.vector_to_parameters(params.clone(), model.parameters())  # (it keeps views of the vector)
    return model


def tokenizer():
    if "tok" not in _models:
        from transformers import AutoTokenizer

        _models["tok"] = AutoTokenizer.from_pretrained(TINY_POLICY)
    return _models["tok"]


def rollout_rows(batch) -> list:
    """(prompt tokens, completion tokens up to and including the first EOS) of every row of a sampler output."""
    eos = tokenizer().eos_token_id
    comp = batch["completion_ids"].tolist()
    if "prompt_index" in batch:
        pid, pmask = batch["prompt_ids"], batch["prompt_mask"]
        prompts = [pid[i][pmask[i].bool()].tolist() for i in batch["prompt_index"].tolist()]
    else:
        C = batch["completion_ids"].shape[1]
        ids, att = batch["input_ids"][:, :-C], batch["attention_mask"][:, :-C]
        prompts = [ids[i][att[i].bool()].tolist() for i in range(ids.shape[0])]
    cut = lambda c: c[: c.index(eos) + 1] if eos in c else c  # noqa: E731
    return [(p, cut(c)) for p, c in zip(prompts, comp)]


def answer_of(prompt_tokens) -> str:
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", tokenizer().decode(prompt_tokens, skip_special_tokens=True)).groups()
    return str(int(a) + int(b))


def rewards_of(rows) -> torch.Tensor:
    texts = [tokenizer().decode(c, skip_special_tokens=True) for _, c in rows]
    return torch.tensor([float(t.strip() == answer_of(p)) for t, (p, _) in zip(texts, rows)], dtype=torch.float64)


def row_logits(model, rows) -> list:
    """Raw logits predicting each completion token, one unpadded forward per row: [len(c), V] per row."""
    return [model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1] for p, c in rows]


def padded(per_row: list, value=0.0) -> torch.Tensor:
    C = max(x.shape[0] for x in per_row)
    return torch.stack([F.pad(x, (0, 0) * (x.dim() - 1) + (0, C - x.shape[0]), value=value) for x in per_row])


def completion_mask(rows) -> torch.Tensor:
    return padded([torch.ones(len(c), dtype=torch.float64) for _, c in rows])


def token_logprobs(model, rows) -> torch.Tensor:
    """log softmax(logits / T) of each completion token, [B, C] (0 at padding)."""
    lps = [
        (lg / T).log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        for lg, (_, c) in zip(row_logits(model, rows), rows)
    ]
    return padded(lps)


def exact_kl_seq(p_model, q_model, rows) -> torch.Tensor:
    """sum over each completion's positions of KL(p(.|s_t) || q(.|s_t)) at temperature T: [B]."""
    with torch.no_grad():
        out = []
        for lp, lq in zip(row_logits(p_model, rows), row_logits(q_model, rows)):
            a, b = (lp / T).log_softmax(-1), (lq / T).log_softmax(-1)
            out.append((a.exp() * (a - b)).sum())
        return torch.stack(out)


def sgd_replay(params_before, loss_fn, schedule: list):
    """Parameters after one SGD step (lr LR, gradient norm clipped to CLIP as torch does) per entry of `schedule`, on
    loss_fn(model, rows): rows None is the whole batch, else the row indices of a mini-batch; and the stats averaged
    over the steps, as the scripts log them."""
    model = tiny(params=params_before)
    stats_sum, clipped = {}, False
    for rows in schedule:
        loss, stats = loss_fn(model, rows)
        grads = [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
        ]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        scale = torch.clamp(CLIP / (norm + 1e-6), max=1.0)
        clipped = clipped or norm > CLIP
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= LR * scale * g
        for k, v in stats.items():  # means over the steps; extremes (`*_min`, `*_max`) over the steps
            pick = min if k.endswith("_min") else max if k.endswith("_max") else None
            stats_sum[k] = pick(stats_sum.get(k, float(v)), float(v)) if pick else stats_sum.get(k, 0.0) + float(v)
    assert clipped, "no step was clipped: --max_grad_norm would go unchecked"
    n = len(schedule)
    return flat(model), {k: v if k.endswith(("_min", "_max")) else v / n for k, v in stats_sum.items()}


def minibatch_schedule(algo, args, num_rows: int, step: int = 2) -> list:
    """The optimizer steps of one update: per pass, a permutation of the rows from the script's (seed, "shuffle",
    step, pass) stream, cut into --num_minibatches parts (the script numbers rows globally; one process here)."""
    if args.num_minibatches == 1:
        return [None] * args.num_iterations
    schedule = []
    for it in range(args.num_iterations):
        shuffle = torch.Generator().manual_seed(algo.seed_of(args, "shuffle", step, it))
        schedule += list(torch.randperm(num_rows, generator=shuffle).tensor_split(args.num_minibatches))
    return schedule


def update_error(rec_update, expected_after) -> float:
    """max |recorded - recomputed| parameter after the update, relative to how far the update moved them."""
    before, after, _ = rec_update
    moved = (after - before).abs().max()
    assert moved > 1e-3, "the update did not move the parameters: nothing would be checked"
    return float((after - expected_after).abs().max() / moved)


def stat_errors(row: dict, name: str, stats: dict, charts: dict) -> dict:
    """Relative differences between the logged metrics of a step and their recomputation."""
    out = {}
    for k, v in [*stats.items(), *((k if "/" in k else f"charts/{k}", v) for k, v in charts.items())]:
        key = k if "/" in k else f"losses/{k}"
        out[key] = abs(row[key] - v) / max(1.0, abs(v))
    return out


# ---- what each script's loss should have been given ---------------------------------------------------------------
def step_inputs(rec, step: int = 2):
    """The rows that step `step`'s update trained on (sampled, re-sampled or the dataset's), the policy before that
    update (the one that sampled them) and the initial model."""
    batch = rec.updates[step - 1][2]
    rows = rollout_rows(batch)
    before = rec.updates[step - 1][0]
    return rows, tiny(params=before), tiny(), batch


def grpo_expected(algo, args, rows, rollout, init, iterations):
    mask, G = completion_mask(rows), args.num_generations
    with torch.no_grad():
        lp_old, lp_ref = token_logprobs(rollout, rows), token_logprobs(init, rows)
    rewards, charts = rewards_of(rows), {"reward_mean": float(rewards_of(rows).mean())}
    if args.kl_placement == "reward":  # the sequence's k1 of the rollout policy, subtracted before the mean
        k1_seq = ((lp_old - lp_ref) * mask).sum(-1)
        rewards = rewards - args.beta * k1_seq
        charts |= {"kl_penalty_seq": float(args.beta * k1_seq.mean()), "losses/kl_ref_rkl_k1_seq": float(k1_seq.mean())}
    adv = algo.group_advantages(rewards, G, args.scale_rewards)

    def loss_fn(model, sub=None):
        """The loss of the mini-batch `sub` (row indices; None: every row), normalized by ITS sequences and tokens."""
        sub = torch.arange(len(rows)) if sub is None else sub
        lsm_rows = [(lg / T).log_softmax(-1) for lg in row_logits(model, [rows[i] for i in sub])]
        lp = padded([x.gather(-1, torch.tensor(rows[i][1])[:, None]).squeeze(-1) for x, i in zip(lsm_rows, sub)])
        C = lp.shape[1]
        m = mask[sub, :C]
        n_seq, n_tok = float(len(sub)), float(m.sum())
        epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high
        loss, stats = algo.grpo_loss(
            lp,
            lp_old[sub, :C],
            lp_ref[sub, :C] if args.kl_placement == "loss" else None,
            adv[sub],
            m,
            n_seq,
            n_tok,
            beta=args.beta,
            epsilon_low=args.epsilon,
            epsilon_high=epsilon_high,
            kl_estimator=args.kl_estimator or "k3",
            kl_importance_weight=args.kl_importance_weight,
            loss_agg=args.loss_agg,
            max_new_tokens=args.max_new_tokens,
        )
        stats["entropy"] = sum(-(x.exp() * x).sum() for x in lsm_rows).detach() / n_tok
        if iterations * args.num_minibatches == 1:  # one optimizer step per rollout: no drift from it, not logged
            stats.pop("kl_old_fkl_k1"), stats.pop("kl_old_fkl_k3")
        return loss, stats

    return loss_fn, charts


def rpg_expected(algo, args, rows, rollout, init, iterations):
    mask = completion_mask(rows)
    adv = algo.group_mean_advantages(rewards_of(rows), args.num_generations)
    with torch.no_grad():
        lp_old, lp_ref = token_logprobs(rollout, rows), token_logprobs(init, rows)

    lp_anchor = lp_ref if args.kl_anchor == "init" else lp_old

    def loss_fn(model, sub=None):
        sub = torch.arange(len(rows)) if sub is None else sub
        lp, m = token_logprobs(model, rows)[sub], mask[sub]
        return algo.rpg_loss(
            lp,
            lp_old[sub],
            lp_anchor[sub],
            adv[sub],
            m,
            float(len(sub)),
            float(m.sum()),
            beta=args.beta,
            unnormalized=args.unnormalized,
            form=args.form,
            ratio_level=args.ratio_level,
            clip=args.clip,
            clip_eps_low=args.clip_eps_low,
            clip_eps_high=args.clip_eps_high,
            clip_c=args.clip_c,
            loss_agg=args.loss_agg,
            max_new_tokens=args.max_new_tokens,
            kl_anchor=args.kl_anchor,
        )

    return loss_fn, {"reward_mean": float(rewards_of(rows).mean())}


def pmd_expected(algo, args, rows, rollout, init, iterations):
    mask = completion_mask(rows)
    adv = algo.pmd_advantages(rewards_of(rows), args.num_generations, args.baseline, args.tau)
    with torch.no_grad():
        lp_old = token_logprobs(rollout, rows)

    def loss_fn(model, sub=None):
        sub = torch.arange(len(rows)) if sub is None else sub
        lp, m = token_logprobs(model, rows)[sub], mask[sub]
        n_seq, n_tok = float(len(sub)), float(m.sum())
        return algo.pmd_loss(
            lp,
            lp_old[sub],
            m,
            adv[sub],
            n_seq,
            n_tok,
            tau=args.tau,
            length_norm=args.length_norm,
            max_new_tokens=args.max_new_tokens,
        )

    return loss_fn, {"reward_mean": float(rewards_of(rows).mean())}


def a_star_po_expected(algo, args, rows, rollout, init, iterations, run_dir=None, train_prompts=None):
    import json

    mask = completion_mask(rows)
    with open(os.path.join(run_dir, "value_estimates.jsonl")) as f:
        cache = [json.loads(line) for line in f][1:]
    index = {tuple(p): i for i, p in enumerate(train_prompts)}
    r_stage1 = torch.tensor([cache[index[tuple(p)]]["rewards"] for p, _ in rows], dtype=torch.float64)
    v_hat = algo.value_estimate(r_stage1, args.beta1)  # each row's own prompt's stage-1 value
    rewards = rewards_of(rows)
    with torch.no_grad():
        lp_ref = token_logprobs(init, rows)

    def loss_fn(model, sub=None):
        sub = torch.arange(len(rows)) if sub is None else sub
        lsm = [(lg / T).log_softmax(-1) for lg in row_logits(model, rows)]
        lp = padded([x.gather(-1, torch.tensor(c)[:, None]).squeeze(-1) for x, (_, c) in zip(lsm, rows)])[sub]
        entropy_sum = sum(-(lsm[i].exp() * lsm[i]).sum() for i in sub.tolist())
        m, n_seq = mask[sub], float(len(sub))
        return algo.a_star_po_loss(
            lp,
            lp_ref[sub],
            m,
            v_hat[sub],
            rewards[sub],
            entropy_sum,
            n_seq,
            float(m.sum()),
            beta2=args.beta2,
            entropy_coef=args.entropy_coef,
        )

    return loss_fn, {"reward_mean": float(rewards.mean())}


def dpo_expected(algo, args, rows, rollout, init, iterations):
    K = args.num_generations
    rewards = rewards_of(rows)
    chosen, rejected, usable = algo.build_pairs(rewards, K)
    groups = torch.arange(len(rows) // K)[usable]
    w_rows, l_rows = (groups * K + chosen[usable]).tolist(), (groups * K + rejected[usable]).tolist()
    pair_rows = [rows[i] for i in w_rows + l_rows]
    with torch.no_grad():
        lr_seq = token_logprobs(init, pair_rows).sum(-1)
    m = len(w_rows)

    def loss_fn(model, sub=None):
        lp = token_logprobs(model, pair_rows).sum(-1)
        s = algo.dpo_scores(lp, lr_seq, divergence=args.divergence, alpha=args.alpha)
        loss, stats = algo.dpo_loss(
            s[:m], s[m:], beta=args.beta, loss=args.loss, eps=args.label_smoothing, num_pairs_global=m
        )
        stats.update(algo.dpo_metrics(s[:m], s[m:], lp[:m], lp[m:], beta=args.beta, num_pairs_global=m))
        return loss, stats

    assert m > 0, "no usable pair in the checked step: choose another seed"
    with torch.no_grad():  # the fresh samples' sequence KL to the reference, under the policy that drew them
        kl = (token_logprobs(rollout, rows) - token_logprobs(init, rows)).sum(-1).mean()
    charts = {"reward_mean": float(rewards.mean()), "losses/kl_ref_rkl_k1_seq": float(kl)}
    return loss_fn, charts | {"charts/kl_reg_objective": float(rewards.mean() - args.beta * kl)}


def gkd_expected(algo, args, rows, rollout, init, iterations):
    teacher = tiny(TINY_TEACHER)
    mask = completion_mask(rows)
    with torch.no_grad():
        lt = (padded(row_logits(teacher, rows)) / T).log_softmax(-1)
    ids = padded([torch.tensor(c, dtype=torch.float64) for _, c in rows]).long()

    def loss_fn(model, sub=None):
        ls = (padded(row_logits(model, rows)) / T).log_softmax(-1)
        loss, stats = algo.gkd_loss(
            lt,
            ls,
            mask,
            ids,
            float(mask.sum()),
            divergence=args.divergence,
            beta=args.beta,
            skew_alpha=args.skew_alpha,
            akl_mu=args.akl_mu,
            divergence_chunk_size=args.divergence_chunk_size,
        )
        stats["entropy"] = (-(ls.exp() * ls).sum(-1) * mask).sum().detach() / mask.sum()
        return loss, stats

    return loss_fn, {}


def gkd_pg_expected(algo, args, rows, rollout, init, iterations):
    mask = completion_mask(rows)
    bonus = args.task_reward_weight * rewards_of(rows)
    with torch.no_grad():  # the rollout policy's and the teacher's log-probs of the sampled tokens
        lp_old, lp_teacher = token_logprobs(rollout, rows), token_logprobs(tiny(TINY_TEACHER), rows)
    ids = padded([torch.tensor(c, dtype=torch.float64) for _, c in rows]).long()

    def loss_fn(model, sub=None):
        ls = (padded(row_logits(model, rows)) / T).log_softmax(-1)
        lp = ls.gather(-1, ids[..., None]).squeeze(-1) * mask
        n_seq, n_tok = float(len(rows)), float(mask.sum())
        options = {"discount": args.opd_discount, "epsilon": args.epsilon}
        loss, stats = algo.opd_loss(lp, lp_old, lp_teacher, mask, bonus, n_seq, n_tok, **options)
        stats["entropy"] = (-(ls.exp() * ls).sum(-1) * mask).sum().detach() / mask.sum()
        return loss, stats

    return loss_fn, {}


EXPECTED = {
    "grpo": grpo_expected,
    "grpo:mu1": grpo_expected,
    "grpo:mb2": grpo_expected,
    "grpo:mb2mu1": grpo_expected,
    "grpo:reward": grpo_expected,
    "pmd_mean:mb2": pmd_expected,
    "rpg_fkl:old": rpg_expected,
    "gkd:data": gkd_expected,
    "gkd:seq_kd": gkd_expected,
    "gkd:pg": gkd_pg_expected,
    "rpg_fkl": rpg_expected,
    "rpg_rkl": rpg_expected,
    "pmd_mean": pmd_expected,
    "a_star_po": a_star_po_expected,
    "dpo_kl": dpo_expected,
    "gkd": gkd_expected,
}
SKIP = {"loss"}  # checked through the update itself (and by name below)


def script_args(algo, flags):
    """The script's Args for these flags (parsed the way the script parses them)."""
    import sys

    import tyro

    argv = sys.argv
    try:
        sys.argv = ["x", *COMMON, *flags]
        return tyro.cli(algo.Args, use_underscores=True)
    finally:
        sys.argv = argv


def recompute(case, rec, bug=None):
    """Step 2 recomputed from scratch: (relative update error, relative error of each logged statistic).
    `bug` plants a mistake in the recomputation (the negative controls): "reference=policy" scores the reference
    log-probs with the rollout policy, "mask" drops the last token of every completion from the mask."""
    name = case.split(":")[0]
    algo = load_algorithm(name)
    args = script_args(algo, FLAGS[case])
    args.max_new_tokens = args.max_new_tokens or 4
    rows, rollout, init, _ = step_inputs(rec)
    if bug == "reference=policy":
        init = rollout
    if bug == "mask":
        rows = [(p, c[:-1] if len(c) > 1 else c) for p, c in rows]
    extra = {}
    if name == "a_star_po":
        from common.tasks import arithmetic_task

        tok = tokenizer()
        extra = {
            "run_dir": rec.run_dir,
            "train_prompts": [tok(e.prompt)["input_ids"] for e in arithmetic_task().train[:16]],
        }
    loss_fn, charts = EXPECTED[case](algo, args, rows, rollout, init, args.num_iterations, **extra)
    schedule = minibatch_schedule(algo, args, len(rows))
    expected_after, stats = sgd_replay(rec.updates[1][0], loss_fn, schedule)
    row = next(r for r in rec.rows if r["step"] == 2)
    return update_error(rec.updates[1], expected_after), stat_errors(row, name, stats, charts)


@pytest.mark.parametrize("case", list(EXPECTED))
def test_one_step_end_to_end(case, tmp_path, monkeypatch, capsys):
    rec = run_spied(case.split(":")[0], FLAGS[case], tmp_path, monkeypatch, capsys)
    assert len(rec.updates) == 2
    check_streams(rec, training_samples=case != "gkd:data")  # (gkd:data trains on the dataset's answers)
    check_sampler_models(rec, case)
    update_err, stat_errs = recompute(case, rec)
    assert update_err < RTOL  # (b) the update is the one the recomputed loss gives
    assert max(stat_errs.values()) < RTOL, stat_errs  # (a) every logged loss / KL / advantage statistic
    # the last eval: pass@1 and the exact KL to the initial policy, from its own samples
    final, init = tiny(params=rec.updates[1][1]), tiny()
    eval_rows = [r for n, out, _ in rec.samples if n == 2 for r in rollout_rows(out)]
    assert len(eval_rows) == 8
    last = rec.rows[-1]
    assert abs(last["eval/pass@1"] - float((rewards_of(eval_rows) >= 1).double().mean())) < 1e-12
    kl = exact_kl_seq(final, init, eval_rows).mean()
    assert kl > 1e-3 and abs(last["eval/kl_init_rkl_exact_seq"] - float(kl)) < RTOL * float(kl)
    if case.startswith("gkd"):  # the eval KL to the teacher, and the teacher's own pass@1 at step 0 from its samples
        teacher = tiny(TINY_TEACHER)
        kl = exact_kl_seq(final, teacher, eval_rows).mean()
        assert abs(last["eval/kl_teacher_rkl_exact_seq"] - float(kl)) < RTOL * float(kl)
        by_teacher = [
            out
            for (_, caller, p), (_, out, _) in zip(rec.models, rec.samples)
            if caller == "evaluate" and torch.equal(p, flat(teacher))
        ]
        teacher_rows = [r for out in by_teacher for r in rollout_rows(out)]
        assert len(by_teacher) == 1 and len(teacher_rows) == 8
        want = float((rewards_of(teacher_rows) >= 1).double().mean())
        assert abs(rec.rows[0]["eval/teacher_pass@1"] - want) < 1e-12


CONTROLS = [
    ("grpo", "reference=policy"),
    ("grpo", "temperature"),
    ("grpo", "mask"),
    ("gkd", "temperature"),
    ("a_star_po", "reference=policy"),
    ("dpo_kl", "reference=policy"),
    ("rpg_rkl", "mask"),
]


@pytest.mark.parametrize("name,bug", CONTROLS)
def test_negative_controls(name, bug, tmp_path, monkeypatch, capsys):
    """Each mistake, planted in the recomputation, moves the update or a logged statistic by far more than the
    tolerance of test_one_step_end_to_end: the test can fail."""
    rec = run_spied(name, FLAGS[name], tmp_path, monkeypatch, capsys)
    if bug == "temperature":
        monkeypatch.setattr(sys.modules[__name__], "T", 1.0)
    update_err, stat_errs = recompute(name, rec, bug)
    assert update_err > 1e3 * RTOL or max(stat_errs.values()) > 1e3 * RTOL, (update_err, stat_errs)


# ---- Q#: the collected data, the Q-model update and the guided eval ---------------------------------------------
Q_LR = 0.2  # a Q-model step (norm Q_LR x CLIP) large enough for a guided KL > 1e-3
Q_FLAGS = [
    "--total_steps",
    "1",
    "--prompts_per_step",
    "4",
    "--samples_per_prompt",
    "2",
    "--epochs_per_round",
    "2",
    "--q_batch_size",
    "8",
    "--micro_batch_size",
    "8",
    "--heldout_frac",
    "0",
    "--eval_num_prompts",
    "4",
    "--eval_samples_per_prompt",
    "2",
    "--eval_etas",
    "0.5",
    "--eta",
    "0.5",
    "--temperature",
    str(T),
    "--learning_rate",
    str(Q_LR),
    "--max_grad_norm",
    str(CLIP),
]


def q_model(params):
    """pi_ref's backbone and a linear head over (token, atom), with the given flat parameters (backbone first)."""
    from transformers import AutoModel

    backbone = AutoModel.from_pretrained(TINY_POLICY, dtype=torch.float64)
    head = torch.nn.Linear(backbone.config.hidden_size, backbone.config.vocab_size * 2, dtype=torch.float64)
    torch.nn.utils.vector_to_parameters(params.clone(), [*backbone.parameters(), *head.parameters()])
    return backbone, head


def q_log_pmf(backbone, head, prompt, tokens):
    """log p(atom | s_t, a) for every state s_t = prompt + tokens[:t] (t = 0..len) and every next token a:
    [len + 1, V, 2], from the last hidden state of each state (the Q-type head)."""
    h = backbone(input_ids=torch.tensor([prompt + tokens])).last_hidden_state[0, len(prompt) - 1 :]
    return head(h).view(h.shape[0], -1, 2).log_softmax(-1)


def test_q_sharp_round_end_to_end(tmp_path, monkeypatch, capsys):
    """One round: every example's reward is the reward of its text; the second Q-model step (SGD) equals minus
    lr times the gradient of the distributional loss recomputed from scratch (labels at the switch token and
    after, bins of the rewards); the guided eval's pass@1 and exact KL(pi_g || pi_ref) equal a recomputation
    from its samples with pi_g = softmax(l / T + Q / eta), Q = eta log E[e^{R / eta}] under the learned law."""
    algo = load_algorithm("q_sharp")
    monkeypatch.setattr(sys.modules[__name__], "COMMON", [])
    real_q_model = algo.QModel
    monkeypatch.setattr(algo, "QModel", lambda *a, **k: real_q_model(*a, **k).double())
    rec = run_spied("q_sharp", Q_FLAGS, tmp_path, monkeypatch, capsys, sampler="sample", update="train_q_epoch")
    from common.tasks import arithmetic_task

    check_streams(rec, sampler_calls=False)
    train = arithmetic_task().train
    tok = tokenizer()
    examples = rec.updates[1][2]
    assert len(examples) == 8 and len(rec.updates) == 2
    rows = [(tok(train[e["prompt_id"]].prompt)["input_ids"], e["completion"]) for e in examples]
    assert rewards_of(rows).tolist() == [e["reward"] for e in examples]
    bins = torch.tensor([int(e["reward"]) for e in examples])  # atoms {0, 1}: the reward is its own bin
    C = max(len(c) for _, c in rows)
    labels = torch.tensor([[float(e["switch"] <= t < len(c)) for t in range(C)] for e, (_, c) in zip(examples, rows)])

    def loss_fn(_):
        log_pmf = padded(
            [
                q_log_pmf(backbone, head, p, c)[:-1]
                .gather(1, torch.tensor(c)[:, None, None].expand(-1, 1, 2))
                .squeeze(1)
                for p, c in rows
            ]
        )
        loss = algo.dist_loss(log_pmf, bins, labels, len(rows))
        return loss, {"q_loss": loss.detach()}

    backbone, head = q_model(rec.updates[1][0])
    params = [*backbone.parameters(), *head.parameters()]
    loss, stats = loss_fn(None)
    grads = torch.autograd.grad(loss, params)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > CLIP  # the clip is active, so a script that ignored --max_grad_norm would fail
    step = Q_LR * torch.clamp(CLIP / (norm + 1e-6), max=1.0)
    expected = torch.cat([(p - step * g).detach().reshape(-1) for p, g in zip(params, grads)])
    assert update_error(rec.updates[1], expected) < RTOL
    row = next(r for r in rec.rows if "eval/pass@1" in r and r["step"] > 0)
    assert abs(row["losses/q_loss"] - float(stats["q_loss"])) < RTOL
    # the guided eval at eta: its samples, pi_ref's logits and the trained Q model
    backbone, head = q_model(rec.updates[1][1])
    ref, eta = tiny(), 0.5
    n, (toks, cmask, _), a = next(s for s in rec.samples if s[0] == 2 and s[2][4] == "qsharp")
    eval_rows = [(p, t[: int(m.sum())].tolist()) for p, t, m in zip(a[2], toks, cmask)]
    with torch.no_grad():
        kl = []
        for p, c in eval_rows:
            lr = (ref(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : len(p) + len(c) - 1] / T).log_softmax(-1)
            q = eta * torch.logsumexp(q_log_pmf(backbone, head, p, c)[:-1] + torch.tensor([0.0, 1.0]) / eta, -1)
            lg = (lr + q / eta).log_softmax(-1)
            kl.append((lg.exp() * (lg - lr)).sum())
    kl = torch.stack(kl).mean()
    assert kl > 1e-3 and abs(row["eval/kl_init_rkl_exact_seq"] - float(kl)) < RTOL * float(kl)
    assert abs(row["eval/pass@1"] - float(rewards_of(eval_rows).mean())) < 1e-12


def test_every_mutation_still_applies():
    """Every planted bug of tests/mutations.py still finds its snippet exactly once (run the planted bugs with
    `python tests/mutations.py`)."""
    from tests.harness import ROOT
    from tests.mutations import MUTATIONS, apply

    assert len(MUTATIONS) >= 12 and len({m[1] for m in MUTATIONS}) >= 8
    for mid, path, original, bug, _ in MUTATIONS:
        with open(os.path.join(ROOT, path)) as f:
            assert apply(f.read(), original, bug) != original, mid
