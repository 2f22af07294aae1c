# docs: docs/rpg.md
# RPG-RKL / RPG-URKL: "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning"
"""Regularized Policy Gradient (arXiv 2505.17508) with the REVERSE KL (RKL) or the unnormalized
reverse KL (URKL), in one file.

Objective (x = a whole response; anchor pi_a = pi_old, or the initial model with --kl_anchor init):
    J(theta) = E_{x ~ pi_theta}[R(x)] - beta D,
    RKL: D = KL(pi_theta || pi_a),    URKL: D = KL(pi_theta || pi_a) + sum_x (pi_a - pi_theta),
one step's optimum pi ~ pi_a e^{R / beta} (with the old anchor, a mirror-descent step toward
argmax R). Loss on samples of pi_old, w = pi_theta / pi_old, u = pi_theta / pi_a, v = pi_a / pi_old,
A = R - group mean of R (inside the w-weighted term, no std), k3(y) = y - 1 - log y; at sequence
level, for every theta, grad L = -grad J:
    differentiable:  L = E_old[-w A + beta K]
    reinforce:       L = -E_old[sg(w A + C) log pi_theta(x)]
                K (differentiable)                C (reinforce)
        RKL     w log u                           -beta w (log u + 1)
        URKL    w k3(1/u) = v - w + w log u       -beta w log u
--ratio_level token (default, the released code) uses token ratios: exact only at theta = theta_old
with the old anchor; with the init anchor the KL term is the per-state KL under the sampler's
states. URKL has RKL's expected gradient with zero per-sample KL gradient at w = 1 (lower
variance).
"""

import argparse
import contextlib
import gc
import glob
import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from functools import partial
from typing import Literal, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `common`, without an install step

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint.state_dict as dist_state
import tqdm
import tyro
from torch.nn.utils.rnn import pad_sequence
from torch.utils.checkpoint import checkpoint as recompute

