"""gkd.py and dpo_kl.py side by side with TRL's GKDTrainer and OnlineDPOTrainer, on the same tiny models and task.

Done the way trl_compare.py does it for grpo.py: within each repeat the runs alternate (gkd.py, TRL GKD, dpo_kl.py,
TRL online DPO, then the next repeat), so that machine drift cancels; every run is its own process. Per trainer:
the median over runs of each run's median step time, completion tokens/s (sampled completion tokens, EOS included,
over the summed step times), the peak RSS of the process (`run` from trl_compare.py) and the quality reached: the
exact held-out pass@1 of the final model (`exact_pass_at_1` from trl_compare.py: the mean over the 500 held-out
prompts of P(answer + EOS) at T = 1, no sampling noise), the same scorer for both since the TRL trainers have no
held-out evaluation. Step time: ours, `perf/step_s` in metrics.jsonl (prompt draw to optimizer step, eval
excluded; run with `--eval_every 0 --eval_num_prompts 8`); TRL, on_step_begin -> on_step_end of a TrainerCallback
(generation, rewards, forwards, backward and optimizer step all happen inside it).

    pip install -r requirements-bench.txt        # TRL 1.16
    python benchmarks/trl_compare_gkd_dpo.py --steps 30 --repeats 3   # writes benchmarks/results/trl_compare_gkd_dpo.md
    python benchmarks/trl_compare_gkd_dpo.py --algos gkd               # one algorithm only

With the defaults (30 steps, 3 repeats, 2 threads) the 12 runs should take about 8 minutes on 2 idle CPU cores (an
estimate from 0.3-0.6 s per step and 20-30 s of fixed cost per run: start-up, our scripts' two 8-prompt evals,
saving, and scoring the 500 held-out prompts).

Where TRL keeps them: TRL 1.16 has both trainers only under `trl.experimental` (`trl.experimental.gkd.GKDTrainer`,
`trl.experimental.online_dpo.OnlineDPOTrainer`); the top-level `trl` exports neither (it has `DistillationTrainer`,
which TRL's GKD trainer itself names as covering lmbda = 1 at T = 1; it is not benchmarked here). The worker also
tries the top level; a trainer found in neither place is reported as having no equivalent in the installed TRL, and
only our side of that algorithm runs.

Common to both algorithms: the shipped tiny policy (`common.TINY_POLICY`) as student / policy, float32 on CPU, the
9,500 arithmetic training prompts of `load_task("arithmetic")` with the tokenizer's BOS token (the token ids of our
scripts), each trainer drawing its own order, completions of at most `task.max_new_tokens` = 4 tokens sampled at T = 1
from the full vocabulary (no top-k, top-p or penalties), AdamW (0.9, 0.999, eps 1e-8), constant learning rate
without warm-up or weight decay, gradient-norm clip 1.0, one optimizer step per batch, no gradient checkpointing,
no dropout, OMP_NUM_THREADS from --threads, HF_HUB_OFFLINE=1.
---
GKD: gkd.py vs TRL GKDTrainer (trl.experimental.gkd)

Matched: student tiny-policy, frozen teacher tiny-teacher (`common.TINY_TEACHER`); 128 prompts per optimizer step,
one completion each; lr 1e-3 (gkd.py's default); lmbda = 1, every step on-policy (gkd.py's default; TRL's is 0.5);
divergence: generalized JSD with beta = 0.5 (`--divergence jsd --beta 0.5`, GKDConfig beta 0.5). The two beta
conventions are the same: both mix in probability space, m = beta * teacher + (1 - beta) * student, and take
beta * KL(teacher || m) + (1 - beta) * KL(student || m) per position over the full vocabulary; beta = 0 is exactly
KL(teacher || student) and beta = 1 exactly KL(student || teacher) in both (the raw formula would be 0 there).
T = 1 for sampling and in the loss (TRL's loss always uses T = 1; its sampling uses GKDConfig.temperature, default
0.9, set to 1). Loss: the divergence summed over sampled completion positions (EOS included) and divided by their
number in the batch. For this, TRL gets our own data collator: left-padded prompts and the dataset completion
(answer + EOS, as gkd.py's dataset batches) but no `labels`, so the Trainer passes no num_items_in_batch and TRL's GKD
loss divides by the sampled completion tokens, as gkd.py does. With TRL's default ChatML collator the batch carries
the dataset completion's labels, and even on-policy steps would be divided by the dataset completion's token count.

Cannot be made identical (GKD):
- sampling: TRL calls HF `model.generate`, gkd.py runs its own KV-cache loop (the same law, softmax(logits / T));
- prompt order: TRL's Trainer shuffles the dataset per epoch (dataloader_drop_last, so every step has 128 prompts),
  gkd.py draws 128 prompts per step without replacement from (seed, step);
- the loss forwards: TRL runs student and teacher over the whole [prompt; completion] rows and keeps [B, L, V]
  logits at every position (the loss is masked to the completion), gkd.py keeps only the completion positions
  (`logits_to_keep`): the same values at a different cost;
- position ids: TRL's loss forwards get none, so left-padded rows are shifted by their padding; gkd.py derives them
  from the attention mask. The tiny models use RoPE, whose attention scores depend on relative positions only, so
  this changes rounding, not the loss;
- gkd.py also decodes every sample and scores it with the verifier (a logged metric, inside its step time);
- lmbda < 1 is not benchmarked: each trainer flips its own coin per step (TRL Python's `random`, gkd.py a draw from
  (seed, step)), so the on/off-policy mix, and the step time with it, would differ from run to run.
---
DPO: dpo_kl.py vs TRL OnlineDPOTrainer (trl.experimental.online_dpo)

Matched: policy tiny-policy, frozen reference = the initial policy; 128 prompts per optimizer step with 2
completions each (`--num_generations 2`; TRL always samples 2); sigmoid DPO loss on sequence log-prob sums,
h = beta * ((lp_w - lr_w) - (lp_l - lr_l)), beta 0.1, no label smoothing (`--loss sigmoid --label_smoothing 0`);
lr 5e-4 (dpo_kl.py's default; TRL's 5e-7 is for real models); log-probs at T = 1; the verifier reward, exact match
of the decoded completion (special tokens skipped) with the answer, given to TRL as a reward function (TRL 1.16's
online DPO takes reward functions or reward models; it has no judge argument), no missing-EOS penalty. TRL
tokenizes prompt text without special tokens, so its prompts are the text after the BOS token string "<s>", which
gives the same token ids as our scripts.

Cannot be made identical (online DPO):
- ties: with 2 samples and a 0/1 reward many prompts tie. dpo_kl.py drops tied prompts and averages the loss over
  the remaining best-vs-worst pairs (`charts/num_pairs`, reported below); TRL keeps every prompt, takes the first
  sample as chosen on a tie (reward first >= second) and averages over all 128, so tied pairs are trained as
  arbitrary preferences and the real pairs weigh less;
- work per step: TRL runs the policy forward with gradient over all 256 samples, dpo_kl.py only over the rows of
  usable pairs; dpo_kl.py adds a no-grad policy forward over all samples for its KL and entropy metrics (TRL takes
  those from its training forward);
- sampling: TRL calls HF `model.generate` on every row with its prompt repeated, dpo_kl.py runs its own KV-cache
  loop (the current version encodes each prompt once for its samples);
- prompt order: TRL's Trainer shuffles per epoch (dataloader_drop_last), dpo_kl.py draws per step from (seed, step);
- position ids: as for GKD, TRL's forwards get none (shifted by the left padding; the same scores under RoPE).
"""

