# docs: docs/rpg.md
# RPG-FKL / RPG-UFKL: "On the Design of KL-Regularized Policy Gradient Algorithms for LLM Reasoning" (arXiv 2505.17508).
"""Regularized Policy Gradient with the FORWARD KL (FKL) or the unnormalized forward KL (UFKL), in one file.

Objective (x = a whole response, samples from pi_old, anchor pi_a = pi_old by default):
    J(theta) = E_{x ~ pi_theta}[R(x)] - beta * D(theta),
    FKL:  D = KL(pi_a || pi_theta)                       UFKL: D = KL(pi_a || pi_theta) + sum_x (pi_theta - pi_a)
Optimum of one step: pi = beta pi_a / (lambda - R), lambda > max R fixed by normalization (both: for softmax
policies the mass term is constant). With the default iterative anchor (`--kl_anchor old`) each rollout step is
a mirror-descent step toward argmax R; with `--kl_anchor init` it is the fixed regularized optimum.
Ratios: w = pi_theta/pi_old (importance weight), u = pi_theta/pi_a, v = pi_a/pi_old; A = R - mean of the group's
R (inside the w-weighted term; no std). Loss, sequence level (exact for every theta), k3(y) = y - 1 - log y:
    differentiable: L = E_old[ -w A + beta K ],           K = -v log pi_theta(x)  (FKL)   or  v k3(u)  (UFKL)
    reinforce:      L = -E_old[ sg(w A + C) log pi_theta(x) ],  C = +beta v  (FKL)  or  -beta (w - v)  (UFKL)
Both have expected gradient -grad J. `--ratio_level token` (default, as the released code) evaluates the same
expressions per token with token ratios; for FKL/UFKL with the old anchor the KL term is then exact for every
theta (v = 1), while the token-ratio reward term is exact at theta = theta_old. `sequence` uses whole-sequence
ratios for the reward term and prefix weights V_t = prod_{k<=t} v_k for the KL term (exact for every theta).
FKL and UFKL have the same expected gradient; per sample at w = 1 the UFKL KL term has zero gradient while FKL's
is -beta grad log pi (zero only in expectation), so UFKL is the lower-variance estimator.
"""

import contextlib
import inspect
import io
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root, for `common`

import numpy as np
import torch
import torch.distributed as dist
import tyro

from common import TINY_POLICY
from common.tasks import TaskError, load_task