# common/tasks.py (data and rewards) is imported as `tasks` where the shared part begins


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of every random draw (rank k samples step s from the stream (seed, s, k))
    cuda: bool = True  # use the GPU when there is one
    track: bool = False  # also log to TensorBoard and Weights & Biases, each when installed
    wandb_project_name: str = "klrl"  # the W&B project
    run_name: Optional[str] = None  # default {task}__{exp_name}__{seed}__{unix time}_{pid}
    output_dir: str = "runs"  # run folders go here
    # model and data
    model_name_or_path: str = "common/models/tiny-policy"  # a causal LM: local folder or hub id
    # arithmetic (built in), jsonl (--train_file, --eval_file) or hf:<dataset>[:<config>]
    task: str = "arithmetic"
    train_file: Optional[str] = None  # JSONL training prompts (--task jsonl)
    eval_file: Optional[str] = None  # JSONL held-out prompts (--task jsonl)
    prompt_field: str = "prompt"  # JSON field of the prompt (GSM8K: question)
    answer_field: str = "answer"  # JSON field of the answer (GSM8K `#### 42`, `\boxed{}` reduced)
    reward_fn: Optional[str] = None  # FILE.py:NAME or module:NAME, (completion, answer) -> float
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    max_prompt_length: Optional[int] = None  # longer is an error (default 16 arithmetic, 512 data)
    max_new_tokens: Optional[int] = None  # completion token limit (default 4 arithmetic, 1024 data)
    temperature: float = 1.0  # sampling temperature, also of every log-prob (policy, old, anchor)
    # training
    total_steps: int = 200  # rollout steps
    prompts_per_step: int = 64  # prompts per step, all ranks together (paper 512)
    num_generations: int = 8  # G, completions per prompt (paper 16)
    num_iterations: int = 1  # mu, passes over each rollout (paper 1)
    num_minibatches: int = 4  # optimizer steps per pass (code 16); 1 x 1 is on-policy (ratio 1)
    micro_batch_size: int = 512  # sequences per forward/backward per device (1.5B, 1K tokens: 4-16)
    gen_batch_size: int = 512  # sequences per generation call on one device
    learning_rate: float = 3e-4  # AdamW, constant after warm-up (paper 1e-6, REINFORCE code 5e-7)
    weight_decay: float = 0.0  # AdamW weight decay (released code 0.1)
    max_grad_norm: float = 1.0  # gradient-norm clip (0 = none)
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps (released code 10)
    # RPG
    unnormalized: bool = False  # URKL: + sum_x (pi_a - pi_theta): same mean gradient, 0 at w = 1
    form: Literal["differentiable", "reinforce"] = "differentiable"  # released code, or Algorithm 2
    kl_anchor: Literal["old", "init"] = "old"  # pi_a: rollout policy (paper) or initial model
    ratio_level: Literal["token", "sequence"] = "token"  # released code; sequence: exact, noisier
    beta: float = 1e-3  # KL coefficient (paper and released scripts 1e-4)
    clip: bool = True  # dual clip of the reward term, or Algorithm 2's mask (--form reinforce)
    clip_eps_low: float = 0.2  # lower clip range of the ratio (paper 0.2)
    clip_eps_high: float = 0.28  # upper clip range of the ratio (paper 0.28)
    clip_c: float = 10.0  # dual-clip bound c for negative advantages (paper 10)
    # all terms / completion tokens (token_mean, released code) or / (N_seq max_new_tokens)
    loss_agg: Literal["token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    dynamic_sampling: bool = False  # DAPO: drop groups of equal rewards, sample more (code: on)
    max_gen_batches_per_step: int = 20  # --dynamic_sampling: generation batches at most (code 20)
    # evaluation, logging, checkpoints
    eval_every: int = 25  # held-out eval every this many steps, at step 0 and at the end (0: only)
    eval_num_prompts: int = 500  # held-out prompts per eval (the whole arithmetic held-out split)
    eval_samples_per_prompt: int = 4  # samples per held-out prompt (pass@1: mean correctness)
    eval_kl: bool = True  # log eval/kl_init_rkl_exact_seq (held anyway with --kl_anchor init)
    log_completions: int = 0  # held-out (prompt, completion, reward) rows per eval to a JSONL file
    log_train_completions: int = 0  # training rows per step, with reward and weight, to JSONL
    save_every: int = 0  # checkpoint every this many steps (0 = only at the end)
    keep_last: int = 0  # keep only the newest this many checkpoints (0 = all)
    resume: Optional[str] = None  # a run folder to continue, bit for bit; it keeps writing there
    bf16: Optional[bool] = None  # bf16 autocast of forwards (weights float32); default: bf16 GPUs
    gradient_checkpointing: bool = False  # trade compute for memory on real models
    logprob_chunk_size: int = 64  # lm_head + log-softmax per this many positions (0: all at once)
    # LoRA (0: full fine-tuning); the initial model is then the trained one, adapters off
    lora_r: int = 0  # adapter rank (peft; a 7B policy fits one 80 GB GPU at 16-64)
    lora_alpha: float = 16.0  # adapter scale alpha / r
    lora_dropout: float = 0.0  # must be 0: the ratios must be exactly 1 at theta = theta_old
    lora_target_modules: str = "all-linear"  # comma-separated names, or all-linear (not lm_head)
    reshard_after_forward: bool = True  # torchrun (FSDP2): free gathered weights after a forward


def check_args(args: Args, world: int) -> None:
    """Bad flag values, before any model loads (called by Run)."""
    positive = ("num_generations", "num_iterations", "num_minibatches", "max_gen_batches_per_step")
    check_numbers(args, POSITIVE + positive)
    if args.num_generations < 2:
        why = "the group-mean baseline needs two samples"
        raise UserError(f"--num_generations must be >= 2 ({why})")
    rows_per_rank = args.prompts_per_step // world * args.num_generations
    if args.prompts_per_step % world or rows_per_rank % args.num_minibatches:
        raise UserError(
            f"--prompts_per_step {args.prompts_per_step} x --num_generations {args.num_generations}"
            f" does not split into {world} ranks x --num_minibatches {args.num_minibatches}"
        )


# ==================================================================================================
# ALGO LOGIC: pure functions, tensors in and out (closed-form tests: tests/test_rpg.py)
# ==================================================================================================
def k3(log_y):
    """k3(y) = y - 1 - log y >= 0, from log y (expm1: accurate near y = 1). No clamp (the released
    code's clamp to [-10, 10] zeroes the gradient outside)."""
    return torch.expm1(log_y) - log_y


def group_mean_advantages(rewards, group_size: int):
    """A_i = R_i - mean of its group, no std (the released code's `rpg` estimator). The mean
    includes R_i: the reward gradient is (1 - 1/G) grad E[R], so the effective beta is
    beta / (1 - 1/G)."""
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def kl_surrogate(log_w, log_u, log_v, lp, unnormalized: bool, prefix: bool = False):
    """Differentiable KL term K_t = W_t g(u_t):  RKL  g = log u;  URKL  g = k3(1/u)
    (log_v, lp unused here). Token level W_t = w_t: E_old[w log u] = KL(pi_theta || pi_a) per state,
    w k3(1/u) = v - w + w log u. Sequence level (prefix) W_t = prod_{k<=t} w_k: sum_t K_t has the
    expectation of the whole-sequence KL(pi_theta || pi_a) (plus the mass term for URKL) for every
    theta."""
    g = k3(-log_u) if unnormalized else log_u
    log_W = log_w.cumsum(-1) if prefix else log_w
    return torch.exp(log_W) * g


def reinforce_coef(log_w, log_u, log_v, beta: float, unnormalized: bool):
    """KL part C of the REINFORCE coefficient sg(w A + C):  RKL  -beta w (log u + 1);
    URKL  -beta w log u."""
    w = torch.exp(log_w)
    if unnormalized:
        return -beta * w * log_u
    return -beta * w * (log_u + 1.0)


def token_mean(x, mask, num_tokens):
    """This micro-batch's share of the global mean of x over the completion tokens."""
    return (x * mask).sum() / max(num_tokens, 1)


def rpg_loss(
    lp,
    lp_old,
    lp_anchor,
    advantages,
    mask,
    num_seqs,
    num_tokens,
    beta: float = 1e-3,
    unnormalized: bool = False,
    form: str = "differentiable",
    ratio_level: str = "token",
    clip: bool = True,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    clip_c: float = 10.0,
    loss_agg: str = "token_mean",
    max_new_tokens: int = 1,
    kl_anchor: str = "old",
):
    """RPG loss of one micro-batch; lp, lp_old, lp_anchor (= lp_old for the old anchor), mask:
    [B, T], advantages [B]; w = e^{lp - lp_old}, u = e^{lp - lp_anchor}, v = e^{lp_anchor - lp_old},
    K = kl_surrogate, C = reinforce_coef, W = a whole sequence's ratio. Per sequence:
      token     differentiable:  sum_t [clip(-w_t A) + beta K_t]
                reinforce:       sum_t -m_t sg(w_t A + C_t) lp_t
      sequence  differentiable:  clip(-W A) + beta sum_t K_t   (K_t with prefix-product weights)
                reinforce:       -m sg(W A + C) sum_t lp_t
    summed / num_tokens (token_mean) or / (num_seqs max_new_tokens). clip(-w A) = max(-w A,
    -clip(w, 1 - eps_low, 1 + eps_high) A), for A < 0 also min(., -c A): RPG / PPO dual clip of the
    reward term, the KL term unclipped (released code). m = 1 if (A' >= 0 and w < 1 + eps_high) or
    (A' < 0 and 1 - eps_low < w < c), A' = A + C/w (paper Algorithm 2: at beta = 0 the dual-clip
    gradient). clip=False: m = 1 and no clip; at sequence level grad E_old[loss] = -grad J for every
    theta. Returns (loss, stats), each stat a share of a global mean, except `*_min` / `*_max`."""
    if form not in ("differentiable", "reinforce") or ratio_level not in ("token", "sequence"):
        raise ValueError(f"unknown form {form!r} or ratio_level {ratio_level!r}")
    mask = mask.to(lp.dtype)
    adv = advantages.to(lp.dtype)[:, None]  # [B, 1]: A on each token of its sequence
    # the log-ratios are 0 on padding, so a row's sum is the sum over its completion
    log_w = (lp - lp_old) * mask
    log_u = (lp - lp_anchor) * mask
    log_v = (lp_anchor - lp_old) * mask
    if loss_agg == "token_mean":
        denominator = max(num_tokens, 1)
    elif loss_agg == "seq_mean_token_sum_norm":
        denominator = max(num_seqs, 1) * max_new_tokens
    else:
        raise ValueError(f"unknown loss_agg {loss_agg!r}")
    if ratio_level == "token":  # every term per token, [B, T]
        log_ratios = (log_w, log_u, log_v)
        logp = lp
        reward_mask = mask
    else:  # sequence: one reward term per sequence, [B, 1], with whole-sequence ratios
        log_ratios = tuple(x.sum(-1, keepdim=True) for x in (log_w, log_u, log_v))
        logp = (lp * mask).sum(-1, keepdim=True)
        reward_mask = torch.ones_like(adv)
    ratio = torch.exp(log_ratios[0])
    # the KL term stays per token at both levels (at sequence level with prefix-product weights)
    prefix = ratio_level == "sequence"
    kl = kl_surrogate(log_w, log_u, log_v, lp, unnormalized, prefix) * mask
    if form == "differentiable":
        reward_term = -ratio * adv
        if clip:  # PPO's clip, then for A < 0 the dual clip's bound -c A
            clipped_ratio = torch.clamp(ratio, 1 - clip_eps_low, 1 + clip_eps_high)
            reward_term = torch.max(reward_term, -clipped_ratio * adv)
            reward_term = torch.where(adv < 0, torch.min(reward_term, -clip_c * adv), reward_term)
        adv_eff = adv  # for the clip fractions: the reward term's advantage
        loss = ((reward_term * reward_mask).sum() + beta * kl.sum()) / denominator
    else:  # reinforce (Algorithm 2)
        coef_kl = reinforce_coef(*log_ratios, beta, unnormalized)
        # the mask reads the sign of the effective advantage A' = A + C / w, that of sg(w A + C)
        adv_eff = adv + coef_kl / ratio
        inside_low_and_c = (ratio > 1 - clip_eps_low) & (ratio < clip_c)
        inside = torch.where(adv_eff >= 0, ratio < 1 + clip_eps_high, inside_low_and_c)
        keep = inside.to(ratio.dtype) if clip else torch.ones_like(ratio)
        coef = (keep * (ratio * adv + coef_kl)).detach()  # sg(w A + C), masked
        loss = (-coef * logp * reward_mask).sum() / denominator
    # the stats, per token: at sequence level a sequence's ratio and A' count on each of its tokens
    with torch.no_grad():
        # a micro-batch without completion tokens has no ratio to report: 1 stands in
        valid = mask > 0
        ratio_valid = ratio.expand_as(mask)[valid] if valid.any() else ratio.new_ones(1)
        w = torch.exp(lp - lp_old)
        stats = {"loss": loss.detach(), "kl_term": beta * kl.sum() / denominator}
        stats["kl_old_fkl_k3"] = token_mean(k3(lp - lp_old), mask, num_tokens)
        stats["kl_old_rkl_k3w"] = token_mean(w * k3(lp_old - lp), mask, num_tokens)
        stats["ratio_mean"] = token_mean(ratio, mask, num_tokens)
        stats["ratio_min"] = ratio_valid.min()
        stats["ratio_max"] = ratio_valid.max()
        # the clip fractions: where the ratio left its range the way A' pushes it (0 without clip)
        low = ((adv_eff < 0) & (ratio < 1 - clip_eps_low)).to(mask.dtype)
        high = ((adv_eff > 0) & (ratio > 1 + clip_eps_high)).to(mask.dtype)
        dual = ((adv_eff < 0) & (ratio > clip_c)).to(mask.dtype)
        stats["clipfrac_low"] = float(clip) * token_mean(low, mask, num_tokens)
        stats["clipfrac_high"] = float(clip) * token_mean(high, mask, num_tokens)
        stats["clipfrac_dual"] = float(clip) * token_mean(dual, mask, num_tokens)
        if kl_anchor != "old":  # named after the anchor: kl_init_rkl_k3w
            stats[f"kl_{kl_anchor}_rkl_k3w"] = token_mean(w * k3(lp_anchor - lp), mask, num_tokens)
        if form == "reinforce":
            stats["mask_frac"] = token_mean(1.0 - keep, mask, num_tokens)
    return loss, stats


# ==================================================================================================
# UPDATE and TRAIN: the loss of a micro-batch (for the shared update), dynamic sampling, the loop
# ==================================================================================================
def micro_loss(lp, entropy, batch: dict, rows, args, num_seqs, num_tokens):
    """RPG's loss of the micro-batch `rows`, from the policy's log-probs of their tokens [m, C]."""
    C = lp.shape[1]
    # one optimizer step per rollout (no old log-probs were computed): theta_old = theta
    lp_old = batch["old_logprobs"][rows, :C] if "old_logprobs" in batch else lp.detach()
    lp_anchor = batch["anchor_logprobs"][rows, :C] if args.kl_anchor == "init" else lp_old
    return rpg_loss(
        lp,
        lp_old,
        lp_anchor,
        batch["advantages"][rows],
        batch["loss_mask"][rows, :C],
        num_seqs,
        num_tokens,
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


def dynamic_sampling(run, policy, args, eos, pad, step: int, prompts, batch: dict, rewards):
    """--dynamic_sampling (DAPO): drop groups whose G rewards are all equal; refill this rank's
    slots from rounds r of P = --prompts_per_step prompts (positions [r P, (r + 1) P) of the step's
    permutation, sampled from (seed, step, rank, r)) while any rank is short; after
    --max_gen_batches_per_step rounds, the earliest all-equal groups."""
    if not args.dynamic_sampling:
        return batch, rewards, {}
    G = args.num_generations
    P = args.prompts_per_step
    need = len(prompts)  # this rank's groups
    kept = []  # groups with reward spread: (prompt index, G completions, G rewards)
    spare = []  # groups of equal rewards, the filler once the rounds run out
    draw = run.draw(step)  # the step's draw, continued
    for gen_batch in range(args.max_gen_batches_per_step):
        if gen_batch > 0:  # the next P prompts of the draw (wrapping around), this rank's share
            positions = range(gen_batch * P, gen_batch * P + P)
            prompts = np.take(draw, positions, mode="wrap")[run.rank :: run.world]
            group_prompts = [run.train_prompts[i] for i in prompts for _ in range(G)]
            seed = seed_of(args, "resample", step, run.rank, gen_batch)
            sampler = torch.Generator(DEVICE).manual_seed(seed)
            batch = sample_batch(policy, group_prompts, args, eos, pad, sampler)
            answers = [run.task.train[i].answer for i in prompts for _ in range(G)]
            scores = run.task.score(decode(run.tokenizer, batch), answers)
            rewards = torch.tensor(scores, device=DEVICE)
        lengths = batch["completion_mask"].sum(-1).tolist()  # each completion up to its EOS
        completions = [ids[:n] for ids, n in zip(batch["completion_ids"], lengths)]
        for k, i in enumerate(prompts):  # group k: prompt i, rows k G .. k G + G - 1
            group_rewards = rewards.view(-1, G)[k]
            group = (i, completions[k * G : k * G + G], group_rewards)
            if (group_rewards != group_rewards[0]).any():
                kept.append(group)
            else:
                spare.append(group)
        # all ranks run as many rounds as the rank shortest of groups (the all-reduces pair up)
        shortfall = all_reduce(torch.tensor(need - len(kept), device=DEVICE), dist.ReduceOp.MAX)
        if shortfall <= 0:
            break
    counts = torch.tensor([len(spare), len(kept) + len(spare)], device=DEVICE)
    dropped, sampled = all_reduce(counts).tolist()
    groups = (kept + spare)[:need]  # the batch: kept groups first
    group_prompts = [run.train_prompts[i] for i, _, _ in groups for _ in range(G)]
    completions = [ids for _, group_completions, _ in groups for ids in group_completions]
    rewards = torch.cat([group_rewards for _, _, group_rewards in groups])
    metrics = {"charts/gen_batches": gen_batch + 1, "charts/frac_groups_dropped": dropped / sampled}
    return make_batch(group_prompts, completions, eos, pad), rewards, metrics


def train(args: Args) -> None:
    run = Run(args)  # the task and its prompts, the processes, the checkpoint to resume (SHARED)
    policy = load_model(run.checkpoint or args.model_name_or_path, args, trainable=True)
    needs_init = args.eval_kl or args.kl_anchor == "init"  # the anchor, or the eval's KL to init
    init = initial_model(policy, args) if needs_init else None
    kl_models = {"init": init} if args.eval_kl else {}
    eos = eos_ids(run.tokenizer, policy)
    pad = run.tokenizer.pad_token_id
    G = args.num_generations

    model, optimizer = run.start(policy, partial(evaluate, policy, kl_models, run, eos))
    for step in run.steps():
        # 1. the step's prompts (one global draw, this rank's share), G completions each from pi_old
        prompts = run.prompts(step)
        group_prompts = [run.train_prompts[i] for i in prompts for _ in range(G)]
        batch = sample_batch(policy, group_prompts, args, eos, pad, run.sampler(step))
        run.lap("generate")
        # 2. rewards and group-mean advantages (a group lives on one rank)
        answers = [run.task.train[i].answer for i in prompts for _ in range(G)]
        rewards = torch.tensor(run.task.score(decode(run.tokenizer, batch), answers), device=DEVICE)
        batch, rewards, resampled = dynamic_sampling(
            run, policy, args, eos, pad, step, prompts, batch, rewards
        )
        reward_mean, reward_std = global_mean_std(rewards)
        batch["advantages"] = group_mean_advantages(rewards, G)
        batch["loss_mask"] = batch["completion_mask"]
        # 3. log-probs of the rollout policy (needed once the optimizer moved off it) and of pi_a
        if args.num_iterations * args.num_minibatches > 1:
            batch["old_logprobs"] = batched_logprobs(policy, batch, args)
        if args.kl_anchor == "init":
            batch["anchor_logprobs"] = batched_logprobs(init, batch, args)
        # 4. the policy update: num_iterations x num_minibatches optimizer steps on the RPG loss
        metrics = update_policy(model, optimizer, batch, args, step, micro_loss) | resampled
        run.lap("update")
        groups = rewards.view(-1, G)
        zero_std = (groups == groups[:, :1]).all(1).sum().double() * G  # rows without reward spread
        all_rows = args.prompts_per_step * G
        metrics["charts/frac_reward_zero_std"] = all_reduce(zero_std).item() / all_rows
        metrics |= {"charts/reward_mean": reward_mean, "charts/reward_std": reward_std}
        run.log_samples(step, batch, rewards, batch["advantages"])
        run.end_step(step, batch, metrics)


# ==================================================================================================
# SHARED: identical in every algorithm file; TRY NOT TO MODIFY (tests/test_shared_blocks.py: change
# it in one file, copy it with `python -m tests.test_shared_blocks --sync`). It calls back into the
# algorithm above through `Args`, `check_args`, `train` and the loss given to `update_policy` only.
# ==================================================================================================

try:  # the repository's common/ folder: a copied script needs it beside its own folder
    from common import tasks
except ModuleNotFoundError:
    sys.exit(f"error: {__file__} needs the repository's common/ folder beside its own folder")


# ---- ROLLOUT: sampling with the KV cache, teacher-forced log-probs, evaluation -----------------
def forward(model, ids, mask, positions, cache=None, keep=0, head=None):
    """Logits with explicit positions (prompts are left-padded), extending the KV cache if given;
    head (a `ChunkedHead`): it stands in for lm_head, and its outputs for the logits."""
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
    base = getattr(model, "module", model)  # (FSDP, WithoutAdapters)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # (LoRA: peft)
    if cache is not None:  # transformers 5.x renamed `past_key_values` to `cache`
        parameters = inspect.signature(base.forward).parameters
        kwargs["cache" if "cache" in parameters else "past_key_values"] = cache
        kwargs["use_cache"] = True
    lm_head = base.get_output_embeddings()
    if head is not None:
        head.lm_head = [lm_head]  # (a list: not a submodule; FSDP keeps managing lm_head's weights)
        base.set_output_embeddings(head)
    try:
        return model(**kwargs, logits_to_keep=keep).logits
    finally:
        base.set_output_embeddings(lm_head)


def keep_rows(cache, rows):
    """Keep these rows of a KV cache (index_select: its backward is ~8x faster than indexing's)."""
    for layer in cache.layers:
        layer.keys = layer.keys.index_select(0, rows)
        layer.values = layer.values.index_select(0, rows)


def prefill(model, prompt_ids, prompt_mask, rows):
    """Run each distinct prompt once and copy its KV cache to the rows that continue it (rows [M]:
    each row's prompt): (logits of each row's first completion token [M, V], a cache of M rows)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    logits = forward(model, prompt_ids, prompt_mask, positions, cache, keep=1)
    keep_rows(cache, rows)  # autograd flows through the copies
    return logits[:, -1].index_select(0, rows), cache


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, rows, args, eos, pad, generator=None, uniforms=None):
    """One completion per row from exactly softmax(logits / T) (no top-k, top-p or penalty: the law
    every log-prob assumes); finished rows leave the batch. uniforms [M, H]: inverse-CDF noise."""
    was_training = model.training
    model.eval()  # in train mode, gradient checkpointing would switch the KV cache off
    with autocast(args):
        logits, cache = prefill(model, prompt_ids, prompt_mask, rows)
    tokens = torch.full((len(rows), args.max_new_tokens), pad, device=rows.device)
    live = torch.arange(len(rows), device=rows.device)  # the rows still generating
    attention = prompt_mask[rows]
    for t in range(args.max_new_tokens):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        probs = torch.softmax(logits / args.temperature, -1)
        if uniforms is None:
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:  # the first token whose CDF reaches u (clamped: the CDF may end just below 1)
            cdf = probs.double().cumsum(-1)
            u = uniforms[live.cpu(), t, None].to(probs.device, torch.float64)
            token = torch.searchsorted(cdf, u).squeeze(-1)
            token = token.clamp(max=probs.shape[-1] - 1)
        tokens[live, t] = token
        done = torch.isin(token, eos)
        if t == args.max_new_tokens - 1 or done.all():
            break
        if done.any():  # finished rows leave the batch
            keep = (~done).nonzero().squeeze(-1)
            keep_rows(cache, keep)
            live = live[keep]
            token = token[keep]
            attention = attention[keep]
        new_token = attention.new_ones(len(live), 1)
        attention = torch.cat([attention, new_token], 1)
        positions = attention.sum(-1, keepdim=True) - 1
        with autocast(args):
            logits = forward(model, token[:, None], attention, positions, cache, keep=1)
            logits = logits[:, -1]
    model.train(was_training)
    return tokens[:, : t + 1]


def sample_batch(model, prompts: list, args, eos, pad, generator=None, uniforms=None) -> dict:
    """One completion per entry of `prompts` (token lists), --gen_batch_size rows at a time."""
    batch = make_batch(prompts, None, eos, pad)
    completions = []
    with gathered(model, args):
        for start in range(0, len(prompts), args.gen_batch_size):
            end = start + args.gen_batch_size
            # the chunk's distinct prompts, and for each row the one it continues
            distinct, rows = batch["prompt_index"][start:end].unique(return_inverse=True)
            ids = batch["prompt_ids"][distinct]
            mask = batch["prompt_mask"][distinct]
            noise = None if uniforms is None else uniforms[start:end]
            chunk = generate(model, ids, mask, rows, args, eos, pad, generator, noise)
            completions += chunk.unbind()
    return make_batch(prompts, completions, eos, pad, batch)


def make_batch(prompts: list, completions, eos, pad, batch=None) -> dict:
    """The batch layout: each distinct prompt once, prompt_ids / prompt_mask [U, P] (left-padded),
    row m continuing prompt prompt_index[m]; completion_ids / completion_mask [M, C], the mask up to
    and including the first EOS; truncated [M]: no EOS. `batch`: add completions to its prompts."""
    if batch is None:
        distinct = {}
        index = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
        ids = [torch.tensor(p) for p in distinct]
        ones = [torch.ones(len(p), dtype=torch.long) for p in distinct]
        prompt_ids = pad_sequence(ids, batch_first=True, padding_value=pad, padding_side="left")
        prompt_mask = pad_sequence(ones, batch_first=True, padding_value=0, padding_side="left")
        batch = {"prompt_ids": prompt_ids.to(eos.device)}
        batch["prompt_index"] = torch.tensor(index, device=eos.device)
        batch["prompt_mask"] = prompt_mask.to(eos.device)
    if completions is None:
        return batch
    # padded with -1 first: a pad id that is also an EOS id must not end a row
    rows = [torch.as_tensor(c) for c in completions]
    tokens = pad_sequence(rows, batch_first=True, padding_value=-1).to(eos.device)
    padding = (0, max(0, 2 - tokens.shape[1]))  # at least 2 columns
    tokens = torch.nn.functional.pad(tokens, padding, value=-1)
    is_eos = torch.isin(tokens, eos).long()
    no_eos_before = is_eos.cumsum(-1) - is_eos == 0
    batch["completion_mask"] = (no_eos_before & (tokens >= 0)).long()
    batch["completion_ids"] = torch.where(tokens >= 0, tokens, pad)
    batch["truncated"] = is_eos.sum(-1) == 0
    return batch


def completion_logits(model, batch: dict, rows, cached: bool = True, head=None):
    """The logits [m, C, V] (or a `ChunkedHead`'s outputs) predicting the completion tokens of `rows`,
    cut to their longest. cached: each distinct prompt runs once (`prefill`), the completions on its
    cache; else whole rows (gradient checkpointing drops the cache in checkpointed layers)."""
    longest = int(batch["completion_mask"][rows].sum(-1).max())
    C = max(longest, 2)  # >= 2: the same forwards on every rank
    completion = batch["completion_ids"][rows, :C]
    prompt = batch["prompt_index"][rows]
    if cached:
        distinct, inverse = prompt.unique(return_inverse=True)
        prompt_mask = batch["prompt_mask"][distinct]
        first, cache = prefill(model, batch["prompt_ids"][distinct], prompt_mask, inverse)
        # completion tokens 0..C-2 predict tokens 1..C-1, at the positions after each row's prompt
        prompt_length = prompt_mask.sum(-1)[inverse, None]
        positions = prompt_length + torch.arange(C - 1, device=prompt.device)
        completion_mask = torch.ones_like(completion[:, 1:])
        mask = torch.cat([prompt_mask[inverse], completion_mask], 1)
        if head is not None:
            head.targets = completion[:, 1:]
        rest = forward(model, completion[:, :-1], mask, positions, cache, head=head)
        if head is not None:  # the prefill kept one position's logits: [m, V], small
            first = token_stats(first[:, None], completion[:, :1], head.temperature)[:, 0]
        return torch.cat([first[:, None], rest], 1)
    completion_mask = torch.ones_like(completion)
    mask = torch.cat([batch["prompt_mask"][prompt], completion_mask], 1)
    ids = torch.cat([batch["prompt_ids"][prompt], completion], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    if head is not None:
        head.targets = torch.nn.functional.pad(completion, (0, 1))  # the last one predicts past C
    logits = forward(model, ids, mask, positions, keep=C + 1, head=head)
    return logits[:, :-1]


def completion_log_softmax(model, batch: dict, rows, temperature: float, cached: bool = True):
    """log softmax(logits / T) [m, C, V], at least float32, of `completion_logits`."""
    logits = completion_logits(model, batch, rows, cached)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return (logits / temperature).log_softmax(-1)


def completion_logprobs(model, batch, rows, temperature: float, cached=True, chunk_size=0):
    """(log-probs, entropies) [m, C] of the completion tokens of `rows`: a `ChunkedHead`'s."""
    outputs = completion_logits(model, batch, rows, cached, ChunkedHead(temperature, chunk_size))
    return outputs[..., 0], outputs[..., 1]


def token_stats(logits, targets, temperature: float):
    """[..., 2]: log softmax(logits / T) (at least float32) at each target token, and its entropy."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    log_softmax = (logits / temperature).log_softmax(-1)
    logprobs = log_softmax.gather(-1, targets[..., None])
    entropy = -(log_softmax.exp() * log_softmax).sum(-1, keepdim=True)
    return torch.cat([logprobs, entropy], -1)


class ChunkedHead(torch.nn.Module):
    """Stands in for lm_head in a `forward`: `token_stats` [m, n, 2] of lm_head(hidden) per chunk of
    chunk_size positions (0: one), recomputed in the backward: no [m, C, V] tensor exists whole."""

    def __init__(self, temperature: float, chunk_size: int):
        super().__init__()
        self.temperature = temperature
        self.chunk_size = chunk_size

    def forward(self, hidden):
        chunk_size = self.chunk_size or hidden.shape[1]
        hidden_chunks = hidden.split(chunk_size, 1)
        chunks = list(zip(hidden_chunks, self.targets.split(chunk_size, 1)))
        if len(chunks) > 1 and torch.is_grad_enabled():
            pieces = [recompute(self.stats, h, t, use_reentrant=False) for h, t in chunks]
        else:
            pieces = [self.stats(h, t) for h, t in chunks]
        return torch.cat(pieces, 1)

    def stats(self, hidden, targets):
        return token_stats(self.lm_head[0](hidden), targets, self.temperature)


@torch.no_grad()
def batched_logprobs(model, batch: dict, args):
    """No-grad log-probs [M, C] of every completion token (0 after the end), once per rollout."""
    ids = batch["completion_ids"]
    out = []
    with gathered(model, args):
        for rows in torch.arange(len(ids), device=ids.device).split(args.micro_batch_size):
            with autocast(args):
                chunk = args.logprob_chunk_size
                logprobs, _ = completion_logprobs(model, batch, rows, args.temperature, True, chunk)
            logprobs = logprobs * batch["completion_mask"][rows, : logprobs.shape[1]]
            padding = (0, ids.shape[1] - logprobs.shape[1])  # back to the batch's width
            out.append(torch.nn.functional.pad(logprobs, padding))
    return torch.cat(out)


def eos_ids(tokenizer, model):
    """Every token that ends a completion: the tokenizer's EOS and the model's generation EOSs."""
    generation_eos = np.atleast_1d(model.generation_config.eos_token_id or []).tolist()
    ids = {tokenizer.eos_token_id, *generation_eos} - {None}
    return torch.tensor(sorted(ids), device=DEVICE)


def decode(tokenizer, batch: dict) -> list:
    """The completion texts, without special tokens (EOS)."""
    pairs = zip(batch["completion_ids"], batch["completion_mask"])
    completions = [ids[mask.bool()] for ids, mask in pairs]
    return tokenizer.batch_decode(completions, skip_special_tokens=True)


@torch.no_grad()
def evaluate(policy, kl_models: dict, run, eos) -> tuple:
    """Held-out pass@1 and pass@k at the training temperature (--eval_samples_per_prompt samples a
    prompt, the same noise at every eval) and, per frozen model q of `kl_models`, KL(pi_theta || q)
    summed along each sample, exact over the vocabulary per position. Returns (metrics, rows)."""
    args = run.args
    per_prompt = args.eval_samples_per_prompt
    my_prompts = range(run.rank, len(run.eval_prompts), run.world)  # interleaved over the ranks
    mine = [i for i in my_prompts for _ in range(per_prompt)]
    prompts = [run.eval_prompts[i] for i in mine]
    batch = sample_batch(policy, prompts, args, eos, run.tokenizer.pad_token_id, run.eval_sampler())
    texts = decode(run.tokenizer, batch)
    answers = [run.eval_answers[i] for i in mine]
    rewards = torch.tensor(run.task.score(texts, answers), device=DEVICE)
    mask = batch["completion_mask"]
    sums = [(rewards >= 1).sum(), rewards.sum(), mask.sum()]
    all_rows = torch.arange(len(mine), device=DEVICE)
    for q in kl_models.values():
        kl = rewards.new_zeros(())
        # in lockstep: under FSDP both models stay sharded, each forward gathering a layer at a time
        for rows, weight in lockstep(all_rows, args.micro_batch_size):
            with autocast(args):
                log_p = completion_log_softmax(policy, batch, rows, args.temperature)
                log_q = completion_log_softmax(q, batch, rows, args.temperature)
            kl_per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
            kl += weight * (kl_per_position * mask[rows, : log_p.shape[1]]).sum()
        sums.append(kl)
    samples = len(run.eval_prompts) * per_prompt
    means = all_reduce(torch.stack(sums).double()) / samples
    names = ["eval/pass@1", "eval/reward_mean", "eval/completion_len_mean"]
    names += [f"eval/kl_{name}_rkl_exact_seq" for name in kl_models]
    metrics = dict(zip(names, means.tolist()))
    # pass@k from each prompt's count of correct samples (all of a prompt's samples are on one rank)
    correct = (rewards >= 1).view(-1, per_prompt).sum(1)
    for k in pass_at_k_sizes(per_prompt):
        total = all_reduce(pass_at_k(correct, per_prompt, k).sum()).item()
        metrics[f"eval/pass@{k}"] = total / len(run.eval_prompts)
    shown = []
    logged = list(zip(mine, texts, rewards.tolist()))[: args.log_completions]
    for i, text, reward in logged:
        prompt = run.tokenizer.decode(run.eval_prompts[i])
        shown.append({"prompt": prompt, "completion": text, "reward": reward})
    return metrics, shown


def pass_at_k_sizes(n: int) -> list:
    """The k of eval/pass@k: 2, 4, 8, ... below n samples, and n (pass@1: the mean correctness)."""
    powers = [2**i for i in range(1, n.bit_length())]
    sizes = [k for k in powers if k < n]
    return sizes + [n] if n > 1 else []


def pass_at_k(correct, n: int, k: int):
    """The unbiased pass@k of each prompt, c of its n samples correct (Chen et al. 2021):
    1 - C(n - c, k) / C(n, k): the chance that k samples, drawn WITHOUT replacement, hold one."""
    misses = [math.comb(n - c, k) / math.comb(n, k) for c in correct.tolist()]
    return 1 - torch.tensor(misses, dtype=torch.float64, device=correct.device)


# ---- UPDATE: global mini-batches, micro-batches in lockstep, the optimizer step ----------------
def update_policy(model, optimizer, batch, args, step, micro_loss, outputs=completion_logprobs):
    """--num_iterations x --num_minibatches optimizer steps over the rollout. A mini-batch: GLOBAL
    rows, their sequence and token counts summed over the ranks before the loss; each rank backprops
    loss x world size (FSDP averages): the update depends on neither ranks nor micro-batching.
    micro_loss(lp, entropy, batch, rows, args, ...): the policy's `outputs`, log-probs [m, C] etc."""
    world, rank = world_rank()
    mask = batch["loss_mask"]
    local_rows = len(mask)
    stats = []
    for iteration in range(args.num_iterations):
        shuffle = torch.Generator().manual_seed(seed_of(args, "shuffle", step, iteration))
        order = torch.randperm(local_rows * world, generator=shuffle).to(DEVICE)
        for minibatch in order.tensor_split(args.num_minibatches):
            # global row g is row g % local_rows of rank g // local_rows
            mine = minibatch[minibatch // local_rows == rank] % local_rows
            sequences = (mask[mine].sum(-1) > 0).sum()
            counts = torch.stack([sequences, mask[mine].sum()]).double()
            num_seqs, num_tokens = all_reduce(counts).tolist()
            micro_batches = lockstep(mine, args.micro_batch_size)
            for k, (rows, weight) in enumerate(micro_batches):
                if world > 1:  # FSDP2: reduce-scatter once, after the mini-batch's last micro-batch
                    model.set_requires_gradient_sync(k == len(micro_batches) - 1)
                with autocast(args):
                    cached = not args.gradient_checkpointing
                    chunk = args.logprob_chunk_size
                    lp, entropy = outputs(model, batch, rows, args.temperature, cached, chunk)
                loss, micro_stats = micro_loss(lp, entropy, batch, rows, args, num_seqs, num_tokens)
                (loss * world * weight).backward()
                if weight == 0:  # a filler: no stats
                    stats.append({})
                    continue
                entropy_sum = (entropy.detach() * mask[rows, : entropy.shape[1]]).sum()
                micro_stats["entropy"] = entropy_sum / max(num_tokens, 1)
                stats.append(micro_stats)
            stats[-1] |= optimizer_step(model, optimizer, args)
    return reduce_stats(stats, args.num_iterations * args.num_minibatches)


def lockstep(rows, size: int) -> list:
    """This rank's micro-batches, as (rows, weight). Under FSDP every forward and backward is a
    collective: a rank with fewer rows adds weight-0 fillers (row 0) to match the busiest rank."""
    micro = list(rows.split(size)) if len(rows) else []
    count = torch.tensor(len(micro), device=DEVICE)
    busiest = int(all_reduce(count, dist.ReduceOp.MAX))
    filler = torch.zeros(1, dtype=torch.long, device=DEVICE)
    fillers = [(filler, 0)] * (busiest - len(micro))
    return [(m, 1) for m in micro] + fillers


def optimizer_step(model, optimizer, args) -> dict:
    """Clip the gradient norm (0: off), stop if it is not finite, step at the warm-up's rate."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a distributed tensor
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        why = f"non-finite loss or gradient (norm {norm.item()})"
        raise FloatingPointError(f"{why}; stopping without saving")
    first_state = next(iter(optimizer.state.values()), {})  # (empty before the first step)
    steps_done = float(first_state.get("step", 0))
    warmup = min(1, (steps_done + 1) / max(args.warmup_steps, 1))
    for group in optimizer.param_groups:
        group["lr"] = args.learning_rate * warmup
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"charts/grad_norm": norm.item() / world_rank()[0]}  # a share of the global value


def reduce_stats(stats: list, steps: int) -> dict:
    """An update's metrics from its micro-batches' stats (shares of global means): summed over the
    ranks, averaged over its optimizer steps; `*_min` and `*_max` are global extremes."""
    out = {}
    for key in sorted({k for s in stats for k in s}):  # the same keys, in order, on every rank
        op = "sum"
        if key.endswith(("_min", "_max")):
            op = key[-3:]
        values = [
            torch.as_tensor(s[key], dtype=torch.float64, device=DEVICE) for s in stats if key in s
        ]
        local = getattr(torch.stack(values), op)()
        value = all_reduce(local, getattr(dist.ReduceOp, op.upper())).item()
        name = key if "/" in key else f"losses/{key}"
        out[name] = value / steps if op == "sum" else value
    return out


# ---- PLUMBING: processes, run folders, checkpoints, resume, logging ----------------------------
DEVICE = torch.device("cpu")  # this rank's GPU or the CPU: set once, by Run, from --cuda
FULL_STATE = dist_state.StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors
DCP = torch.distributed.checkpoint  # (imported with dist_state) torchrun's sharded optimizer state
RESUMABLE = {"resume", "total_steps", "learning_rate", "weight_decay", "max_grad_norm"}
RESUMABLE |= {"eval_every", "save_every", "keep_last"}  # the flags that may change on resume
# flags that must be > 0 in every script (the other number flags >= 0); check_args adds its own
POSITIVE = ("temperature", "max_prompt_length", "max_new_tokens", "total_steps", "prompts_per_step")
POSITIVE += ("micro_batch_size", "gen_batch_size", "eval_num_prompts", "eval_samples_per_prompt")
OPEN = []  # the run-folder lock and the progress bar, closed when main ends (tests rerun main)
GATHERED = []  # the sharded models whole now (`gathered`)


class UserError(Exception):
    """Bad input: one `error:` line, exit status 1."""


class Stop(Exception):
    """SIGTERM or SIGINT: the step in flight finished and was checkpointed; exit status 143."""


class Finished(Exception):
    """--resume of a run that has nothing left to run: one `finished:` line, exit status 0."""


def main() -> None:
    """Parse the flags and train. Bad input: an `error:` line (exit status 1); SIGTERM or SIGINT: a
    checkpoint, a `stopped:` line (143); a second Ctrl-C: at once (130). Under torchrun: rank 0."""
    rank = int(os.environ.get("RANK", 0))
    if rank > 0 and {"-h", "--help"} & set(sys.argv):
        return  # --help prints once, on rank 0
    speak = rank == 0  # under torchrun, rank 0 says it, once
    code = 0
    message = None
    try:
        train(parse_args(sys.argv[1:]))
    except (UserError, tasks.TaskError, FloatingPointError) as e:
        code = 1
        message = f"error: {first_line(e)}"
    except OSError as e:  # this rank's own file system: every rank says it
        code = 1
        where = f" (rank {rank})" if rank else ""
        message = f"error{where}: {first_line(e)}"
        speak = True
    except Stop as e:
        code = 143
        message = f"stopped: {e}"
    except Finished as e:
        message = f"finished: {e}"
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        code = 130
        message = "stopped at once (Ctrl-C): nothing was saved since the last checkpoint"
    for handle in reversed(OPEN):  # the progress bar ends its line, the run-folder lock is freed
        handle.close()
    OPEN.clear()
    if dist.is_initialized():  # the sharded model's reference cycles collected first
        gc.collect()
        dist.destroy_process_group()
    if message and speak and code == 1:
        sys.exit(message)  # (sys.exit prints it: one line, exit status 1)
    if message and speak:
        print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def first_line(error) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def parse_args(argv: list) -> Args:
    """The flags; --resume DIR: DIR/args.json gives the defaults, only RESUMABLE flags change."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--resume")
    folder = pre.parse_known_args(argv)[0].resume
    if folder is None:
        return tyro.cli(Args, args=argv, use_underscores=True)
    saved = saved_args(folder)
    args = tyro.cli(Args, args=argv, default=Args(**saved), use_underscores=True)
    for key, value in asdict(args).items():  # (a flag missing from args.json: its default)
        if key in saved and value != saved[key] and key not in RESUMABLE:
            why = f"the run has {saved[key]!r}; start a new run"
            raise UserError(f"--{key} cannot change when resuming ({why})")
    return args


def saved_args(folder: str) -> dict:
    """A run folder's flags (JSON lists back to tuples). The run of another script is an error; a
    flag missing from args.json (a hand edit, an older version) is named in a warning."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder} is not a run folder (args.json: {e})") from None
    this = os.path.basename(__file__)
    if not isinstance(saved, dict):
        raise UserError(f"{folder} is not a run folder (args.json is no JSON object)")
    script = saved.pop("script", this)  # (runs of older versions did not record it)
    digest = saved.pop("reward_fn_sha256", None)
    if digest and digest != tasks.reward_fn_digest(saved.get("reward_fn")):
        changed = f"{saved['reward_fn']} changed since the run started: it scores as it is now"
        print(f"warning: {changed}", file=sys.stderr)
    if script != this:
        raise UserError(f"{folder} is a run of {script}, not of {this}: resume it with {script}")
    if set(saved) - set(Args.__dataclass_fields__):
        raise UserError(f"{folder} is a run of another script (its flags are not this one's)")
    fields = Args.__dataclass_fields__
    missing = [f"--{key} {field.default}" for key, field in fields.items() if key not in saved]
    missing = ", ".join(missing)
    if missing and int(os.environ.get("RANK", 0)) == 0:
        print(f"warning: {folder}/args.json lacks {missing}: using these", file=sys.stderr)
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


def check_numbers(args, positive: tuple) -> None:
    """Every number flag is finite (NaN passes every comparison) and >= 0; > 0 if in `positive`."""
    for key, value in asdict(args).items():
        values = value if isinstance(value, tuple) else (value,)
        for number in [v for v in values if type(v) in (int, float)]:
            if not math.isfinite(number):
                raise UserError(f"--{key} must be a finite number, got {number}")
            if key in positive and number <= 0:
                raise UserError(f"--{key} must be > 0, got {number}")
            if number < 0:
                raise UserError(f"--{key} must be >= 0, got {number}")


def lock(run_dir: str) -> None:
    """Rank 0's flock on RUN/.lock (freed on any exit, SIGKILL too): one process per run folder."""
    import fcntl

    handle = open(os.path.join(run_dir, ".lock"), "w")
    OPEN.append(handle)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        why = f"it holds {run_dir}/.lock; wait for it to end"
        raise UserError(f"{run_dir} is in use by another run ({why})") from None


def seed_of(args, stream: str, *keys) -> int:
    """The seed of one random draw, from (--seed, the stream's name, step, ...): no two streams
    share one (SeedSequence pads short keys with zeros: (seed, step) = (seed, step, 0), unnamed)."""
    name = zlib.crc32(stream.encode())
    entropy = [args.seed, name, *[k % 2**31 for k in keys]]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def world_rank() -> tuple:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def all_reduce(x, op=dist.ReduceOp.SUM):
    """x reduced over the ranks, as a copy (x itself in one process)."""
    if not dist.is_initialized():
        return x
    x = x.clone()
    dist.all_reduce(x, op)
    return x


def global_mean_std(x) -> tuple:
    """Mean and Bessel std of x over all ranks, in two passes (never E[x^2] - mean^2)."""
    count_and_sum = torch.stack([x.new_tensor(x.numel()), x.sum()])
    count, total = all_reduce(count_and_sum).tolist()
    mean = total / count
    squares = all_reduce((x - mean).pow(2).sum()).item()
    return mean, (squares / max(count - 1, 1)) ** 0.5


def autocast(args):
    return torch.autocast(DEVICE.type, torch.bfloat16, enabled=args.bf16)


def load_model(path: str, args, trainable: bool = False):
    """A causal LM with dropout off (ratios exactly 1 at theta = theta_old), frozen unless trained
    (then float32: AdamW's master weights). A frozen one computes as the trained one does (bf16
    under FSDP with --bf16, else float32 under autocast) and is sharded under torchrun too."""
    from transformers import AutoModelForCausalLM

    lora = trainable and args.lora_r > 0
    adapter = os.path.join(path, "adapter")  # a LoRA run's checkpoint: its adapters only
    base = args.model_name_or_path if lora and os.path.isdir(adapter) else path
    bf16 = args.bf16 and DEVICE.type == "cuda" and not trainable and dist.is_initialized()
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = AutoModelForCausalLM.from_pretrained(tasks.model_path(base), dtype=dtype)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) or hasattr(module, "attention_dropout"):
            module.p = 0.0
            module.attention_dropout = 0.0
    if trainable and args.gradient_checkpointing:  # (transformers 5.2x: activation checkpointing)
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)({"use_reentrant": False})
    model = model.to(DEVICE).train(trainable).requires_grad_(trainable)
    if not trainable:  # whole only while `gathered` (a phase) or in FSDP's forward (a layer)
        return shard(model, args)
    if not lora:
        return model
    import peft  # only LoRA's adapters train; B starts at 0: the model starts as the base model

    if os.path.isdir(adapter):
        return peft.PeftModel.from_pretrained(model, adapter, is_trainable=True).to(DEVICE)
    modules = args.lora_target_modules  # peft's "all-linear", or comma-separated module names
    if modules != "all-linear":
        modules = modules.split(",")
    options = {"r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": 0.0}
    config = peft.LoraConfig(**options, target_modules=modules, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def shard(model, args):
    """Under torchrun, FSDP2 on each decoder layer and the root (weights, gradients and AdamW state
    split over the ranks; CUDA with --bf16: bf16 compute, float32 reductions); else the model."""
    if not dist.is_initialized():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mixed = MixedPrecisionPolicy()
    if args.bf16 and DEVICE.type == "cuda":
        mixed = MixedPrecisionPolicy(torch.bfloat16, torch.float32)
    mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))  # --no_cuda on a GPU: CPU shards
    reshard = args.reshard_after_forward
    options = {"reshard_after_forward": reshard, "mp_policy": mixed, "mesh": mesh}
    layer_types = set()
    for module in model.modules():
        layer_types.update(getattr(module, "_no_split_modules", None) or [])
    for module in [m for m in model.modules() if type(m).__name__ in layer_types]:
        fully_shard(module, **options)
    return fully_shard(model, **options)