import argparse
import importlib
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.trl_compare import exact_pass_at_1, run

# One set of numbers per algorithm, given to both sides (ours as flags, TRL as its config).
GKD = {"prompts_per_step": 128, "learning_rate": 1e-3, "lmbda": 1.0, "beta": 0.5, "temperature": 1.0}
DPO = {"prompts_per_step": 128, "num_generations": 2, "learning_rate": 5e-4, "beta": 0.1, "temperature": 1.0}
MAX_GRAD_NORM = 1.0

ALGOS = {
    "gkd": {
        "script": "gkd.py",
        "trl_name": "TRL GKDTrainer",
        "trl_module": "gkd",
        "trl_classes": ("GKDConfig", "GKDTrainer"),
    },
    "dpo_kl": {
        "script": "dpo_kl.py",
        "trl_name": "TRL OnlineDPOTrainer",
        "trl_module": "online_dpo",
        "trl_classes": ("OnlineDPOConfig", "OnlineDPOTrainer"),
    },
}


def ours_flags(algo: str, max_new_tokens: int) -> list:
    """The matched settings as flags of algorithms/gkd.py or algorithms/dpo_kl.py (defaults spelled out)."""
    common = [
        "--max_new_tokens",
        str(max_new_tokens),
        "--max_grad_norm",
        str(MAX_GRAD_NORM),
        "--weight_decay",
        "0",
        "--warmup_steps",
        "0",
        "--num_iterations",
        "1",
        "--num_minibatches",
        "1",
    ]
    if algo == "gkd":
        return common + [
            "--prompts_per_step",
            str(GKD["prompts_per_step"]),
            "--learning_rate",
            str(GKD["learning_rate"]),
            "--lmbda",
            str(GKD["lmbda"]),
            "--divergence",
            "jsd",
            "--beta",
            str(GKD["beta"]),
            "--temperature",
            str(GKD["temperature"]),
        ]
    return common + [
        "--prompts_per_step",
        str(DPO["prompts_per_step"]),
        "--num_generations",
        str(DPO["num_generations"]),
        "--learning_rate",
        str(DPO["learning_rate"]),
        "--beta",
        str(DPO["beta"]),
        "--loss",
        "sigmoid",
        "--label_smoothing",
        "0",
        "--divergence",
        "reverse_kl",
        "--temperature",
        str(DPO["temperature"]),
    ]