@dataclass
class Args:
    # ---- experiment ---------------------------------------------------------------------------------------
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """global seed; prompt draws use it on every rank, sampling uses seed + rank"""
    torch_deterministic: bool = True
    """`torch.backends.cudnn.deterministic = True`"""
    cuda: bool = True
    """use the GPU when one is present"""
    track: bool = False
    """also log to TensorBoard and Weights & Biases, each when installed"""
    wandb_project_name: str = "klrl"
    """the W&B project"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    run_name: Optional[str] = None
    """default `{task}__{exp_name}__{seed}__{unix_time}`"""
    output_dir: str = "runs"
    """outputs go to `{output_dir}/{run_name}/`"""
    # ---- model and data -----------------------------------------------------------------------------------
    model_name_or_path: str = TINY_POLICY
    """any Hugging Face causal LM (local folder or hub id); default: the shipped tiny policy"""
    task: str = "arithmetic"
    """`arithmetic` (built in), `jsonl` (with --train_file/--eval_file) or `hf:<dataset>[:<config>]`"""
    train_file: Optional[str] = None
    """JSONL training prompts (with --task jsonl)"""
    eval_file: Optional[str] = None
    """JSONL held-out prompts (with --task jsonl)"""
    prompt_field: str = "prompt"
    """JSON field holding the prompt"""
    answer_field: str = "answer"
    """JSON field holding the reference answer (GSM8K `#### 42` and `\\boxed{}` are reduced to the answer)"""
    no_chat_template: bool = False
    """do not apply the tokenizer's chat template (it is applied when the tokenizer has one)"""
    max_prompt_length: Optional[int] = None
    """prompt token limit; longer prompts are an error, never truncated (default per task: 16 arithmetic, 512)"""
    max_new_tokens: Optional[int] = None
    """completion token limit (default per task: 4 arithmetic, 1024 real data)"""
    temperature: float = 1.0
    """sampling temperature, also used for every log-prob (policy, old, reference)"""
    # ---- training -----------------------------------------------------------------------------------------
    total_steps: int = 200
    """rollout steps (one generation phase each). Tiny-tuned (about 2 minutes on 2 CPU cores)"""
    prompts_per_step: int = 64
    """prompts per step, all ranks together. Tiny-tuned; paper: 512 (x 16 samples)"""
    num_generations: int = 8
    """G, completions per prompt (a group; the baseline is the group mean). Paper 16"""
    num_iterations: int = 1
    """mu, passes over each rollout batch (paper 1)"""
    num_minibatches: int = 4
    """optimizer steps per pass over disjoint shuffled mini-batches (released code: 16 per rollout batch)"""
    micro_batch_size: int = 512
    """sequences per forward/backward on one device (gradient accumulation below the mini-batch). Tiny-tuned;
    about 4-16 for 0.5B-1.5B models with 1K-token completions on one 80 GB GPU"""
    gen_batch_size: int = 512
    """sequences per generate call on one device"""
    learning_rate: float = 3e-4
    """AdamW learning rate, constant after warm-up. Tiny-tuned (5e-4 reached higher peaks but oscillated);
    paper 1e-6 (REINFORCE scripts 5e-7), AdamW weight decay 0.1, 10 warm-up steps"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    warmup_steps: int = 0
    """linear LR warm-up, in optimizer steps"""
    # ---- RPG ---------------------------------------------------------------------------------------------
    unnormalized: bool = False
    """UFKL: add the mass term sum_x (pi_theta - pi_a) to the KL (same expected gradient for softmax policies; the
    per-sample KL gradient is exactly 0 at w = 1, so a lower-variance estimator)"""
    form: Literal["differentiable", "reinforce"] = "differentiable"
    """`differentiable`: surrogate with gradients through the ratios (released code); `reinforce`: stop-gradient
    coefficients on log pi (paper Algorithm 2; the released code never calls its REINFORCE loss)"""
    kl_anchor: Literal["old", "init"] = "old"
    """`old`: pi_a = the policy that sampled this step's rollouts (the paper's iterative reference, no extra
    model); `init`: pi_a = the frozen initial model"""
    ratio_level: Literal["token", "sequence"] = "token"
    """`token`: per-token ratios (released code; exact at theta = theta_old); `sequence`: whole-sequence ratios and
    prefix weights (exact for every theta, higher variance on long responses)"""
    beta: float = 1e-3
    """KL coefficient. Tiny-task value; paper and released scripts 1e-4 (1e-3 was worse in the paper's ablation)"""
    clip: bool = True
    """dual clip of the reward term (differentiable) or Algorithm 2's mask (reinforce); --no_clip: bare surrogate"""
    clip_eps_low: float = 0.2
    """lower clip range of the ratio (paper 0.2)"""
    clip_eps_high: float = 0.28
    """upper clip range of the ratio (paper 0.28)"""
    clip_c: float = 10.0
    """dual-clip bound c for negative advantages (paper 10)"""
    loss_agg: Literal["token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """`token_mean`: all terms / global completion-token count (released code); `seq_mean_token_sum_norm`:
    (1/N_seq) sum of each sequence's terms / max_new_tokens (a constant times the exact per-sequence sum)"""
    # ---- evaluation, logging, checkpoints -----------------------------------------------------------------
    eval_every: int = 25
    """held-out eval every this many steps (and always at step 0); 0 = only at the start and the end"""
    eval_num_prompts: int = 500
    """held-out prompts per eval (all of the arithmetic held-out split)"""
    eval_samples_per_prompt: int = 4
    """samples per held-out prompt at `temperature`; pass@1 = mean correctness"""
    eval_kl: bool = True
    """log eval/kl_init_rkl_exact_seq; needs a frozen copy of the initial policy (held anyway with --kl_anchor init)"""
    log_every: int = 10
    """print a one-line summary every this many steps (metrics.jsonl gets every step)"""
    save_every: int = 0
    """checkpoint every this many steps (0 = only at the end)"""
    resume: Optional[str] = None
    """a run folder or checkpoint folder to resume from (restores model, optimizer, step and RNG)"""
    bf16: Optional[bool] = None
    """bf16 autocast for forward passes (parameters and optimizer stay float32); default: on with CUDA"""
    gradient_checkpointing: bool = False
    """trade compute for memory on real models"""
    prompt_cache: bool = True
    """run each prompt once per group and reuse its KV cache for the G completions, in generation, the
    reference/old log-probs and the training forward: the same logits from P + G*C instead of G*(P + C) tokens per
    group (about 3x fewer on the tiny task). Off: full [prompt; completion] rows everywhere (for models whose cache
    cannot be indexed by batch row). The training forward uses full rows under gradient checkpointing, which drops
    the cache inside checkpointed layers"""
    # ---- filled in at runtime -----------------------------------------------------------------------------
    world_size: int = 0
    """number of processes (computed at runtime)"""
    local_prompts: int = 0
    """prompts per step on one rank (computed at runtime)"""


class Preempted(Exception):
    """SIGTERM (a scheduler's preemption, `kill`): the step in flight finishes, a checkpoint is written, and the
    process exits with status 143 so `--resume` continues exactly."""


class UserError(ValueError):
    """Bad flags or inputs: printed as one line (`error: ...`), exit status 1, nothing written."""


# ==========================================================================================================
# ALGO LOGIC: pure functions (tensors in, tensors out; tested against closed forms in tests/test_rpg.py)
# ==========================================================================================================
def k3(log_y: torch.Tensor) -> torch.Tensor:
    """k3(y) = y - 1 - log y >= 0, from log y (expm1 keeps it accurate near y = 1). No clamping (the released
    code clamps KL values to [-10, 10], which zeroes the gradient outside)."""
    return torch.expm1(log_y) - log_y


def group_mean_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = R_i - mean of its group (the mean includes R_i; no std division: the released code's `rpg`
    estimator). The reward gradient is then (1 - 1/G) grad E[R], so the effective beta is beta / (1 - 1/G)."""
    r = rewards.view(-1, group_size)
    return (r - r.mean(dim=1, keepdim=True)).view(-1)


def kl_surrogate(log_weight: torch.Tensor, log_u: torch.Tensor, lp: torch.Tensor, unnormalized: bool) -> torch.Tensor:
    """Differentiable KL term, weight * g:  FKL  weight * (-log pi_theta);   UFKL  weight * k3(u).

    Token level: weight = v_t = pi_a/pi_old, so E_old[-v lp] = cross-entropy(pi_a, pi_theta) per state (the
    gradient of KL(pi_a || pi_theta)) and E_old[v k3(u)] = KL(pi_a || pi_theta) + sum (pi_theta - pi_a).
    Sequence level: weight = the prefix product V_t = prod_{k<=t} v_k, and the sum over t has the expectation
    (and gradient) of the whole-sequence forward KL for every theta. With the old anchor, v = V_t = 1.
    """
    g = k3(log_u) if unnormalized else -lp
    return torch.exp(log_weight) * g


def reinforce_coef(log_w: torch.Tensor, log_v: torch.Tensor, beta: float, unnormalized: bool) -> torch.Tensor:
    """KL part C of the REINFORCE coefficient sg(w A + C):  FKL  +beta v;  UFKL  -beta (w - v).
    grad E_old[(w A + C) grad log pi] = grad E_theta[R] - beta grad D."""
    v = torch.exp(log_v)
    return -beta * (torch.exp(log_w) - v) if unnormalized else beta * v


def dual_clip(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float, c: float) -> torch.Tensor:
    """RPG / PPO dual-clip reward term: l = max(-w A, -clip(w, 1 - eps_low, 1 + eps_high) A), and for A < 0 also
    min(l, -c A). Gradient -A grad w except where w > 1 + eps_high with A > 0, w < 1 - eps_low with A < 0, or
    w > c with A < 0 (zero there)."""
    loss = torch.max(-ratio * adv, -torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)
    return torch.where(adv < 0, torch.min(loss, -c * adv), loss)


def reinforce_mask(ratio: torch.Tensor, adv_eff: torch.Tensor, eps_low: float, eps_high: float,
                   c: float) -> torch.Tensor:
    """Paper Algorithm 2: m = 1 if (A' >= 0 and w < 1 + eps_high) or (A' < 0 and 1 - eps_low < w < c), with the
    effective advantage A' = A + C/w (the sign of the whole coefficient, not of A). At beta = 0 the masked
    gradient is exactly the PPO dual-clip gradient."""
    keep = torch.where(adv_eff >= 0, ratio < 1 + eps_high, (ratio > 1 - eps_low) & (ratio < c))
    return keep.to(ratio.dtype)


def rpg_loss(lp, lp_old, lp_anchor, advantages, mask, *, beta: float, unnormalized: bool = False,
             form: str = "differentiable", ratio_level: str = "token", clip: bool = True, clip_eps_low: float = 0.2,
             clip_eps_high: float = 0.28, clip_c: float = 10.0, loss_agg: str = "token_mean", num_seqs,
             num_tokens, max_new_tokens: int, anchor: str = "old"):
    """RPG-FKL / UFKL loss of one micro-batch. lp, lp_old, lp_anchor, mask [B, T] (lp_anchor = lp_old for the old
    anchor); advantages [B]. With w = e^{lp - lp_old}, u = e^{lp - lp_anchor}, v = e^{lp_anchor - lp_old}:

      token level      differentiable: sum_t [ clip(-w_t A) + beta K_t ],   K_t = kl_surrogate(log v_t, log u_t)
                       reinforce:      sum_t -m_t sg(w_t A + C_t) lp_t,     C_t = reinforce_coef(w_t, v_t)
      sequence level   differentiable: clip(-W A) + beta sum_t K_t(V_t),    W = prod_t w_t, V_t prefix products of v
                       reinforce:      -m sg(W A + C(W, V)) sum_t lp_t

    Exact gradient weight (no clip, sequence level): grad E_old[loss] = -grad J = -(grad E_theta[R] -
    beta grad KL(pi_a || pi_theta)). `clip` applies `dual_clip` to the reward term (the KL term stays unclipped,
    as the released code) or `reinforce_mask` with the effective advantage A' = A + C/w (paper Algorithm 2).
    Aggregation: token_mean = sum of all terms / num_tokens (global); seq_mean_token_sum_norm = sum /
    (num_seqs * max_new_tokens), a constant times the exact per-sequence sum.
    Returns (loss, stats); stats are this micro-batch's share of global means, except `*_min` / `*_max`;
    `anchor` ("old" or "init") only names the anchor-KL metric.
    """
    m = mask.to(lp.dtype)
    log_w, log_u, log_v = (lp - lp_old) * m, (lp - lp_anchor) * m, (lp_anchor - lp_old) * m
    adv = advantages.to(lp.dtype)
    denom = max(num_tokens, 1) if loss_agg == "token_mean" else max(num_seqs, 1) * max_new_tokens
    if ratio_level == "token":  # every term per token; A broadcast over the tokens of its sequence
        adv, ratio, log_weight, log_ratio, logp = adv[:, None], torch.exp(log_w), log_v, log_w, lp
    else:  # one reward term per sequence; prefix weights for the KL term; whole-sequence ratios for REINFORCE
        log_weight = torch.cumsum(log_v, dim=-1)
        log_ratio, ratio, logp = log_w.sum(-1), torch.exp(log_w.sum(-1)), (lp * m).sum(-1)
    kl = kl_surrogate(log_weight, log_u, lp, unnormalized) * m  # its value is logged in both forms
    if form == "differentiable":
        reward_term = dual_clip(ratio, adv, clip_eps_low, clip_eps_high, clip_c) if clip else -ratio * adv
        adv_eff = adv
        terms = reward_term.sum() if ratio_level == "sequence" else (reward_term * m).sum()
        loss = (terms + beta * kl.sum()) / denom
    else:
        log_v_c = log_v if ratio_level == "token" else log_v.sum(-1)
        coef_kl = reinforce_coef(log_ratio, log_v_c, beta, unnormalized)
        adv_eff = adv + coef_kl / ratio
        keep = reinforce_mask(ratio, adv_eff, clip_eps_low, clip_eps_high, clip_c) if clip else torch.ones_like(ratio)
        coef = (keep * (ratio * adv + coef_kl)).detach()
        per = -coef * logp
        loss = (per * m).sum() / denom if ratio_level == "token" else per.sum() / denom
    with torch.no_grad():
        tok = lambda x: (x * m).sum() / max(num_tokens, 1)  # noqa: E731  token mean (share of the global mean)
        per_tok = (lambda x: x) if ratio_level == "token" else (lambda x: x[:, None].expand_as(m))  # noqa: E731
        r_t, a_t = per_tok(ratio), per_tok(adv_eff.expand_as(ratio) if ratio_level == "token" else adv_eff)
        valid = m > 0
        in_clip = float(clip)
        stats = {
            "loss": loss.detach(), "kl_term": beta * kl.sum() / denom,
            "kl_old_fkl_k3": tok(k3(lp - lp_old)), "kl_old_rkl_k3w": tok(torch.exp(lp - lp_old) * k3(lp_old - lp)),
            "ratio_mean": tok(r_t),
            "ratio_min": r_t[valid].min() if valid.any() else r_t.new_tensor(1.0),
            "ratio_max": r_t[valid].max() if valid.any() else r_t.new_tensor(1.0),
            "clipfrac_low": in_clip * tok(((a_t < 0) & (r_t < 1 - clip_eps_low)).to(m.dtype)),
            "clipfrac_high": in_clip * tok(((a_t > 0) & (r_t > 1 + clip_eps_high)).to(m.dtype)),
            "clipfrac_dual": in_clip * tok(((a_t < 0) & (r_t > clip_c)).to(m.dtype)),
        }
        if anchor != "old":
            stats[f"kl_{anchor}_rkl_k3w"] = tok(torch.exp(lp - lp_old) * k3(lp_anchor - lp))
        if form == "reinforce":
            stats["mask_frac"] = tok(1.0 - per_tok(keep))
    return loss, stats


# ==========================================================================================================
# Rollout and log-probs
# ==========================================================================================================
def left_pad(seqs: list, pad_id: int, device) -> tuple:
    """Token lists -> (ids [B, P], attention mask [B, P]), padded on the left."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def completion_mask_from(tokens: torch.Tensor, eos_ids: torch.Tensor) -> torch.Tensor:
    """1 for every generated token up to and including the first EOS, 0 after it. [B, C] long."""
    is_eos = torch.isin(tokens, eos_ids)
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after_eos).long()


def cache_kwarg(model) -> str:
    """The KV-cache keyword of this model's forward (`cache` in transformers >= 5.x, else `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(getattr(model, "module", model).forward).parameters \
        else "past_key_values"


def prefill(model, prompt_ids, prompt_mask, rows):
    """Encode each distinct prompt once and copy its KV cache to every row that continues it.

    prompt_ids/prompt_mask: [U, P] distinct left-padded prompts; rows: [M] index of each row's prompt.
    Returns the logits of each row's first completion token [M, V] and a DynamicCache of M rows. With G samples
    per prompt the prompt tokens are run once instead of G times; autograd flows through the copies, so the
    prompt's gradient is the sum over its rows, as in a forward over the full rows.
    """
    from transformers import DynamicCache

    cache = DynamicCache()
    pos = (prompt_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    logits = model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True,
                   logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1]
    for layer in getattr(cache, "layers", ()):  # index_select: its backward (index_add) is ~8x faster than [rows]'s
        layer.keys, layer.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
    if not hasattr(cache, "layers"):  # older cache classes
        cache.batch_select_indices(rows)
    return logits.index_select(0, rows), cache


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, rows, max_new_tokens: int, temperature: float, eos_ids: torch.Tensor,
             pad_id: int, generator: torch.Generator, amp=contextlib.nullcontext):
    """Sample one completion per row from exactly softmax(logits / T) (no top-k, top-p or penalties, so the
    sampling law is the one every log-prob assumes), with the KV cache and each distinct prompt prefilled once.
    rows: [M] index into the [U, P] prompts. Returns (tokens [M, C], completion mask [M, C])."""
    was_training = model.training
    model.eval()  # in train mode, gradient checkpointing would silently switch the KV cache off
    with amp():
        logits, cache = prefill(model, prompt_ids, prompt_mask, rows)
    attn = prompt_mask[rows]
    pos = attn.sum(-1, keepdim=True)  # position of the first completion token
    done = torch.zeros(rows.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for t in range(max_new_tokens):
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= torch.isin(tok, eos_ids)
        if done.all() or t == max_new_tokens - 1:
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        with amp():
            logits = model(input_ids=tok[:, None], attention_mask=attn, position_ids=pos + t, use_cache=True,
                           logits_to_keep=1, **{cache_kwarg(model): cache}).logits[:, -1]
    model.train(was_training)
    tokens = torch.stack(tokens, dim=1)
    return tokens, completion_mask_from(tokens, eos_ids)


def completion_log_softmax(model, batch: dict, rows, temperature: float, prompt_cache: bool = True):
    """log softmax(logits / T) at the positions that predict each completion token of batch rows `rows`:
    [M, C, V], logits upcast to at least float32.

    prompt_cache: each distinct prompt among the rows is encoded once (`prefill`) and the completions run on its
    copied KV cache; the logits equal those of one forward over the [prompt; completion] rows (tested to 1e-12 in
    float64) from P + G*C instead of G*(P + C) tokens per group. False: that full forward (needed under gradient
    checkpointing, which drops the cache inside checkpointed layers)."""
    comp = batch["completion_ids"][rows]
    C = comp.shape[1]
    if prompt_cache:
        uniq, inv = batch["prompt_index"][rows].unique(return_inverse=True)
        p_mask = batch["prompt_mask"][uniq]
        first, cache = prefill(model, batch["prompt_ids"][uniq], p_mask, inv)
        logits = first[:, None]
        if C > 1:  # completion tokens 0..C-2 predict tokens 1..C-1
            attn = torch.cat([p_mask[inv], torch.ones_like(comp[:, :-1])], dim=1)
            pos = p_mask.sum(-1)[inv, None] + torch.arange(C - 1, device=comp.device)
            rest = model(input_ids=comp[:, :-1], attention_mask=attn, position_ids=pos, use_cache=True,
                         **{cache_kwarg(model): cache}).logits
            logits = torch.cat([logits, rest], dim=1)
    else:
        mask = batch["attention_mask"][rows]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=batch["input_ids"][rows], attention_mask=mask, position_ids=pos, use_cache=False,
                       logits_to_keep=C + 1).logits[:, :-1]
    return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)


def token_logprobs(log_probs_all: torch.Tensor, completion_ids: torch.Tensor) -> torch.Tensor:
    return log_probs_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def batched_logprobs(model, batch: dict, temperature: float, micro_batch_size: int, prompt_cache: bool = True,
                     amp=contextlib.nullcontext) -> torch.Tensor:
    """No-grad per-token log-probs of the batch's completions, in micro-batches (reference / old policy)."""
    out = []
    for i in range(0, batch["completion_ids"].shape[0], micro_batch_size):
        rows = torch.arange(i, min(i + micro_batch_size, batch["completion_ids"].shape[0]))
        with amp():
            lsm = completion_log_softmax(model, batch, rows, temperature, prompt_cache)
        out.append(token_logprobs(lsm, batch["completion_ids"][rows]))
    return torch.cat(out)


def sample_batch(model, prompts: list, args, eos_ids, pad_id, generator, device, amp):
    """Generate one completion per entry of `prompts` (token lists; a group = G equal entries), in chunks of
    `gen_batch_size` rows. Each distinct prompt is stored once (prompt_ids/prompt_mask [U, P]); row m continues
    prompt prompt_index[m]. input_ids/attention_mask hold the full [prompt; completion] rows too."""
    keys = {}
    index = [keys.setdefault(tuple(p), len(keys)) for p in prompts]
    prompt_ids, prompt_mask = left_pad([list(k) for k in keys], pad_id, device)
    prompt_index = torch.tensor(index, dtype=torch.long, device=device)
    chunks = []
    for i in range(0, len(prompts), args.gen_batch_size):
        rows = prompt_index[i: i + args.gen_batch_size]
        if args.prompt_cache:
            uniq, inv = rows.unique(return_inverse=True)
        else:  # one prompt row per completion row: the plain batched generate
            uniq, inv = rows, torch.arange(rows.shape[0], device=device)
        chunks.append(generate(model, prompt_ids[uniq], prompt_mask[uniq], inv, args.max_new_tokens,
                               args.temperature, eos_ids, pad_id, generator, amp))
    C = max(c[0].shape[1] for c in chunks)
    pad_r = lambda x, v: torch.nn.functional.pad(x, (0, C - x.shape[1]), value=v)  # noqa: E731
    toks = torch.cat([pad_r(c[0], pad_id) for c in chunks])
    cmask = torch.cat([pad_r(c[1], 0) for c in chunks])
    input_ids = torch.cat([prompt_ids[prompt_index], toks], dim=1)
    attention_mask = torch.cat([prompt_mask[prompt_index], torch.ones_like(toks)], dim=1)  # after EOS: no loss
    truncated = ~torch.isin(toks, eos_ids).any(-1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_ids": toks,
            "completion_mask": cmask, "truncated": truncated, "prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "prompt_index": prompt_index}


def decode_completions(tokenizer, batch) -> list:
    ids, mask = batch["completion_ids"].tolist(), batch["completion_mask"].tolist()
    return tokenizer.batch_decode([[t for t, m in zip(r, mr) if m] for r, mr in zip(ids, mask)],
                                  skip_special_tokens=True)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def global_mean_std(x: torch.Tensor) -> tuple:
    """Mean and Bessel std of `x` over all ranks, two passes (never E[x^2] - mean^2)."""
    n_sum = all_reduce_sum(torch.stack([x.new_tensor(float(x.numel())), x.sum()]))
    mean = n_sum[1] / n_sum[0]
    ss = all_reduce_sum((x - mean).pow(2).sum().reshape(1))[0]
    return mean, (ss / (n_sum[0] - 1).clamp(min=1)).sqrt()


# ==========================================================================================================
# Policy update (importable: the data-parallel invariance test drives it on a fixed batch)
# ==========================================================================================================
def update_policy(model, optimizer, scheduler, batch: dict, args, shuffle_seed: int, amp=contextlib.nullcontext):
    """`num_iterations` passes x `num_minibatches` AdamW steps over this rank's rollout batch; after the first
    step the ratios move away from 1, which is where RPG's importance weights matter.

    Counts (sequences, tokens) are all-reduced over ranks and micro-batches BEFORE the loss is formed, and each
    rank backpropagates local_sum / global_count * world_size (DDP averages over ranks), so the update does not
    depend on the number of ranks or micro-batches. Mini-batches are drawn within each rank's shard.
    Returns global metrics (count-weighted means; min / max over ranks for `*_min` / `*_max`).
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch["input_ids"].shape[0]
    sums, extremes, grad_norms, steps = {}, {}, [], 0
    for it in range(args.num_iterations):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed * 1000 + it))  # same on all ranks
        for mb_idx in perm.tensor_split(args.num_minibatches):
            mask = batch["loss_mask"][mb_idx]  # counts of this mini-batch, over all ranks
            counts = all_reduce_sum(torch.stack([(mask.sum(-1) > 0).sum(), mask.sum()]).double())
            num_seqs, num_tokens = counts[0].item(), counts[1].item()
            micro = mb_idx.split(args.micro_batch_size)
            for k, idx in enumerate(micro):
                sync = k == len(micro) - 1 or not hasattr(model, "no_sync")
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with amp():
                        lsm = completion_log_softmax(model, batch, idx, args.temperature,
                                                     args.prompt_cache and not args.gradient_checkpointing)
                    lp = token_logprobs(lsm, batch["completion_ids"][idx])
                    with torch.no_grad():  # exact per-position entropy, a metric only
                        entropy = (-(lsm.exp() * lsm).sum(-1) * batch["loss_mask"][idx]).sum() / max(num_tokens, 1)
                    lp_old = batch["old_logprobs"][idx] if batch.get("old_logprobs") is not None else lp.detach()
                    lp_anchor = batch["anchor_logprobs"][idx] if args.kl_anchor == "init" else lp_old
                    loss, stats = rpg_loss(
                        lp, lp_old, lp_anchor, batch["advantages"][idx], batch["loss_mask"][idx], beta=args.beta,
                        unnormalized=args.unnormalized, form=args.form, ratio_level=args.ratio_level, clip=args.clip,
                        clip_eps_low=args.clip_eps_low, clip_eps_high=args.clip_eps_high, clip_c=args.clip_c,
                        loss_agg=args.loss_agg, num_seqs=num_seqs, num_tokens=num_tokens,
                        max_new_tokens=args.max_new_tokens, anchor=args.kl_anchor)
                    (loss * world).backward()
                stats["entropy"] = entropy
                for key, v in stats.items():
                    v = v.detach().double()
                    if key.endswith(("_min", "_max")):
                        f = torch.minimum if key.endswith("_min") else torch.maximum
                        extremes[key] = f(extremes[key], v) if key in extremes else v
                    else:
                        sums[key] = sums.get(key, 0.0) + v
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            if not torch.isfinite(grad_norm):  # identical on every rank after DDP's all-reduce: all stop together
                optimizer.zero_grad(set_to_none=True)
                raise FloatingPointError("non-finite loss or gradient (grad norm "
                                         f"{grad_norm.item()}); no optimizer step was taken")
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            grad_norms.append(grad_norm.item())
            steps += 1
    keys = sorted(sums)
    reduced = all_reduce_sum(torch.stack([sums[k] for k in keys])) / steps
    metrics = {f"losses/{k}": v for k, v in zip(keys, reduced.tolist())}
    for key, v in extremes.items():
        if dist.is_initialized():
            dist.all_reduce(v, op=dist.ReduceOp.MIN if key.endswith("_min") else dist.ReduceOp.MAX)
        metrics[f"losses/{key}"] = v.item()
    metrics["charts/grad_norm"] = sum(grad_norms) / len(grad_norms)
    return metrics


# ==========================================================================================================
# Setup helpers: models, prompts, checkpoints
# ==========================================================================================================
def load_error(path: str, what: str, e: Exception) -> UserError:
    """One line that says whether `path` was read as a local folder or as a hub id (and why that failed)."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(path):
        return UserError(f"{what} {path!r} not found: no such local folder")
    where = "local folder" if os.path.isdir(path) else "not a local folder; tried as a Hugging Face hub id"
    return UserError(f"could not load {what} {path!r} ({where}): {str(e).strip().splitlines()[0]}")


def load_model(path: str, device, trainable: bool):
    """AutoModelForCausalLM in float32 with dropout off; a missing path gives a one-line error."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise load_error(path, "model", e) from None
    for m in model.modules():  # ratios must be exactly 1 at theta = theta_old: no dropout anywhere
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    model.to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def enable_checkpointing(model) -> None:
    """Activation (gradient) checkpointing; transformers >= 5.2x renamed the method."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise load_error(path, "model", e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def encode_prompts(tokenizer, examples, args, split: str) -> list:
    """Token ids per prompt (chat template when the tokenizer has one); too long is an error, not a truncation."""
    if getattr(tokenizer, "chat_template", None) and not args.no_chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": ex.prompt}], tokenize=False,
                                               add_generation_prompt=True) for ex in examples]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]  # the template already has any BOS
    else:
        ids = tokenizer([ex.prompt for ex in examples])["input_ids"]
    for i, seq in enumerate(ids):
        if len(seq) > args.max_prompt_length:
            raise UserError(f"{split} prompt {i} has {len(seq)} tokens > --max_prompt_length "
                            f"{args.max_prompt_length}: {examples[i].prompt[:60]!r}")
    return ids


