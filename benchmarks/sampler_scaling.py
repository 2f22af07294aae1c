"""Sampling cost per generated token as --max_new_tokens grows at a fixed mean completion length.

The realistic-shape model of trl_compare.py (a ~5M-parameter Llama from a config, 12-shot arithmetic prompts of
~120 tokens, 16 prompts x 8 samples), with a bias on the EOS logit so that completions stop after ~32 tokens on
average whatever the cap. A sampler that keeps finished rows in the batch pays for the longest row (which grows
with the cap); one that drops them pays for the tokens generated. Also: the share of sampling time spent in
`aten::cat` (the KV cache growing by one position per decoded token).

    python benchmarks/sampler_scaling.py --script /path/to/an/older/grpo.py   # writes benchmarks/results/sampler_scaling.md
"""

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def load(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", default=None, help="also time this (older) grpo.py's sampler")
    ap.add_argument("--eos_bias", type=float, default=1.2, help="added to the EOS logit (mean length ~32)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl_compare import realistic_setup

    work = tempfile.mkdtemp(prefix="sampler_scaling_")
    model_dir, train, _ = realistic_setup(work)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos_id = tok.eos_token_id
    model.lm_head.register_forward_hook(
        lambda m, i, out: out.index_add(-1, torch.tensor([eos_id]), torch.full_like(out[..., :1], a.eos_bias))
    )
    from common.tasks import load_jsonl

    prompts = [tok(e.prompt)["input_ids"] for e in load_jsonl(train, "prompt", "answer")[:16] for _ in range(8)]
    eos = torch.tensor([eos_id])
    arms = {"grpo.py": load(os.path.join(ROOT, "algorithms", "grpo.py"), "grpo_now")}
    if a.script:
        arms["older grpo.py"] = load(a.script, "grpo_old")
    lines = [
        "| sampler | max_new_tokens | mean length | s per call | ms per generated token | aten::cat share |",
        "|---|---|---|---|---|---|",
    ]
    for name, mod in arms.items():
        for cap in (64, 128, 256):
            args = mod.Args(max_new_tokens=cap, gen_batch_size=512, temperature=1.0)
            args.bf16, args.prompt_cache = False, True
            kwargs = {} if name == "grpo.py" else {"device": "cpu", "amp": mod.contextlib.nullcontext}
            times, lengths = [], []
            for r in range(a.repeats + 1):
                gen = torch.Generator().manual_seed(r)
                t = time.perf_counter()
                b = mod.sample_batch(model, prompts, args, eos, tok.pad_token_id, gen, **kwargs)
                if r:  # the first call warms up
                    times.append(time.perf_counter() - t)
                    lengths.append(b["completion_mask"].sum().item() / len(prompts))
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                mod.sample_batch(
                    model, prompts, args, eos, tok.pad_token_id, torch.Generator().manual_seed(9), **kwargs
                )
            total = sum(e.self_cpu_time_total for e in prof.key_averages())
            cat = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::cat")
            s, n = statistics.median(times), statistics.mean(lengths)
            lines.append(
                f"| {name} | {cap} | {n:.1f} | {s:.2f} | {1000 * s / (n * len(prompts)):.2f} | {cat / total:.1%} |"
            )
            print(lines[-1], flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "sampler_scaling.md"), "w") as f:
        f.write(
            f"{len(prompts)} rows (16 prompts x 8), EOS logit + {a.eos_bias}, median of {a.repeats} calls, "
            f"OMP_NUM_THREADS={torch.get_num_threads()}, CPU.\n\n" + "\n".join(lines) + "\n"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
