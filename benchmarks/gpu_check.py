"""One command that checks the real-model path of all eight scripts on a GPU, in at most ~8 minutes.

It builds a Qwen2.5-0.5B-shaped model from a config (random weights, no download) with a tokenizer built here
(single characters padded to Qwen's 151,936-token vocabulary, plus its chat template), writes 12-shot
arithmetic prompts (~120 tokens), runs each script for a few steps with the real-model flags (bf16, gradient
checkpointing, completions of up to 256 tokens), then TRL's GRPOTrainer on the same model and batch when TRL is
installed, and with two or more GPUs grpo.py under `torchrun --nproc_per_node=2` (FSDP2). Per run: median step
time, generated tokens/s, peak GPU memory (`perf/max_memory_gb`, from torch.cuda.max_memory_allocated), and
whether the loss and the logged KL are finite. Writes `table.md` and `results.json` to --out.

    python benchmarks/gpu_check.py                       # on a GPU machine: results in benchmarks/results/gpu_check/
    python benchmarks/gpu_check.py --device cpu --tiny   # the same steps on CPU with a 2-layer model (~75 s)
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPTS = ["grpo", "rpg_fkl", "rpg_rkl", "pmd_mean", "a_star_po", "dpo_kl", "gkd", "q_sharp"]
CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_model(path: str, tiny: bool, vocab_size: int = 0) -> None:
    """A Qwen2.5-0.5B-shaped Qwen2 model with random weights and a local tokenizer of the same vocabulary size;
    --tiny: a 2-layer one of the same family (seconds on CPU); vocab_size > 0: that vocabulary instead (tiny with
    151936: Qwen's vocabulary on a 2-layer, 64-wide model, for CPU memory measurements)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n", "\t"]
    vocab_size = vocab_size or (512 if tiny else 151936)
    names = specials + chars + [f"<x{i}>" for i in range(vocab_size - len(specials) - len(chars))]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(names)}, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token="<unk>", padding_side="left"
    )
    tok.chat_template = CHAT
    shape = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
        if tiny
        else dict(
            hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2
        )
    )
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=1e6,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **shape,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def write_data(work: str, max_new_tokens: int = 256) -> tuple:
    """12-shot arithmetic prompts (~120 tokens) as JSONL train / eval files, and offline DPO pairs of ~200-token
    completions, shorter when --max_new_tokens is (a random-weight model's own samples all score 0: online DPO finds
    no pair to train on)."""
    from common.tasks import load_task

    task = load_task("arithmetic")
    shots = "".join(f"{e.prompt}{e.answer}\n" for e in task.train[:12])
    paths = []
    for name, examples in (("train", task.train[12:1012]), ("eval", task.eval[:32])):
        paths.append(os.path.join(work, f"{name}.jsonl"))
        with open(paths[-1], "w") as f:
            f.writelines(json.dumps({"prompt": shots + e.prompt, "answer": e.answer}) + "\n" for e in examples)
    paths.append(os.path.join(work, "pairs.jsonl"))
    repeats = min(3, max_new_tokens // 64 - 1)  # ~50 tokens each
    work_text = "Add the ones, carry the tens, then add the tens and the carry. " * max(repeats, 0)
    with open(paths[-1], "w") as f:
        for e in task.train[12:268]:
            row = {"prompt": shots + e.prompt, "chosen": work_text + e.answer, "rejected": work_text + e.answer + "1"}
            f.write(json.dumps(row) + "\n")
    return tuple(paths)


def flags(script: str, model: str, train: str, held: str, a, out: str, run_name: str) -> list:
    """The real-model flags of one script, sized for a few steps."""
    common = [
        "--model_name_or_path",
        model,
        "--task",
        "jsonl",
        "--train_file",
        train,
        "--eval_file",
        held,
        "--max_prompt_length",
        "256",
        "--max_new_tokens",
        str(a.max_new_tokens),
        "--eval_num_prompts",
        "8",
        "--eval_samples_per_prompt",
        "1",
        "--eval_every",
        "0",
        "--output_dir",
        out,
        "--run_name",
        run_name,
        "--micro_batch_size",
        "8",
        "--gen_batch_size",
        "64",
        "--gradient_checkpointing",
        "--bf16",
        "True",
        "--learning_rate",
        "1e-6",
        "--total_steps",
        str(a.steps),
    ]
    if a.device == "cpu":
        common += ["--no_cuda", "--bf16", "False"]
    per_script = {
        "q_sharp": [
            "--prompts_per_step",
            "8",
            "--samples_per_prompt",
            "2",
            "--epochs_per_round",
            "1",
            "--q_batch_size",
            "16",
            "--eval_etas",
            "0.1",
            "--total_steps",
            "1",
            "--top_k",
            "20",
        ],
        # (the default Q-type head: the V-type head scores every vocabulary token as a candidate at each decoded
        # token, 151,936 for Qwen, which only a small vocabulary affords)
        "a_star_po": [
            "--prompts_per_step",
            "16",
            "--max_train_prompts",
            "32",
            "--num_ref_samples",
            "2",
            "--num_minibatches",
            "1",
        ],
        "gkd": ["--prompts_per_step", "16", "--teacher_name_or_path", model],
    }
    return common + per_script.get(
        script, ["--prompts_per_step", "8", "--num_generations", "4", "--num_minibatches", "1"]
    )


def summarize(run_dir: str) -> dict:
    rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if x.strip()]
    steps = [r for r in rows if "perf/step_s" in r]
    losses = [r[k] for r in steps for k in ("losses/loss", "losses/q_loss") if k in r]  # none: no update ran
    kls = [v for r in rows for k, v in r.items() if "kl_" in k and isinstance(v, float)]
    times = [r["perf/step_s"] for r in steps]
    init = [r["eval/kl_init_rkl_exact_seq"] for r in rows if r["step"] == 0 and "eval/kl_init_rkl_exact_seq" in r]
    return {
        "kl_step0": init[0] if init else None,  # policy = initial model: 0 up to rounding (same precision path)
        "step_s": statistics.median(times[1:] or times),
        "tokens_per_s": statistics.median(r["charts/tokens_per_s"] for r in steps),
        "max_memory_gb": max((r.get("perf/max_memory_gb", 0) for r in steps), default=0),
        "loss_finite": all(math.isfinite(x) for x in losses) if losses else "no update",
        "kl_finite": bool(kls) and all(math.isfinite(x) for x in kls),
    }


