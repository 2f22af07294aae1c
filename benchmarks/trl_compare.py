"""grpo.py side by side with TRL's GRPOTrainer on the same model, prompts and settings, alternating runs, at two
shapes, plus the per-phase time of grpo.py's step.

tiny:      the shipped tiny policy on the arithmetic task, 64 prompts x 8 completions of at most 4 tokens.
realistic: a Llama of ~5M parameters built from a config (random weights, the shipped character tokenizer),
           12-shot arithmetic prompts of ~120 tokens, completions of up to 256 tokens (a random model stops at
           ~100 on average), 16 prompts x 8.
Same in both trainers: lr 5e-4 constant, beta 0.04 with k3, clip 0.2, one optimizer step per generation, loss
seq-mean-token-mean, group-std advantages, grad clip 1.0, T = 1 with the full vocabulary, float32 on CPU, no
gradient checkpointing (on by default in TRL's GRPOConfig: it saves TRL memory and costs it time). Cannot be
made identical: TRL generates with `model.generate`, grpo.py with its own KV-cache loop; each draws its own prompts.
Step time: grpo.py's `perf/step_s` (sampling to optimizer step, no eval); TRL's time between `on_step_begin` and
`on_step_end`. The median is over steps 2.. (step 1 pays one-time costs).

    pip install -r requirements-bench.txt
    python benchmarks/trl_compare.py --shape both --repeats 2       # writes benchmarks/results/trl_compare.md

`--phases`: grpo.py alone at the realistic shape, per phase (sampling, reference log-probs, update), for this
grpo.py and any other version given with --script (e.g. an older commit's file), with and without the prompt KV
cache in the teacher-forced forwards and with EOS suppressed (every completion 256 tokens).
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
SHAPES = {  # prompts per step, completions per prompt, max new tokens, steps
    "tiny": {"prompts": 64, "G": 8, "max_new_tokens": 4, "steps": 30},
    "realistic": {"prompts": 16, "G": 8, "max_new_tokens": 256, "steps": 4},
}


def realistic_setup(work: str) -> tuple:
    """(model folder, train JSONL, eval JSONL) of the realistic shape, built once per benchmark run."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from common import TINY_POLICY
    from common.tasks import load_task

    model_dir = os.path.join(work, "llama5m")
    if not os.path.isdir(model_dir):
        tok = AutoTokenizer.from_pretrained(TINY_POLICY)
        cfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    task = load_task("arithmetic")
    shots = "".join(f"{e.prompt}{e.answer}\n" for e in task.train[:12])
    for name, examples in (("train", task.train[12:2012]), ("eval", task.eval[:64])):
        with open(os.path.join(work, f"{name}.jsonl"), "w") as f:
            for e in examples:
                f.write(json.dumps({"prompt": shots + e.prompt, "answer": e.answer}) + "\n")
    return model_dir, os.path.join(work, "train.jsonl"), os.path.join(work, "eval.jsonl")


def grpo_flags(shape: str, work: str, steps: int) -> list:
    s = SHAPES[shape]
    flags = [
        "--total_steps",
        str(steps),
        "--eval_every",
        "0",
        "--eval_num_prompts",
        "8",
        "--eval_samples_per_prompt",
        "1",
        "--prompts_per_step",
        str(s["prompts"]),
        "--num_generations",
        str(s["G"]),
        "--output_dir",
        work,
    ]
    if shape == "realistic":
        model, train, held = realistic_setup(work)
        flags += [
            "--model_name_or_path",
            model,
            "--task",
            "jsonl",
            "--train_file",
            train,
            "--eval_file",
            held,
            "--max_prompt_length",
            "160",
            "--max_new_tokens",
            str(s["max_new_tokens"]),
        ]
    return flags