@contextlib.contextmanager
def gathered(model, args):
    """FSDP2: all-gather the weights once for a whole inference phase (rollout, log-probs, eval),
    not per layer and forward; with no collective inside, ranks may run different forward counts."""
    root = getattr(model, "module", model)  # (WithoutAdapters: the trained model it runs)
    modules = root.modules() if root not in [None, *GATHERED] else []  # (GATHERED: whole already)
    sharded = [m for m in modules if hasattr(m, "unshard")]
    for module in sharded:
        module.unshard()
    if sharded:
        root.set_reshard_after_forward(False)
        GATHERED.append(root)
    yield
    if sharded:
        GATHERED.remove(root)
        root.set_reshard_after_forward(args.reshard_after_forward)
    for module in sharded:
        module.reshard()


class WithoutAdapters(torch.nn.Module):
    """--lora_r: the initial model is the trained one with its adapters off (no second copy)."""

    def __init__(self, model):
        super().__init__()
        self.module = model

    def forward(self, **kwargs):
        with self.module.disable_adapter():
            return self.module(**kwargs)


def initial_model(policy, args):
    """The frozen initial policy: the trained model, adapters off (--lora_r), or a second copy."""
    if args.lora_r:
        return WithoutAdapters(policy)
    return load_model(args.model_name_or_path, args)


