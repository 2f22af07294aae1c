# docs: docs/grpo.md
# GRPO: "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models" (arXiv 2402.03300).
"""Group Relative Policy Optimization with a KL penalty to a frozen reference, in one file.

Objective per prompt x, pi_ref the frozen initial model:
    J(theta) = E_{y ~ pi_theta}[r(x, y)] - beta KL(pi_theta || pi_ref),   optimum pi* = pi_ref e^{r/beta} / Z.
Loss (token t of completion o_i in a group of G, rho = pi_theta / pi_old, delta = log pi_ref - log pi_theta):
    l_it = -min(rho_it A_i, clip(rho_it, 1 - eps, 1 + eps_high) A_i) + beta kappa_it,
    A_i = (r_i - mean_group r) / (std_group r + 1e-4)   (Bessel std; --scale_rewards),
    kappa = k3 = e^delta - 1 - delta                     (--kl_estimator, --kl_importance_weight),
aggregated by --loss_agg (default: mean over sequences of the token mean).
What this estimator really regularizes:
  * k3 without importance weight (the paper's default) has the value of the reverse KL but the expected gradient
    of the FORWARD KL, KL(pi_ref || pi_theta), at every visited state; with --kl_importance_weight (rho k3,
    DeepSeek-V3.2's "unbiased KL") the gradient is the reverse KL's.
  * The KL term shares the policy term's aggregation, so relative to the advantage beta acts on the per-token KL
    summed over the sequence; a per-token KL in the loss gives the per-state KL gradient with the state
    distribution held fixed, not the gradient of the sequence KL (that needs the log-ratio as a reward).
  * The group mean includes the sample itself: the reward gradient is (1 - 1/G) grad E[r].
"""

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
from typing import Literal, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # `common`, without an install step

import numpy as np
import torch
import torch.distributed as dist
import tqdm
import tyro
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict

from common.tasks import TaskError, encode_prompts, load_task


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of every random draw; step s on rank k samples from its own stream (seed, s, k)
    cuda: bool = True  # use the GPU when there is one
    track: bool = False  # also log to TensorBoard and Weights & Biases, each when installed
    wandb_project_name: str = "klrl"  # the W&B project
    run_name: Optional[str] = None  # default {task}__{exp_name}__{seed}__{unix time}_{pid}
    output_dir: str = "runs"  # run folders go here
    # model and data
    model_name_or_path: str = "common/models/tiny-policy"  # any Hugging Face causal LM: local folder or hub id
    task: str = "arithmetic"  # arithmetic (built in), jsonl (--train_file, --eval_file) or hf:<dataset>[:<config>]
    train_file: Optional[str] = None  # JSONL training prompts (--task jsonl)
    eval_file: Optional[str] = None  # JSONL held-out prompts (--task jsonl)
    prompt_field: str = "prompt"  # JSON field of the prompt (GSM8K: question)
    answer_field: str = "answer"  # JSON field of the answer (GSM8K `#### 42` and `\boxed{}` are reduced)
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one
    max_prompt_length: Optional[int] = None  # longer prompts are an error (default: 16 arithmetic, 512 data)
    max_new_tokens: Optional[int] = None  # completion token limit (default: 4 arithmetic, 1024 data)
    temperature: float = 1.0  # sampling temperature, also of every log-prob (policy, old, reference)
    # training
    total_steps: int = 200  # rollout steps
    prompts_per_step: int = 64  # prompts per step, all ranks together (paper 1024)
    num_generations: int = 8  # G, completions per prompt (paper 64, TRL 8)
    num_iterations: int = 1  # mu, passes over each rollout (paper 1)
    num_minibatches: int = 1  # optimizer steps per pass; 1 x 1 is on-policy (ratio 1, clip fractions 0)
    micro_batch_size: int = 512  # sequences per forward/backward on one device (4-16 for 1.5B, 1K tokens, 80 GB)
    gen_batch_size: int = 512  # sequences per generation call on one device
    learning_rate: float = 5e-4  # AdamW, constant after warm-up (paper 1e-6 on 7B)
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clip (0 = none)
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimizer steps
    # GRPO
    beta: float = 0.04  # KL coefficient (paper 0.04, TRL default 0); 0 removes the KL term
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # per token, delta = lp_ref - lp: -delta, delta^2/2, e^delta-1-delta
    kl_importance_weight: bool = False  # KL term x rho (not detached): reverse-KL gradient (DeepSeek-V3.2, TRL)
    epsilon: float = 0.2  # lower clip range of the ratio
    epsilon_high: Optional[float] = None  # upper clip range (None = epsilon; DAPO 0.28)
    scale_rewards: Literal["group", "batch", "none"] = "group"  # std in A: the group's (paper), the batch's, none
    loss_agg: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = "seq_mean_token_mean"
    """seq_mean_token_mean (paper, TRL grpo), token_mean (DAPO), seq_mean_token_sum_norm (Dr. GRPO: / max_new_tokens)"""
    mask_truncated_completions: bool = False  # completions without EOS get no loss and no counts (TRL)
    # evaluation, logging, checkpoints
    eval_every: int = 25  # held-out eval every this many steps, at step 0 and at the end (0 = only those)
    eval_num_prompts: int = 500  # held-out prompts per eval (the whole arithmetic held-out split)
    eval_samples_per_prompt: int = 4  # samples per held-out prompt at `temperature`; pass@1 = mean correctness
    eval_kl: bool = True  # log eval/kl_init_rkl_exact_seq (GRPO's reference is the initial policy: no extra model)
    log_completions: int = 0  # held-out (prompt, completion, reward) rows per eval written to completions.jsonl
    save_every: int = 0  # checkpoint every this many steps (0 = only at the end)
    keep_last: int = 0  # keep only the newest this many checkpoints (0 = all)
    resume: Optional[str] = None  # a run folder to continue, bit for bit; it keeps writing there
    bf16: Optional[bool] = None  # bf16 autocast of forwards (weights, optimizer float32); default: on bf16 GPUs
    gradient_checkpointing: bool = False  # trade compute for memory on real models
    reshard_after_forward: bool = True  # under torchrun (FSDP2): free gathered weights after each forward (ZeRO-3)