def find_checkpoint(path: str) -> str:
    """`--resume` accepts a checkpoint folder or a run folder (then its latest checkpoint, `final` included)."""
    if os.path.isfile(os.path.join(path, "trainer_state.pt")):
        return path
    candidates = [os.path.join(path, "final")]
    ckpt_dir = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_dir):
        candidates += [os.path.join(ckpt_dir, d) for d in os.listdir(ckpt_dir)]
    found = [c for c in candidates if os.path.isfile(os.path.join(c, "trainer_state.pt"))]
    if not found:
        raise UserError(f"--resume {path!r}: no checkpoint (trainer_state.pt) found there")
    return max(found, key=lambda c: torch.load(os.path.join(c, "trainer_state.pt"), weights_only=False)["step"])


def rng_state(generator) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "sampler": generator.get_state()}


def set_rng_state(state: dict, generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["sampler"])


def save_checkpoint(path, policy, tokenizer, optimizer, scheduler, step, elapsed, generator, args, rank) -> None:
    """save_pretrained (model + tokenizer) plus trainer_state.pt (optimizer, scheduler, step, every rank's RNG).
    Written to a temporary folder first and renamed, so an interrupted save never leaves a corrupt checkpoint."""
    states = [None] * args.world_size if dist.is_initialized() else None
    if dist.is_initialized():
        dist.all_gather_object(states, rng_state(generator))
    else:
        states = [rng_state(generator)]
    if rank == 0:
        tmp, old = path + ".tmp", path + ".old"
        try:
            policy.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            torch.save({"step": step, "elapsed_s": elapsed, "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "rng": states, "args": asdict(args)},
                       os.path.join(tmp, "trainer_state.pt"))
            if os.path.isdir(path):  # keep the previous checkpoint until the new one is in place
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:  # disk full, permissions: the previous checkpoints are untouched
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"could not save a checkpoint to {path}: {e.strerror or e}") from None
    if dist.is_initialized():
        dist.barrier()


