"""Peak memory of algorithms/gkd.py's update at Qwen's 151,936-token vocabulary on CPU: the full-vocabulary teacher
against --teacher_top_k K (the teacher's top K and a tail bucket), and the other levers beside them (--update pg,
--divergence_chunk_size), on the same batch.

The model is benchmarks/gpu_check.py's Qwen2-family builder with the 151,936-token vocabulary and the 2-layer,
64-wide body of its --tiny mode (random weights; it is both student and teacher), so the [batch, tokens, vocabulary]
tensors of the loss dominate the memory as they do on real models. The task is gpu_check's 12-shot arithmetic JSONL;
a random model's completions run to --max_new_tokens, so every configuration trains on the same widths. Each
configuration runs in a fresh process (same seed, so the same samples); its peak RSS is read from
getrusage(RUSAGE_CHILDREN) by a wrapper process that runs nothing else.

    python benchmarks/gkd_top_k_memory.py                 # writes benchmarks/results/gkd_top_k_memory.md
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
VOCAB = 151936
WRAPPER = (  # runs the command, then prints the peak RSS of its process tree (only child: the command) in KiB
    "import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)"
)
CONFIGS = [  # (name, extra flags)
    ("full teacher (default jsd)", []),
    ("--teacher_top_k 64", ["--teacher_top_k", "64"]),
    ("--divergence_chunk_size 8", ["--divergence_chunk_size", "8"]),
    ("--update pg", ["--update", "pg"]),
]


def run(name: str, extra: list, model: str, train: str, held: str, a, out: str, index: int) -> dict:
    flags = [
        *("--model_name_or_path", model, "--teacher_name_or_path", model, "--task", "jsonl"),
        *("--train_file", train, "--eval_file", held, "--max_prompt_length", "256"),
        *("--max_new_tokens", str(a.max_new_tokens), "--prompts_per_step", str(a.batch)),
        *("--micro_batch_size", str(a.batch), "--gen_batch_size", str(a.batch), "--total_steps", str(a.steps)),
        *("--eval_every", "0", "--eval_num_prompts", "2", "--eval_samples_per_prompt", "1", "--no_eval_kl"),
        *("--no_eval_teacher", "--no_cuda", "--bf16", "False", "--learning_rate", "1e-6"),
        *("--output_dir", out, "--run_name", str(index)),
    ]
    command = [sys.executable, os.path.join(ROOT, "algorithms", "gkd.py"), *flags, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *command], env=env, capture_output=True, text=True)
    rss_kib, code = map(int, proc.stdout.split()[-2:])
    if code:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, str(index), "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [r for r in rows if "perf/update_s" in r]
    return {
        "config": name,
        "peak_rss_gb": rss_kib / 2**20,
        "update_s": statistics.median(r["perf/update_s"] for r in steps),
        "completion_len": statistics.mean(r["charts/completion_len_mean"] for r in steps),
        "loss": steps[0]["losses/loss"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="prompts per step = micro-batch size")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gkd_top_k_memory.md"))
    a = ap.parse_args()
    from benchmarks.gpu_check import build_model, write_data

    work = tempfile.mkdtemp(prefix="gkd_top_k_")
    try:
        model = os.path.join(work, "model")
        build_model(model, tiny=True, vocab_size=VOCAB)
        train, held, _ = write_data(work)
        results = []
        for index, (name, extra) in enumerate(CONFIGS):
            results.append(run(name, extra, model, train, held, a, os.path.join(work, "runs"), index))
            print(json.dumps(results[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = a.batch * a.max_new_tokens * VOCAB * 4 / 2**30
    lines = [
        "# gkd.py: peak memory of the teacher's top K against the full teacher (CPU, 151,936-token vocabulary)",
        "",
        f"`python benchmarks/gkd_top_k_memory.py --batch {a.batch} --max_new_tokens {a.max_new_tokens} "
        f"--steps {a.steps}`: {a.batch} prompts per step in one micro-batch, completions of {a.max_new_tokens} "
        f"tokens, a 2-layer 64-wide Qwen2 model with the 151,936-token vocabulary as student and teacher. One "
        f"[batch, tokens, vocabulary] float32 tensor is {one:.2f} GiB.",
        "",
        "| configuration | peak RSS (GiB) | update s (median) | completion tokens | loss at step 1 |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        row = f"| {r['config']} | {r['peak_rss_gb']:.2f} | {r['update_s']:.2f} | {r['completion_len']:.1f} |"
        lines.append(f"{row} {r['loss']:.4g} |")
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
