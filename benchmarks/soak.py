"""Long-run soak: train grpo.py (or another script) for a fixed wall time, sample its resident memory, stop it with
SIGTERM (which also checks that the stop writes a checkpoint), and report whether RSS stays flat.

    python benchmarks/soak.py --minutes 30 -- --prompts_per_step 128       # flags after -- go to the script
Writes benchmarks/results/soak.md: RSS every `--every` seconds and the RSS growth over the second half of the run
(a leak grows linearly; allocator warm-up happens in the first minutes).
"""

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--script", default="grpo")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=float, default=15, help="seconds between RSS samples")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("flags", nargs="*", help="flags for the script (after --)")
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="soak_")
    cmd = [
        sys.executable,
        os.path.join(ROOT, "algorithms", f"{a.script}.py"),
        "--total_steps",
        "1000000",
        "--output_dir",
        work,
        "--run_name",
        "soak",
        *a.flags,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0, samples = time.time(), []
    while time.time() - t0 < a.minutes * 60 and proc.poll() is None:
        samples.append((time.time() - t0, rss_mb(proc.pid)))
        time.sleep(a.every)
    if proc.poll() is not None:
        sys.exit(f"error: the run ended early:\n{proc.stderr.read()[-2000:]}")
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=600)[1]
    metrics = os.path.join(work, "soak", "metrics.jsonl")
    steps = sum(1 for _ in open(metrics)) - 1
    half = [rss for t, rss in samples if t >= samples[-1][0] / 2]
    stop = [line for line in err.splitlines() if line.startswith("stopped:")]
    lines = [
        f"`{' '.join(['python', f'algorithms/{a.script}.py', *a.flags])}` for {a.minutes:g} min: {steps} steps, "
        f"stopped by SIGTERM (exit {proc.returncode}: {stop[-1] if stop else 'no stop message'}).",
        "",
        f"RSS: start {samples[0][1]:.0f} MB, max {max(r for _, r in samples):.0f} MB, second half "
        f"{min(half):.0f}-{max(half):.0f} MB (growth over the second half: {half[-1] - half[0]:+.1f} MB).",
        "",
        "| minute | RSS (MB) |",
        "|---|---|",
    ]
    lines += [f"| {t / 60:.1f} | {r:.0f} |" for t, r in samples[:: max(1, int(60 / a.every))]]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "soak.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))


if __name__ == "__main__":
    main()
