"""The reward-KL frontier of all eight algorithms on the default task, under one budget of prompts.

Each script runs with its own defaults except the length: `--total_steps = budget // prompts_per_step`, so every
method sees the same number of training prompts (GRPO's default budget: 200 steps x 64 prompts = 12,800). Q# does
not train the policy; it gets `--total_steps` rounds of `--prompts_per_step = budget // total_steps` prompts for
its Q model (its own collect + train budget). A*-PO's stage 1 (reference samples of every training prompt) comes
on top of the budget, as in the paper. For each run the harness reads `metrics.jsonl`: the final held-out
`eval/pass@1`, the sequence KL to the initial policy `eval/kl_init_rkl_exact_seq`, the wall time and the mean
tokens/s; it writes `frontier.md` (mean +- std over seeds, population std) and `frontier.png` (matplotlib,
optional: pip install -r requirements-bench.txt), one point per run and the mean per algorithm.

    python benchmarks/frontier.py                          # 8 algorithms x 3 seeds (about 70 min on 2 CPU cores)
    python benchmarks/frontier.py --seeds 1 --algos grpo gkd --out /tmp/frontier
    python benchmarks/frontier.py --sweep                  # also beta / tau / eta sweeps of GRPO, PMD-mean, DPO
"""

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS = ["grpo", "rpg_fkl", "rpg_rkl", "pmd_mean", "a_star_po", "q_sharp", "dpo_kl", "gkd"]
SWEEPS = {
    "grpo": ("--beta", [0.0, 0.04, 0.2]),
    "pmd_mean": ("--tau", [0.03, 0.1, 0.3]),
    "dpo_kl": ("--beta", [0.05, 0.1, 0.3]),
}


def defaults(algo: str):
    spec = importlib.util.spec_from_file_location(f"bench_{algo}", os.path.join(ROOT, "algorithms", f"{algo}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.Args()


def budget_flags(algo: str, budget: int) -> list:
    d = defaults(algo)
    if algo == "q_sharp":
        return ["--prompts_per_step", str(budget // d.total_steps)]
    return ["--total_steps", str(max(1, budget // d.prompts_per_step))]


def summarize(run_dir: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    final = [r for r in rows if "eval/pass@1" in r][-1]
    tps = [r["charts/tokens_per_s"] for r in rows if "charts/tokens_per_s" in r]
    return {
        "pass@1": final["eval/pass@1"],
        "start": rows[0]["eval/pass@1"],
        "kl": final.get("eval/kl_init_rkl_exact_seq", float("nan")),
        "time_s": rows[-1]["time_s"],
        "tokens_per_s": statistics.mean(tps) if tps else float("nan"),
    }


def fmt(values: list, digits: int) -> str:
    if any(v != v for v in values):  # NaN: not logged by this script (Q# has no training tokens/s)
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.pstdev(values):.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algos", nargs="+", default=ALGOS, choices=ALGOS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--budget", type=int, default=12_800, help="training prompts seen per run")
    ap.add_argument("--sweep", action="store_true", help="also sweep beta / tau for " + ", ".join(SWEEPS))
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    runs = []  # (label, algo, flags)
    for algo in a.algos:
        runs.append((algo, algo, []))
        if a.sweep and algo in SWEEPS:
            flag, values = SWEEPS[algo]
            runs += [(f"{algo} {flag[2:]}={v:g}", algo, [flag, str(v)]) for v in values]
    results = {}
    for label, algo, extra in runs:
        for seed in a.seeds:
            name = f"{label.replace(' ', '_').replace('=', '')}_seed{seed}"
            run_dir = os.path.join(a.out, "runs", name)
            if not os.path.exists(os.path.join(run_dir, "final")):
                cmd = [
                    sys.executable,
                    os.path.join(ROOT, "algorithms", f"{algo}.py"),
                    "--seed",
                    str(seed),
                    "--output_dir",
                    os.path.join(a.out, "runs"),
                    "--run_name",
                    name,
                    *budget_flags(algo, a.budget),
                    *extra,
                ]
                if os.path.exists(run_dir):  # an interrupted earlier attempt: continue it
                    cmd = [sys.executable, os.path.join(ROOT, "algorithms", f"{algo}.py"), "--resume", run_dir]
                t = time.time()
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"error: {name} failed:\n{proc.stderr[-2000:]}")
                print(f"{name}: {time.time() - t:.0f} s", flush=True)
            results.setdefault(label, []).append(summarize(run_dir))
    lines = [
        f"Budget: {a.budget:,} training prompts per run (Q#: its Q model's collection), seeds "
        f"{', '.join(map(str, a.seeds))}; mean ± std over seeds. KL: sequence KL(π ‖ π_init), nats.",
        "",
        "| algorithm | pass@1 start | pass@1 final | KL to init | wall time (s) | tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for label, rs in results.items():
        lines.append(
            f"| {label} | {fmt([r['start'] for r in rs], 3)} | {fmt([r['pass@1'] for r in rs], 3)} | "
            f"{fmt([r['kl'] for r in rs], 2)} | {fmt([r['time_s'] for r in rs], 0)} | "
            f"{fmt([r['tokens_per_s'] for r in rs], 0)} |"
        )
    with open(os.path.join(a.out, "frontier.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -r requirements-bench.txt)")
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, (label, rs) in enumerate(results.items()):
        color = f"C{i % 10}"
        ax.scatter([r["kl"] for r in rs], [r["pass@1"] for r in rs], color=color, alpha=0.35, s=18)
        ax.scatter(
            [statistics.mean(r["kl"] for r in rs)],
            [statistics.mean(r["pass@1"] for r in rs)],
            color=color,
            s=70,
            label=label,
            edgecolors="black",
        )
    start = statistics.mean(r["start"] for rs in results.values() for r in rs)
    ax.axhline(start, color="gray", ls=":", label="initial policy")
    ax.set_xlabel("sequence KL(π ‖ π_init) on held-out prompts (nats)")
    ax.set_ylabel("held-out pass@1")
    ax.set_title(f"tiny arithmetic task, {a.budget:,} prompts per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "frontier.png"), dpi=120)
    print(f"wrote {os.path.join(a.out, 'frontier.md')} and frontier.png")


if __name__ == "__main__":
    main()