def check_args(args: Args, world: int) -> None:
    check_numbers(args, positive=("temperature", "epsilon"))
    if args.num_generations < 2:
        raise UserError("--num_generations must be >= 2 (the group std and mean need two samples)")
    if args.prompts_per_step % world or args.prompts_per_step // world * args.num_generations % args.num_minibatches:
        raise UserError(f"--prompts_per_step x --num_generations does not split into {world} ranks x --num_minibatches")


# ==========================================================================================================
# ALGO LOGIC: pure functions, tensors in and out (tested against closed forms in tests/test_grpo.py)
# ==========================================================================================================
def group_advantages(rewards, group_size: int, scale: str = "group", eps: float = 1e-4, batch_std=None):
    """A_i = (r_i - mean_g) / (s + eps) for contiguous groups: s = the group's Bessel std (two-pass, never
    E[r^2] - mean^2), the global batch's (`batch_std`; from `rewards` when None), or no division ("none",
    Dr. GRPO). A group whose rewards are all equal gets A = 0 exactly."""
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / ((adv.pow(2).sum(1, keepdim=True) / (group_size - 1)).sqrt() + eps)
    elif scale == "batch":
        adv = adv / ((rewards.std() if batch_std is None else batch_std) + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale_rewards {scale!r}")
    return torch.where((r == r[:, :1]).all(1, keepdim=True), 0.0, adv).view(-1)


def kl_term(lp, lp_ref, lp_old, estimator: str = "k3", importance_weight: bool = False):
    """Per-token KL penalty, delta = lp_ref - lp:  k1 = -delta,  k2 = delta^2 / 2,  k3 = e^delta - 1 - delta.
    All estimate KL(pi_theta || pi_ref) in value on samples of pi_theta. Expected on-policy gradients: k1 -> 0,
    k2 -> grad KL(pi_theta || pi_ref), k3 -> grad KL(pi_ref || pi_theta) (FORWARD). importance_weight: x rho,
    rho = e^{lp - lp_old} not detached; then E_old[grad rho k1] = E_old[grad rho k3] = grad KL(pi_theta || pi_ref)."""
    delta = lp_ref - lp
    kappa = {"k1": -delta, "k2": 0.5 * delta.pow(2), "k3": torch.expm1(delta) - delta}[estimator]
    return torch.exp(lp - lp_old) * kappa if importance_weight else kappa


def aggregate(per_token, mask, loss_agg: str, num_seqs, num_tokens, max_new_tokens: int):
    """This micro-batch's share of the loss L (summed over micro-batches and ranks it is L):
        seq_mean_token_mean:     L = (1/N_seq) sum_i (1/|o_i|) sum_t l_it
        token_mean:              L = sum_{i,t} l_it / sum_i |o_i|
        seq_mean_token_sum_norm: L = (1/N_seq) sum_i sum_t l_it / max_new_tokens
    `num_seqs` and `num_tokens` are GLOBAL counts, so L does not depend on how the batch is split."""
    masked = per_token * mask
    if loss_agg == "seq_mean_token_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / max(num_seqs, 1)
    if loss_agg == "token_mean":
        return masked.sum() / max(num_tokens, 1)
    if loss_agg == "seq_mean_token_sum_norm":
        return masked.sum() / (max(num_seqs, 1) * max_new_tokens)
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def grpo_loss(lp, lp_old, lp_ref, advantages, mask, args, num_seqs, num_tokens):
    """GRPO loss of one micro-batch: aggregate(l_it),  l_it = -min(rho A_i, clip(rho, 1 - eps, 1 + eps_high) A_i)
    + beta kappa_it,  rho = e^{lp - lp_old}. Gradient -rho A grad lp where unclipped, 0 where clipped, plus beta
    grad kappa. lp, lp_old, lp_ref, mask [B, T]; advantages [B]; lp_ref None: no KL term. Returns (loss, stats),
    each stat this micro-batch's share of a global mean."""
    eps_low, eps_high = args.epsilon, args.epsilon if args.epsilon_high is None else args.epsilon_high
    mask = mask.to(lp.dtype)
    agg = lambda x: aggregate(x, mask, args.loss_agg, num_seqs, num_tokens, args.max_new_tokens)  # noqa: E731
    tok_mean = lambda x: (x * mask).sum() / max(num_tokens, 1)  # noqa: E731
    ratio, adv = torch.exp(lp - lp_old), advantages.to(lp.dtype)[:, None]
    loss = policy_loss = agg(-torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv))
    low, high = ((ratio < 1 - eps_low) & (adv < 0)).to(lp.dtype), ((ratio > 1 + eps_high) & (adv > 0)).to(lp.dtype)
    stats = {"policy_loss": policy_loss, "clipfrac_low": tok_mean(low), "clipfrac_high": tok_mean(high)}
    stats |= {"clipfrac": tok_mean(low + high), "kl_old_fkl_k1": tok_mean(lp_old - lp)}
    stats["kl_old_fkl_k3"] = tok_mean(torch.expm1(lp - lp_old) - (lp - lp_old))
    if lp_ref is not None:
        loss = loss + (kl := args.beta * agg(kl_term(lp, lp_ref, lp_old, args.kl_estimator, args.kl_importance_weight)))
        delta = lp_ref - lp
        stats |= {"kl_penalty": kl, "kl_ref_rkl_k3": tok_mean(torch.expm1(delta) - delta)}
        stats["kl_ref_rkl_k1_seq"] = (-delta * mask).sum() / max(num_seqs, 1)
    return loss, {k: v.detach() for k, v in (stats | {"loss": loss}).items()}


