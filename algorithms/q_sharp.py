# docs: docs/q_sharp.md
# Q-sharp: "Q#: Provably Optimal Distributional RL for LLM Post-Training" (arXiv 2502.20548).
"""Q#: learn the return distribution of the frozen reference pi_ref, then sample from pi_ref exp(Q*/eta), in one file.

Token MDP (state = prompt + tokens so far, action = next token, episode ends at EOS or max_new_tokens), outcome
reward R, objective J(pi) = E_pi[R] - eta KL(pi || pi_ref). Because transitions are deterministic the soft Bellman
recursion telescopes:
    Q*(s, a) = eta ln E_{pi_ref}[ e^{R/eta} | s, a ]        (continuations from pi_ref after a),
    pi*(a|s) = pi_ref(a|s) e^{(Q*(s,a) - V*(s))/eta},        pi*(y) = pi_ref(y) e^{R(y)/eta} / Z for whole sequences.
So Q* only needs the return DISTRIBUTION of pi_ref at every (state, token): a Q model (a causal-LM backbone plus a
categorical head over reward atoms) is fit by maximum likelihood on pi_ref rollouts, and one learned law serves
every eta (the eval sweep). Q# never fine-tunes pi_ref. Rounds: round 1 samples pi_ref; later rounds roll in
with the current guided policy, switch at a uniformly drawn token and roll out with pi_ref, so every label
(the switch token and every pi_ref token after it, labelled with the final reward) is an unbiased sample of the
pi_ref return law; data from all rounds is trained on together. CD (controlled decoding) guides with
pi_ref e^{E[R|s,a]/eta} instead, which is not pi*.
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
from typing import Literal, Optional, Tuple

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
    """global seed; every sample's noise is derived from (seed, round or eval, prompt id, sample index)"""
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
    """pi_ref, the frozen reference that is guided (never trained); default: the shipped tiny policy"""
    q_model_name_or_path: Optional[str] = None
    """backbone of the Q model; default: a copy of pi_ref's weights. Must share pi_ref's tokenizer (checked)"""
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
    """horizon H: responses end at EOS or after H tokens, rollouts included (default per task: 4 arithmetic, 1024)"""
    temperature: float = 1.0
    """pi_ref = softmax(logits / T), the sampler whose returns are learned; the offset is added after tempering"""
    # ---- Q# -----------------------------------------------------------------------------------------------
    eta: float = 0.1
    """the paper's KL coefficient (bigger = closer to pi_ref; paper default 0.1). The official math code's
    `--eta` is 1/eta (its eval uses 10)"""
    head: Literal["v", "q"] = "q"
    """`v`: atom logits from the hidden state AT each candidate token (the paper's V-type, its default; one extra
    token per candidate, so use it with --top_k on real vocabularies); `q`: |V| x atoms logits from the last
    hidden state of the state, all candidates in one forward (for small vocabularies). Tiny-tuned: `q`. On the
    101-token tiny task the V-type head, started from pi_ref's weights, did not learn to tell candidate digits
    apart within the time budget (guided KL 0.035 after 8k examples), the Q-type head did"""
    num_atoms: int = 2
    """atoms of the categorical return law; 2 on {0, 1} is exactly the sigmoid/BCE head (official default)"""
    v_min: float = 0.0
    """smallest atom"""
    v_max: float = 1.0
    """largest atom"""
    top_k: int = 0
    """guide only the k most likely reference tokens (0 = all: the guided policy is exactly pi_ref e^{Q/eta});
    official 20"""
    topk_outside: Literal["zero", "mask"] = "zero"
    """tokens outside the top k: `zero` = offset 0 (the official Bernoulli path), `mask` = removed (star-graph code)"""
    num_rounds: int = 3
    """collection + training rounds; data from all rounds is kept (DAgger-style aggregation). Tiny-tuned: 3
    (guided eval/pass@1 at eta 0.1: 0.355 after round 1, 0.488 after round 2, 0.646 after round 3); paper 2"""
    prompts_per_round: int = 4096
    """training prompts drawn per round. Tiny-tuned; the official code collects on every training problem"""
    samples_per_prompt: int = 2
    """rollouts per prompt per round. Tiny-tuned (more prompts generalize better than more samples of few
    prompts); official `num_samples` 16"""
    rollin_eta: Optional[float] = None
    """eta of the guided roll-in in rounds >= 2 (None = --eta)"""
    only_switch_token: bool = False
    """ablation: label only the switch token (official `--use_all_ref_tokens 0`)"""
    drop_no_variation: bool = False
    """drop prompts whose collected rewards are all equal (a selection effect on the learned law)"""
    epochs_per_round: int = 6
    """passes over all collected data per round. Tiny-tuned with q_batch_size 128 to the 5-minute budget (3 epochs
    of batches of 32: guided pass@1 0.490 at eta 0.1 and CD below Q# at equal pass@1; 6 of 128: 0.646, Q# below
    CD); official 5"""
    q_batch_size: int = 128
    """sequences per Q-model optimizer step, all ranks together. Tiny-tuned (on 2 CPU cores a step of 128 costs
    little more than one of 32); official 32"""
    micro_batch_size: int = 128
    """sequences per forward/backward on one device"""
    learning_rate: float = 6e-4
    """AdamW learning rate of the Q model, constant. Tiny-tuned (3e-4 with batches of 32); official 2e-5"""
    weight_decay: float = 0.01
    """AdamW weight decay (official 0.01)"""
    max_grad_norm: float = 5.0
    """gradient-norm clip (official 5.0 for the V-type head)"""
    heldout_frac: float = 0.1
    """share of training prompts whose examples are kept out of training for the held-out Q loss"""
    gen_batch_size: int = 256
    """sequences per sampling call on one device"""
    score_batch_size: int = 32
    """V-type head: sequences whose |V| candidates are scored in one forward (memory: x vocabulary size)"""
    # ---- evaluation, logging, checkpoints -----------------------------------------------------------------
    eval_etas: Tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
    """eta sweep after the last round: held-out pass@1 and sequence KL to pi_ref for Q# and CD"""
    eval_cd: bool = True
    """also evaluate CD, pi_ref e^{E[R|s,a]/eta} from the same Q model"""
    eval_num_prompts: int = 500
    """held-out prompts per eval"""
    eval_samples_per_prompt: int = 4
    """samples per held-out prompt; pass@1 = mean correctness"""
    save_every: int = 1
    """checkpoint every this many rounds (the last round is always saved as `final`)"""
    resume: Optional[str] = None
    """a run folder or round checkpoint to resume from (Q model, optimizer, collected data, round, step)"""
    bf16: Optional[bool] = None
    """bf16 autocast for forward passes (parameters and optimizer stay float32); default: on with CUDA"""
    gradient_checkpointing: bool = False
    """trade compute for memory on real Q models"""
    # ---- filled in at runtime -----------------------------------------------------------------------------
    world_size: int = 0
    """number of processes (computed at runtime)"""


