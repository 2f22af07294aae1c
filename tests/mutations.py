"""Planted loop-level bugs: each is applied to a temporary copy of the repository and the tests that should catch it
are run there; a mutation is caught when at least one of them fails.

    python tests/mutations.py            # all mutations, a markdown table on stdout (about 5 minutes on 2 cores)
    python tests/mutations.py -k grpo    # those whose id contains "grpo"

`tests/test_loops.py::test_every_mutation_still_applies` checks that every snippet below still occurs exactly once
in its file, so the list cannot rot silently when the scripts change.
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, file, original snippet, planted bug, tests expected to catch it)
MUTATIONS = [
    (
        "grpo-reference-is-the-policy",
        "algorithms/grpo.py",
        'batch["ref_logprobs"] = batched_logprobs(ref, batch, args)',
        'batch["ref_logprobs"] = batched_logprobs(policy, batch, args)',
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "grpo-sampler-ignores-temperature",
        "algorithms/grpo.py",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / args.temperature, -1)",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "rpg_rkl-sampler-ignores-temperature",
        "algorithms/rpg_rkl.py",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / args.temperature, -1)",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "gkd-sampler-ignores-temperature",
        "algorithms/gkd.py",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / args.temperature, -1)",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "grpo-logprobs-ignore-temperature",
        "algorithms/grpo.py",
        "return (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)",
        "return (logits.to(torch.promote_types(logits.dtype, torch.float32))).log_softmax(-1)",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "grpo-mask-drops-the-eos-token",
        "algorithms/grpo.py",
        "((is_eos.cumsum(-1) - is_eos == 0) & (tokens >= 0))",
        "((is_eos.cumsum(-1) == 0) & (tokens >= 0))",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "grpo-old-logprobs-not-detached",
        "algorithms/grpo.py",
        'lp_old = batch["old_logprobs"][rows, :C] if "old_logprobs" in batch else lp.detach()',
        'lp_old = batch["old_logprobs"][rows, :C] if "old_logprobs" in batch else lp',
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "grpo-token-count-per-rank",
        "algorithms/grpo.py",
        "counts = all_reduce(torch.stack([(mask[mb].sum(-1) > 0).sum(), mask[mb].sum()]).double()).tolist()",
        "counts = torch.stack([(mask[mb].sum(-1) > 0).sum(), mask[mb].sum()]).double().tolist()",
        ["tests/test_distributed.py::test_two_processes_equal_one"],
    ),
    (
        "grpo-eval-kl-against-the-policy",
        "algorithms/grpo.py",
        "lp, lq = (completion_log_softmax(m, b, rows, args.temperature) for m in (policy, q))",
        "lp, lq = (completion_log_softmax(m, b, rows, args.temperature) for m in (policy, policy))",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "pmd_mean-stale-old-logprobs",
        "algorithms/pmd_mean.py",
        'lp_old = batch["old_logprobs"][rows, :C] if "old_logprobs" in batch else lp.detach()',
        "lp_old = lp.detach()",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "rpg_fkl-anchor-is-the-policy",
        "algorithms/rpg_fkl.py",
        'batch["anchor_logprobs"] = batched_logprobs(init, batch,',
        'batch["anchor_logprobs"] = batched_logprobs(policy, batch,',
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "a_star_po-value-of-another-prompt",
        "algorithms/a_star_po.py",
        'batch["rewards"], batch["v_hat"] = rewards, v_hat[mine]',
        'batch["rewards"], batch["v_hat"] = rewards, v_hat[mine].roll(1)',
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "a_star_po-stage1-ignores-temperature",
        "algorithms/a_star_po.py",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / args.temperature, -1)",
        "probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "dpo_kl-chosen-and-rejected-swapped",
        "algorithms/dpo_kl.py",
        "loss, stats = dpo_loss(s[:m], s[m:], args.beta,",
        "loss, stats = dpo_loss(s[m:], s[:m], args.beta,",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "gkd-teacher-and-student-swapped",
        "algorithms/gkd.py",
        'gkd_loss(lt, lsm, batch["loss_mask"]',
        'gkd_loss(lsm, lt, batch["loss_mask"]',
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "q_sharp-offset-on-the-wrong-tokens",
        "algorithms/q_sharp.py",
        "offsets = soft_q(log_pmf, atoms, eta) / eta if mode",
        "offsets = soft_q(log_pmf, atoms, eta).roll(1, -1) / eta if mode",
        ["tests/test_samplers.py", "tests/test_loops.py::test_q_sharp_round_end_to_end"],
    ),
    (
        "q_sharp-labels-shifted",
        "algorithms/q_sharp.py",
        'switch = torch.tensor([e["switch"] for e in examples]',
        'switch = torch.tensor([e["switch"] + 1 for e in examples]',
        ["tests/test_loops.py::test_q_sharp_round_end_to_end"],
    ),
]


def apply(text: str, original: str, bug: str) -> str:
    assert text.count(original) == 1, f"snippet occurs {text.count(original)} times: {original!r}"
    return text.replace(original, bug)


def run(mutation) -> tuple:
    """(caught, the failing tests) for one mutation, in a temporary copy of the repository."""
    mid, path, original, bug, targets = mutation
    with tempfile.TemporaryDirectory() as tmp:
        for item in ("algorithms", "common", "tests", "pytest.ini"):
            src = os.path.join(ROOT, item)
            (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, os.path.join(tmp, item))
        with open(os.path.join(tmp, path)) as f:
            text = f.read()
        with open(os.path.join(tmp, path), "w") as f:
            f.write(apply(text, original, bug))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *targets],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
    failed = re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)
    return proc.returncode != 0 and bool(failed), failed


def main():
    select = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
    print("| planted bug | file | caught by |\n|---|---|---|")
    missed = 0
    for m in MUTATIONS:
        if select not in m[0]:
            continue
        caught, failed = run(m)
        missed += not caught
        names = sorted({f.split("[")[0] for f in failed})
        params = [f.split("[", 1)[1].rstrip("]") for f in failed if "[" in f]
        shown = ", ".join(f"`{n}`" for n in names) + (f" ({', '.join(params[:4])})" if params else "")
        print(f"| {m[0]} | `{m[1]}` | {shown if caught else '**NOT CAUGHT**'} |", flush=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