class Run:
    """One training run: its task, processes, run folder, checkpoints, logs and stop signals."""

    def __init__(self, args):
        from importlib.util import find_spec

        import transformers

        global DEVICE
        self.args = args
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        self.stop = []  # the stop signals received
        self.checkpoint = None  # the checkpoint to resume from
        use_cuda = args.cuda and torch.cuda.is_available()
        if use_cuda:  # LOCAL_RANK modulo the visible GPUs: some launchers show each process one
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            DEVICE = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
        if args.bf16 is None:
            args.bf16 = use_cuda and torch.cuda.is_bf16_supported()
        self.task = tasks.run_task(args)  # (and the task's default lengths)
        check_args(args, self.world)
        if args.track and not (find_spec("tensorboard") or find_spec("wandb")):
            raise UserError("--track needs tensorboard or wandb: pip install tensorboard wandb")
        if args.lora_r and not find_spec("peft"):
            raise UserError("--lora_r needs peft: pip install peft")
        if args.lora_dropout:  # (peft's dropout would make the ratios differ from 1 on-policy)
            raise UserError("--lora_dropout must be 0: the ratios must be exactly 1 at theta_old")
        if self.world > 1:
            if use_cuda:
                torch.cuda.set_device(DEVICE)
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.run_dir = args.resume or os.path.join(args.output_dir, self.run_name())
        if args.resume:
            self.checkpoint = self.find_checkpoint()
        elif os.path.exists(self.run_dir):
            hint = "--resume it, or choose another --run_name"
            raise UserError(f"{self.run_dir} already exists: {hint}")
        else:  # a read-only or file --output_dir fails here, before any model loads
            os.makedirs(args.output_dir, exist_ok=True)
            if not os.access(args.output_dir, os.W_OK):
                raise UserError(f"--output_dir {args.output_dir} is not writable")
        torch.manual_seed(args.seed)  # TRY NOT TO MODIFY: all other draws are seed_of(args, ...)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if self.rank == 0:
            print(f"loading {args.model_name_or_path}", flush=True)
        self.tokenizer = tasks.load_tokenizer(args, self.task)
        prompts = tasks.encode_task(self.tokenizer, self.task, args)
        self.train_prompts, self.eval_prompts, self.eval_answers = prompts

    def run_name(self) -> str:
        """--run_name, or {task}__{exp_name}__{seed}__{time}_{pid}: chosen on rank 0 for all."""
        args = self.args
        stamp = f"{int(time.time())}_{os.getpid()}"
        name = f"{self.task.name}__{args.exp_name}__{args.seed}__{stamp}"
        names = [args.run_name or name]
        if self.world > 1:
            dist.broadcast_object_list(names, src=0)
        return names[0]

    def find_checkpoint(self):
        """The newest intact checkpoint (corrupt ones set aside, .tmp removed), or None: step 0."""
        resuming = not getattr(self.args, "sample_from", None)  # (Q#'s --sample_from only reads)
        acting = self.rank == 0 and resuming  # one rank warns and tidies; a reader changes nothing
        if acting:
            lock(self.run_dir)
        found = sorted(glob.glob(os.path.join(self.run_dir, "checkpoints", "step_*")))
        for tmp in [c for c in found if c.endswith(".tmp") and acting]:
            print(f"warning: removing {tmp}, an interrupted save", file=sys.stderr)
            shutil.rmtree(tmp, ignore_errors=True)
        complete = [c for c in found if c[-1].isdigit()]
        while complete and checkpoint_problem(complete[-1]):
            corrupt = complete.pop()
            fallback = os.path.basename(complete[-1]) if complete else "step 0"
            if acting:  # kept aside, for a look: step_N.corrupt
                problem = checkpoint_problem(corrupt)
                print(f"warning: {problem}; resuming from {fallback}", file=sys.stderr)
                os.replace(corrupt, corrupt + ".corrupt")
        if not complete and not resuming:
            raise UserError(f"{self.run_dir} has no checkpoint to read")
        if not complete:
            if acting:
                warning = f"warning: {self.run_dir} has no checkpoint: starting at step 0"
                print(warning, file=sys.stderr)
            return None
        step = int(os.path.basename(complete[-1])[len("step_") :])
        if resuming and self.args.total_steps < step:
            raise UserError(f"--total_steps {self.args.total_steps} < the checkpoint's step {step}")
        if resuming and self.args.total_steps == step:  # nothing left to run: say so
            again = "to go on: raise --total_steps"
            raise Finished(f"{self.run_dir} has run its {step} steps ({again})")
        return complete[-1]

    def start(self, policy, evaluate):
        """Shard the model, make AdamW (restored on resume), lock the run folder, eval at step 0."""
        args = self.args
        self.evaluate = evaluate
        self.tb = None
        self.model = shard(policy, args)
        parameters = [p for p in self.model.parameters() if p.requires_grad]  # (LoRA: adapters)
        decay = args.weight_decay
        self.optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=decay)
        self.state = {"step": 0, "elapsed_s": 0.0, "prompts_seen": 0}
        if self.checkpoint:
            path = os.path.join(self.checkpoint, "trainer_state.pt")
            self.state = torch.load(path, "cpu", weights_only=False)
            adamw = self.state.pop("optimizer")  # whole: 1 process, or a torchrun of an older klrl
            options = FULL_STATE
            if adamw is None:  # torchrun's: each rank reads its part (any number of ranks)
                adamw = dist_state.get_optimizer_state_dict(self.model, self.optimizer)
                DCP.load({"optimizer": adamw}, checkpoint_id=f"{self.checkpoint}/optimizer")
                options = None
            dist_state.set_optimizer_state_dict(self.model, self.optimizer, adamw, options=options)
            for group in self.optimizer.param_groups:  # --weight_decay may change on resume
                group["weight_decay"] = args.weight_decay
        self.log_path = os.path.join(self.run_dir, "metrics.jsonl")
        if self.rank == 0:
            self.create_folder()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self.on_signal)
        self.t0 = time.time() - self.state["elapsed_s"]
        if self.state["step"] == 0:
            self.log(0, self.eval())
        initial = self.state["step"]
        self.bar = tqdm.tqdm(total=args.total_steps, initial=initial, disable=self.rank > 0)
        OPEN.append(self.bar)
        return self.model, self.optimizer

    def create_folder(self) -> None:
        """Rank 0: the run folder (locked), args.json, logs cut back to the checkpoint's step."""
        args = self.args
        os.makedirs(self.run_dir, exist_ok=bool(args.resume))
        if not args.resume:
            lock(self.run_dir)
        saved = asdict(args) | {"resume": None, "script": os.path.basename(__file__)}
        saved["reward_fn_sha256"] = tasks.reward_fn_digest(args.reward_fn)
        write_atomically(os.path.join(self.run_dir, "args.json"), json.dumps(saved, indent=1))
        last_kept = self.state["step"] if self.state["step"] > 0 else -1
        for name in ("metrics.jsonl", "completions.jsonl", "train_completions.jsonl"):
            path = os.path.join(self.run_dir, name)
            rows = read_jsonl_rows(path)
            kept = [json.dumps(row) + "\n" for row in rows if row["step"] <= last_kept]
            if rows:
                write_atomically(path, "".join(kept))
        if args.track:
            self.tb = tensorboard(args, self.run_dir)

    def on_signal(self, signum, frame) -> None:
        """A stop signal ends the run after the step in flight (saved); a second Ctrl-C at once."""
        if signum == signal.SIGINT and "SIGINT" in self.stop:
            raise KeyboardInterrupt
        self.stop.append(signal.Signals(signum).name)

    def steps(self):
        """The steps still to run; each starts the step's clock."""
        for self.step in range(self.state["step"] + 1, self.args.total_steps + 1):
            self.clock = {"start": time.time(), "last": time.time()}
            yield self.step

    def draw(self, step: int):
        """The step's order of all training prompts: one draw from (seed, step), on every rank."""
        seed = seed_of(self.args, "prompts", step)
        return np.random.default_rng(seed).permutation(len(self.train_prompts))

    def prompts(self, step: int):
        """This rank's share of the step's prompts."""
        step_prompts = self.draw(step)[: self.args.prompts_per_step]
        return step_prompts[self.rank :: self.world]

    def sampler(self, step: int):
        """This rank's sampling noise at this step."""
        return torch.Generator(DEVICE).manual_seed(seed_of(self.args, "sample", step, self.rank))

    def eval_sampler(self):
        """This rank's eval noise: the same at every eval, so evals differ only by the policy."""
        return torch.Generator(DEVICE).manual_seed(seed_of(self.args, "eval", self.rank))

    def lap(self, name: str) -> None:
        """Record the time since the last lap (or the step's start) as perf/{name}_s."""
        now = time.time()
        self.clock[f"perf/{name}_s"] = now - self.clock["last"]
        self.clock["last"] = now

    def eval(self) -> dict:
        step = getattr(self, "step", 0)
        if self.rank == 0:
            print(f"step {step}: evaluating", flush=True)
        metrics, shown = self.evaluate()
        if self.rank == 0 and shown:
            rows = [json.dumps({"step": step} | row) + "\n" for row in shown]
            append(os.path.join(self.run_dir, "completions.jsonl"), "".join(rows))
        return metrics

    def log_samples(self, step: int, batch: dict, rewards, weights, weight="advantage"):
        """--log_train_completions N: rank 0's first N training rows of the step, with the reward
        and the algorithm's per-sample weight (named `weight`), to train_completions.jsonl."""
        n = self.args.log_train_completions
        if self.rank > 0 or n == 0:
            return
        completions = {k: batch[k][:n] for k in ("completion_ids", "completion_mask")}
        rows = []
        for i, text in enumerate(decode(self.tokenizer, completions)):
            prompt = batch["prompt_index"][i]
            prompt_ids = batch["prompt_ids"][prompt][batch["prompt_mask"][prompt].bool()]
            row = {"step": step, "prompt": self.tokenizer.decode(prompt_ids), "completion": text}
            row["reward"] = None if rewards is None else float(rewards[i])
            row[weight] = float(weights[i])
            row["completion_len"] = int(batch["completion_mask"][i].sum())
            row["truncated"] = bool(batch["truncated"][i])
            rows.append(json.dumps(row) + "\n")
        append(os.path.join(self.run_dir, "train_completions.jsonl"), "".join(rows))

    def log(self, step: int, metrics: dict) -> None:
        """One metrics.jsonl row (rank 0), strict JSON: a non-finite value is null."""
        if self.rank > 0:
            return
        row = {"step": step, "time_s": round(time.time() - self.t0, 3)}
        for key, value in metrics.items():
            row[key] = value if math.isfinite(value) else None
        append(self.log_path, json.dumps(row) + "\n")
        if self.tb:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)

    def end_step(self, step: int, batch: dict, metrics: dict) -> None:
        """Counters, the metrics row, and the eval and checkpoint when due (or on a stop signal)."""
        args = self.args
        elapsed = time.time() - self.clock["start"]
        rows = len(batch["completion_ids"]) * self.world
        counts = [batch["completion_mask"].sum(), batch["truncated"].sum()]
        tokens, truncated = all_reduce(torch.stack(counts).double()).tolist()
        self.state["prompts_seen"] += args.prompts_per_step
        metrics |= {key: value for key, value in self.clock.items() if "/" in key}
        metrics["perf/step_s"] = elapsed
        metrics["charts/tokens_per_s"] = tokens / elapsed
        metrics["charts/completion_len_mean"] = tokens / rows
        metrics["charts/truncated_frac"] = truncated / rows
        metrics["charts/prompts_seen"] = self.state["prompts_seen"]
        metrics["charts/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        if DEVICE.type == "cuda":  # this rank's high-water mark since the start
            metrics["perf/max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        last = step == args.total_steps
        if last or (args.eval_every and step % args.eval_every == 0):
            metrics |= self.eval()
        self.log(step, metrics)
        self.bar.update()
        signals = all_reduce(torch.tensor(len(self.stop), device=DEVICE)).item()  # on any rank
        stop = signals > 0 and not last
        if last or stop or (args.save_every and step % args.save_every == 0):
            self.save(step)
        if stop:
            why = self.stop[0] if self.stop else "a signal on another rank"
            raise Stop(f"{why}: step {step} saved; continue with --resume {self.run_dir}")
        if last and self.rank == 0:  # where the results are, and the last eval
            self.bar.close()
            shown = [key for key in metrics if key.startswith("eval/") and key.count("/") == 1]
            values = [f"{key} {metrics[key]:.4g}" for key in shown]
            print(f"finished step {step}: {', '.join(values)}")
            print(f"results: {self.run_dir} (metrics.jsonl, final/)")

    def save(self, step: int) -> None:
        """checkpoints/step_N: save_pretrained (model, tokenizer) and trainer_state.pt with the AdamW
        state (torchrun: each rank's part in step_N/optimizer, by DCP), written as step_N.tmp, then
        renamed. A failure to write (a full disk) removes the .tmp folder and stops in one line."""
        from safetensors import SafetensorError

        self.state["step"] = step
        self.state["elapsed_s"] = time.time() - self.t0
        model_state = dist_state.get_model_state_dict(self.model, options=FULL_STATE)
        options = None if self.world > 1 else FULL_STATE  # torchrun: this rank's part
        adamw = dist_state.get_optimizer_state_dict(self.model, self.optimizer, options=options)
        path = os.path.join(self.run_dir, "checkpoints", f"step_{step:06d}")
        saved = os.path.join(self.run_dir, "checkpoints", "step_*[0-9]")  # (not .tmp, .corrupt)
        failure = None
        try:
            if self.world > 1:  # a collective: every rank raises if any rank's part fails
                DCP.save({"optimizer": adamw}, checkpoint_id=f"{path}.tmp/optimizer")
                adamw = None  # (trainer_state.pt's: in optimizer/)
            if self.rank == 0:
                self.write_weights(path + ".tmp", model_state, step == self.args.total_steps)
                self.tokenizer.save_pretrained(path + ".tmp")
                trainer_state = self.state | {"optimizer": adamw}
                torch.save(trainer_state, os.path.join(path + ".tmp", "trainer_state.pt"))
                os.replace(path + ".tmp", path)
        except (OSError, RuntimeError, SafetensorError, DCP.CheckpointException) as e:
            if self.rank == 0:
                shutil.rmtree(path + ".tmp", ignore_errors=True)
            free = shutil.disk_usage(self.run_dir).free / 2**20
            failures = getattr(e, "failures", {0: (e, None)})  # (DCP's: each failed rank's error)
            cause = list(failures.values())[0][0]
            why = getattr(cause, "strerror", None) or first_line(cause)[:80]
            failure = f"could not save {path} ({why}; {free:.1f} MB free)"
        if all_reduce(torch.tensor(failure is not None, device=DEVICE).int()).item():
            older = glob.glob(saved)
            kept = f"{os.path.basename(max(older))} is intact" if older else "nothing was saved"
            raise UserError(f"{failure or 'rank 0 could not save'}: {kept}")
        if self.rank == 0 and self.args.keep_last:  # only the newest --keep_last checkpoints stay
            for old in sorted(glob.glob(saved))[: -self.args.keep_last]:
                shutil.rmtree(old)
        if self.rank == 0 and step == self.args.total_steps:  # `final` links to the last one
            link = os.path.join(self.run_dir, "final")
            with contextlib.suppress(FileNotFoundError):
                os.remove(link)
            os.symlink(os.path.relpath(path, self.run_dir), link)
        if self.world > 1:
            dist.barrier()

    def write_weights(self, folder: str, model_state: dict, last: bool) -> None:
        """save_pretrained (--lora_r: adapters in folder/adapter; at the last step, merged too)."""
        unwrapped = getattr(self.model, "module", self.model)
        weights = os.path.join(folder, "adapter") if self.args.lora_r else folder
        unwrapped.save_pretrained(weights, state_dict=model_state)
        if last and self.args.lora_r:  # W + (alpha / r) B A per adapted layer (peft), float32
            import peft
            from transformers import AutoModelForCausalLM

            base_path = tasks.model_path(self.args.model_name_or_path)
            base = AutoModelForCausalLM.from_pretrained(base_path)
            merged = peft.PeftModel.from_pretrained(base, os.path.join(folder, "adapter"))
            merged.merge_and_unload().save_pretrained(folder)


def append(path: str, text: str) -> None:
    """Append to a log; a failure to write (a full disk) stops the run in one line naming it."""
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        why = e.strerror or e
        raise UserError(f"could not write {path}: {why}; the checkpoints stay") from None


def write_atomically(path: str, text: str) -> None:
    """Write a whole file as path.tmp, then rename it: a kill or a full disk leaves the old file."""
    try:
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise UserError(f"could not write {path}: {e.strerror or e}") from None


def read_jsonl_rows(path: str) -> list:
    """The rows of a JSONL file the scripts append to (none if it does not exist). A last line cut
    by a kill or a full disk is dropped with a warning; a broken line before it is an error."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise UserError(f"{path}, line {i + 1}, is not JSON: fix or remove it") from None
            print(f"warning: dropping the cut last line of {path}", file=sys.stderr)
    return rows


def tensorboard(args, run_dir: str):
    """--track: a TensorBoard writer, mirrored to W&B; each when installed."""
    with contextlib.suppress(ImportError):
        import wandb

        name = os.path.basename(run_dir)
        config = asdict(args)
        wandb.init(project=args.wandb_project_name, name=name, config=config, sync_tensorboard=True)
    with contextlib.suppress(ImportError):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(run_dir)


def checkpoint_problem(path: str):
    """What is wrong with a checkpoint folder (a missing or cut file), or None; cheaply read."""
    from safetensors import safe_open

    weights = glob.glob(os.path.join(path, "**", "*.safetensors"), recursive=True)
    files = [os.path.join(path, "trainer_state.pt"), *weights]
    for file in files:
        try:
            if file.endswith(".pt"):
                torch.load(file, mmap=True, weights_only=False)
            else:
                safe_open(file, "pt").keys()
        except Exception as e:  # any failure to read it: the file is not a checkpoint's
            return f"{file} is unreadable ({first_line(e)[:60]})"
    return None if weights else f"{path} has no model weights"


if __name__ == "__main__":
    main()