def trl_classes(algo: str):
    """(Config, Trainer) of the TRL equivalent, from trl.experimental.<module> or the top-level trl; None if absent."""
    names = ALGOS[algo]["trl_classes"]
    for module in (f"trl.experimental.{ALGOS[algo]['trl_module']}", "trl"):
        try:
            m = importlib.import_module(module)
            return tuple(getattr(m, n) for n in names)
        except (ImportError, AttributeError):
            continue
    return None


def trl_worker(algo: str, out: str, steps: int, seed: int) -> None:
    """Runs in its own process: the TRL trainer of `algo`; per-step wall times and sampled completion tokens (EOS
    included) to out/trl.json, the final model to out/final."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from common import TINY_POLICY, TINY_TEACHER
    from common.tasks import load_task

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    os.makedirs(out, exist_ok=True)
    found = trl_classes(algo)
    if found is None:
        with open(os.path.join(out, "trl.json"), "w") as f:
            json.dump(
                {
                    "unavailable": f"the installed TRL ({importlib.metadata.version('trl')}) has no "
                    f"{ALGOS[algo]['trl_classes'][1]}"
                },
                f,
            )
        return
    Config, Trainer = found
    task = load_task("arithmetic")
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(TINY_POLICY, dtype=torch.float32)
    tokens = []  # sampled completion tokens of each step, recorded by the subclasses below

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    common = dict(
        output_dir=out,
        gradient_accumulation_steps=1,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
        dataloader_num_workers=0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    timer = Timer()
    if algo == "gkd":

        class CountingGKD(Trainer):
            def generate_on_policy_outputs(self, model, inputs, generation_config):  # a staticmethod upstream
                ids, mask, labels = Trainer.generate_on_policy_outputs(model, inputs, generation_config)
                tokens.append(int(mask[:, inputs["prompts"].shape[1] :].sum()))
                return ids, mask, labels

        def collate(rows: list) -> dict:
            """Prompts (left-padded) and the dataset completion answer + EOS (right-padded), as gkd.py's dataset
            batches; no `labels`, so the loss is normalized by the sampled completion tokens (see the docstring)."""
            prompts = [tok(r["prompt"])["input_ids"] for r in rows]
            comps = [tok(r["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in rows]
            P, C = max(map(len, prompts)), max(map(len, comps))
            p_ids = torch.tensor([[tok.pad_token_id] * (P - len(p)) + p for p in prompts])
            p_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
            c_ids = torch.tensor([c + [tok.pad_token_id] * (C - len(c)) for c in comps])
            c_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in comps])
            return {
                "prompts": p_ids,
                "prompt_attention_mask": p_mask,
                "input_ids": torch.cat([p_ids, c_ids], 1),
                "attention_mask": torch.cat([p_mask, c_mask], 1),
            }

        cfg = Config(
            **common,
            per_device_train_batch_size=GKD["prompts_per_step"],
            learning_rate=GKD["learning_rate"],
            lmbda=GKD["lmbda"],
            beta=GKD["beta"],
            temperature=GKD["temperature"],
            max_new_tokens=task.max_new_tokens,
            seq_kd=False,
        )
        teacher = AutoModelForCausalLM.from_pretrained(TINY_TEACHER, dtype=torch.float32)
        data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in task.train])
        trainer = CountingGKD(
            model=model,
            teacher_model=teacher,
            args=cfg,
            train_dataset=data,
            processing_class=tok,
            data_collator=collate,
            callbacks=[timer],
        )
    else:

        class CountingDPO(Trainer):
            def _generate(self, model, prompts, images=None):
                out_ = super()._generate(model, prompts, images)
                tokens.append(int(out_[3].sum()))  # completion mask, EOS included
                return out_

        def reward(prompts, completions, answer, **kw):
            return [task.reward_fn(c, a) for c, a in zip(completions, answer)]

        cfg = Config(
            **common,
            per_device_train_batch_size=DPO["prompts_per_step"],
            learning_rate=DPO["learning_rate"],
            beta=DPO["beta"],
            loss_type="sigmoid",
            temperature=DPO["temperature"],
            top_k=0,
            top_p=1.0,
            max_new_tokens=task.max_new_tokens,
            missing_eos_penalty=None,
        )
        # TRL tokenizes the prompt text without special tokens: the BOS string gives our scripts' token ids
        data = Dataset.from_list([{"prompt": tok.bos_token + e.prompt, "answer": e.answer} for e in task.train])
        trainer = CountingDPO(
            model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok, callbacks=[timer]
        )
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    tok.save_pretrained(os.path.join(out, "final"))
    with open(os.path.join(out, "trl.json"), "w") as f:
        json.dump({"step_times": timer.times, "tokens": tokens}, f)


def ours_result(out: str) -> dict:
    """Step times, completion tokens and pairs per step from one of our runs' metrics.jsonl."""
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if x.strip()]
    rows = [r for r in rows if "perf/step_s" in r]
    return {
        "step_times": [r["perf/step_s"] for r in rows],
        "tokens": [r["charts/tokens_per_s"] * r["perf/step_s"] for r in rows],
        "pairs": [r["charts/num_pairs"] for r in rows if "charts/num_pairs" in r],
    }


