"""Data-parallel and gradient-accumulation invariance of each script's `update_policy`, via tests/dp_worker.py.

A 2-process gloo torchrun update on a fixed global batch must give the same parameters as 1 process (1e-6),
and several micro-batches the same as one. The negative control for the normalizer (averaging per-rank token
means of ragged batches) is in tests/test_grpo.py::test_t10_split_over_ranks_with_global_counts.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.harness import ROOT

WORKER = os.path.join(ROOT, "tests", "dp_worker.py")


def run_worker(tmp_path, algo, name, **overrides):
    """The worker's 1-process result, in this process (no interpreter start-up); more processes: run_cases."""
    from tests import dp_worker

    out = str(tmp_path / f"{algo}_{name}.pt")
    argv = sys.argv
    sys.argv = [WORKER, algo, out, *[f"{k}={v}" for k, v in overrides.items()]]
    torch.set_num_threads(1)  # as the torchrun workers (OMP_NUM_THREADS=1)
    try:
        dp_worker.main()
    finally:
        sys.argv = argv
    return torch.load(out)


CASES = [
    ("grpo", {"loss_agg": "token_mean"}),
    ("grpo", {"loss_agg": "seq_mean_token_mean", "num_iterations": 2, "kl_estimator": "k2"}),
    # global mini-batches, ragged micro-batch counts; then Run.save of the (sharded) model and its folder loaded
    ("grpo", {"num_minibatches": 2, "micro_batch_size": 3, "save": True}),
    # lm_head + log-softmax per 2 positions, recomputed in the backward through FSDP2's gathered lm_head
    ("grpo", {"logprob_chunk_size": 2, "num_iterations": 2, "micro_batch_size": 5}),
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


# the 2-process runs of a batch share one torchrun (one interpreter start-up per rank for all its cases)
BATCHES = {
    "policy_gradient": ("grpo", "rpg_fkl", "rpg_rkl", "pmd_mean", "a_star_po"),
    "pairs_distill_q": ("dpo_kl", "gkd", "q_sharp"),
}


def case_id(algo, overrides) -> str:
    return f"{algo}-{'-'.join(map(str, overrides.values()))}"


def run_cases(tmp_path, cases, nproc) -> list:
    """The worker's results for several cases, all in one torchrun of `nproc` ranks."""
    path = tmp_path / "cases.json"
    outs = [str(tmp_path / f"two_{i}.pt") for i in range(len(cases))]
    as_flags = [{k: str(v) for k, v in overrides.items()} for _, overrides in cases]  # as key=value arguments
    path.write_text(json.dumps([[algo, out, o] for (algo, _), out, o in zip(cases, outs, as_flags)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*cmd, WORKER, "--cases", str(path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out) for out in outs]


def differences(one, two) -> list:
    """What differs between a 1-process and a 2-process update (none: equal), and whether it moved at all."""
    found = []
    if (one["params"] - one["init"]).abs().max() <= 1e-3:
        found.append("the update did not move the parameters")
    gap = (one["params"] - two["params"]).abs().max().item()
    if gap >= 1e-6:
        found.append(f"parameters differ by {gap:.3g}")
    for k, v in one["metrics"].items():
        if not k.startswith("perf/") and abs(v - two["metrics"][k]) >= 1e-5 * max(1.0, abs(v)):  # (not timings)
            found.append(f"{k}: {v} vs {two['metrics'][k]}")
    if "frozen_sharded" in two and (one["frozen_sharded"] or not two["frozen_sharded"]):  # (Q#'s: none)
        found.append("the frozen reference is not sharded over the 2 ranks only")
    for processes, result in (("1 process", one), ("2 processes", two)):
        if result.get("saved_gap") is None:
            continue
        saved, initial = result["saved_gap"]
        if not (saved < 1e-9 and initial > 1e-3):  # (negative control: the untrained model's log-probs differ)
            found.append(
                f"{processes}: the saved model's log-probs differ by {saved:.3g} (the initial's {initial:.3g})"
            )
    return found


@pytest.mark.parametrize("batch", BATCHES)
def test_two_processes_equal_one(tmp_path, batch):
    """Each case of the batch: the 2-process update equals the 1-process one (parameters 1e-6, metrics 1e-5). A case
    with "save": Run.save on the (FSDP-sharded, with 2 ranks) trained model writes a folder that from_pretrained
    loads and that gives the trained model's log-probs on its own batch, in 1 process and in 2."""
    cases = [(algo, overrides) for algo, overrides in CASES if algo in BATCHES[batch]]
    twos = run_cases(tmp_path, cases, 2)
    failures = {}
    for i, ((algo, overrides), two) in enumerate(zip(cases, twos)):
        one = run_worker(tmp_path, algo, f"one_{i}", **overrides)
        found = differences(one, two)
        if found:
            failures[case_id(algo, overrides)] = found
    assert not failures, failures


def test_micro_batches_equal_one_batch(tmp_path):
    whole = run_worker(tmp_path, "grpo", "whole", micro_batch_size=16)
    split = run_worker(tmp_path, "grpo", "split", micro_batch_size=3)
    assert (whole["params"] - split["params"]).abs().max() < 1e-6
