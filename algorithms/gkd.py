# docs: docs/gkd.md
# GKD: "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (arXiv 2306.13649).
"""Generalized knowledge distillation: a student learns the full next-token distributions of a frozen teacher, in
one file, with a zoo of per-token divergences.

Objective (student q_theta, teacher p_T, s_t = (x, y_<t) the states of a completion y):
    min_theta E_x E_{y ~ data(lambda)} [ sum_t D(p_T(.|s_t), q_theta(.|s_t)) ],
with y sampled from the current student with probability lambda (on-policy, no gradient through the sampling),
otherwise taken from the dataset or, with --seq_kd, sampled from the teacher. Every D below is 0 iff q = p_T at
that state, so a fully expressive student's optimum is the teacher whatever the data; with limited capacity the
data decides WHERE the student matches the teacher, and on-policy data trains on the states the student visits.
Loss (t = softmax(a / T), s = softmax(z / T) for teacher and student logits a, z at each completion position):
    L = sum_{valid positions} D(t, s) / (global number of valid positions),   D from --divergence:
    fkl = KL(t || s), rkl = KL(s || t), jsd = generalized JSD(beta) of the paper (beta 0 / 1: exact fkl / rkl),
    skl / srkl = DistiLLM's skew KLs, tv = total variation, akl = the adaptive FKL/RKL mix of AKL.
Per-token on-policy RKL with detached sampling is the per-state RKL under the student's state distribution, not the
gradient of the sequence-level KL(q || p_T) that MiniLLM follows with an extra score-function term
(tests/test_gkd.py, G9). The paper's optional RL term is not implemented.
"""

import contextlib
import inspect
import io
import json
import math
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

from common import TINY_POLICY, TINY_TEACHER
from common.tasks import TaskError, load_task