class Preempted(Exception):
    """SIGTERM (a scheduler's preemption, `kill`): the round in flight finishes, a checkpoint is written, and
    the process exits with status 143 so `--resume` continues exactly."""


class UserError(ValueError):
    """Bad flags or inputs: printed as one line (`error: ...`), exit status 1, nothing written."""


# ==========================================================================================================
# ALGO LOGIC: pure functions (tensors in, tensors out; tested against closed forms in tests/test_q_sharp.py)
# ==========================================================================================================
def soft_q(log_pmf: torch.Tensor, atoms: torch.Tensor, eta: float) -> torch.Tensor:
    """Q(s, a) = eta ln sum_i p(z_i | s, a) e^{z_i / eta}, the soft value of a learned return law [..., A]."""
    return eta * torch.logsumexp(log_pmf + atoms / eta, dim=-1)


def cd_value(log_pmf: torch.Tensor, atoms: torch.Tensor) -> torch.Tensor:
    """E[R | s, a] = sum_i p(z_i) z_i: what CD guides with (the eta -> infinity limit of soft_q)."""
    return (log_pmf.exp() * atoms).sum(-1)


def atom_bin(rewards: torch.Tensor, atoms: torch.Tensor) -> tuple:
    """Index of the nearest atom to each reward; exact ties go to the LOWER atom (argmin returns the first);
    rewards outside [v_min, v_max] are clamped. Returns (indices, clamped mask). The official code rounds
    R (A - 1) half-to-even and ignores v_min / v_max."""
    r = rewards.to(atoms.dtype)
    clamped = (r < atoms[0]) | (r > atoms[-1])
    idx = (r.clamp(atoms[0], atoms[-1]).unsqueeze(-1) - atoms).abs().argmin(dim=-1)
    return idx, clamped


