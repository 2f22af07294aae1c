"""Data-parallel and gradient-accumulation invariance of each script's `update_policy`, via tests/dp_worker.py.

A 2-process gloo torchrun update on a fixed global batch must give the same parameters as 1 process (1e-6),
and several micro-batches the same as one. The negative control for the normalizer (averaging per-rank token
means of ragged batches) is in tests/test_grpo.py::test_t10_split_over_ranks_with_global_counts.
"""

import os
import subprocess
import sys

import pytest
import torch

from tests.harness import ROOT

WORKER = os.path.join(ROOT, "tests", "dp_worker.py")


def run_worker(tmp_path, algo, name, nproc=1, **overrides):
    out = str(tmp_path / f"{algo}_{name}.pt")
    kv = [f"{k}={v}" for k, v in overrides.items()]
    if nproc == 1:
        cmd = [sys.executable, WORKER, algo, out, *kv]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            WORKER,
            algo,
            out,
            *kv,
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


CASES = [
    ("grpo", {"loss_agg": "token_mean"}),
    ("grpo", {"loss_agg": "seq_mean_token_mean", "num_iterations": 2, "kl_estimator": "k2"}),
    ("grpo", {"num_minibatches": 2, "micro_batch_size": 3}),  # global mini-batches, ragged micro-batch counts
    ("rpg_fkl", {"num_iterations": 2, "unnormalized": True, "kl_anchor": "init"}),
    ("rpg_rkl", {"num_iterations": 2, "form": "reinforce", "ratio_level": "sequence"}),
    ("pmd_mean", {"num_iterations": 2}),
    ("a_star_po", {"num_iterations": 2, "entropy_coef": 0.01}),
    ("q_sharp", {}),
    ("dpo_kl", {"divergence": "js", "loss": "robust", "label_smoothing": 0.2}),
    ("dpo_kl", {"num_minibatches": 3, "micro_batch_size": 2, "num_generations": 2}),  # 4 pairs, on rank 0 only
    # 8 pairs over both ranks: every global mini-batch's pairs are split across the ranks (normalized globally)
    ("dpo_kl", {"num_minibatches": 2, "num_generations": 2, "pairs": "all"}),
    ("dpo_kl", {"num_generations": 4, "pairs": "all", "loss": "ipo"}),
    ("gkd", {"divergence": "akl", "num_iterations": 2, "micro_batch_size": 3}),
    # LoRA: FSDP2 over the peft model (frozen base weights and trained adapters in one shard group)
    ("grpo", {"lora_r": 4, "num_iterations": 2}),
    ("dpo_kl", {"lora_r": 4, "pairs": "all"}),
    ("gkd", {"lora_r": 4, "micro_batch_size": 3}),
]


@pytest.mark.parametrize("algo,overrides", CASES, ids=[f"{a}-{'-'.join(map(str, o.values()))}" for a, o in CASES])
def test_two_processes_equal_one(tmp_path, algo, overrides):
    one = run_worker(tmp_path, algo, "one", 1, **overrides)
    two = run_worker(tmp_path, algo, "two", 2, **overrides)
    assert (one["params"] - one["init"]).abs().max() > 1e-3  # the update did move the parameters
    assert (one["params"] - two["params"]).abs().max() < 1e-6
    for k, v in one["metrics"].items():
        if k.startswith("perf/"):  # wall-clock timings
            continue
        assert abs(v - two["metrics"][k]) < 1e-5 * max(1.0, abs(v)), k


@pytest.mark.parametrize("nproc", [1, 2])
def test_checkpoint_loads_with_from_pretrained_and_gives_the_trained_log_probs(tmp_path, nproc):
    """Run.save on the (FSDP-sharded, with 2 ranks) trained model writes a folder that from_pretrained loads and that
    gives the trained model's log-probs on its own batch."""
    saved, initial = run_worker(tmp_path, "grpo", "saved", nproc, save="True")["saved_gap"]
    assert saved < 1e-9 and initial > 1e-3  # (negative control: the untrained model's log-probs differ)


def test_micro_batches_equal_one_batch(tmp_path):
    whole = run_worker(tmp_path, "grpo", "whole", 1, micro_batch_size=16)
    split = run_worker(tmp_path, "grpo", "split", 1, micro_batch_size=3)
    assert (whole["params"] - split["params"]).abs().max() < 1e-6