def trl_worker(out: str, shape: str, steps: int, seed: int, work: str) -> None:
    """In its own process: TRL GRPOTrainer, per-step wall times and completion lengths to out/trl.json."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common import TINY_POLICY
    from common.rewards import exact_match_reward
    from common.tasks import load_jsonl, load_task

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    s = SHAPES[shape]
    if shape == "realistic":
        model_path, train, _ = realistic_setup(work)
        examples = load_jsonl(train, "prompt", "answer")
    else:
        model_path, examples = TINY_POLICY, load_task("arithmetic").train
    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in examples])

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

    n = s["prompts"] * s["G"]
    cfg = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=s["G"],
        steps_per_generation=1,
        num_iterations=1,
        max_completion_length=s["max_new_tokens"],
        learning_rate=5e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        beta=0.04,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        max_steps=steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,  # TRL's GRPOConfig turns it on by default; grpo.py's default is off
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    timer = Timer()
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path),
        reward_funcs=reward,
        args=cfg,
        train_dataset=data,
        processing_class=tok,
        callbacks=[timer],
    )
    trainer.train()
    lengths = [g["completions/mean_length"] for g in timer.logs if "completions/mean_length" in g]
    with open(os.path.join(out, "trl.json"), "w") as f:
        json.dump({"step_times": timer.times, "mean_lengths": lengths}, f)


def phase_worker(out: str, script: str, flags: list, full_rows: bool, no_eos: bool) -> None:
    """In its own process: one script's main() with its sampling, log-prob and update functions timed per call
    (wrapped by name, so any version of grpo.py works). full_rows: teacher-forced forwards without the prompt KV
    cache; no_eos: completions never stop before max_new_tokens."""
    import importlib.util

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    spec = importlib.util.spec_from_file_location("script", script)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["script"] = mod
    spec.loader.exec_module(mod)
    times = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            result = fn(*a, **k)
            times.setdefault(name, []).append(time.perf_counter() - t)
            return result

        return wrapper

    if no_eos:  # nothing counts as EOS: every completion runs to max_new_tokens
        sample = mod.sample_batch
        mod.sample_batch = lambda model, prompts, args, eos, *a, **k: sample(model, prompts, args, eos * 0 - 1, *a, **k)
    if full_rows:
        cls = mod.completion_log_softmax
        mod.completion_log_softmax = lambda model, batch, rows, temperature, cached=True: cls(
            model, batch, rows, temperature, False
        )
    for name in ("sample_batch", "batched_logprobs", "update_policy"):
        setattr(mod, name, timed(name, getattr(mod, name)))
    sys.argv = ["script", *flags]
    try:
        mod.main()
    except SystemExit as e:
        if e.code:
            raise
    with open(os.path.join(out, "phases.json"), "w") as f:
        json.dump(times, f)


def run(cmd: list, env: dict) -> tuple:
    """(return code, stderr tail, peak RSS in MB) of a child process."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    return os.waitstatus_to_exitcode(status), err[-3000:], usage.ru_maxrss / 1024