# ==========================================================================================================
# ROLLOUT: sampling, teacher-forced log-probs, evaluation (identical in every file that has them)
# ==========================================================================================================
def forward(model, ids, mask, pos, cache=None, keep=0):
    """Logits with explicit positions (left padding), extending the KV cache `cache` when one is given."""
    names = inspect.signature(getattr(model, "module", model).forward).parameters  # `cache` from transformers 5.x
    kw = {"cache" if "cache" in names else "past_key_values": cache, "use_cache": True} if cache is not None else {}
    return model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, **kw).logits


def keep_rows(cache, rows):
    """Keep these batch rows of a KV cache (index_select: its backward is ~8x faster than indexing's)."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)


def prefill(model, prompt_ids, prompt_mask, rows):
    """Run each distinct prompt once and copy its KV cache to the rows that continue it (rows [M]: prompt index):
    (logits of each row's first completion token [M, V], a cache of M rows). Autograd flows through the copies."""
    from transformers import DynamicCache

    cache = DynamicCache()
    logits = forward(model, prompt_ids, prompt_mask, (prompt_mask.cumsum(-1) - 1).clamp(min=0), cache, keep=1)
    keep_rows(cache, rows)
    return logits[:, -1].index_select(0, rows), cache


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, rows, args, eos, pad, generator=None, uniforms=None):
    """One completion per row from exactly softmax(logits / T): no top-k, top-p or penalty, so the samples follow
    the law every log-prob assumes. Rows that emitted EOS leave the batch and the KV cache, so decoding costs what
    is generated. uniforms [M, H]: inverse-CDF draws from that noise instead of `generator` (rank-invariant)."""
    was_training = model.training
    model.eval()  # in train mode gradient checkpointing would switch the KV cache off
    with autocast(args):
        logits, cache = prefill(model, prompt_ids, prompt_mask, rows)
    tokens = torch.full((len(rows), args.max_new_tokens), pad, device=rows.device)
    live, attn = torch.arange(len(rows), device=rows.device), prompt_mask[rows]
    for t in range(args.max_new_tokens):
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / args.temperature, -1)
        if uniforms is None:
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            cdf, u = probs.double().cumsum(-1), uniforms[live.cpu(), t, None].to(probs.device, torch.float64)
            tok = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=probs.shape[-1] - 1)
        tokens[live, t], done = tok, torch.isin(tok, eos)
        if t == args.max_new_tokens - 1 or done.all():
            break
        if done.any():  # finished rows leave the batch
            keep_rows(cache, keep := (~done).nonzero().squeeze(-1))
            live, tok, attn = live[keep], tok[keep], attn[keep]
        attn = torch.cat([attn, attn.new_ones(len(live), 1)], 1)
        with autocast(args):
            logits = forward(model, tok[:, None], attn, attn.sum(-1, keepdim=True) - 1, cache, keep=1)[:, -1]
    model.train(was_training)
    return tokens[:, : t + 1]


def sample_batch(model, prompts: list, args, eos, pad, generator=None, uniforms=None) -> dict:
    """One completion per entry of `prompts` (token lists; a group = G equal entries), gen_batch_size rows per
    generation call; the batch layout of `make_batch`."""
    batch, chunks = make_batch(prompts, None, eos, pad), []
    with gathered(model, args):
        for i in range(0, len(prompts), args.gen_batch_size):
            uniq, rows = batch["prompt_index"][i : i + args.gen_batch_size].unique(return_inverse=True)
            ids, mask = batch["prompt_ids"][uniq], batch["prompt_mask"][uniq]
            u = None if uniforms is None else uniforms[i : i + args.gen_batch_size]
            chunks += generate(model, ids, mask, rows, args, eos, pad, generator, u).unbind()
    return make_batch(prompts, chunks, eos, pad, batch)


def make_batch(prompts: list, completions, eos, pad, batch=None) -> dict:
    """Each distinct prompt stored once: prompt_ids, prompt_mask [U, P] (left-padded); row m continues prompt
    prompt_index[m]. completion_ids [M, C], completion_mask [M, C] = up to and including the first EOS."""
    if batch is None:
        distinct = {}
        index = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts], device=eos.device)
        left = lambda xs, v: torch.nn.utils.rnn.pad_sequence(xs, True, v, "left").to(eos.device)  # noqa: E731
        batch = {"prompt_ids": left([torch.tensor(p) for p in distinct], pad), "prompt_index": index}
        batch["prompt_mask"] = left([torch.ones(len(p), dtype=torch.long) for p in distinct], 0)
    if completions is not None:  # padded with -1 first: a pad id that is also an EOS id must not end a row
        tokens = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(c) for c in completions], True, -1).to(eos.device)
        tokens = torch.nn.functional.pad(tokens, (0, max(0, 2 - tokens.shape[1])), value=-1)  # >= 2 columns
        is_eos = torch.isin(tokens, eos).long()
        batch["completion_mask"] = ((is_eos.cumsum(-1) - is_eos == 0) & (tokens >= 0)).long()
        batch |= {"completion_ids": tokens.clamp(min=0) + (tokens < 0) * pad, "truncated": is_eos.sum(-1) == 0}
    return batch


def completion_log_softmax(model, batch: dict, rows, temperature: float, cached: bool = True):
    """log softmax(logits / T) at the positions predicting the completion tokens of `rows`, trimmed to their
    longest completion: [m, C, V], at least float32. cached: each distinct prompt runs once (`prefill`) and the
    completions on its cache (the full rows' logits to 1e-10 in float64); else full [prompt; completion] rows
    (needed under gradient checkpointing, which drops caches inside checkpointed layers)."""
    C = max(int(batch["completion_mask"][rows].sum(-1).max()), 2)  # >= 2: the same forwards on every rank
    comp, prompt = batch["completion_ids"][rows, :C], batch["prompt_index"][rows]
    if cached:
        uniq, inv = prompt.unique(return_inverse=True)
        p_mask = batch["prompt_mask"][uniq]
        first, cache = prefill(model, batch["prompt_ids"][uniq], p_mask, inv)
        pos = p_mask.sum(-1)[inv, None] + torch.arange(C - 1, device=comp.device)  # tokens 0..C-2 predict 1..C-1
        mask = torch.cat([p_mask[inv], torch.ones_like(comp[:, 1:])], 1)
        logits = torch.cat([first[:, None], forward(model, comp[:, :-1], mask, pos, cache)], 1)
    else:
        mask = torch.cat([batch["prompt_mask"][prompt], torch.ones_like(comp)], 1)
        ids = torch.cat([batch["prompt_ids"][prompt], comp], 1)
        logits = forward(model, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), keep=C + 1)[:, :-1]
    return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)


