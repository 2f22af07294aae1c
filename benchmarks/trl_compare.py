"""grpo.py side by side with TRL's GRPOTrainer on the same tiny model, prompts and settings, alternating runs.

Same: the shipped tiny policy, the arithmetic training prompts (each trainer draws its own order), 64 prompts x
8 completions per optimizer step, completions of at most 4 tokens at T = 1 with the full
vocabulary, lr 5e-4 constant, beta 0.04 with the k3 estimator, clip 0.2, one optimizer step per generation
(no old-policy forward), loss seq-mean-token-mean (TRL `loss_type="grpo"`), group-std advantage scaling, grad
clip 1.0, float32 on CPU. Cannot be made identical: TRL generates with `model.generate` (HF generation loop),
grpo.py with its own KV-cache loop; TRL draws its prompts with its own sampler; TRL has no held-out evaluation,
so both final models are scored by the same exact held-out pass@1 (P(answer + EOS) at T = 1, no sampling).
Step time: grpo.py's `charts/step_time_s` (sampling to optimizer step, without eval); TRL's time between
`on_step_begin` and `on_step_end` (generation happens inside the step). Peak RSS: the process's max RSS.

    pip install -r requirements-bench.txt
    python benchmarks/trl_compare.py --steps 30 --repeats 2      # writes benchmarks/results/trl_compare.md

Arms, alternated within each repeat: grpo.py (default: shared prompt KV cache), grpo.py --no_prompt_cache (every
row runs its whole prompt: the implementation before the cache), TRL, and a bare floor (`bare_worker`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def exact_pass_at_1(model_path: str, n: int = 500) -> float:
    """Mean over held-out prompts of P(answer followed by EOS) under the model at T = 1 (no sampling noise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.tasks import load_task

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).double().eval()
    total = 0.0
    with torch.no_grad():
        for ex in load_task("arithmetic").eval[:n]:
            p = tok(ex.prompt)["input_ids"]
            y = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            lp = torch.log_softmax(model(torch.tensor([p + y])).logits[0, len(p) - 1: -1], -1)
            total += lp[torch.arange(len(y)), torch.tensor(y)].sum().exp().item()
    return total / n