def compare(shape: str, a, env: dict, work: str) -> list:
    """grpo.py vs TRL at one shape, alternating; returns markdown lines."""
    s, res = SHAPES[shape], {"grpo.py": [], "TRL GRPOTrainer": []}
    steps = a.steps or s["steps"]
    for rep in range(a.repeats):
        for name in res:
            out = os.path.join(work, f"{shape}_{name.split()[0]}_{rep}")
            if name == "grpo.py":
                cmd = [
                    sys.executable,
                    os.path.join(ROOT, "algorithms", "grpo.py"),
                    *grpo_flags(shape, work, steps),
                    "--run_name",
                    os.path.basename(out),
                    "--seed",
                    str(rep + 1),
                ]
            else:
                os.makedirs(out, exist_ok=True)
                cmd = [
                    sys.executable,
                    __file__,
                    "--trl_worker",
                    out,
                    "--shape",
                    shape,
                    "--steps",
                    str(steps),
                    "--seed",
                    str(rep + 1),
                    "--work",
                    work,
                ]
            rc, err, rss = run(cmd, env)
            if rc != 0:
                sys.exit(f"error: {name} failed:\n{err}")
            if name == "grpo.py":
                rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if x.strip()]
                rows = [r for r in rows if "perf/step_s" in r]
                times, lengths = [r["perf/step_s"] for r in rows], [r["charts/completion_len_mean"] for r in rows]
            else:
                d = json.load(open(os.path.join(out, "trl.json")))
                times, lengths = d["step_times"], d["mean_lengths"]
            n = s["prompts"] * s["G"]
            res[name].append(
                {
                    "step": statistics.median(times[1:]),
                    "len": statistics.mean(lengths),
                    "tokens_per_s": sum(x * n for x in lengths[1:]) / sum(times[1:]),
                    "rss": rss,
                }
            )
            print(shape, name, rep, json.dumps(res[name][-1]), flush=True)
    med = {n: statistics.median(r["step"] for r in rs) for n, rs in res.items()}
    lines = [
        f"### {shape}: {s['prompts']} prompts x {s['G']} completions of at most {s['max_new_tokens']} tokens, "
        f"{steps} steps, {a.repeats} alternating runs each",
        "",
        "| trainer | median step time (s) | mean completion length | completion tokens/s | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for n, rs in res.items():
        lines.append(
            f"| {n} | {med[n]:.3f} | {statistics.mean(r['len'] for r in rs):.1f} | "
            f"{statistics.mean(r['tokens_per_s'] for r in rs):.0f} | {max(r['rss'] for r in rs):.0f} |"
        )
    lines += ["", f"Median step time ratio grpo.py / TRL: **{med['grpo.py'] / med['TRL GRPOTrainer']:.2f}**", ""]
    return lines


def phases(a, env: dict, work: str) -> list:
    """Per-phase medians of grpo.py (this one and --script) at the realistic shape; markdown lines."""
    arms = {"grpo.py": (os.path.join(ROOT, "algorithms", "grpo.py"), False, False)}
    if a.script:
        arms[f"{a.script} (older)"] = (a.script, False, False)
    arms["grpo.py, EOS suppressed"] = (arms["grpo.py"][0], False, True)
    arms["grpo.py, EOS suppressed, full rows"] = (arms["grpo.py"][0], True, True)
    lines = [
        "### grpo.py per phase, realistic shape (median s over steps 2..)",
        "",
        "| version | sampling | reference log-probs | update | step | mean completion length |",
        "|---|---|---|---|---|---|",
    ]
    for name, (script, full_rows, no_eos) in arms.items():
        out = os.path.join(work, "phases_" + name.replace(" ", "_").replace("/", "_").replace(",", ""))
        os.makedirs(out, exist_ok=True)
        flags = grpo_flags("realistic", work, a.steps or SHAPES["realistic"]["steps"]) + ["--run_name", "r"]
        flags[flags.index("--output_dir") + 1] = out
        cmd = [sys.executable, __file__, "--phase_worker", out, "--script", script, "--work", work]
        cmd += ["--full_rows"] * full_rows + ["--no_eos"] * no_eos + ["--", *flags]
        rc, err, _ = run(cmd, env)
        if rc != 0:
            sys.exit(f"error: {name} failed:\n{err}")
        t = json.load(open(os.path.join(out, "phases.json")))
        rows = [json.loads(x) for x in open(os.path.join(out, "r", "metrics.jsonl")) if x.strip()]
        steps = [r for r in rows if "charts/completion_len_mean" in r]
        step_key = "perf/step_s" if "perf/step_s" in steps[0] else "charts/step_time_s"
        train_samples = t["sample_batch"][1:-1]  # the first call is the step-0 eval, the last the final eval
        med = lambda xs: statistics.median(xs[1:]) if len(xs) > 1 else xs[0]  # noqa: E731
        lines.append(
            f"| {name} | {med(train_samples):.2f} | {med(t['batched_logprobs']):.2f} | "
            f"{med(t['update_policy']):.2f} | {med([r[step_key] for r in steps]):.2f} | "
            f"{statistics.mean(r['charts/completion_len_mean'] for r in steps):.1f} |"
        )
        print(lines[-1], flush=True)
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["tiny", "realistic", "both"], default="both")
    ap.add_argument("--steps", type=int, default=0, help="steps per run (default: 30 tiny, 4 realistic)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--phases", action="store_true", help="grpo.py per phase at the realistic shape instead")
    ap.add_argument("--script", default=None, help="--phases: also time this version of grpo.py")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS for every run")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--phase_worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--full_rows", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--no_eos", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.trl_worker:
        return trl_worker(a.trl_worker, a.shape, a.steps, a.seed, a.work)
    if a.phase_worker:
        return phase_worker(a.phase_worker, a.script, a.rest, a.full_rows, a.no_eos)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    work = tempfile.mkdtemp(prefix="trl_compare_")
    if a.phases:
        lines = phases(a, env, work)
        name = "phases.md"
    else:
        lines = [f"grpo.py vs TRL GRPOTrainer, OMP_NUM_THREADS={a.threads}, CPU.", ""]
        for shape in ("tiny", "realistic") if a.shape == "both" else (a.shape,):
            lines += compare(shape, a, env, work)
        name = "trl_compare.md"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, name), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