def token_logprobs(log_softmax, tokens):
    return log_softmax.gather(-1, tokens[:, : log_softmax.shape[1], None]).squeeze(-1)


@torch.no_grad()
def batched_logprobs(model, batch: dict, args):
    """No-grad log-probs [M, C] of every completion token (0 after the end), in micro-batches: old, reference."""
    out, ids = [], batch["completion_ids"]
    with gathered(model, args):
        for rows in torch.arange(len(ids), device=ids.device).split(args.micro_batch_size):
            with autocast(args):
                lp = token_logprobs(completion_log_softmax(model, batch, rows, args.temperature), ids[rows])
            lp = lp * batch["completion_mask"][rows, : lp.shape[1]]
            out.append(torch.nn.functional.pad(lp, (0, ids.shape[1] - lp.shape[1])))
    return torch.cat(out)


def eos_ids(tokenizer, model):
    ids = {tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()}
    return torch.tensor(sorted(i for i in ids if i is not None), device=DEVICE)


def decode(tokenizer, batch: dict) -> list:
    ids = [t[m.bool()] for t, m in zip(batch["completion_ids"], batch["completion_mask"])]
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.no_grad()
def evaluate(policy, kl_models: dict, run, eos) -> tuple:
    """Held-out pass@1 at `temperature` (eval_samples_per_prompt samples each, the same random numbers at every
    eval) and, per frozen model q of kl_models, KL(pi_theta || q) summed along each sample, exact over the
    vocabulary at every visited position; prompts interleaved over ranks. Returns (metrics, example rows)."""
    args, tok, g = run.args, run.tokenizer, run.eval_sampler()
    mine = [i for i in range(run.rank, len(run.eval_prompts), run.world) for _ in range(args.eval_samples_per_prompt)]
    b = sample_batch(policy, [run.eval_prompts[i] for i in mine], args, eos, tok.pad_token_id, g)
    texts, mask = decode(tok, b), b["completion_mask"]
    r = torch.tensor(run.task.score(texts, [run.eval_answers[i] for i in mine]), device=DEVICE)
    sums = [(r >= 1).sum(), r.sum(), mask.sum()] + [r.new_zeros(()) for _ in kl_models]
    with gathered(policy, args):  # ranks may hold different numbers of eval rows
        for k, q in enumerate(kl_models.values()):
            for rows in torch.arange(len(mine), device=DEVICE).split(args.micro_batch_size):
                with autocast(args):
                    lp, lq = (completion_log_softmax(m, b, rows, args.temperature) for m in (policy, q))
                sums[3 + k] += ((lp.exp() * (lp - lq)).sum(-1) * mask[rows, : lp.shape[1]]).sum()
    s = all_reduce(torch.stack(sums).double()) / (len(run.eval_prompts) * args.eval_samples_per_prompt)
    keys = ["eval/pass@1", "eval/reward_mean", "eval/completion_len_mean"]
    keys += [f"eval/kl_{name}_rkl_exact_seq" for name in kl_models]
    shown = list(zip(mine, texts, r.tolist()))[: args.log_completions]
    shown = [{"prompt": tok.decode(run.eval_prompts[i]), "completion": c, "reward": x} for i, c, x in shown]
    return dict(zip(keys, s.tolist())), shown


# ==========================================================================================================
# UPDATE: the loss of a micro-batch (from the policy's log-softmax over its rows), and the update loop
# ==========================================================================================================
def micro_loss(lsm, batch: dict, rows, args, num_seqs, num_tokens):
    lp = token_logprobs(lsm, batch["completion_ids"][rows])
    C = lp.shape[1]
    lp_old = batch["old_logprobs"][rows, :C] if "old_logprobs" in batch else lp.detach()  # 1 step per rollout
    lp_ref = batch["ref_logprobs"][rows, :C] if "ref_logprobs" in batch else None
    return grpo_loss(
        lp, lp_old, lp_ref, batch["advantages"][rows], batch["loss_mask"][rows, :C], args, num_seqs, num_tokens
    )