def trl_worker(out: str, steps: int, seed: int) -> None:
    """Runs in its own process: TRL GRPOTrainer, per-step wall times and completion lengths to out/trl.json."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common import TINY_POLICY
    from common.rewards import exact_match_reward
    from common.tasks import load_task

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    task = load_task("arithmetic")
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in task.train])

    def reward(prompts, completions, answer, **kw):
        return [exact_match_reward(c, a) for c, a in zip(completions, answer)]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0, self.logs = [], None, []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append(dict(logs or {}))

    cfg = GRPOConfig(output_dir=out, per_device_train_batch_size=512, gradient_accumulation_steps=1,
                     num_generations=8, steps_per_generation=1, num_iterations=1, max_completion_length=4,
                     learning_rate=5e-4, lr_scheduler_type="constant", weight_decay=0.0,
                     beta=0.04, epsilon=0.2, loss_type="grpo", scale_rewards="group", max_grad_norm=1.0,
                     temperature=1.0, top_p=1.0, top_k=0, max_steps=steps, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, seed=seed, dataloader_num_workers=0,
                     disable_tqdm=True)
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(TINY_POLICY)
    timer = Timer()
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok,
                          callbacks=[timer])
    trainer.train()
    trainer.save_model(os.path.join(out, "final"))
    tok.save_pretrained(os.path.join(out, "final"))
    lengths = [g["completions/mean_length"] for g in timer.logs if "completions/mean_length" in g]
    rewards = [g["reward"] for g in timer.logs if "reward" in g]
    with open(os.path.join(out, "trl.json"), "w") as f:
        json.dump({"step_times": timer.times, "mean_lengths": lengths, "rewards": rewards}, f)


def bare_worker(out: str, steps: int, seed: int) -> None:
    """Runs in its own process: the floor of one grpo.py step on the same tokens, without RL machinery (no
    reference forward, no loss terms, no optimizer): per step, 64 fresh prompts x 8 samples are
      naive:  HF `model.generate` (sampling at T = 1, full vocabulary) + one forward/backward over the full rows;
      same:   grpo.py's own `sample_batch` + forward/backward (prompt cache on, as grpo.py by default).
    Writes the per-step times of both to out/bare.json."""
    import importlib.util

    import torch

    from common import TINY_POLICY
    from common.tasks import load_task

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    spec = importlib.util.spec_from_file_location("grpo", os.path.join(ROOT, "algorithms", "grpo.py"))
    grpo = importlib.util.module_from_spec(spec)
    sys.modules["grpo"] = grpo
    spec.loader.exec_module(grpo)
    task = load_task("arithmetic")
    tok = grpo.load_tokenizer(TINY_POLICY)
    model = grpo.load_model(TINY_POLICY, "cpu", trainable=True)
    args = grpo.Args(max_new_tokens=task.max_new_tokens)
    eos = torch.tensor([tok.eos_token_id])
    gen = torch.Generator().manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    ctx = grpo.contextlib.nullcontext
    times = {"naive": [], "same": []}

    def fwd_bwd(batch, cached):
        lsm = grpo.completion_log_softmax(model, batch, torch.arange(batch["completion_ids"].shape[0]), 1.0, cached)
        (grpo.token_logprobs(lsm, batch["completion_ids"]) * batch["completion_mask"]).sum().backward()
        model.zero_grad(set_to_none=True)

    for step in range(steps):
        idx = torch.randperm(len(task.train), generator=rng)[:64].tolist()
        prompts = [tok(task.train[i].prompt)["input_ids"] for i in idx for _ in range(8)]
        t0 = time.perf_counter()  # naive: HF generate on every row, then the full rows
        ids, mask = grpo.left_pad(prompts, tok.pad_token_id, "cpu")
        model.eval()
        with torch.no_grad():
            seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=args.max_new_tokens, pad_token_id=tok.pad_token_id)
        model.train()
        comp = seqs[:, ids.shape[1]:]
        batch = {"input_ids": seqs, "attention_mask": torch.cat([mask, torch.ones_like(comp)], 1),
                 "completion_ids": comp, "completion_mask": grpo.completion_mask_from(comp, eos)}
        fwd_bwd(batch, False)
        t1 = time.perf_counter()  # same: grpo.py's sampler and log-prob path
        batch = grpo.sample_batch(model, prompts, args, eos, tok.pad_token_id, gen, "cpu", ctx)
        fwd_bwd(batch, True)
        t2 = time.perf_counter()
        times["naive"].append(t1 - t0)
        times["same"].append(t2 - t1)
    with open(os.path.join(out, "bare.json"), "w") as f:
        json.dump(times, f)


def run(cmd: list, env: dict) -> tuple:
    """(return code, stderr tail, peak RSS in MB) of a child process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err[-3000:], usage.ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for both")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bare", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return trl_worker(a.worker, a.steps, a.seed)
    if a.bare:
        return bare_worker(a.bare, a.steps, a.seed)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = tempfile.mkdtemp(prefix="trl_compare_")
    grpo_py = [sys.executable, os.path.join(ROOT, "algorithms", "grpo.py"), "--total_steps", str(a.steps),
               "--eval_every", "0", "--eval_num_prompts", "8", "--output_dir", work]
    arms = {"grpo.py": [], "grpo.py --no_prompt_cache": ["--no_prompt_cache"], "TRL GRPOTrainer": None}
    res = {n: [] for n in arms}
    bare = {"naive": [], "same": []}
    parts = ("generate", "logprob", "forward_backward", "optimizer")
    for rep in range(a.repeats):
        for name, extra in arms.items():  # alternate run by run, so that machine drift cancels
            out = os.path.join(work, f"{name.split()[0]}{len(extra or [])}_{rep}")
            if extra is not None:
                cmd = grpo_py + ["--run_name", os.path.basename(out), "--seed", str(rep + 1)] + extra
            else:
                cmd = [sys.executable, __file__, "--worker", out, "--steps", str(a.steps), "--seed", str(rep + 1)]
            t = time.time()
            rc, err, rss = run(cmd, env)
            if rc != 0:
                sys.exit(f"error: {name} failed:\n{err}")
            if extra is not None:
                rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if x.strip()]
                rows = [r for r in rows if "charts/step_time_s" in r]
                times = [r["charts/step_time_s"] for r in rows]
                tokens = [r["charts/completion_len_mean"] * 512 for r in rows]
                breakdown = {k: statistics.median(r[f"perf/{k}_s"] for r in rows) for k in parts}
            else:
                d = json.load(open(os.path.join(out, "trl.json")))
                times, tokens, breakdown = d["step_times"], [m * 512 for m in d["mean_lengths"]], {}
            res[name].append({"step_median": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
                              "rss_mb": rss, "pass@1": exact_pass_at_1(os.path.join(out, "final")),
                              "wall_s": time.time() - t, "breakdown": breakdown})
            print(name, rep, json.dumps(res[name][-1]), flush=True)
        out = os.path.join(work, f"bare_{rep}")
        os.makedirs(out, exist_ok=True)
        rc, err, _ = run([sys.executable, __file__, "--bare", out, "--steps", str(a.steps), "--seed", str(rep + 1)],
                         env)
        if rc != 0:
            sys.exit(f"error: bare failed:\n{err}")
        d = json.load(open(os.path.join(out, "bare.json")))
        for k in bare:
            bare[k].append(statistics.median(d[k]))
        print("bare", rep, {k: v[-1] for k, v in bare.items()}, flush=True)
    med = {n: statistics.median(r["step_median"] for r in rs) for n, rs in res.items()}
    lines = [f"{a.steps} optimizer steps of 64 prompts x 8 completions, {a.repeats} alternating runs each, "
             f"OMP_NUM_THREADS={a.threads}, CPU.", "",
             "| trainer | median step time (s) | completion tokens/s | peak RSS (MB) | exact held-out pass@1 after |",
             "|---|---|---|---|---|"]
    for n, rs in res.items():
        lines.append(f"| {n} | {med[n]:.3f} | {statistics.mean(r['tokens_per_s'] for r in rs):.0f} | "
                     f"{max(r['rss_mb'] for r in rs):.0f} | "
                     + ", ".join(f"{r['pass@1']:.3f}" for r in rs) + " |")
    trl, mine = med["TRL GRPOTrainer"], med["grpo.py"]
    naive, same = statistics.median(bare["naive"]), statistics.median(bare["same"])
    lines += ["", f"Median step time ratio grpo.py / TRL: **{mine / trl:.2f}** "
              f"(with --no_prompt_cache: {med['grpo.py --no_prompt_cache'] / trl:.2f})", "",
              "Bare generate + forward/backward of the same tokens (no reference forward, no loss terms, no optimizer; "
              "median s per step): naive (HF `generate` + full-row forward/backward) "
              f"{naive:.3f}, grpo.py's own sampler and prompt-cached forward {same:.3f}. grpo.py's step / bare: "
              f"**{mine / naive:.2f}** (naive), **{mine / same:.2f}** (same implementation).", "",
              "Step breakdown (median s):", "",
              "| run | generate | reference/old log-probs | forward+backward | optimizer | other | step |",
              "|---|---|---|---|---|---|---|"]
    for n in ("grpo.py", "grpo.py --no_prompt_cache"):
        b = {k: statistics.median(r["breakdown"][k] for r in res[n]) for k in parts}
        lines.append(f"| {n} | " + " | ".join(f"{b[k]:.3f}" for k in parts)
                     + f" | {med[n] - sum(b.values()):.3f} | {med[n]:.3f} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "trl_compare.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
