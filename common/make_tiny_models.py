"""Regenerate the shipped tiny models: ``python common/make_tiny_models.py`` (about 2 minutes on 2 CPU cores).

Writes ``common/models/tiny-policy`` and ``common/models/tiny-teacher``, each a Hugging Face folder
(``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) that ``AutoModelForCausalLM`` and
``AutoTokenizer`` load offline. Both are one supervised run on the arithmetic task's *training* split:
  * tokenizer: character level (every printable ASCII character, newline and tab, plus <pad> <s> </s> <unk>),
    a real ``tokenizers`` BPE with no merges, so ``AutoTokenizer.from_pretrained`` works on it; it prepends
    <s> and pads on the left.
  * model: Llama architecture, hidden 128, 4 layers, 4 heads, MLP 384, tied embeddings, no dropout (0.86M).
  * training: batch 128, AdamW lr 3e-3, 100 warm-up steps then cosine decay, grad-norm clip 1.0, loss on the
    answer tokens and EOS only.
Checkpoints are picked by measured held-out pass@1, not by step count. Pass@1 at T = 1 is computed exactly,
without sampling: it is the probability of the answer followed by EOS, a product of teacher-forced token
probabilities (completions that decode to the same string another way, like " 95", have negligible mass).
  * tiny-policy: the first checkpoint with pass@1 >= 0.25 (deliberately under-trained: RL has room to climb);
  * tiny-teacher: the end of training (pass@1 >= 0.9 is asserted).
Deterministic on one machine: fixed seeds, deterministic kernels and one thread.
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from common import TINY_POLICY, TINY_TEACHER
from common.tasks import arithmetic_task

SEED = 0
BATCH = 128  # sequences per step
LR = 3e-3  # peak learning rate
WARMUP = 100  # linear warm-up steps, then cosine decay
TOTAL_STEPS = 1500
EVAL_EVERY = 10
POLICY_MIN_PASS, TEACHER_MIN_PASS = 0.25, 0.9


def build_tokenizer() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges = one token per char
    tok.decoder = decoders.Fuse()  # concatenate characters back, no spaces in between
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


def build_model(tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=384,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def encode(tokenizer, examples):
    """Right-padded ``<s>prompt answer</s>`` with labels on the answer and EOS only."""
    ids, labels = [], []
    for ex in examples:
        p = tokenizer(ex.prompt)["input_ids"]
        c = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids.append(p + c)
        labels.append([-100] * len(p) + c)
    n = max(map(len, ids))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (n - len(x)) for x in ids])
    label_ids = torch.tensor([y + [-100] * (n - len(y)) for y in labels])
    return input_ids, (input_ids != pad).long(), label_ids


@torch.no_grad()
def exact_pass_at_1(model, tokenizer, examples) -> float:
    """Mean over prompts of P(answer + EOS | prompt) at T = 1: the expected sampled pass@1."""
    model.eval()
    input_ids, attn, labels = encode(tokenizer, examples)
    logp = torch.log_softmax(model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    tok_lp = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (tgt != -100)
    model.train()
    return tok_lp.sum(-1).exp().mean().item()


def save(model, tokenizer, path, pass_at_1, step):
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # the generic fast-tokenizer class name loads in transformers 4.x and 5.x alike
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(
            f"# {os.path.basename(path)}\n\nGenerated by `common/make_tiny_models.py` (step {step}).\n"
            f"Held-out arithmetic pass@1 at T=1 (exact): {pass_at_1:.4f}\n"
        )
    print(f"saved {path}: step {step}, held-out pass@1 {pass_at_1:.4f}")


def main():
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    rng = np.random.default_rng(SEED)
    task = arithmetic_task()
    tokenizer = build_tokenizer()
    model = build_model(tokenizer)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)

    def lr_at(s):
        """Linear warm-up over WARMUP steps, then a cosine decay to 0 at TOTAL_STEPS."""
        warmup = min(1.0, (s + 1) / WARMUP)
        if s < WARMUP:
            return LR * warmup
        cosine = 0.5 * (1 + math.cos(math.pi * (s - WARMUP) / (TOTAL_STEPS - WARMUP)))
        return LR * warmup * cosine

    policy_saved = False
    model.train()
    for step in range(1, TOTAL_STEPS + 1):
        batch = [task.train[i] for i in rng.integers(0, len(task.train), BATCH)]
        input_ids, attn, labels = encode(tokenizer, batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % EVAL_EVERY == 0 and (not policy_saved or step % 100 == 0):
            p1 = exact_pass_at_1(model, tokenizer, task.eval)
            print(f"step {step}: loss {loss.item():.4f} held-out pass@1 {p1:.4f}", flush=True)
            if not policy_saved and p1 >= POLICY_MIN_PASS:
                save(model, tokenizer, TINY_POLICY, p1, step)
                policy_saved = True
    p1 = exact_pass_at_1(model, tokenizer, task.eval)
    assert policy_saved and p1 >= TEACHER_MIN_PASS, f"teacher too weak: pass@1 {p1:.4f}"
    save(model, tokenizer, TINY_TEACHER, p1, TOTAL_STEPS)


if __name__ == "__main__":
    main()