def trl_run(model: str, train: str, a, out: str) -> dict:
    """TRL GRPOTrainer on the same model, prompts and batch (8 prompts x 4, the same max length)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from common.rewards import math_reward
    from common.tasks import load_jsonl

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *args, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, *args, **kw):
            times.append(time.perf_counter() - self.t0)

    data = Dataset.from_list([{"prompt": e.prompt, "answer": e.answer} for e in load_jsonl(train, "prompt", "answer")])
    cfg = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=32,
        num_generations=4,
        steps_per_generation=1,
        max_completion_length=a.max_new_tokens,
        learning_rate=1e-6,
        beta=0.04,
        max_steps=a.steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=a.device == "cuda",
        use_cpu=a.device == "cpu",
        gradient_checkpointing=True,
        disable_tqdm=True,
        top_k=0,
        top_p=1.0,
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model),
        args=cfg,
        train_dataset=data,
        reward_funcs=lambda completions, answer, **kw: [math_reward(c, x) for c, x in zip(completions, answer)],
        processing_class=AutoTokenizer.from_pretrained(model),
        callbacks=[Timer()],
    )
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    memory = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else 0.0
    return {"step_s": statistics.median(times[1:] or times), "max_memory_gb": memory}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model of the same family (the CPU smoke mode)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--scripts", nargs="*", default=SCRIPTS)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpu_check"))
    ap.add_argument("--trl_worker", default=None, help=argparse.SUPPRESS)  # the parent's work folder
    a = ap.parse_args()
    if a.trl_worker:  # TRL in its own process, on the parent's model and data (built once)
        w = a.trl_worker
        return print(json.dumps(trl_run(os.path.join(w, "model"), os.path.join(w, "train.jsonl"), a, w + "/trl")))
    work = tempfile.mkdtemp(prefix="gpu_check_")
    try:
        check(a, work)
    finally:  # each run's checkpoint of a 0.5B model is ~6 GB (weights + AdamW): nothing is left on the disk
        shutil.rmtree(work, ignore_errors=True)


def check(a, work: str) -> None:
    model = os.path.join(work, "model")
    build_model(model, a.tiny)
    train, held, pairs = write_data(work, a.max_new_tokens)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    one_gpu = env if a.device == "cpu" else {**env, "CUDA_VISIBLE_DEVICES": "0"}  # (HF Trainer: no DataParallel)
    results, t_all = {}, time.time()
    runs = [(s, s, 1, []) for s in a.scripts]  # (name, script, processes, extra flags)
    if "dpo_kl" in a.scripts:
        runs.append(("dpo_kl offline pairs", "dpo_kl", 1, ["--pairs_path", pairs]))
    import torch

    if a.device == "cuda" and torch.cuda.device_count() >= 2:
        runs.append(("grpo x2 (FSDP2)", "grpo", 2, []))
    for name, script, nproc, extra in runs:
        run_name = "".join(c if c.isalnum() else "_" for c in name)
        launcher = (
            [sys.executable]
            if nproc == 1
            else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        )
        cmd = [
            *launcher,
            os.path.join(ROOT, "algorithms", f"{script}.py"),
            *flags(script, model, train, held, a, os.path.join(work, f"runs{nproc}"), run_name),
            *extra,
        ]
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=one_gpu if nproc == 1 else env, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1], "wall_s": time.time() - t}
        else:
            results[name] = summarize(os.path.join(work, f"runs{nproc}", run_name)) | {"wall_s": time.time() - t}
        shutil.rmtree(os.path.join(work, f"runs{nproc}", run_name), ignore_errors=True)
        print(name, json.dumps(results[name]), flush=True)
        write_outputs(a, results, t_all)  # after every run: a command cut short keeps the table so far
    try:
        import trl  # noqa: F401

        t = time.time()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--trl_worker",
                work,
                "--device",
                a.device,
                "--steps",
                str(a.steps),
                "--max_new_tokens",
                str(a.max_new_tokens),
            ],
            cwd=ROOT,
            env=one_gpu,
            capture_output=True,
            text=True,
        )
        results["TRL GRPOTrainer"] = (
            json.loads(proc.stdout.strip().splitlines()[-1])
            if proc.returncode == 0
            else {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        ) | {"wall_s": time.time() - t}
    except ImportError:
        results["TRL GRPOTrainer"] = {"error": "not installed"}
    print(write_outputs(a, results, t_all))
    sys.exit(1 if any("error" in r and r["error"] != "not installed" for r in results.values()) else 0)


def write_outputs(a, results: dict, t_all: float) -> str:
    """table.md and results.json under --out; returns the table."""
    lines = [
        f"`python benchmarks/gpu_check.py --device {a.device}{' --tiny' if a.tiny else ''}`: {a.steps} steps each, "
        f"completions of up to {a.max_new_tokens} tokens, total {time.time() - t_all:.0f} s.",
        "",
        "| run | median step (s) | generated tokens/s | peak GPU memory (GB) | loss finite | KL finite | KL at step 0 "
        "| wall (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error'][:80]} | | | | | | {r.get('wall_s', 0):.0f} |")
        else:
            lines.append(
                f"| {name} | {r['step_s']:.2f} | {r.get('tokens_per_s', float('nan')):.0f} | "
                f"{r['max_memory_gb']:.2f} | {r.get('loss_finite', '')} | {r.get('kl_finite', '')} | "
                f"{r.get('kl_step0') if r.get('kl_step0') is not None else ''} | {r['wall_s']:.0f} |"
            )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