def sigterm_received(flag: dict, device) -> bool:
    """Whether any rank got SIGTERM (all ranks must stop after the same step)."""
    hit = torch.tensor([float(flag["sigterm"])], device=device)
    if dist.is_initialized():
        dist.all_reduce(hit, op=dist.ReduceOp.MAX)
    return bool(hit.item())


# ==========================================================================================================
# Evaluation
# ==========================================================================================================
@torch.no_grad()
def evaluate(policy, init_model, tokenizer, prompts, answers, reward_fn, args, eos_ids, device, amp, rank) -> dict:
    """Held-out pass@1 at `temperature` and KL(pi_theta || pi_init) summed along each sampled completion, exact
    over the vocabulary at every visited position. Prompts are interleaved over ranks; sums are all-reduced.
    The sampler is re-seeded for every eval, so evals at different steps share their random numbers."""
    gen = torch.Generator(device=device).manual_seed(10_000_019 * (args.seed + 1) + rank)
    mine = list(range(rank, len(prompts), args.world_size))
    rep = [prompts[i] for i in mine for _ in range(args.eval_samples_per_prompt)]
    ans = [answers[i] for i in mine for _ in range(args.eval_samples_per_prompt)]
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # reward, correct, length, kl
    count = torch.zeros(1, dtype=torch.float64, device=device)
    for i in range(0, len(rep), args.gen_batch_size):
        b = sample_batch(policy, rep[i: i + args.gen_batch_size], args, eos_ids, tokenizer.pad_token_id, gen, device, amp)
        rewards = torch.tensor([reward_fn(c, a) for c, a in zip(decode_completions(tokenizer, b), ans[i:])],
                               dtype=torch.float64, device=device)
        cmask = b["completion_mask"]
        sums[0] += rewards.sum()
        sums[1] += (rewards >= 1.0).double().sum()
        sums[2] += cmask.sum()
        if init_model is not None:
            for j in range(0, cmask.shape[0], args.micro_batch_size):
                sl = torch.arange(j, min(j + args.micro_batch_size, cmask.shape[0]), device=device)
                with amp():
                    p = completion_log_softmax(policy, b, sl, args.temperature, args.prompt_cache)
                    q = completion_log_softmax(init_model, b, sl, args.temperature, args.prompt_cache)
                sums[3] += ((p.exp() * (p - q)).sum(-1) * cmask[sl]).sum().double()
        count += cmask.shape[0]
    total = all_reduce_sum(torch.cat([sums, count]))
    n = total[4].clamp(min=1)
    out = {"eval/pass@1": (total[1] / n).item(), "eval/reward_mean": (total[0] / n).item(),
           "eval/completion_len_mean": (total[2] / n).item()}
    if init_model is not None:
        out["eval/kl_init_rkl_exact_seq"] = (total[3] / n).item()
    return out


