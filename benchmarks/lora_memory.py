"""Peak memory and step time of grpo.py with LoRA (--lora_r 16) against full fine-tuning, same batch, on CPU.

The model: a ~110M-parameter Llama (hidden 768, 12 layers, MLP 3072), random weights, built from its config and
saved locally with the tiny shipped tokenizer (no download). Each configuration is one process of
`algorithms/grpo.py` (the reference loaded as the scripts do: a second copy under full fine-tuning, the same
weights with the adapters off under LoRA), 3 steps of 2 prompts x 4 completions of up to 32 tokens in micro-batches
of 4 (small activations, so that the weights, gradients and AdamW state dominate); peak RSS of the process, step
time the median of the logged perf/step_s.

    python benchmarks/lora_memory.py            # writes benchmarks/results/lora_memory.md
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_model(folder: str) -> int:
    """The ~110M Llama with the tiny tokenizer's vocabulary, saved to `folder`; its parameter count."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "common", "models", "tiny-policy"))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def run(model: str, out: str, name: str, extra: list) -> dict:
    """One grpo.py run; its peak RSS (GiB) and median step time (s)."""
    flags = ["--model_name_or_path", model, "--output_dir", out, "--run_name", name]
    flags += ["--total_steps", "3", "--prompts_per_step", "2", "--num_generations", "4", "--max_new_tokens", "32"]
    flags += ["--micro_batch_size", "4"]  # small activations: the weights, gradients and AdamW state dominate
    flags += ["--eval_num_prompts", "4", "--eval_samples_per_prompt", "1", "--eval_every", "0"]
    command = [sys.executable, os.path.join(ROOT, "algorithms", "grpo.py"), *flags, *extra]
    # a fresh parent per run: ru_maxrss of RUSAGE_CHILDREN is a high-water mark over all children
    parent = "import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=-3); "
    parent += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    done = subprocess.run([sys.executable, "-c", parent, *command], check=True, capture_output=True, text=True)
    peak_kb = int(done.stdout.split()[-1])
    with open(os.path.join(out, name, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    steps = [row["perf/step_s"] for row in rows if "perf/step_s" in row]
    return {"peak_rss_gib": peak_kb / 2**20, "step_s": statistics.median(steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "lora_memory.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = os.path.join(tmp, "llama110m")
        count = build_model(model)
        lora = run(model, tmp, "lora", ["--lora_r", "16", "--learning_rate", "1e-4"])
        full = run(model, tmp, "full", ["--learning_rate", "1e-5"])
    lines = [
        "# grpo.py: LoRA (--lora_r 16) against full fine-tuning, CPU",
        "",
        f"`python benchmarks/lora_memory.py`: a {count / 1e6:.0f}M-parameter Llama (random weights), 3 steps of 2",
        "prompts x 4 completions of up to 32 tokens, micro-batches of 4, the reference loaded as the scripts do.",
        "",
        "| configuration | peak RSS (GiB) | median step (s) |",
        "|---|---|---|",
        f"| full fine-tuning (second copy as reference) | {full['peak_rss_gib']:.2f} | {full['step_s']:.2f} |",
        f"| --lora_r 16 (reference: adapters off) | {lora['peak_rss_gib']:.2f} | {lora['step_s']:.2f} |",
        "",
    ]
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