def dist_loss(log_pmf: torch.Tensor, bins: torch.Tensor, mask: torch.Tensor, num_seqs) -> torch.Tensor:
    """Distributional maximum likelihood, this micro-batch's share of the mean over the global batch:
        L = (1/N_seq) sum_i (1/|T_i|) sum_{t in T_i} -log p_theta(bin(R_i) | s_t, y_t),
    log_pmf [B, T, A], bins [B] (one label per sequence: its final reward), mask [B, T] marks T_i."""
    nll = -log_pmf.gather(-1, bins.view(-1, 1, 1).expand(-1, log_pmf.shape[1], 1)).squeeze(-1)
    m = mask.to(nll.dtype)
    return ((nll * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / max(num_seqs, 1)


def guided_logits(ref_logits: torch.Tensor, offsets: torch.Tensor, temperature: float, top_k: int = 0,
                  outside: str = "zero") -> torch.Tensor:
    """l'_a = l_a / T + o(a), o = Q/eta (Q#) or E[R]/eta (CD), added AFTER tempering (the official code adds it
    before, which divides the offset by T). top_k > 0: only the k largest reference logits get their offset;
    the others get 0 (`zero`) or are removed (`mask`)."""
    tempered = ref_logits / temperature
    if top_k <= 0 or top_k >= ref_logits.shape[-1]:
        return tempered + offsets
    keep = torch.zeros_like(ref_logits, dtype=torch.bool).scatter(-1, ref_logits.topk(top_k, dim=-1).indices, True)
    if outside == "zero":
        return tempered + torch.where(keep, offsets, torch.zeros_like(offsets))
    return torch.where(keep, tempered + offsets, torch.full_like(tempered, -math.inf))


def make_targets(completion_mask: torch.Tensor, switch: torch.Tensor, only_switch: bool = False) -> torch.Tensor:
    """Label positions of each completion [B, C]: the switch token c and every pi_ref token after it up to and
    including EOS (only c with `only_switch`); never the prompt (not in the completion) or padding."""
    pos = torch.arange(completion_mask.shape[1], device=completion_mask.device).unsqueeze(0)
    at_or_after = (pos == switch.unsqueeze(1)) if only_switch else (pos >= switch.unsqueeze(1))
    return at_or_after & completion_mask.bool()


def seq_kl(guided: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum_t KL(softmax(guided_t) || softmax(reference_t)) over the masked positions of each sequence: the exact
    per-position KL along a sample, whose expectation is the sequence KL(pi_g || pi_ref) by the chain rule.
    guided, reference [..., T, V] (reference already tempered); -inf guided logits (masked top-k) count 0."""
    lg, lr = torch.log_softmax(guided, -1), torch.log_softmax(reference, -1)
    p = lg.exp()
    per_pos = torch.where(p > 0, p * (lg - lr), torch.zeros_like(p)).sum(-1)
    return (per_pos * mask.to(per_pos.dtype)).sum(-1)


def kl_at_equal_reward(front: list, pass_at_1: float) -> float:
    """The KL another method needs for the same pass@1: linear interpolation on its Pareto front.
    front: (pass@1, KL) points, pi_ref's (pass@1, 0) included; points beaten by one with less KL and more pass@1
    are dropped (CD at small eta often overshoots: more KL, less pass@1). NaN outside the front's range. Linear
    interpolation of a convex frontier overstates the KL between points, so use a dense --eval_etas."""
    pts, best = [], -math.inf
    for p, kl in sorted(front, key=lambda x: (x[1], -x[0])):
        if p > best:
            pts.append((p, kl))
            best = p
    for (p0, k0), (p1, k1) in zip(pts, pts[1:]):
        if p0 <= pass_at_1 <= p1:
            return k0 + (k1 - k0) * (pass_at_1 - p0) / (p1 - p0)
    return math.nan


# ==========================================================================================================
# Models: pi_ref and the Q model (backbone + categorical head)
# ==========================================================================================================
def cache_kwarg(model) -> str:
    """transformers >= 5.2x renamed the forward argument `past_key_values` to `cache`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class QModel(torch.nn.Module):
    """A causal-LM backbone (no LM head) and a linear head giving log-probabilities over the reward atoms.
    head "v": [B, L, A] from the hidden state at each position, i.e. at the candidate token itself;
    head "q": [B, L, V, A] from the hidden state at the end of the state, one row per next token."""

    def __init__(self, backbone, head_type: str, num_atoms: int, vocab_size: int):
        super().__init__()
        self.backbone, self.head_type, self.num_atoms, self.vocab_size = backbone, head_type, num_atoms, vocab_size
        width = num_atoms if head_type == "v" else vocab_size * num_atoms
        self.head = torch.nn.Linear(backbone.config.hidden_size, width)
        torch.nn.init.zeros_(self.head.weight)  # uniform return law until trained
        torch.nn.init.zeros_(self.head.bias)

    def hidden(self, input_ids, attention_mask, position_ids, cache=None):
        kw = {cache_kwarg(self.backbone): cache} if cache is not None else {}
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=cache is not None, **kw).last_hidden_state

    def log_pmf(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.head_type == "q":
            logits = logits.view(*hidden.shape[:-1], self.vocab_size, self.num_atoms)
        return torch.log_softmax(logits, dim=-1)

    def forward(self, input_ids, attention_mask, position_ids):
        return self.log_pmf(self.hidden(input_ids, attention_mask, position_ids))


def load_error(path: str, what: str, e: Exception) -> UserError:
    """One line that says whether `path` was read as a local folder or as a hub id (and why that failed)."""
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if looks_local and not os.path.isdir(path):
        return UserError(f"{what} {path!r} not found: no such local folder")
    where = "local folder" if os.path.isdir(path) else "not a local folder; tried as a Hugging Face hub id"
    return UserError(f"could not load {what} {path!r} ({where}): {str(e).strip().splitlines()[0]}")


def load_model(path: str, device, trainable: bool, backbone_only: bool = False):
    """AutoModelForCausalLM (or AutoModel, the backbone without LM head) in float32 with dropout off."""
    from transformers import AutoModel, AutoModelForCausalLM

    try:
        model = (AutoModel if backbone_only else AutoModelForCausalLM).from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise load_error(path, "model", e) from None
    for m in model.modules():  # the learned return law is that of the sampler: no dropout anywhere
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    model.to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


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


# ==========================================================================================================
# Our own sampling loop: pi_ref, Q# (pi_ref e^{Q/eta}) or CD (pi_ref e^{E[R]/eta}), with the exact KL
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
    after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


def sample_uniforms(seed: int, kind: int, index: int, sample: int, n: int) -> torch.Tensor:
    """Noise of one rollout from (seed, kind = round number or -1 for eval, prompt id, sample index) alone: the
    collected data and the eval samples do not depend on the number of ranks or on batching."""
    g = torch.Generator().manual_seed(((seed * 1_000_003 + kind) * 1_000_003 + index) * 1_009 + sample)
    return torch.rand(n, generator=g, dtype=torch.float64)


@torch.no_grad()
def score_candidates(qmodel: QModel, cache, attn, pos, chunk: int) -> torch.Tensor:
    """V-type head: log-pmfs of every next token as a candidate, [B, V, A]. The prefix cache is copied and
    expanded |V| times per chunk of rows, the candidates run as one batch of single tokens, and the copies are
    dropped, so no candidate key/value leaks into the next step (tests compare with a no-cache forward)."""
    import copy

    B, V = attn.shape[0], qmodel.vocab_size
    out = []
    for i in range(0, B, chunk):
        rows = torch.arange(i, min(i + chunk, B), device=attn.device)
        c = copy.deepcopy(cache)
        c.batch_select_indices(rows)
        c.batch_repeat_interleave(V)
        cand = torch.arange(V, device=attn.device).repeat(len(rows)).unsqueeze(1)
        a = torch.cat([attn[rows].repeat_interleave(V, 0), torch.ones(len(rows) * V, 1, dtype=attn.dtype,
                                                                        device=attn.device)], dim=1)
        p = (pos[rows, -1:] + 1).repeat_interleave(V, 0)
        h = qmodel.hidden(cand, a, p, cache=c)[:, -1]
        out.append(qmodel.log_pmf(h).view(len(rows), V, -1))
    return torch.cat(out)


@torch.no_grad()
def sample(ref, qmodel, prompts: list, uniforms: torch.Tensor, mode: str, eta: float, args, atoms, eos_ids,
           pad_id, device, amp, max_tokens: Optional[int] = None):
    """Sample one completion per prompt with the KV cache; tokens by inverse CDF from `uniforms` [B, >= H].

    mode "ref": pi_ref = softmax(l / T); "qsharp": softmax(l / T + Q/eta); "cd": softmax(l / T + E[R]/eta)
    (`guided_logits`, with --top_k). Returns (tokens [B, C], completion mask [B, C], kl [B]) where kl is the
    exact KL(pi_g(.|s) || pi_ref(.|s)) summed over the generated positions (0 for mode "ref")."""
    H = max_tokens or args.max_new_tokens
    ids, attn = left_pad(prompts, pad_id, device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    from transformers import DynamicCache

    ref_cache, q_cache = DynamicCache(), DynamicCache()
    with amp():
        ref_logits = ref(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1,
                         **{cache_kwarg(ref): ref_cache}).logits[:, -1]
        ref_logits = ref_logits.to(torch.promote_types(ref_logits.dtype, torch.float32))
        if mode != "ref":
            q_hidden = qmodel.hidden(ids, attn, pos, cache=q_cache)[:, -1]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    kl = torch.zeros(len(prompts), dtype=torch.float64, device=device)
    tokens = []
    for t in range(H):
        tempered = ref_logits / args.temperature
        if mode == "ref":
            logits = tempered
        else:
            with amp():
                log_pmf = (score_candidates(qmodel, q_cache, attn, pos, args.score_batch_size)
                           if qmodel.head_type == "v" else qmodel.log_pmf(q_hidden))
            offsets = soft_q(log_pmf, atoms, eta) / eta if mode == "qsharp" else cd_value(log_pmf, atoms) / eta
            logits = guided_logits(ref_logits, offsets, args.temperature, args.top_k, args.topk_outside)
            kl += seq_kl(logits.unsqueeze(1), tempered.unsqueeze(1), (~done).unsqueeze(1)).double()
        cdf = torch.softmax(logits.double(), -1).cumsum(-1)
        u = uniforms[:, t: t + 1].to(device).contiguous()
        tok = torch.searchsorted(cdf, u).squeeze(-1).clamp(max=logits.shape[-1] - 1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= torch.isin(tok, eos_ids)
        if done.all():
            break
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos[:, -1:] + 1
        with amp():
            ref_logits = ref(input_ids=tok[:, None], attention_mask=attn, position_ids=pos, use_cache=True,
                             **{cache_kwarg(ref): ref_cache}).logits[:, -1]
            ref_logits = ref_logits.to(torch.promote_types(ref_logits.dtype, torch.float32))
            if mode != "ref":
                q_hidden = qmodel.hidden(tok[:, None], attn, pos, cache=q_cache)[:, -1]
    tokens = torch.stack(tokens, dim=1)
    return tokens, completion_mask_from(tokens, eos_ids), kl


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_list(items: list) -> list:
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# ==========================================================================================================
# Collection: rounds of roll-in (pi_ref, then the guided policy) and pi_ref roll-out
# ==========================================================================================================
@torch.no_grad()
def collect(round_idx: int, ref, qmodel, prompts: list, answers: list, prompt_ids: list, reward_fn, tokenizer, args,
            atoms, eos_ids, device, amp) -> list:
    """Examples of this rank's prompts: for each (prompt, sample) a response y_0..y_{L-1} from pi_ref (round 1)
    or from the guided policy at `rollin_eta` (later rounds), a switch c ~ Unif{0..L-1}, y_0..y_c kept and the
    rest re-sampled from pi_ref (capped at H tokens in total), the reward R of the final text. Labels: c and
    every position after it. In round 1 everything is already pi_ref, so the original tokens are kept."""
    H, S = args.max_new_tokens, args.samples_per_prompt
    eta = args.rollin_eta or args.eta
    out = []
    per_call = max(1, args.gen_batch_size // S)
    for i in range(0, len(prompt_ids), per_call):
        rows = [(p, j) for p in prompt_ids[i: i + per_call] for j in range(S)]
        u = torch.stack([sample_uniforms(args.seed, round_idx, p, j, 2 * H + 1) for p, j in rows])
        plist = [prompts[p] for p, _ in rows]
        mode = "ref" if round_idx == 1 else "qsharp"
        toks, cmask, _ = sample(ref, qmodel, plist, u[:, :H], mode, eta, args, atoms, eos_ids,
                                tokenizer.pad_token_id, device, amp)
        lengths = cmask.sum(-1).tolist()
        switch = [min(int(u[k, 2 * H].item() * L), L - 1) for k, L in enumerate(lengths)]
        if round_idx == 1:  # all pi_ref already: keep the sampled tokens
            completions = [toks[k, : lengths[k]].tolist() for k in range(len(rows))]
        else:
            completions = [toks[k, : switch[k] + 1].tolist() for k in range(len(rows))]
            redo = [k for k in range(len(rows)) if switch[k] < lengths[k] - 1]
            if redo:  # roll out from the switch token with pi_ref, at most H tokens in total
                cont, cmask2, _ = sample(ref, None, [plist[k] + completions[k] for k in redo], u[redo, H: 2 * H],
                                         "ref", eta, args, atoms, eos_ids, tokenizer.pad_token_id, device, amp,
                                         max_tokens=H - 1)
                for r, k in enumerate(redo):
                    n = min(int(cmask2[r].sum().item()), H - 1 - switch[k])
                    completions[k] += cont[r, :n].tolist()
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        for k, (p, j) in enumerate(rows):
            out.append({"prompt_id": p, "sample": j, "round": round_idx, "completion": completions[k],
                        "switch": switch[k], "reward": float(reward_fn(texts[k], answers[p]))})
    return out


# ==========================================================================================================
# Q-model training (importable: the data-parallel invariance test drives it on a fixed dataset)
# ==========================================================================================================
def q_batch(examples: list, prompts: list, args, atoms, pad_id, device) -> dict:
    """Left-padded prompt + completion, the label mask over completion positions and each sequence's atom bin.
    V-type scores (s_t, y_t) at y_t's position; Q-type at the position before it, in the row of y_t."""
    seqs = [prompts[e["prompt_id"]] + e["completion"] for e in examples]
    ids, attn = left_pad(seqs, pad_id, device)
    W = ids.shape[1]
    C = max(len(e["completion"]) for e in examples)
    cmask = torch.zeros(len(examples), C, dtype=torch.long, device=device)
    for i, e in enumerate(examples):
        cmask[i, : len(e["completion"])] = 1
    switch = torch.tensor([e["switch"] for e in examples], device=device)
    labels = make_targets(cmask, switch, args.only_switch_token)  # [B, C], completion-aligned
    targets = torch.zeros(len(examples), W, dtype=torch.bool, device=device)
    for i, e in enumerate(examples):  # left padding: each completion ends at the right edge
        L = len(e["completion"])
        targets[i, W - L:] = labels[i, :L]
    bins, clamped = atom_bin(torch.tensor([e["reward"] for e in examples], device=device), atoms)
    return {"input_ids": ids, "attention_mask": attn, "targets": targets, "bins": bins, "clamped": clamped}


def q_log_pmf_at_targets(qmodel, batch: dict) -> tuple:
    """log p(. | s_t, y_t) at every position [B, W, A] and the mask of labelled positions, for either head."""
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    log_pmf = qmodel(batch["input_ids"], batch["attention_mask"], pos)
    if log_pmf.dim() == 3:  # V-type: the hidden state at y_t scores (s_t, y_t)
        return log_pmf, batch["targets"]
    # Q-type: the hidden state before y_t scores every next token; pick y_t's row
    nxt = batch["input_ids"][:, 1:]
    picked = log_pmf[:, :-1].gather(2, nxt[:, :, None, None].expand(-1, -1, 1, log_pmf.shape[-1])).squeeze(2)
    return picked, batch["targets"][:, 1:]


def train_q_epoch(model, qmodel, optimizer, examples: list, prompts: list, args, atoms, pad_id, device, amp,
                  shuffle_seed: int) -> tuple:
    """One pass over `examples` in global batches of q_batch_size sequences (the last one filled up by wrapping
    around, so every rank runs the same number of steps); each rank takes its slice and backpropagates
    local_sum / global_count * world_size. Returns (mean loss, optimizer steps)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    n, qb = len(examples), args.q_batch_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    steps = math.ceil(n / qb)
    perm = (perm * math.ceil(steps * qb / n))[: steps * qb]
    total = 0.0
    for s in range(steps):
        mine = perm[s * qb: (s + 1) * qb][rank * qb // world: (rank + 1) * qb // world]
        micro = [mine[i: i + args.micro_batch_size] for i in range(0, len(mine), args.micro_batch_size)]
        for k, idx in enumerate(micro):
            sync = k == len(micro) - 1 or not hasattr(model, "no_sync")
            with (contextlib.nullcontext() if sync else model.no_sync()):
                batch = q_batch([examples[i] for i in idx], prompts, args, atoms, pad_id, device)
                with amp():
                    log_pmf, targets = q_log_pmf_at_targets(model, batch)
                loss = dist_loss(log_pmf, batch["bins"], targets, qb)
                (loss * world).backward()
            total += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(qmodel.parameters(), args.max_grad_norm)
        if not torch.isfinite(grad_norm):
            optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite Q loss or gradient (grad norm {grad_norm.item()})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return all_reduce_sum(torch.tensor([total], dtype=torch.float64, device=device)).item() / steps, steps


@torch.no_grad()
def heldout_q_loss(qmodel, examples: list, prompts: list, args, atoms, pad_id, device, amp) -> float:
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = examples[rank::world]
    total = torch.zeros(2, dtype=torch.float64, device=device)  # summed per-sequence losses, sequences
    for i in range(0, len(mine), args.micro_batch_size):
        batch = q_batch(mine[i: i + args.micro_batch_size], prompts, args, atoms, pad_id, device)
        with amp():
            log_pmf, targets = q_log_pmf_at_targets(qmodel, batch)
        total[0] += dist_loss(log_pmf, batch["bins"], targets, 1).double()
        total[1] += len(batch["bins"])
    total = all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


# ==========================================================================================================
# Evaluation: pi_ref, Q# and CD on held-out prompts, with the exact sequence KL to pi_ref
# ==========================================================================================================
@torch.no_grad()
def evaluate(mode: str, eta: float, ref, qmodel, tokenizer, prompts: list, answers: list, reward_fn, args, atoms,
             eos_ids, device, amp) -> dict:
    """Held-out pass@1 and mean sequence KL(pi_g || pi_ref). Every mode and eta draws the same noise per
    (prompt, sample), so their differences are not sampling noise. Prompts interleaved over ranks."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    rows = [(p, j) for p in range(rank, len(prompts), world) for j in range(args.eval_samples_per_prompt)]
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct, kl, count
    for i in range(0, len(rows), args.gen_batch_size):
        chunk = rows[i: i + args.gen_batch_size]
        u = torch.stack([sample_uniforms(args.seed, -1, p, j, args.max_new_tokens) for p, j in chunk])
        toks, cmask, kl = sample(ref, qmodel, [prompts[p] for p, _ in chunk], u, mode, eta, args, atoms, eos_ids,
                                 tokenizer.pad_token_id, device, amp)
        texts = tokenizer.batch_decode([t[: int(m.sum())].tolist() for t, m in zip(toks, cmask)],
                                       skip_special_tokens=True)
        sums[0] += sum(float(reward_fn(t, answers[p]) >= 1.0) for t, (p, _) in zip(texts, chunk))
        sums[1] += kl.sum()
        sums[2] += len(chunk)
    total = all_reduce_sum(sums)
    n = total[2].clamp(min=1)
    return {"pass@1": (total[0] / n).item(), "kl_init_rkl_exact_seq": (total[1] / n).item()}


# ==========================================================================================================
# Checkpoints (one per round): Q model, optimizer, collected data, round, step
# ==========================================================================================================
def find_checkpoint(path: str) -> str:
    """`--resume` accepts a round checkpoint or a run folder (then its latest round, `final` included)."""
    if os.path.isfile(os.path.join(path, "trainer_state.pt")):
        return path
    candidates = [os.path.join(path, "final")]
    ckpt_dir = os.path.join(path, "checkpoints")
    if os.path.isdir(ckpt_dir):
        candidates += [os.path.join(ckpt_dir, d) for d in os.listdir(ckpt_dir)]
    found = [c for c in candidates if os.path.isfile(os.path.join(c, "trainer_state.pt"))]
    if not found:
        raise UserError(f"--resume {path!r}: no checkpoint (trainer_state.pt) found there")
    return max(found, key=lambda c: torch.load(os.path.join(c, "trainer_state.pt"), weights_only=False)["round"])


def save_checkpoint(path, qmodel, tokenizer, optimizer, dataset, round_idx, step, elapsed, args, rank) -> None:
    """`q_backbone/` (save_pretrained), `head.pt`, `examples.jsonl` (every collected example) and
    `trainer_state.pt`; written to a temporary folder and renamed, so an interrupted save leaves nothing corrupt."""
    if rank == 0:
        tmp, old = path + ".tmp", path + ".old"
        try:
            qmodel.backbone.save_pretrained(os.path.join(tmp, "q_backbone"), safe_serialization=True)
            tokenizer.save_pretrained(os.path.join(tmp, "q_backbone"))
            torch.save(qmodel.head.state_dict(), os.path.join(tmp, "head.pt"))
            with open(os.path.join(tmp, "examples.jsonl"), "w") as f:
                f.writelines(json.dumps(e) + "\n" for e in dataset)
            torch.save({"round": round_idx, "step": step, "elapsed_s": elapsed, "optimizer": optimizer.state_dict(),
                        "rng": torch.get_rng_state(), "args": asdict(args)}, os.path.join(tmp, "trainer_state.pt"))
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
    """Whether any rank got SIGTERM (all ranks must stop after the same round)."""
    hit = torch.tensor([float(flag["sigterm"])], device=device)
    if dist.is_initialized():
        dist.all_reduce(hit, op=dist.ReduceOp.MAX)
    return bool(hit.item())


# ==========================================================================================================
# Main: args, setup, rounds
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
                default = Args(**{k: tuple(v) if k == "eval_etas" else v for k, v in saved.items()
                                  if k in Args.__dataclass_fields__})
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return tyro.cli(Args, default=default, use_underscores=True)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        text = []  # tyro draws a multi-line box; keep its first section as our one-line error
        for line in err.getvalue().splitlines()[1:]:
            if "──" in line or line.startswith("╰"):
                break
            text.append(line.strip("│ "))
        raise UserError(" ".join(text) + " (see --help)") from None


def check_args(args: Args, world_size: int) -> None:
    if args.temperature <= 0:
        raise UserError("--temperature must be > 0")
    if args.eta <= 0 or (args.rollin_eta is not None and args.rollin_eta <= 0) or min(args.eval_etas) <= 0:
        raise UserError("--eta, --rollin_eta and --eval_etas must be > 0 (the paper's KL coefficient)")
    if args.num_atoms < 2 or args.v_max <= args.v_min:
        raise UserError("need --num_atoms >= 2 and --v_max > --v_min")
    if args.q_batch_size % world_size:
        raise UserError(f"--q_batch_size {args.q_batch_size} is not divisible by the world size {world_size}")
    if not 0 <= args.heldout_frac < 1:
        raise UserError("--heldout_frac must be in [0, 1)")
    for name in ("num_rounds", "prompts_per_round", "samples_per_prompt", "epochs_per_round", "q_batch_size",
                 "micro_batch_size", "gen_batch_size", "score_batch_size", "eval_num_prompts",
                 "eval_samples_per_prompt", "max_new_tokens", "max_prompt_length", "save_every"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1")


def main() -> None:
    try:
        train(parse_args())
    except (UserError, TaskError, FloatingPointError) as e:
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
    args.world_size = world_size
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
    ref = load_model(args.model_name_or_path, device, trainable=False)
    q_path = args.q_model_name_or_path or args.model_name_or_path
    if args.q_model_name_or_path and load_tokenizer(q_path).get_vocab() != tokenizer.get_vocab():
        raise UserError(f"--q_model_name_or_path {q_path!r} has another tokenizer than {args.model_name_or_path!r}; "
                        "the Q model scores pi_ref's tokens, so the vocabularies must be identical")
    backbone = load_model(os.path.join(resume_ckpt, "q_backbone") if resume_ckpt else q_path, device,
                          trainable=True, backbone_only=True)
    torch.manual_seed(args.seed)  # the head is the only new parameter: identical on every rank
    qmodel = QModel(backbone, args.head, args.num_atoms, ref.config.vocab_size).to(device)
    if args.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = qmodel
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(qmodel, device_ids=[local_rank] if use_cuda else None)
    atoms = torch.linspace(args.v_min, args.v_max, args.num_atoms, device=device)
    train_prompts = encode_prompts(tokenizer, task.train, args, "train")
    eval_examples = task.eval[: args.eval_num_prompts]
    eval_prompts = encode_prompts(tokenizer, eval_examples, args, "eval")
    if args.prompts_per_round > len(train_prompts):
        raise UserError(f"--prompts_per_round {args.prompts_per_round} > {len(train_prompts)} training prompts")
    eos_ids = {tokenizer.eos_token_id} | set(np.atleast_1d(ref.generation_config.eos_token_id or []).tolist())
    eos_ids = torch.tensor(sorted(i for i in eos_ids if i is not None), device=device)
    order = np.random.default_rng([args.seed, 7]).permutation(len(train_prompts))
    heldout = set(order[: int(args.heldout_frac * len(train_prompts))].tolist())  # prompts for the held-out Q loss
    optimizer = torch.optim.AdamW(qmodel.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    dataset, start_round, step, elapsed0 = [], 1, 0, 0.0
    if resume_ckpt is not None:
        state = torch.load(os.path.join(resume_ckpt, "trainer_state.pt"), weights_only=False, map_location="cpu")
        qmodel.head.load_state_dict(torch.load(os.path.join(resume_ckpt, "head.pt"), map_location=device))
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start_round, step, elapsed0 = state["round"] + 1, state["step"], state["elapsed_s"]
        with open(os.path.join(resume_ckpt, "examples.jsonl")) as f:
            dataset = [json.loads(line) for line in f]

    # ---- logging ------------------------------------------------------------------------------------------
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    writers = []
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(asdict(args), f, indent=2)
        if resume_ckpt is not None and os.path.exists(metrics_path):  # drop what was logged after the checkpoint
            with open(metrics_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
            with open(metrics_path, "w") as f:
                f.writelines(kept)
        if args.track:
            writers = make_trackers(args, run_dir)
    t_start = time.time() - elapsed0
    flag = {"sigterm": False}  # SIGTERM is acted on at the end of a round (its data and Q model are consistent)
    signal.signal(signal.SIGTERM, lambda signum, frame: flag.update(sigterm=True))

    def log(at_step: int, metrics: dict) -> None:
        if rank != 0:
            return
        record = {"step": at_step, "time_s": round(time.time() - t_start, 3), **metrics}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for w in writers:
            w(at_step, metrics)

    def run_eval(mode: str, eta: float) -> dict:
        return evaluate(mode, eta, ref, qmodel, tokenizer, eval_prompts, [e.answer for e in eval_examples],
                        task.reward_fn, args, atoms, eos_ids, device, amp)

    if start_round == 1:  # pi_ref first: the baseline every guided policy is compared with
        t = time.time()
        m = run_eval("ref", args.eta)
        log(0, {"eval/pass@1": m["pass@1"], "eval/kl_init_rkl_exact_seq": m["kl_init_rkl_exact_seq"],
                "perf/eval_s": time.time() - t})
        if rank == 0:
            print(f"pi_ref: eval/pass@1 {m['pass@1']:.4f}")

    # ---- rounds: collect, train, evaluate -----------------------------------------------------------------
    for round_idx in range(start_round, args.num_rounds + 1):
        # 1. collect: the same draw of prompts on every rank, interleaved; per-sample noise from the seed
        t0 = time.time()
        ids = np.random.default_rng([args.seed, round_idx]).choice(len(train_prompts), args.prompts_per_round,
                                                                   replace=False).tolist()
        qmodel.eval()
        new = collect(round_idx, ref, qmodel, train_prompts, [e.answer for e in task.train], ids[rank::world_size],
                      task.reward_fn, tokenizer, args, atoms, eos_ids, device, amp)
        new = sorted(all_gather_list(new), key=lambda e: (e["prompt_id"], e["sample"]))
        rewards = torch.tensor([e["reward"] for e in new])
        clamped = atom_bin(rewards, atoms.cpu())[1].float().mean().item()
        if args.drop_no_variation:
            by_prompt = {}
            for e in new:
                by_prompt.setdefault(e["prompt_id"], set()).add(e["reward"])
            new = [e for e in new if len(by_prompt[e["prompt_id"]]) > 1]
        dataset += new
        train_set = [e for e in dataset if e["prompt_id"] not in heldout]
        held_set = [e for e in dataset if e["prompt_id"] in heldout]
        t_collect = time.time()
        if not train_set:
            raise UserError("no training examples collected (every prompt held out or dropped)")
        # 2. train the Q model on everything collected so far (warm start from the previous round)
        qmodel.train()
        for epoch in range(args.epochs_per_round):
            try:
                loss, n = train_q_epoch(model, qmodel, optimizer, train_set, train_prompts, args, atoms,
                                        tokenizer.pad_token_id, device, amp,
                                        shuffle_seed=(args.seed * 1000 + round_idx) * 1000 + epoch)
            except FloatingPointError as e:
                raise FloatingPointError(f"round {round_idx}, epoch {epoch + 1} (after step {step}): {e}; "
                                         "stopping without saving") from None
            step += n
            qmodel.eval()
            held = heldout_q_loss(qmodel, held_set, train_prompts, args, atoms, tokenizer.pad_token_id, device, amp) \
                if held_set else float("nan")
            qmodel.train()
            metrics = {"charts/round": round_idx, "charts/epoch": epoch + 1, "losses/q_loss": loss,
                       "losses/q_loss_heldout": held}
            if epoch < args.epochs_per_round - 1:
                log(step, metrics)
        qmodel.eval()
        t_train = time.time()
        # 3. evaluate the guided policy at the default eta (and the sweep after the last round)
        m = run_eval("qsharp", args.eta)
        metrics.update({"charts/num_examples": len(dataset), "charts/num_train_examples": len(train_set),
                        "charts/collect_reward_mean": rewards.mean().item(), "charts/reward_clamped_frac": clamped,
                        "eval/pass@1": m["pass@1"], "eval/kl_init_rkl_exact_seq": m["kl_init_rkl_exact_seq"],
                        "perf/collect_s": t_collect - t0, "perf/train_s": t_train - t_collect})
        if round_idx == args.num_rounds:
            for eta in args.eval_etas:
                for mode, name in (("qsharp", "qsharp"), ("cd", "cd")):
                    if mode == "cd" and not args.eval_cd:
                        continue
                    r = m if (mode == "qsharp" and eta == args.eta) else run_eval(mode, eta)
                    metrics[f"eval/sweep/{name}_eta{eta:g}/pass@1"] = r["pass@1"]
                    metrics[f"eval/sweep/{name}_eta{eta:g}/kl_init_rkl_exact_seq"] = r["kl_init_rkl_exact_seq"]
            if args.eval_cd:  # the comparison that matters: at equal pass@1, how much KL does CD need?
                ref_pass = run_eval("ref", args.eta)["pass@1"]  # same noise as step 0's eval: resume-safe
                metrics["eval/sweep/ref/pass@1"] = ref_pass
                cd_front = [(ref_pass, 0.0)] + [(metrics[f"eval/sweep/cd_eta{e:g}/pass@1"],
                                                 metrics[f"eval/sweep/cd_eta{e:g}/kl_init_rkl_exact_seq"])
                                                for e in args.eval_etas]
                for eta in args.eval_etas:
                    p = metrics[f"eval/sweep/qsharp_eta{eta:g}/pass@1"]
                    metrics[f"eval/frontier/cd_kl_at_equal_pass@1_eta{eta:g}"] = kl_at_equal_reward(cd_front, p)
                if rank == 0:
                    print(f"{'eta':>6} {'Q# pass@1':>10} {'Q# KL':>8} {'CD KL at equal pass@1':>22} "
                          f"{'CD pass@1':>10} {'CD KL':>8}")
                    for eta in args.eval_etas:
                        q, c = f"eval/sweep/qsharp_eta{eta:g}/", f"eval/sweep/cd_eta{eta:g}/"
                        print(f"{eta:>6g} {metrics[q + 'pass@1']:>10.4f} {metrics[q + 'kl_init_rkl_exact_seq']:>8.3f} "
                              f"{metrics[f'eval/frontier/cd_kl_at_equal_pass@1_eta{eta:g}']:>22.3f} "
                              f"{metrics[c + 'pass@1']:>10.4f} {metrics[c + 'kl_init_rkl_exact_seq']:>8.3f}")
        metrics["perf/eval_s"] = time.time() - t_train
        log(step, metrics)
        if rank == 0:
            print(f"round {round_idx}: {len(dataset)} examples, q_loss {metrics['losses/q_loss']:.4f} "
                  f"(held-out {held:.4f}), guided eval/pass@1 {m['pass@1']:.4f} at eta {args.eta:g}, "
                  f"KL {m['kl_init_rkl_exact_seq']:.3f}")
        last = round_idx == args.num_rounds
        preempted = not last and sigterm_received(flag, device)
        if last or round_idx % args.save_every == 0 or preempted:
            path = os.path.join(run_dir, "final") if last else os.path.join(run_dir, "checkpoints",
                                                                            f"round_{round_idx:03d}")
            save_checkpoint(path, qmodel, tokenizer, optimizer, dataset, round_idx, step, time.time() - t_start,
                            args, rank)
        if preempted:
            raise Preempted(f"SIGTERM: checkpoint of round {round_idx} saved; continue with --resume {run_dir}")
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
