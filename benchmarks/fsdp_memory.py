"""Per-rank memory and step time of one training step of a ~110M-parameter model on CPU: 1 process, 2 ranks with
DDP, 2 ranks with FSDP2 (the scripts' own `shard`, algorithms/grpo.py). Memory is counted exactly from the tensors
each rank holds after an AdamW step (its shards under FSDP2): parameters, gradients, optimizer state, and the frozen
reference, kept whole on every rank as the scripts do; peak RSS of the process is reported beside it.

    python benchmarks/fsdp_memory.py            # writes benchmarks/results/fsdp_memory.md
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_bytes(tensors) -> int:
    """Bytes this rank holds: a DTensor's local shard, a plain tensor whole."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if t is not None)


def worker(mode: str, steps: int) -> dict:
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("grpo", os.path.join(ROOT, "algorithms", "grpo.py"))
    grpo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(grpo)
    if mode != "single":
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        tie_word_embeddings=True,
    )
    policy, ref = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg).requires_grad_(False).eval()
    n_params = sum(p.numel() for p in policy.parameters())
    opts = argparse.Namespace(bf16=False, reshard_after_forward=True)
    if mode == "fsdp":
        policy = grpo.shard(policy, opts)  # the frozen reference stays whole, as in the scripts
    elif mode == "ddp":
        policy = torch.nn.parallel.DistributedDataParallel(policy)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (4, 128), generator=g)
        t = time.perf_counter()
        with torch.no_grad():
            ref(input_ids=ids)
        policy(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradient buffers: they are part of the footprint
        times.append(time.perf_counter() - t)
    params = list(policy.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    out = {
        "mode": mode,
        "rank": rank,
        "params_total": n_params,
        "params_gb": local_bytes(params) / 2**30,
        "grads_gb": local_bytes(p.grad for p in params) / 2**30,
        "adamw_gb": local_bytes(state) / 2**30,
        "reference_gb": local_bytes(ref.parameters()) / 2**30,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "step_s": statistics.median(times[1:]),
    }
    out["trained_gb"] = out["params_gb"] + out["grads_gb"] + out["adamw_gb"]
    out["total_gb"] = out["trained_gb"] + out["reference_gb"]
    if dist.is_initialized():
        dist.destroy_process_group()
    return out


def launch(mode: str, steps: int) -> list:
    nproc = 1 if mode == "single" else 2
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // nproc))}
    proc = subprocess.run(
        [*launcher, __file__, "--worker", mode, "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", choices=["single", "ddp", "fsdp"], default=None)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "fsdp_memory.md"))
    a = ap.parse_args()
    if a.worker:
        return print("RESULT " + json.dumps(worker(a.worker, a.steps)), flush=True)
    rows = {mode: launch(mode, a.steps) for mode in ("single", "ddp", "fsdp")}
    base, base_trained = rows["single"][0]["total_gb"], rows["single"][0]["trained_gb"]
    lines = [
        f"`python benchmarks/fsdp_memory.py`: a {rows['single'][0]['params_total'] / 1e6:.0f}M-parameter Llama "
        f"(config-built, fp32), batch 4 x 128 tokens per rank, AdamW, a frozen reference of the same size "
        f"(whole on every rank); CPU, gloo, {os.cpu_count()} cores shared by the ranks. Bytes held per rank after "
        f"a step; 'trained' = params + grads + AdamW.",
        "",
        "| run | rank | params (GB) | grads (GB) | AdamW (GB) | trained (GB) | vs 1 process | reference (GB) | "
        "total (GB) | vs 1 process | peak RSS (GB) | median step (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, label in (("single", "1 process"), ("ddp", "2 ranks, DDP"), ("fsdp", "2 ranks, FSDP2")):
        for r in sorted(rows[mode], key=lambda r: r["rank"]):
            lines.append(
                f"| {label} | {r['rank']} | {r['params_gb']:.3f} | {r['grads_gb']:.3f} | {r['adamw_gb']:.3f} | "
                f"{r['trained_gb']:.3f} | {r['trained_gb'] / base_trained:.2f}x | {r['reference_gb']:.3f} | "
                f"{r['total_gb']:.3f} | {r['total_gb'] / base:.2f}x | "
                f"{r['peak_rss_gb']:.2f} | {r['step_s']:.2f} |"
            )
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