def update_policy(model, optimizer, batch: dict, args, step: int) -> dict:
    """num_iterations passes x num_minibatches optimizer steps over the rollout. A mini-batch is a set of GLOBAL
    rows (one permutation on every rank; each rank trains its own rows of it), and its sequence and token counts
    are all-reduced BEFORE its loss is formed; every rank backpropagates loss x world size (FSDP averages). So the
    update does not depend on the number of ranks or micro-batches. Returns the global metrics."""
    world, rank, stats, mask = *world_rank(), [], batch["loss_mask"]
    for it in range(args.num_iterations):
        shuffle = torch.Generator().manual_seed(seed_of(args, "shuffle", step, it))
        for mb in torch.randperm(len(mask) * world, generator=shuffle).to(DEVICE).tensor_split(args.num_minibatches):
            mb = mb[(mb // len(mask)) == rank] % len(mask)  # this rank's rows of the global mini-batch
            counts = all_reduce(torch.stack([(mask[mb].sum(-1) > 0).sum(), mask[mb].sum()]).double()).tolist()
            micro = mb.split(args.micro_batch_size) if len(mb) else ()  # a rank may hold none of its rows
            n = int(all_reduce(torch.tensor(len(micro), device=DEVICE), dist.ReduceOp.MAX))  # FSDP: lockstep
            for k in range(n):
                rows = micro[k] if k < len(micro) else mask.new_zeros(1, dtype=torch.long)  # else: weight 0
                if world > 1:  # FSDP2: reduce-scatter the gradients once per mini-batch, after its last micro-batch
                    model.set_requires_gradient_sync(k == n - 1)
                with autocast(args):
                    lsm = completion_log_softmax(model, batch, rows, args.temperature, not args.gradient_checkpointing)
                loss, s = micro_loss(lsm, batch, rows, args, *counts)
                (loss * world * (k < len(micro))).backward()
                entropy = (-(lsm.exp() * lsm).sum(-1) * mask[rows, : lsm.shape[1]]).sum() / max(counts[1], 1)
                stats += [s | {"entropy": entropy.detach()}] if k < len(micro) else [{}]
            stats[-1] |= optimizer_step(model, optimizer, args)
    return reduce_stats(stats, args.num_iterations * args.num_minibatches)


# ==========================================================================================================
# TRAIN
# ==========================================================================================================
def train(args: Args) -> None:
    run = Run(args)  # the task and its prompts, processes, the checkpoint to resume (PLUMBING)
    policy = load_model(run.checkpoint or args.model_name_or_path, args, trainable=True)
    ref = load_model(args.model_name_or_path, args) if args.beta > 0 or args.eval_kl else None
    eos, pad, G = eos_ids(run.tokenizer, policy), run.tokenizer.pad_token_id, args.num_generations
    model, optimizer = run.start(policy, lambda: evaluate(policy, {"init": ref} if args.eval_kl else {}, run, eos))
    for step in run.steps():
        # 1. the step's prompts (one global draw, this rank's share), G completions each from pi_old
        prompts = run.prompts(step)
        batch = sample_batch(
            policy, [run.train_prompts[i] for i in prompts for _ in range(G)], args, eos, pad, run.sampler(step)
        )
        run.timer("generate")
        # 2. rewards and group advantages (a group lives on one rank; the batch std is global)
        answers = [run.task.train[i].answer for i in prompts for _ in range(G)]
        rewards = torch.tensor(run.task.score(decode(run.tokenizer, batch), answers), device=DEVICE)
        reward_mean, reward_std = global_mean_std(rewards)
        batch["advantages"] = group_advantages(rewards, G, args.scale_rewards, batch_std=reward_std)
        truncated = batch["truncated"][:, None] & args.mask_truncated_completions
        batch["loss_mask"] = batch["completion_mask"] * ~truncated
        # 3. log-probs of the rollout policy (only if later optimizer steps move away from it) and the reference
        if args.num_iterations * args.num_minibatches > 1:
            batch["old_logprobs"] = batched_logprobs(policy, batch, args)
        if args.beta > 0:
            batch["ref_logprobs"] = batched_logprobs(ref, batch, args)
        # 4. the policy update
        metrics = update_policy(model, optimizer, batch, args, step)
        run.timer("update")
        if args.num_iterations * args.num_minibatches == 1:  # drift from the rollout policy: 0 by construction
            del metrics["losses/kl_old_fkl_k1"], metrics["losses/kl_old_fkl_k3"]
        zero_std = (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1).sum().double() * G
        metrics["charts/frac_reward_zero_std"] = all_reduce(zero_std).item() / (args.prompts_per_step * G)
        run.end_step(step, batch, metrics | {"charts/reward_mean": reward_mean, "charts/reward_std": reward_std})


# ==========================================================================================================
# PLUMBING: identical in every algorithm file (tests/test_shared_blocks.py); change it in one, copy it to all
# ==========================================================================================================
DEVICE = torch.device("cpu")  # this rank's GPU, or the CPU (set by Run)
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)  # checkpoints: whole tensors on rank 0
RESUMABLE = {"resume", "total_steps", "learning_rate", "weight_decay", "max_grad_norm", "eval_every", "save_every"}
LOCKS = []  # run-folder locks this process holds, released when main ends (tests call main again in-process)


class UserError(Exception):
    """Bad input: one `error:` line, exit status 1."""


class Stop(Exception):
    """SIGTERM or SIGINT: the step in flight finished and was checkpointed; exit status 143."""


def main() -> None:
    """Flags (with --resume DIR, DIR/args.json gives the defaults and only RESUMABLE flags may change), then train;
    bad input of any kind ends in one `error:` line."""
    if int(os.environ.get("RANK", 0)) and {"-h", "--help"} & set(sys.argv):  # --help on rank 0 only
        return
    resume = [b if a == "--resume" else a[9:] for a, b in zip(sys.argv, sys.argv[1:] + [""]) if a[:8] == "--resume"]
    code = 0
    try:
        saved = saved_args(resume[0]) if resume else None
        args = tyro.cli(Args, default=Args(**saved) if saved else None, use_underscores=True)
        for k, v in asdict(args).items() if saved else []:
            if k in saved and v != saved[k] and k not in RESUMABLE:  # (a missing flag: its default)
                raise UserError(f"--{k} cannot change when resuming (the run has {saved[k]!r}); start a new run")
        train(args)
    except (UserError, TaskError, FloatingPointError, OSError) as e:
        code = f"error: {str(e).strip().splitlines()[0]}"
    except Stop as e:
        print(f"stopped: {e}", file=sys.stderr)
        code = 143
    if dist.is_initialized():  # with the sharded model's reference cycles collected first
        gc.collect()
        dist.destroy_process_group()
    while LOCKS:
        LOCKS.pop().close()
    sys.exit(code)


def saved_args(folder: str) -> dict:
    """A run folder's flags (JSON lists back to tuples); a folder of another script is an error."""
    try:
        with open(os.path.join(folder, "args.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{folder} is not a run folder (args.json: {e})") from None
    if not isinstance(saved, dict) or set(saved) - set(Args.__dataclass_fields__):
        raise UserError(f"{folder} is a run of another script (its flags are not this one's)")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}


def lock(run_dir: str) -> None:
    """Rank 0 holds an flock on RUN/.lock while it runs (the OS drops it on any exit, SIGKILL included), so a second
    process never writes into a run folder in use."""
    import fcntl

    LOCKS.append(f := open(os.path.join(run_dir, ".lock"), "w"))
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise UserError(f"{run_dir} is in use by another run (it holds {run_dir}/.lock); wait for it to end") from None


def check_numbers(args, positive: tuple) -> None:
    """No flag may be negative; `positive` ones, and sizes, lengths and counts not defaulting to 0, must be > 0."""
    for k, v in asdict(args).items():
        suffix = k.endswith(("_size", "_length", "_tokens", "_steps", "_per_step", "_per_prompt", "_per_round"))
        strict = k in positive or (k.startswith("num_") or suffix) and type(args).__dataclass_fields__[k].default != 0
        if type(v) in (int, float) and (v <= 0 if strict else v < 0):
            raise UserError(f"--{k} must be {'> 0' if strict else '>= 0'}, got {v}")


def seed_of(args, stream: str, *keys) -> int:
    """The seed of one random draw, from (--seed, the stream's name, step, ...): every step is reproducible on its
    own, and two streams never share a seed (SeedSequence pads short keys with zeros, so without the name
    (seed, step) and (seed, step, 0) would be the same seed)."""
    name = zlib.crc32(stream.encode())
    return int(np.random.SeedSequence([args.seed, name, *[k % 2**31 for k in keys]]).generate_state(1)[0])


def world_rank() -> tuple:
    return (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)


def all_reduce(x, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(x := x.clone(), op)
    return x


def global_mean_std(x) -> tuple:
    """Mean and Bessel std of x over all ranks, in two passes (never E[x^2] - mean^2)."""
    n, total = all_reduce(torch.stack([x.new_tensor(x.numel()), x.sum()])).tolist()
    return total / n, (all_reduce((x - total / n).pow(2).sum()).item() / max(n - 1, 1)) ** 0.5


def reduce_stats(stats: list, steps: int) -> dict:
    """An update's metrics from its micro-batches' stats (shares of global means): summed over ranks and averaged
    over its optimizer steps; `*_min` / `*_max` are global extremes."""
    out = {}
    for k in sorted({k for s in stats for k in s}):  # the same keys in the same order on every rank
        op = "min" if k.endswith("_min") else "max" if k.endswith("_max") else "sum"
        v = torch.stack([torch.as_tensor(s[k], dtype=torch.float64, device=DEVICE) for s in stats if k in s])
        v = all_reduce(getattr(v, op)(), getattr(dist.ReduceOp, op.upper())).item()
        out[k if "/" in k else f"losses/{k}"] = v / steps if op == "sum" else v
    return out


def autocast(args):
    return torch.autocast(DEVICE.type, torch.bfloat16, enabled=args.bf16)


def optimizer_step(model, optimizer, args) -> dict:
    """Clip the gradient norm (0: no clipping), stop on a non-finite one, step at the warm-up learning rate."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a distributed tensor
    if not torch.isfinite(norm):
        raise FloatingPointError(f"non-finite loss or gradient (norm {norm.item()}); stopping without saving")
    done = float(next(iter(optimizer.state.values()), {}).get("step", 0))  # optimizer steps so far
    for group in optimizer.param_groups:
        group["lr"] = args.learning_rate * min(1, (done + 1) / max(args.warmup_steps, 1))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"charts/grad_norm": norm.item() / world_rank()[0]}  # a share of the global value


def load_model(path: str, args, trainable: bool = False):
    """A causal LM with dropout off (ratios are exactly 1 at theta = theta_old), frozen unless trained; a trained one
    in float32 (AdamW's master weights). A frozen one computes as the trained one does, so their log-probs agree at
    theta = theta_ref: in bf16 under FSDP with --bf16 (its MixedPrecisionPolicy), else float32 under autocast."""
    from transformers import AutoModelForCausalLM

    bf16 = args.bf16 and DEVICE.type == "cuda" and not trainable and dist.is_initialized()
    model = AutoModelForCausalLM.from_pretrained(local(path), dtype=torch.bfloat16 if bf16 else torch.float32)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout) or hasattr(m, "attention_dropout"):
            m.p = m.attention_dropout = 0.0
    if trainable and args.gradient_checkpointing:  # (transformers 5.2x renamed it activation checkpointing)
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return model.to(DEVICE).train(trainable).requires_grad_(trainable)


def shard(model, args):
    """Under torchrun, FSDP2 on each decoder layer and the root: weights, gradients and AdamW state split over the
    ranks; on CUDA with --bf16, bf16 compute and float32 gradient reductions. One process: the model as it is."""
    if not dist.is_initialized():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if args.bf16 and DEVICE.type == "cuda" else None
    mesh = init_device_mesh(DEVICE.type, (dist.get_world_size(),))  # --no_cuda on a GPU machine: CPU shards
    kw = {"reshard_after_forward": args.reshard_after_forward, "mp_policy": mp or MixedPrecisionPolicy(), "mesh": mesh}
    layers = {n for m in model.modules() for n in getattr(m, "_no_split_modules", None) or []}
    for m in [m for m in model.modules() if type(m).__name__ in layers]:
        fully_shard(m, **kw)
    return fully_shard(model, **kw)


@contextlib.contextmanager
def gathered(model, args):
    """FSDP2: all-gather the weights once for a whole inference phase (rollout, log-probs, eval), not per layer at
    every forward; with no collective inside, ranks may run different numbers of forwards. Else: nothing."""
    sharded = [m for m in model.modules() if hasattr(m, "unshard")] if model is not None else []
    for m in sharded:
        m.unshard()
    if sharded:
        model.set_reshard_after_forward(False)
    yield
    if sharded:
        model.set_reshard_after_forward(args.reshard_after_forward)
    for m in sharded:
        m.reshard()


def local(path: str) -> str:
    """A relative path that does not exist here is read from the repository root (the shipped tiny models)."""
    if not os.path.exists(path) and os.path.exists(os.path.join(ROOT, path)):
        return os.path.join(ROOT, path)
    if not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") > 1):
        raise UserError(f"{path}: no such local folder (nor a hub id)")
    return path


class Run:
    """The task and its prompts, the processes, the run folder (created exclusively), checkpoints and resume,
    metrics, the progress bar and the stop signals (SIGTERM, SIGINT: finish the step, save, exit 143)."""

    def __init__(self, args):
        import transformers

        global DEVICE
        self.args, self.world, self.rank = args, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
        cuda, self.stop, self.checkpoint = args.cuda and torch.cuda.is_available(), [], None
        DEVICE = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % max(torch.cuda.device_count(), 1)}")
        DEVICE = DEVICE if cuda else torch.device("cpu")  # (% : launchers that show each process one GPU)
        args.bf16 = cuda and torch.cuda.is_bf16_supported() if args.bf16 is None else args.bf16
        self.task = load_task(args.task, args.train_file, args.eval_file, args.prompt_field, args.answer_field)
        for k in ("max_prompt_length", "max_new_tokens"):  # task defaults (0 is refused by check_args)
            setattr(args, k, getattr(self.task, k) if getattr(args, k) is None else getattr(args, k))
        check_args(args, self.world)
        name = args.run_name or f"{self.task.name}__{args.exp_name}__{args.seed}__{int(time.time())}_{os.getpid()}"
        self.run_dir = args.resume or os.path.join(args.output_dir, name)
        if args.resume:  # the newest complete checkpoint, by folder name
            if self.rank == 0 and not getattr(args, "sample_from", None):  # (Q#'s --sample_from only reads it)
                lock(self.run_dir)
            found = sorted(glob.glob(os.path.join(self.run_dir, "checkpoints", "step_*")))
            for tmp in [c for c in found if c.endswith(".tmp")]:
                print(f"warning: skipping {tmp}, an interrupted save", file=sys.stderr)
            self.checkpoint = ([c for c in found if not c.endswith(".tmp")] or [None])[-1]
            if self.checkpoint is None:
                raise UserError(f"{self.run_dir} has no checkpoint yet: delete it and start again")
        elif os.path.exists(self.run_dir):
            raise UserError(f"{self.run_dir} already exists: --resume it, or choose another --run_name")
        else:  # a read-only or file --output_dir fails here, before any model loads
            os.makedirs(args.output_dir, exist_ok=True)
            if not os.access(args.output_dir, os.W_OK):
                raise UserError(f"--output_dir {args.output_dir} is not writable")
        if self.world > 1:
            if cuda:
                torch.cuda.set_device(DEVICE)
            dist.init_process_group("nccl" if cuda else "gloo")
        torch.manual_seed(args.seed)  # TRY NOT TO MODIFY: every other random draw is seed_of(args, stream, step, ...)
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if self.rank == 0:
            print(f"loading {args.model_name_or_path}", flush=True)
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(local(args.model_name_or_path))
            config = transformers.AutoConfig.from_pretrained(local(args.model_name_or_path))
        except OSError as e:
            raise UserError(f"could not load {args.model_name_or_path!r}: {str(e).strip().splitlines()[0]}") from None
        positions = getattr(config, "max_position_embeddings", math.inf)
        if args.max_prompt_length + args.max_new_tokens > positions:
            raise UserError(f"--max_prompt_length + --max_new_tokens > the model's {positions} positions")
        self.tokenizer.pad_token = self.tokenizer.pad_token or self.tokenizer.eos_token
        limit, template, evals = args.max_prompt_length, args.chat_template, self.task.eval[: args.eval_num_prompts]
        self.train_prompts = encode_prompts(self.tokenizer, self.task.train, template, limit, "train")
        self.eval_prompts = encode_prompts(self.tokenizer, evals, template, limit, "eval")
        self.eval_answers = [e.answer for e in evals]
        if args.prompts_per_step > len(self.train_prompts):
            raise UserError(f"--prompts_per_step {args.prompts_per_step} > {len(self.train_prompts)} training prompts")

    def start(self, policy, evaluate):
        """Shard the trained model, make AdamW (restored when resuming), create the run folder (exclusively: two
        runs never share one) and its log, evaluate at step 0. Returns (model, optimizer)."""
        args, self.evaluate, self.tb = self.args, evaluate, None
        self.model = shard(policy, args)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), args.learning_rate, weight_decay=args.weight_decay)
        self.state = {"step": 0, "elapsed_s": 0.0, "prompts_seen": 0}
        if self.checkpoint:
            self.state = torch.load(os.path.join(self.checkpoint, "trainer_state.pt"), "cpu", weights_only=False)
            set_optimizer_state_dict(self.model, self.optimizer, self.state.pop("optimizer"), options=FULL_STATE)
            for group in self.optimizer.param_groups:  # --weight_decay may change on resume
                group["weight_decay"] = args.weight_decay
        self.log_path = os.path.join(self.run_dir, "metrics.jsonl")
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=bool(args.resume))
            if not args.resume:
                lock(self.run_dir)
            with open(os.path.join(self.run_dir, "args.json"), "w") as f:
                json.dump(asdict(args) | {"resume": None}, f, indent=1)
            rows = open(self.log_path).readlines() if os.path.exists(self.log_path) else []
            # what was logged after the checkpoint is logged again; from a step-0 checkpoint (A*-PO stopped in its
            # stage 1) step 0 itself is redone, its eval and stage-1 rows included
            last_kept = self.state["step"] if self.state["step"] > 0 else -1
            with open(self.log_path, "w") as f:
                f.writelines(r for r in rows if json.loads(r)["step"] <= last_kept)
            self.tb = tensorboard(args, self.run_dir) if args.track else None
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda signum, _: self.stop.append(signal.Signals(signum).name))
        self.t0 = time.time() - self.state["elapsed_s"]
        if self.state["step"] == 0:
            self.log(0, self.eval())
        self.bar = tqdm.tqdm(total=args.total_steps, initial=self.state["step"], disable=self.rank > 0)
        return self.model, self.optimizer

    def steps(self):
        for self.step in range(self.state["step"] + 1, self.args.total_steps + 1):
            self.clock = {"start": time.time(), "last": time.time()}
            yield self.step

    def draw(self, step: int):
        """The step's order of all training prompts: one draw from (seed, step), the same on every rank."""
        return np.random.default_rng(seed_of(self.args, "prompts", step)).permutation(len(self.train_prompts))

    def prompts(self, step: int):
        """This rank's share of the step's prompts."""
        return self.draw(step)[: self.args.prompts_per_step][self.rank :: self.world]

    def sampler(self, step: int):
        """This rank's sampling noise at this step."""
        return torch.Generator(DEVICE).manual_seed(seed_of(self.args, "sample", step, self.rank))

    def eval_sampler(self):
        """This rank's eval noise: the same at every eval, so evals differ only by the policy."""
        return torch.Generator(DEVICE).manual_seed(seed_of(self.args, "eval", self.rank))

    def timer(self, name: str) -> None:
        self.clock[f"perf/{name}_s"], self.clock["last"] = time.time() - self.clock["last"], time.time()

    def eval(self) -> dict:
        step = getattr(self, "step", 0)
        if self.rank == 0:
            print(f"step {step}: evaluating", flush=True)
        metrics, shown = self.evaluate()
        if self.rank == 0 and shown:
            with open(os.path.join(self.run_dir, "completions.jsonl"), "a") as f:
                f.writelines(json.dumps({"step": step} | row) + "\n" for row in shown)
        return metrics

    def log(self, step: int, metrics: dict) -> None:
        if self.rank == 0:
            row = {"step": step, "time_s": round(time.time() - self.t0, 3)}
            row |= {k: v if math.isfinite(v) else None for k, v in metrics.items()}  # JSON has no NaN
            with open(self.log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            for k, v in metrics.items() if self.tb else []:
                self.tb.add_scalar(k, v, step)

    def end_step(self, step: int, batch: dict, metrics: dict) -> None:
        """Counters, the eval when due, the metrics row, a checkpoint every --save_every steps, at the end, or on
        SIGTERM / SIGINT (which then stops the run)."""
        args, n, elapsed = self.args, len(batch["completion_ids"]) * self.world, time.time() - self.clock["start"]
        tokens, cut = all_reduce(torch.stack([batch["completion_mask"].sum(), batch["truncated"].sum()]).double())
        self.state["prompts_seen"] += args.prompts_per_step
        metrics |= {k: v for k, v in self.clock.items() if "/" in k} | {"perf/step_s": elapsed}
        metrics |= {"charts/tokens_per_s": tokens.item() / elapsed, "charts/completion_len_mean": tokens.item() / n}
        metrics |= {"charts/truncated_frac": cut.item() / n, "charts/prompts_seen": self.state["prompts_seen"]}
        metrics["charts/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        if DEVICE.type == "cuda":  # this rank's high-water mark since the start
            metrics["perf/max_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if (args.eval_every and step % args.eval_every == 0) or step == args.total_steps:
            metrics |= self.eval()
        self.log(step, metrics)
        self.bar.update()
        stop = all_reduce(torch.tensor(len(self.stop), device=DEVICE)).item() > 0 and step < args.total_steps
        if step == args.total_steps or stop or (args.save_every and step % args.save_every == 0):
            self.save(step)
        if stop:
            why = self.stop[0] if self.stop else "a signal on another rank"
            raise Stop(f"{why}: checkpoint of step {step} saved; continue with --resume {self.run_dir}")

    def save(self, step: int) -> None:
        """checkpoints/step_N: save_pretrained (model, tokenizer) and trainer_state.pt (optimizer, counters), written
        as step_N.tmp and renamed (never half-written); the newest --keep_last kept; `final` links to the last."""
        self.state |= {"step": step, "elapsed_s": time.time() - self.t0}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=FULL_STATE)
        path = os.path.join(self.run_dir, "checkpoints", f"step_{step:06d}")
        if self.rank == 0:
            try:
                getattr(self.model, "module", self.model).save_pretrained(path + ".tmp", state_dict=model_sd)
                self.tokenizer.save_pretrained(path + ".tmp")
                torch.save(self.state | {"optimizer": optim_sd}, os.path.join(path + ".tmp", "trainer_state.pt"))
                os.replace(path + ".tmp", path)
            except OSError as e:
                shutil.rmtree(path + ".tmp", ignore_errors=True)
                raise UserError(f"could not save {path}: {e.strerror or e}") from None
            older = sorted(glob.glob(os.path.join(self.run_dir, "checkpoints", "step_*[0-9]")))[:-1]
            for old in older[: max(0, len(older) + 1 - self.args.keep_last)] if self.args.keep_last else []:
                shutil.rmtree(old)
            if step == self.args.total_steps:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.run_dir, "final"))
                os.symlink(os.path.relpath(path, self.run_dir), os.path.join(self.run_dir, "final"))
        if self.world > 1:
            dist.barrier()


def tensorboard(args, run_dir: str):
    """--track: a TensorBoard writer, mirrored to W&B; each when installed."""
    with contextlib.suppress(ImportError):
        import wandb

        name, config = os.path.basename(run_dir), asdict(args)
        wandb.init(project=args.wandb_project_name, name=name, config=config, sync_tensorboard=True)
    with contextlib.suppress(ImportError):
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(run_dir)


if __name__ == "__main__":
    main()