# ==========================================================================================================
# Main: args, setup, training loop
# ==========================================================================================================
def parse_args() -> Args:
    """tyro flags; with `--resume`, the resumed run's saved args are the defaults that flags override."""
    default = Args()
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a.startswith("--resume"):
            path = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else "")
            ckpt = find_checkpoint(path) if path else None
            if ckpt:
                saved = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=False)["args"]
                default = Args(**{k: v for k, v in saved.items() if k in Args.__dataclass_fields__})
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(Args, default=default, use_underscores=True)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        # tyro draws a multi-line box; keep its first section as our one-line error
        text = []
        for line in err.getvalue().splitlines()[1:]:
            if "──" in line or line.startswith("╰"):
                break
            text.append(line.strip("│ "))
        raise UserError(" ".join(text) + " (see --help)") from None


def check_args(args: Args, world_size: int) -> None:
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0 (sampling and log-probs use softmax(logits / T))")
    if args.num_generations < 2:
        raise UserError("--num_generations must be >= 2 (the group-mean baseline needs two samples)")
    if args.prompts_per_step % world_size:
        raise UserError(f"--prompts_per_step {args.prompts_per_step} is not divisible by the world size {world_size}")
    local_seqs = args.prompts_per_step // world_size * args.num_generations
    if local_seqs % args.num_minibatches:
        raise UserError(f"{local_seqs} sequences per rank are not divisible by --num_minibatches {args.num_minibatches}")
    for name in ("total_steps", "micro_batch_size", "gen_batch_size", "num_iterations", "num_minibatches",
                 "eval_num_prompts", "eval_samples_per_prompt", "max_new_tokens", "max_prompt_length", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")


def main() -> None:
    try:
        args = parse_args()
        train(args)
    except (UserError, TaskError) as e:
        sys.exit(f"error: {e}")
    except FloatingPointError as e:
        sys.exit(f"error: {e}")
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        sys.exit(143)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args: Args) -> None:
    # ---- distributed setup and seeding (TRY NOT TO MODIFY) --------------------------------------------------
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = args.cuda and torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    task = load_task(args.task, args.train_file, args.eval_file, args.prompt_field, args.answer_field)
    args.max_prompt_length = args.max_prompt_length or task.max_prompt_length
    args.max_new_tokens = args.max_new_tokens or task.max_new_tokens
    args.bf16 = use_cuda if args.bf16 is None else args.bf16
    check_args(args, world_size)
    args.world_size, args.local_prompts = world_size, args.prompts_per_step // world_size
    resume_ckpt = find_checkpoint(args.resume) if args.resume else None
    if resume_ckpt is None:
        args.run_name = args.run_name or f"{task.name}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join(args.output_dir, args.run_name)
    if resume_ckpt is None and os.path.exists(run_dir):
        raise UserError(f"{run_dir} already exists; pass --resume {run_dir} to continue it, or another --run_name")
    if world_size > 1:
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    # ---- models, data, optimizer -------------------------------------------------------------------------
    import transformers

    transformers.utils.logging.set_verbosity_error()  # our own progress bar and one-line errors only
    transformers.utils.logging.disable_progress_bar()
    tokenizer = load_tokenizer(args.model_name_or_path)
    policy = load_model(resume_ckpt or args.model_name_or_path, device, trainable=True)
    need_init = args.kl_anchor == "init" or args.eval_kl  # the old anchor needs no extra model
    init_model = load_model(args.model_name_or_path, device, trainable=False) if need_init else None
    if args.gradient_checkpointing:
        enable_checkpointing(policy)
    model = policy
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[local_rank] if use_cuda else None)
    train_prompts = encode_prompts(tokenizer, task.train, args, "train")
    eval_examples = task.eval[: args.eval_num_prompts]
    eval_prompts = encode_prompts(tokenizer, eval_examples, args, "eval")
    if args.prompts_per_step > len(train_prompts):
        raise UserError(f"--prompts_per_step {args.prompts_per_step} > {len(train_prompts)} training prompts")
    eos_ids = {tokenizer.eos_token_id} | set(np.atleast_1d(policy.generation_config.eos_token_id or []).tolist())
    eos_ids = torch.tensor(sorted(i for i in eos_ids if i is not None), device=device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps) if args.warmup_steps > 0 else 1.0)
    sampler = torch.Generator(device=device).manual_seed(args.seed + rank)  # per-rank sampling RNG
    start_step, elapsed0 = 0, 0.0
    if resume_ckpt is not None:
        state = torch.load(os.path.join(resume_ckpt, "trainer_state.pt"), weights_only=False, map_location="cpu")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, elapsed0 = state["step"], state["elapsed_s"]
        if len(state["rng"]) == world_size:
            set_rng_state(state["rng"][rank], sampler)
        elif rank == 0:
            print(f"warning: checkpoint has {len(state['rng'])} ranks' RNG states, now {world_size}: reseeding")

    # ---- logging ------------------------------------------------------------------------------------------
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    writers = []
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        if resume_ckpt is not None and os.path.exists(metrics_path):  # drop what was logged after the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        if args.track:
            writers = make_trackers(args, run_dir)
    t_start = time.time() - elapsed0
    flag = {"sigterm": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: flag.update(sigterm=True))

    def log(step: int, metrics: dict) -> None:
        if rank != 0:
            return
        record = {"step": step, "time_s": round(time.time() - t_start, 3), **metrics}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for w in writers:
            w(step, metrics)

    def run_eval() -> dict:
        t = time.time()
        out = evaluate(policy, init_model if args.eval_kl else None, tokenizer, eval_prompts,
                       [e.answer for e in eval_examples], task.reward_fn, args, eos_ids, device, amp, rank)
        out["perf/eval_s"] = time.time() - t
        return out

    if start_step == 0:
        m = run_eval()
        log(0, m)
        if rank == 0:
            print(f"step 0: eval/pass@1 {m['eval/pass@1']:.4f}")

    # ---- training loop ------------------------------------------------------------------------------------
    G = args.num_generations
    bar = None
    if rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.total_steps, initial=start_step, desc=args.exp_name, dynamic_ncols=True)
    for step in range(start_step + 1, args.total_steps + 1):
        t0 = time.time()
        # 1. prompts: the same global draw on every rank (from seed and step), then this rank's shard
        order = np.random.default_rng([args.seed, step]).choice(len(train_prompts), args.prompts_per_step,
                                                                replace=False)
        mine = order[rank * args.local_prompts: (rank + 1) * args.local_prompts]
        batch = sample_batch(policy, [train_prompts[i] for i in mine for _ in range(G)], args, eos_ids,
                             tokenizer.pad_token_id, sampler, device, amp)
        t_gen = time.time()
        # 2. rewards and group-mean advantages (each group lives on one rank)
        answers = [task.train[i].answer for i in mine for _ in range(G)]
        rewards = torch.tensor([task.reward_fn(c, a) for c, a in zip(decode_completions(tokenizer, batch), answers)],
                               dtype=torch.float32, device=device)
        reward_mean, reward_std = global_mean_std(rewards)
        batch["advantages"] = group_mean_advantages(rewards, G)
        batch["loss_mask"] = batch["completion_mask"]
        # 3. log-probs of the rollout policy (only if it will differ from the policy being trained) and anchor
        if args.num_iterations * args.num_minibatches > 1:
            batch["old_logprobs"] = batched_logprobs(policy, batch, args.temperature, args.micro_batch_size,
                                                     args.prompt_cache, amp)
        if args.kl_anchor == "init":
            batch["anchor_logprobs"] = batched_logprobs(init_model, batch, args.temperature, args.micro_batch_size,
                                                        args.prompt_cache, amp)
        t_lp = time.time()
        # 4. policy update
        try:
            metrics = update_policy(model, optimizer, scheduler, batch, args, shuffle_seed=args.seed * 100_003 + step,
                                    amp=amp)
        except FloatingPointError as e:
            raise FloatingPointError(f"step {step}: {e}; stopping without saving") from None
        t_train = time.time()
        # 5. metrics, eval, checkpoints
        zero_std = (rewards.view(-1, G) == rewards.view(-1, G)[:, :1]).all(1).float().repeat_interleave(G)
        counters = all_reduce_sum(torch.stack([batch["completion_mask"].sum().double(),
                                               batch["truncated"].sum().double(), zero_std.sum().double(),
                                               torch.tensor(float(rewards.numel()), dtype=torch.float64,
                                                            device=device)]))
        n_seq = counters[3].item()
        metrics.update({
            "charts/reward_mean": reward_mean.item(), "charts/reward_std": reward_std.item(),
            "charts/completion_len_mean": counters[0].item() / n_seq, "charts/truncated_frac": counters[1].item() / n_seq,
            "charts/frac_reward_zero_std": counters[2].item() / n_seq,
            "charts/learning_rate": scheduler.get_last_lr()[0], "charts/prompts_seen": step * args.prompts_per_step,
            "charts/optimizer_steps": step * args.num_iterations * args.num_minibatches,
            "perf/generate_s": t_gen - t0, "perf/logprob_s": t_lp - t_gen, "perf/train_s": t_train - t_lp})
        metrics["charts/step_time_s"] = time.time() - t0
        metrics["charts/tokens_per_s"] = counters[0].item() / metrics["charts/step_time_s"]
        if (args.eval_every and step % args.eval_every == 0) or step == args.total_steps:
            metrics.update(run_eval())
        log(step, metrics)
        preempted = step != args.total_steps and sigterm_received(flag, device)
        if (args.save_every and step % args.save_every == 0 and step != args.total_steps) or preempted:
            save_checkpoint(os.path.join(run_dir, "checkpoints", f"step_{step:06d}"), policy, tokenizer, optimizer,
                            scheduler, step, time.time() - t_start, sampler, args, rank)
        if preempted:
            raise Preempted(f"SIGTERM: checkpoint of step {step} saved; continue with --resume {run_dir}")
        if rank == 0:
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['charts/reward_mean']:.3f}")
            if step % args.log_every == 0 or "eval/pass@1" in metrics:
                summary = (f"step {step}: reward {metrics['charts/reward_mean']:.3f} "
                           f"loss {metrics['losses/loss']:.4f} tokens/s {metrics['charts/tokens_per_s']:.0f}")
                if "eval/pass@1" in metrics:
                    summary += f" eval/pass@1 {metrics['eval/pass@1']:.4f}"
                bar.write(summary)
    if bar is not None:
        bar.close()
    save_checkpoint(os.path.join(run_dir, "final"), policy, tokenizer, optimizer, scheduler, args.total_steps,
                    time.time() - t_start, sampler, args, rank)
    if rank == 0:
        print(f"done: {run_dir}")


def make_trackers(args: Args, run_dir: str) -> list:
    """TensorBoard and W&B writers, each only when its package is installed (both optional)."""
    writers = []
    try:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(run_dir)
        tb.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
        writers.append(lambda step, m: [tb.add_scalar(k, v, step) for k, v in m.items()])
    except ImportError:
        print("warning: --track: tensorboard is not installed, skipping TensorBoard")
    try:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=args.run_name, config=asdict(args),
                   dir=run_dir)
        writers.append(lambda step, m: wandb.log(m, step=step))
    except ImportError:
        print("warning: --track: wandb is not installed, skipping W&B")
    return writers


if __name__ == "__main__":
    main()