@dataclass
class Args:
    # ---- experiment ---------------------------------------------------------------------------------------
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run name)"""
    seed: int = 1
    """global seed; prompt draws and the data-source coin use it on every rank, sampling uses seed + rank"""
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
    # ---- models and data ----------------------------------------------------------------------------------
    model_name_or_path: str = TINY_POLICY
    """the STUDENT: any Hugging Face causal LM (local folder or hub id); default: the shipped tiny policy"""
    teacher_name_or_path: str = TINY_TEACHER
    """the frozen TEACHER; must share the student's tokenizer and logit width. Default: the shipped tiny teacher"""
    task: str = "arithmetic"
    """`arithmetic` (built in), `jsonl` (with --train_file/--eval_file) or `hf:<dataset>[:<config>]`"""
    train_file: Optional[str] = None
    """JSONL training prompts (with --task jsonl)"""
    eval_file: Optional[str] = None
    """JSONL held-out prompts (with --task jsonl)"""
    prompt_field: str = "prompt"
    """JSON field holding the prompt"""
    answer_field: str = "answer"
    """JSON field holding the reference answer (also the dataset completion when --lmbda < 1 without --seq_kd)"""
    no_chat_template: bool = False
    """do not apply the tokenizer's chat template (it is applied when the tokenizer has one)"""
    max_prompt_length: Optional[int] = None
    """prompt token limit; longer prompts are an error, never truncated (default per task: 16 arithmetic, 512)"""
    max_new_tokens: Optional[int] = None
    """completion token limit (default per task: 4 arithmetic, 1024 real data; TRL GKD 128)"""
    temperature: float = 1.0
    """ONE temperature for sampling (student and teacher) AND for both distributions in the loss. TRL's GKDTrainer
    samples at 0.9 but scores at 1, so its 'on-policy' samples come from another distribution"""
    # ---- training -----------------------------------------------------------------------------------------
    total_steps: int = 200
    """rollout steps (one data batch each). Tiny-tuned (about 1.5 minutes on 2 CPU cores)"""
    prompts_per_step: int = 128
    """prompts per step, all ranks together, one completion each. Tiny-tuned; TRL GKD examples 8-32 per device"""
    num_iterations: int = 1
    """passes over each batch (the teacher target does not change; later passes are mildly off-policy)"""
    num_minibatches: int = 1
    """optimizer steps per pass"""
    micro_batch_size: int = 512
    """sequences per forward/backward on one device (gradient accumulation below the mini-batch). Tiny-tuned;
    about 2-8 for 0.5B-1.5B students with full-vocabulary teacher logits and 1K-token completions on 80 GB"""
    gen_batch_size: int = 512
    """sequences per generate call on one device"""
    learning_rate: float = 1e-3
    """AdamW learning rate, constant after warm-up. Tiny-tuned; GKD paper 3e-4 (T5 students, Adafactor), TRL
    examples 2e-5 / 1e-6"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    warmup_steps: int = 0
    """linear LR warm-up, in optimizer steps"""
    # ---- GKD ----------------------------------------------------------------------------------------------
    lmbda: float = 1.0
    """on-policy fraction: each step is on-policy (student samples) with probability lmbda, drawn from the shared
    seed so all ranks agree. 1.0 = fully on-policy (the paper's best setting); TRL default 0.5; 0 = supervised KD"""
    seq_kd: bool = False
    """off-policy steps use teacher samples (sequence-level KD) instead of the dataset's reference completions"""
    divergence: Literal["jsd", "fkl", "rkl", "skl", "srkl", "tv", "akl"] = "jsd"
    """per-token divergence D(teacher, student) over the full vocabulary: jsd = generalized JSD(beta) (paper,
    TRL); fkl = KL(teacher || student); rkl = KL(student || teacher); skl / srkl = DistiLLM skew forward / reverse
    KL; tv = total variation; akl = adaptive KL (head FKL + tail RKL)"""
    beta: float = 0.5
    """JSD(beta) with mixture M = beta teacher + (1 - beta) student; ~beta FKL as beta -> 0, ~(1 - beta) RKL as
    beta -> 1. beta = 0 and 1 compute the EXACT fkl / rkl (as TRL), a jump in magnitude: the raw formula is 0
    there. TRL default 0.5; the paper's best beta is task-dependent"""
    skew_alpha: float = 0.1
    """skl = KL(t || a t + (1 - a) s), srkl = KL(s || (1 - a) t + a s); DistiLLM lam = 0.1. In [0, 1)"""
    akl_mu: float = 0.5
    """AKL head: the fewest top teacher tokens whose mass reaches mu (AKL paper 0.5). In (0, 1]"""
    divergence_chunk_size: int = 0
    """positions per chunk of the per-position divergence, recomputed in backward (activation checkpointing), so
    only one chunk's [batch, chunk, vocab] intermediates live at once. 0 = one chunk (tiny vocab); 128-512 for
    real vocabularies"""
    # ---- evaluation, logging, checkpoints -----------------------------------------------------------------
    eval_every: int = 25
    """held-out eval every this many steps (and always at step 0); 0 = only at the start and the end"""
    eval_num_prompts: int = 500
    """held-out prompts per eval (all of the arithmetic held-out split)"""
    eval_samples_per_prompt: int = 4
    """samples per held-out prompt at `temperature`; pass@1 = mean correctness"""
    eval_kl: bool = True
    """log eval/kl_init_rkl_exact_seq; needs a frozen copy of the initial student"""
    eval_teacher: bool = True
    """log the teacher's held-out pass@1 at step 0 and the exact KLs to the teacher along held-out student samples"""
    log_every: int = 10
    """print a one-line summary every this many steps (metrics.jsonl gets every step)"""
    save_every: int = 0
    """checkpoint every this many steps (0 = only at the end)"""
    resume: Optional[str] = None
    """a run folder or checkpoint folder to resume from (restores model, optimizer, step and RNG)"""
    bf16: Optional[bool] = None
    """bf16 autocast for forward passes (parameters and optimizer stay float32); default: on with CUDA"""
    gradient_checkpointing: bool = False
    """trade compute for memory on real models (student only; the teacher runs under no_grad)"""
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
# ALGO LOGIC: pure functions (tensors in, tensors out; tested against closed forms in tests/test_gkd.py)
# ==========================================================================================================
def log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w a + (1 - w) b) from log a, log b: the mixture is formed in PROBABILITY space (mixing log-probs
    instead is the bug of huggingface/trl#2202). w = 0 or 1 return the other input exactly (no log 0)."""
    if w <= 0.0:
        return log_b
    if w >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def akl_head_mask(teacher_probs: torch.Tensor, mu: float) -> torch.Tensor:
    """AKL head H in VOCABULARY order (bool, same shape): sort the teacher's probabilities in descending order,
    H = the shortest prefix whose cumulative mass reaches mu, the crossing token included, then mapped back to the
    tokens themselves. Building it in sorted order and applying it to the unsorted gap vector (a bug in a
    third-party version) mixes the wrong tokens (test G5)."""
    sorted_p, order = teacher_probs.sort(dim=-1, descending=True, stable=True)
    head_sorted = (sorted_p.cumsum(-1) - sorted_p) < mu  # the mass BEFORE a token is < mu: it is still needed
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


def divergence_from_log_probs(lt: torch.Tensor, ls: torch.Tensor, kind: str, beta: float = 0.5,
                              skew_alpha: float = 0.1, akl_mu: float = 0.5) -> torch.Tensor:
    """Per-position D(t, s) over the last axis from teacher / student log-probabilities lt, ls (see `divergence`)."""
    t, s = lt.exp(), ls.exp()
    fkl = lambda: (t * (lt - ls)).sum(-1)  # noqa: E731  KL(t || s)
    rkl = lambda: (s * (ls - lt)).sum(-1)  # noqa: E731  KL(s || t)
    if kind == "fkl":
        return fkl()
    if kind == "rkl":
        return rkl()
    if kind == "jsd":
        if beta <= 0.0:  # exact end-point branches (TRL >= 0.16): the raw JSD(0) would be identically 0
            return fkl()
        if beta >= 1.0:
            return rkl()
        lm = log_mix(lt, ls, beta)
        return beta * (t * (lt - lm)).sum(-1) + (1 - beta) * (s * (ls - lm)).sum(-1)
    if kind == "skl":
        return (t * (lt - log_mix(lt, ls, skew_alpha))).sum(-1)
    if kind == "srkl":
        return (s * (ls - log_mix(lt, ls, 1.0 - skew_alpha))).sum(-1)
    if kind == "tv":
        return 0.5 * (t - s).abs().sum(-1)
    if kind == "akl":
        with torch.no_grad():  # the mixing weights are detached (our choice, see `divergence`)
            head = akl_head_mask(t, akl_mu).to(t.dtype)
            gap = (t - s).abs()
            g_head, g_tail = (gap * head).sum(-1), (gap * (1 - head)).sum(-1)
            total = g_head + g_tail
            w_head = torch.where(total > 0, g_head / total.clamp(min=torch.finfo(t.dtype).tiny), 0.5)
        return w_head * fkl() + (1 - w_head) * rkl()
    raise ValueError(f"unknown divergence {kind!r}")


def divergence(teacher_logits: torch.Tensor, student_logits: torch.Tensor, kind: str, beta: float = 0.5,
               skew_alpha: float = 0.1, akl_mu: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence between t = softmax(a / T) (teacher) and s = softmax(z / T) (student), summed over
    the full vocabulary (last axis), computed in log space in at least float32:

        fkl  = sum t (log t - log s) = KL(t || s)            grad_z = (s - t) / T
        rkl  = sum s (log s - log t) = KL(s || t)            grad_z = s (log(s/t) - rkl) / T
        jsd  = beta KL(t || m) + (1 - beta) KL(s || m),  m = beta t + (1 - beta) s   (paper; 0 <= jsd <= H_b(beta))
               beta = 0 -> exactly fkl, beta = 1 -> exactly rkl (TRL's convention; DISCONTINUOUS in magnitude:
               jsd(beta) ~ beta fkl near 0 and ~ (1 - beta) rkl near 1, huggingface/trl#6780)
        skl  = KL(t || m),  m = alpha t + (1 - alpha) s      (DistiLLM skew KL, alpha = skew_alpha)
        srkl = KL(s || m),  m = (1 - alpha) t + alpha s      (DistiLLM skew reverse KL)
        tv   = 0.5 sum |t - s|
        akl  = (g_H fkl + g_tail rkl) / (g_H + g_tail),  g_X = sum_{X} |t - s| over the teacher head H
               (`akl_head_mask`) and the tail; the weights are detached (whether AKL back-propagates through them
               is not confirmed against the paper), and D = 0 when s = t.
    Every gradient row sums to 0 (softmax), and carries the 1/T factor. Returns [...] (the logits' leading axes).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    lt = (teacher_logits.to(dtype) / temperature).log_softmax(-1)
    ls = (student_logits.to(dtype) / temperature).log_softmax(-1)
    return divergence_from_log_probs(lt, ls, kind, beta, skew_alpha, akl_mu)


def gkd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor, num_tokens_global, *,
             kind: str = "jsd", beta: float = 0.5, skew_alpha: float = 0.1, akl_mu: float = 0.5,
             temperature: float = 1.0, completion_ids: Optional[torch.Tensor] = None, chunk_size: int = 0):
    """This micro-batch's share of the global token mean of the named divergence:

        L = sum_{b,t} mask_bt D(t_bt, s_bt) / N_tokens,   N_tokens = valid positions over ALL ranks and micro-batches,
    so summing L over micro-batches and ranks gives the same number for any split (TRL divides by the number of
    items instead, huggingface/trl#4719). The loss is exactly D: no cross-entropy or other term mixed in.
    Shapes: logits [B, C, V], mask [B, C], completion_ids [B, C] (optional, for the teacher log-prob metric).
    `chunk_size` > 0 evaluates D in chunks of positions under activation checkpointing (same value and gradient).
    Returns (loss, stats): token-mean shares of the exact KL(t || s) and KL(s || t), both entropies and the
    teacher's log-prob of the batch tokens, whatever divergence is optimized.
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    m = mask.to(dtype)
    n = max(num_tokens_global, 1)
    C = student_logits.shape[-2]
    step = chunk_size if chunk_size > 0 else C
    kw = dict(kind=kind, beta=beta, skew_alpha=skew_alpha, akl_mu=akl_mu, temperature=temperature)
    total = student_logits.new_zeros((), dtype=dtype)
    sums = torch.zeros(5, dtype=torch.float64, device=student_logits.device)
    for c in range(0, C, step):
        a, z, mc = teacher_logits[..., c: c + step, :], student_logits[..., c: c + step, :], m[..., c: c + step]
        if chunk_size > 0 and torch.is_grad_enabled() and z.requires_grad:
            from torch.utils.checkpoint import checkpoint

            d = checkpoint(lambda a_, z_: divergence(a_, z_, **kw), a, z, use_reentrant=False)
        else:
            d = divergence(a, z, **kw)
        total = total + (d * mc).sum()
        with torch.no_grad():
            lt = (a.to(dtype) / temperature).log_softmax(-1)
            ls = (z.detach().to(dtype) / temperature).log_softmax(-1)
            t, s = lt.exp(), ls.exp()
            per = [(t * (lt - ls)).sum(-1), (s * (ls - lt)).sum(-1), -(s * ls).sum(-1), -(t * lt).sum(-1)]
            if completion_ids is not None:
                per.append(lt.gather(-1, completion_ids[..., c: c + step].unsqueeze(-1)).squeeze(-1))
            for i, x in enumerate(per):
                sums[i] += (x * mc).sum().double()
    loss = total / n
    keys = ["kl_teacher_fkl_exact", "kl_teacher_rkl_exact", "entropy", "entropy_teacher", "teacher_logprob_mean"]
    stats = {"loss": loss.detach()}
    stats.update({k: sums[i] / n for i, k in enumerate(keys[: 4 + (completion_ids is not None)])})
    return loss, stats


def on_policy_coin(seed: int, step: int, lmbda: float) -> bool:
    """The step's data source: on-policy iff u < lmbda with u ~ U(0, 1) drawn from (seed, step) alone, so every
    rank, every world size and a resumed run make the same choice (a per-rank coin would make ranks run different
    code paths and hang). The whole batch follows one coin, as TRL. lmbda = 1: always; lmbda = 0: never."""
    return bool(np.random.default_rng([seed, step, 0x6B6D]).random() < lmbda)


# ==========================================================================================================
# Rollout, dataset completions and logits
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


@torch.no_grad()
def generate(model, prompt_ids, prompt_mask, max_new_tokens: int, temperature: float, eos_ids: torch.Tensor,
             pad_id: int, generator: torch.Generator, amp=contextlib.nullcontext):
    """Sample completions with the KV cache from exactly softmax(logits / T): no top-k, top-p or penalties, so
    the sampling law is the one the loss assumes. Returns (tokens [B, C], completion mask [B, C])."""
    from transformers import DynamicCache

    was_training = model.training
    model.eval()  # in train mode, gradient checkpointing would silently switch the KV cache off
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache()
    attn = prompt_mask
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    inputs = prompt_ids
    done = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        with amp():
            logits = model(input_ids=inputs, attention_mask=attn, position_ids=pos, use_cache=True,
                           logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]
        probs = torch.softmax(logits.float() / temperature, dim=-1)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= torch.isin(tok, eos_ids)
        if done.all():
            break
        inputs, pos = tok[:, None], pos[:, -1:] + 1
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
    model.train(was_training)
    tokens = torch.stack(tokens, dim=1)
    return tokens, completion_mask_from(tokens, eos_ids)


def join_batch(chunks: list, pad_id: int, eos_ids) -> dict:
    """(prompt ids, prompt mask, completion tokens, completion mask) chunks -> one teacher-forcing batch."""
    P = max(c[0].shape[1] for c in chunks)
    C = max(c[2].shape[1] for c in chunks)
    pad_l = lambda x, v: torch.nn.functional.pad(x, (P - x.shape[1], 0), value=v)  # noqa: E731
    pad_r = lambda x, v: torch.nn.functional.pad(x, (0, C - x.shape[1]), value=v)  # noqa: E731
    p_ids = torch.cat([pad_l(c[0], pad_id) for c in chunks])
    p_mask = torch.cat([pad_l(c[1], 0) for c in chunks])
    toks = torch.cat([pad_r(c[2], pad_id) for c in chunks])
    cmask = torch.cat([pad_r(c[3], 0) for c in chunks])
    input_ids = torch.cat([p_ids, toks], dim=1)
    attention_mask = torch.cat([p_mask, torch.ones_like(toks)], dim=1)  # after EOS: masked out of every loss
    truncated = ~torch.isin(toks, eos_ids).any(-1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_ids": toks,
            "completion_mask": cmask, "truncated": truncated}


def sample_batch(model, prompts: list, args, eos_ids, pad_id, generator, device, amp):
    """Generate for a list of prompt token lists (in chunks); returns teacher-forcing inputs and masks."""
    chunks = []
    for i in range(0, len(prompts), args.gen_batch_size):
        p_ids, p_mask = left_pad(prompts[i: i + args.gen_batch_size], pad_id, device)
        toks, cmask = generate(model, p_ids, p_mask, args.max_new_tokens, args.temperature, eos_ids, pad_id,
                               generator, amp)
        chunks.append((p_ids, p_mask, toks, cmask))
    return join_batch(chunks, pad_id, eos_ids)


def dataset_batch(prompts: list, completions: list, eos_ids, pad_id, device) -> dict:
    """The same layout as `sample_batch` for given completion token lists (each already ending in EOS)."""
    p_ids, p_mask = left_pad(prompts, pad_id, device)
    width = max(len(c) for c in completions)
    toks = torch.full((len(completions), width), pad_id, dtype=torch.long)
    cmask = torch.zeros((len(completions), width), dtype=torch.long)
    for i, c in enumerate(completions):
        toks[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        cmask[i, : len(c)] = 1
    return join_batch([(p_ids, p_mask, toks.to(device), cmask.to(device))], pad_id, eos_ids)


def completion_logits(model, input_ids, attention_mask, completion_len: int) -> torch.Tensor:
    """Raw logits at the positions that predict the last `completion_len` tokens: [B, C, V]. Position ids follow
    the attention mask (left padding)."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                 logits_to_keep=completion_len + 1).logits[:, :-1]


def completion_log_softmax(model, input_ids, attention_mask, completion_len: int, temperature: float):
    """log softmax(logits / T) at the completion positions, upcast to at least float32: [B, C, V]."""
    logits = completion_logits(model, input_ids, attention_mask, completion_len)
    return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)


@torch.no_grad()
def batched_logprobs(model, input_ids, attention_mask, completion_len, temperature, micro_batch_size,
                     amp=contextlib.nullcontext) -> torch.Tensor:
    """No-grad per-token log-probs of the completions, in micro-batches, over full [prompt; completion] rows (one
    sample per prompt, so the other scripts' shared prompt cache would save nothing here; GKD's loss needs full
    distributions, so training uses `completion_logits` instead)."""
    out = []
    for i in range(0, input_ids.shape[0], micro_batch_size):
        sl = slice(i, i + micro_batch_size)
        with amp():
            lsm = completion_log_softmax(model, input_ids[sl], attention_mask[sl], completion_len, temperature)
        out.append(lsm.gather(-1, input_ids[sl, -completion_len:].unsqueeze(-1)).squeeze(-1))
    return torch.cat(out)


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
# Student update (importable: the data-parallel invariance test drives it on a fixed batch)
# ==========================================================================================================
def update_policy(model, optimizer, scheduler, batch: dict, args, shuffle_seed: int, amp=contextlib.nullcontext,
                  teacher=None):
    """`num_iterations` passes x `num_minibatches` AdamW steps of the GKD loss over this rank's batch.

    Per micro-batch: one teacher forward (no grad) and one student forward over prompt + completion, the named
    divergence at every completion position. The token count is all-reduced over ranks and micro-batches BEFORE
    the loss is formed, and each rank backpropagates local_sum / global_count * world_size (DDP averages over
    ranks), so the update does not depend on the number of ranks or micro-batches. The teacher is re-run per
    micro-batch rather than cached: [batch, length, vocab] teacher logits of a whole batch would not fit for real
    vocabularies. Returns global, count-weighted metrics.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    params = [p for p in model.parameters() if p.requires_grad]
    n = batch["input_ids"].shape[0]
    C = batch["completion_ids"].shape[1]
    sums, grad_norms, steps = {}, [], 0
    for it in range(args.num_iterations):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed * 1000 + it))  # same on all ranks
        for mb_idx in perm.tensor_split(args.num_minibatches):
            mask = batch["loss_mask"][mb_idx]
            num_tokens = all_reduce_sum(mask.sum().double().reshape(1))[0].item()  # over all ranks
            micro = mb_idx.split(args.micro_batch_size)
            for k, idx in enumerate(micro):
                sync = k == len(micro) - 1 or not hasattr(model, "no_sync")
                ids, attn = batch["input_ids"][idx], batch["attention_mask"][idx]
                with torch.no_grad(), amp():
                    t_logits = completion_logits(teacher, ids, attn, C)
                with (contextlib.nullcontext() if sync else model.no_sync()):
                    with amp():
                        s_logits = completion_logits(model, ids, attn, C)
                    loss, stats = gkd_loss(
                        t_logits, s_logits, batch["loss_mask"][idx], num_tokens, kind=args.divergence,
                        beta=args.beta, skew_alpha=args.skew_alpha, akl_mu=args.akl_mu, temperature=args.temperature,
                        completion_ids=batch["completion_ids"][idx], chunk_size=args.divergence_chunk_size)
                    (loss * world).backward()
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + v.detach().double()
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
    metrics = {(f"charts/{k}" if k == "teacher_logprob_mean" else f"losses/{k}"): v
               for k, v in zip(keys, reduced.tolist())}
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


def load_model(path: str, device, trainable: bool, what: str = "model"):
    """AutoModelForCausalLM in float32 with dropout off; a missing path gives a one-line error."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise load_error(path, what, e) from None
    for m in model.modules():  # the teacher's distributions must be deterministic: no dropout anywhere
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


def load_tokenizer(path: str, what: str = "model"):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise load_error(path, what, e) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_vocabulary(student_tok, teacher_tok, student_width: Optional[int] = None,
                          teacher_width: Optional[int] = None) -> None:
    """The divergence compares the two next-token distributions entry by entry, so token i must mean the same
    string for both (same vocabulary, same special tokens) and both must have the same number of logits (checked
    when the widths are given: the tokenizers are checked before any model is loaded)."""
    sv, tv = student_tok.get_vocab(), teacher_tok.get_vocab()
    if sv != tv:
        only_s = sorted(set(sv.items()) - set(tv.items()), key=lambda x: x[1])
        only_t = sorted(set(tv.items()) - set(sv.items()), key=lambda x: x[1])
        example = f"student {only_s[0]}" if only_s else f"teacher {only_t[0]}"
        raise UserError(f"the teacher's tokenizer differs from the student's ({len(sv)} vs {len(tv)} tokens, "
                        f"{len(only_s) + len(only_t)} (token, id) pairs differ, e.g. {example}); GKD needs one "
                        "shared tokenizer")
    for name in ("bos_token", "eos_token", "unk_token"):
        a, b = getattr(student_tok, name), getattr(teacher_tok, name)
        if a != b:
            raise UserError(f"the teacher's {name} {b!r} differs from the student's {a!r}; GKD needs one shared "
                            "tokenizer")
    if student_width is not None and student_width != teacher_width:
        raise UserError(f"the teacher has {teacher_width} logits per position, the student {student_width}: the "
                        "full-vocabulary divergence needs the same logit width")


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


def encode_completions(tokenizer, examples, args) -> list:
    """Dataset completions (the reference answers) + EOS, for off-policy steps without --seq_kd; one that does not
    fit in --max_new_tokens is an error, not a truncation."""
    ids = tokenizer([ex.answer for ex in examples], add_special_tokens=False)["input_ids"]
    out = [seq + [tokenizer.eos_token_id] for seq in ids]
    for i, seq in enumerate(out):
        if len(seq) > args.max_new_tokens:
            raise UserError(f"train answer {i} has {len(seq)} tokens with EOS > --max_new_tokens {args.max_new_tokens}"
                            f": {examples[i].answer[:60]!r}")
    return out


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
def evaluate(policy, init_model, teacher, tokenizer, prompts, answers, reward_fn, args, eos_ids, device, amp,
             rank) -> dict:
    """Held-out pass@1 of `policy` at `temperature`; along its samples, exact over the vocabulary at every visited
    position: KL(pi_theta || pi_init) summed per sequence (with `init_model`) and the token means of KL(t || s)
    and KL(s || t) to the teacher (with `teacher`). Prompts are interleaved over ranks; sums are all-reduced.
    The sampler is re-seeded for every eval, so evals at different steps share their random numbers."""
    gen = torch.Generator(device=device).manual_seed(10_000_019 * (args.seed + 1) + rank)
    mine = list(range(rank, len(prompts), args.world_size))
    rep = [prompts[i] for i in mine for _ in range(args.eval_samples_per_prompt)]
    ans = [answers[i] for i in mine for _ in range(args.eval_samples_per_prompt)]
    sums = torch.zeros(7, dtype=torch.float64, device=device)  # reward, correct, length, kl_init, fkl, rkl, count
    for i in range(0, len(rep), args.gen_batch_size):
        b = sample_batch(policy, rep[i: i + args.gen_batch_size], args, eos_ids, tokenizer.pad_token_id, gen, device, amp)
        rewards = torch.tensor([reward_fn(c, a) for c, a in zip(decode_completions(tokenizer, b), ans[i:])],
                               dtype=torch.float64, device=device)
        cmask = b["completion_mask"]
        sums[0] += rewards.sum()
        sums[1] += (rewards >= 1.0).double().sum()
        sums[2] += cmask.sum()
        sums[6] += cmask.shape[0]
        if init_model is None and teacher is None:
            continue
        C = cmask.shape[1]
        for j in range(0, cmask.shape[0], args.micro_batch_size):
            sl = slice(j, j + args.micro_batch_size)
            lsm = lambda m: completion_log_softmax(m, b["input_ids"][sl], b["attention_mask"][sl], C,  # noqa: E731
                                                   args.temperature)
            with amp():
                p = lsm(policy)
                q = lsm(init_model) if init_model is not None else None
                t = lsm(teacher) if teacher is not None else None
            if q is not None:
                sums[3] += ((p.exp() * (p - q)).sum(-1) * cmask[sl]).sum().double()
            if t is not None:
                sums[4] += ((t.exp() * (t - p)).sum(-1) * cmask[sl]).sum().double()
                sums[5] += ((p.exp() * (p - t)).sum(-1) * cmask[sl]).sum().double()
    total = all_reduce_sum(sums)
    n, n_tok = total[6].clamp(min=1), total[2].clamp(min=1)
    out = {"eval/pass@1": (total[1] / n).item(), "eval/reward_mean": (total[0] / n).item(),
           "eval/completion_len_mean": (total[2] / n).item()}
    if init_model is not None:
        out["eval/kl_init_rkl_exact_seq"] = (total[3] / n).item()
    if teacher is not None:
        out["eval/kl_teacher_fkl_exact"] = (total[4] / n_tok).item()
        out["eval/kl_teacher_rkl_exact"] = (total[5] / n_tok).item()
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
        raise UserError("--temperature must be > 0 (sampling and the loss use softmax(logits / T))")
    if not 0.0 <= args.lmbda <= 1.0:
        raise UserError(f"--lmbda {args.lmbda} must be in [0, 1] (the on-policy fraction)")
    if not 0.0 <= args.beta <= 1.0:
        raise UserError(f"--beta {args.beta} must be in [0, 1] (JSD mixture weight of the teacher)")
    if not 0.0 <= args.skew_alpha < 1.0:
        raise UserError(f"--skew_alpha {args.skew_alpha} must be in [0, 1) (at 1 the skew KLs are identically 0)")
    if not 0.0 < args.akl_mu <= 1.0:
        raise UserError(f"--akl_mu {args.akl_mu} must be in (0, 1] (teacher mass of the AKL head)")
    if args.prompts_per_step % world_size:
        raise UserError(f"--prompts_per_step {args.prompts_per_step} is not divisible by the world size {world_size}")
    if (args.prompts_per_step // world_size) % args.num_minibatches:
        raise UserError(f"{args.prompts_per_step // world_size} sequences per rank are not divisible by "
                        f"--num_minibatches {args.num_minibatches}")
    for name in ("total_steps", "micro_batch_size", "gen_batch_size", "num_iterations", "num_minibatches",
                 "eval_num_prompts", "eval_samples_per_prompt", "max_new_tokens", "max_prompt_length", "log_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")
    if args.divergence_chunk_size < 0:
        raise UserError("--divergence_chunk_size must be >= 0")


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
    teacher_tokenizer = load_tokenizer(args.teacher_name_or_path, "teacher")
    check_same_vocabulary(tokenizer, teacher_tokenizer)  # before loading any weights
    policy = load_model(resume_ckpt or args.model_name_or_path, device, trainable=True)
    teacher = load_model(args.teacher_name_or_path, device, trainable=False, what="teacher")
    check_same_vocabulary(tokenizer, teacher_tokenizer, policy.get_output_embeddings().weight.shape[0],
                          teacher.get_output_embeddings().weight.shape[0])
    init_model = load_model(args.model_name_or_path, device, trainable=False) if args.eval_kl else None
    if args.gradient_checkpointing:
        enable_checkpointing(policy)
    model = policy
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[local_rank] if use_cuda else None)
    train_prompts = encode_prompts(tokenizer, task.train, args, "train")
    train_completions = (encode_completions(tokenizer, task.train, args)
                         if args.lmbda < 1.0 and not args.seq_kd else None)
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

    def run_eval(model_to_eval=None) -> dict:
        t = time.time()
        if model_to_eval is not None:  # the teacher, once: its pass@1 is the ceiling of the distillation
            out = evaluate(model_to_eval, None, None, tokenizer, eval_prompts, [e.answer for e in eval_examples],
                           task.reward_fn, args, eos_ids, device, amp, rank)
            return {"eval/teacher_pass@1": out["eval/pass@1"]}
        out = evaluate(policy, init_model, teacher if args.eval_teacher else None, tokenizer, eval_prompts,
                       [e.answer for e in eval_examples], task.reward_fn, args, eos_ids, device, amp, rank)
        out["perf/eval_s"] = time.time() - t
        return out

    if start_step == 0:
        m = run_eval()
        if args.eval_teacher:
            m.update(run_eval(teacher))
        log(0, m)
        if rank == 0:
            print(f"step 0: eval/pass@1 {m['eval/pass@1']:.4f}"
                  + (f" (teacher {m['eval/teacher_pass@1']:.4f})" if args.eval_teacher else ""))

    # ---- training loop ------------------------------------------------------------------------------------
    on_policy_steps = sum(on_policy_coin(args.seed, s, args.lmbda) for s in range(1, start_step + 1))
    bar = None
    if rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.total_steps, initial=start_step, desc=args.exp_name, dynamic_ncols=True)
    for step in range(start_step + 1, args.total_steps + 1):
        t0 = time.time()
        # 1. prompts: the same global draw on every rank (from seed and step), then this rank's shard; one shared
        #    coin decides where the whole batch's completions come from
        order = np.random.default_rng([args.seed, step]).choice(len(train_prompts), args.prompts_per_step,
                                                                replace=False)
        mine = order[rank * args.local_prompts: (rank + 1) * args.local_prompts]
        on_policy = on_policy_coin(args.seed, step, args.lmbda)
        on_policy_steps += on_policy
        # 2. completions: the student's own samples, the teacher's samples, or the dataset's answers
        prompts = [train_prompts[i] for i in mine]
        if on_policy or args.seq_kd:
            batch = sample_batch(policy if on_policy else teacher, prompts, args, eos_ids, tokenizer.pad_token_id,
                                 sampler, device, amp)
        else:
            batch = dataset_batch(prompts, [train_completions[i] for i in mine], eos_ids, tokenizer.pad_token_id,
                                  device)
        batch["loss_mask"] = batch["completion_mask"]
        answers = [task.train[i].answer for i in mine]
        rewards = torch.tensor([task.reward_fn(c, a) for c, a in zip(decode_completions(tokenizer, batch), answers)],
                               dtype=torch.float64, device=device)
        t_gen = time.time()
        # 3. teacher and student forwards, the divergence at every completion position, one AdamW step
        try:
            metrics = update_policy(model, optimizer, scheduler, batch, args, shuffle_seed=args.seed * 100_003 + step,
                                    amp=amp, teacher=teacher)
        except FloatingPointError as e:
            raise FloatingPointError(f"step {step}: {e}; stopping without saving") from None
        t_train = time.time()
        # 4. metrics, eval, checkpoints
        reward_mean, reward_std = global_mean_std(rewards)
        counters = all_reduce_sum(torch.stack([batch["completion_mask"].sum().double(),
                                               batch["truncated"].sum().double(),
                                               torch.tensor(float(rewards.numel()), dtype=torch.float64,
                                                            device=device)]))
        n_seq = counters[2].item()
        metrics.update({
            "charts/reward_mean": reward_mean.item(), "charts/reward_std": reward_std.item(),
            "charts/on_policy": float(on_policy),
            "charts/on_policy_frac": on_policy_steps / step,
            "charts/completion_len_mean": counters[0].item() / n_seq, "charts/truncated_frac": counters[1].item() / n_seq,
            "charts/learning_rate": scheduler.get_last_lr()[0], "charts/prompts_seen": step * args.prompts_per_step,
            "charts/optimizer_steps": step * args.num_iterations * args.num_minibatches,
            "perf/generate_s": t_gen - t0, "perf/train_s": t_train - t_gen})
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
            bar.set_postfix(loss=f"{metrics['losses/loss']:.4f}")
            if step % args.log_every == 0 or "eval/pass@1" in metrics:
                summary = (f"step {step}: {args.divergence} {metrics['losses/loss']:.4f} "
                           f"fkl {metrics['losses/kl_teacher_fkl_exact']:.4f} "
                           f"rkl {metrics['losses/kl_teacher_rkl_exact']:.4f} "
                           f"reward {metrics['charts/reward_mean']:.3f} tokens/s {metrics['charts/tokens_per_s']:.0f}")
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