def settings_notes(algo: str) -> str:
    """The algorithm's "Matched" / "Cannot be made identical" block of this module's docstring."""
    return __doc__.split("\n---\n")[1 + list(ALGOS).index(algo)].strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=3, help="alternating runs per trainer")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every run")
    ap.add_argument("--algos", nargs="+", choices=list(ALGOS), default=list(ALGOS))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--worker", nargs=2, metavar=("ALGO", "DIR"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return trl_worker(a.worker[0], a.worker[1], a.steps, a.seed)

    from common import TINY_POLICY, TINY_TEACHER
    from common.tasks import load_task

    max_new_tokens = load_task("arithmetic").max_new_tokens
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(a.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "TRL_EXPERIMENTAL_SILENCE": "1",
    }
    work = tempfile.mkdtemp(prefix="trl_compare_gkd_dpo_")
    res = {(algo, arm): [] for algo in a.algos for arm in ("ours", "trl")}
    unavailable = {}
    t_all = time.time()
    for rep in range(a.repeats):
        for algo in a.algos:
            for arm in ("ours", "trl"):  # alternate run by run, so that machine drift cancels
                if arm == "trl" and algo in unavailable:
                    continue
                out = os.path.join(work, f"{algo}_{arm}_{rep}")
                if arm == "ours":
                    cmd = [
                        sys.executable,
                        os.path.join(ROOT, "algorithms", ALGOS[algo]["script"]),
                        "--total_steps",
                        str(a.steps),
                        "--eval_every",
                        "0",
                        "--eval_num_prompts",
                        "8",
                        "--output_dir",
                        work,
                        "--run_name",
                        os.path.basename(out),
                        "--seed",
                        str(rep + 1),
                    ]
                    cmd += ours_flags(algo, max_new_tokens)
                else:
                    cmd = [
                        sys.executable,
                        os.path.abspath(__file__),
                        "--worker",
                        algo,
                        out,
                        "--steps",
                        str(a.steps),
                        "--seed",
                        str(rep + 1),
                    ]
                t = time.time()
                rc, err, rss = run(cmd, env)
                if rc != 0:
                    sys.exit(f"error: {algo} {arm} failed:\n{err}")
                if arm == "ours":
                    d = ours_result(out)
                else:
                    d = json.load(open(os.path.join(out, "trl.json")))
                    if "unavailable" in d:
                        unavailable[algo] = d["unavailable"]
                        print(f"{algo} trl: {d['unavailable']}; running our side only", flush=True)
                        continue
                times = d["step_times"]
                res[(algo, arm)].append(
                    {
                        "step_median": statistics.median(times),
                        "tokens_per_s": sum(d["tokens"]) / sum(times),
                        "rss_mb": rss,
                        "pass@1": exact_pass_at_1(os.path.join(out, "final")),
                        "pairs_mean": statistics.mean(d["pairs"]) if d.get("pairs") else None,
                        "wall_s": time.time() - t,
                    }
                )
                print(algo, arm, rep, json.dumps(res[(algo, arm)][-1]), flush=True)

    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "transformers", "trl"))
    lines = [
        f"{a.steps} optimizer steps per run, {a.repeats} alternating runs per trainer, OMP_NUM_THREADS="
        f"{a.threads}, CPU, float32 ({versions}). Wall time of the whole comparison: "
        f"{(time.time() - t_all) / 60:.1f} min.",
        "",
        "| algorithm | trainer | median step time (s) | completion tokens/s | peak RSS (MB) | "
        "exact held-out pass@1 after |",
        "|---|---|---|---|---|---|",
    ]
    med = {k: statistics.median(r["step_median"] for r in rs) for k, rs in res.items() if rs}
    for (algo, arm), rs in res.items():
        name = ALGOS[algo]["script"] if arm == "ours" else ALGOS[algo]["trl_name"]
        if not rs:
            lines.append(f"| {algo} | {name} | no equivalent in this TRL | | | |")
            continue
        lines.append(
            f"| {algo} | {name} | {med[(algo, arm)]:.3f} | "
            f"{statistics.mean(r['tokens_per_s'] for r in rs):.0f} | {max(r['rss_mb'] for r in rs):.0f} | "
            + ", ".join(f"{r['pass@1']:.3f}" for r in rs)
            + " |"
        )
    before = {"policy": exact_pass_at_1(TINY_POLICY)}
    if "gkd" in a.algos:
        before["teacher"] = exact_pass_at_1(TINY_TEACHER)
    lines += [
        "",
        "Exact held-out pass@1 before training: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items()) + ".",
    ]
    for algo in a.algos:
        if algo in unavailable:
            lines += ["", f"{ALGOS[algo]['trl_name']}: {unavailable[algo]}; only {ALGOS[algo]['script']} ran."]
            continue
        lines += [
            "",
            f"Median step time ratio {ALGOS[algo]['script']} / {ALGOS[algo]['trl_name']}: "
            f"**{med[(algo, 'ours')] / med[(algo, 'trl')]:.2f}**",
        ]
        if algo == "dpo_kl":
            pairs = statistics.mean(r["pairs_mean"] for r in res[(algo, "ours")])
            lines.append(
                f"(dpo_kl.py trained on {pairs:.1f} usable pairs per step on average, ties dropped; "
                f"TRL on all {DPO['prompts_per_step']} prompts, ties included)"
            )
    for algo in a.algos:
        lines += ["", "---", "", settings_notes(algo)]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "trl_compare_gkd_dpo.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
