"""Planted loop-level bugs: each is applied to a temporary copy of the repository and the tests that should catch it
are run there; a mutation is caught when at least one of them fails.

    python tests/mutations.py            # all mutations, a markdown table on stdout (about 15 minutes on 2 cores)
    python tests/mutations.py -k grpo    # those whose id contains "grpo"
    python tests/mutations.py -j 2       # two at a time

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
        "probs = torch.softmax(logits / args.temperature, -1)",
        "probs = torch.softmax(logits, -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "rpg_rkl-sampler-ignores-temperature",
        "algorithms/rpg_rkl.py",
        "probs = torch.softmax(logits / args.temperature, -1)",
        "probs = torch.softmax(logits, -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "gkd-sampler-ignores-temperature",
        "algorithms/gkd.py",
        "probs = torch.softmax(logits / args.temperature, -1)",
        "probs = torch.softmax(logits, -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "grpo-logprobs-ignore-temperature",
        "algorithms/grpo.py",
        "log_softmax = (logits / temperature).log_softmax(-1)",
        "log_softmax = logits.log_softmax(-1)",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "grpo-mask-drops-the-eos-token",
        "algorithms/grpo.py",
        "no_eos_before = is_eos.cumsum(-1) - is_eos == 0",
        "no_eos_before = is_eos.cumsum(-1) == 0",
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
        "num_seqs, num_tokens = all_reduce(counts).tolist()",
        "num_seqs, num_tokens = counts.tolist()",
        ["tests/test_distributed.py::test_two_processes_equal_one"],
    ),
    (
        "grpo-eval-kl-against-the-policy",
        "algorithms/grpo.py",
        "log_q = completion_log_softmax(q, batch, rows, args.temperature)",
        "log_q = completion_log_softmax(policy, batch, rows, args.temperature)",
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
        'batch["v_hat"] = v_hat[mine]',
        'batch["v_hat"] = v_hat[mine].roll(1)',
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "a_star_po-stage1-ignores-temperature",
        "algorithms/a_star_po.py",
        "probs = torch.softmax(logits / args.temperature, -1)",
        "probs = torch.softmax(logits, -1)",
        ["tests/test_samplers.py"],
    ),
    (
        "dpo_kl-chosen-and-rejected-swapped",
        "algorithms/dpo_kl.py",
        "loss, stats = dpo_loss(\n        s[:m],\n        s[m:],\n",
        "loss, stats = dpo_loss(\n        s[m:],\n        s[:m],\n",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "gkd-teacher-and-student-swapped",
        "algorithms/gkd.py",
        "gkd_loss(\n        log_t,\n        log_softmax,\n",
        "gkd_loss(\n        log_softmax,\n        log_t,\n",
        ["tests/test_loops.py::test_one_step_end_to_end"],
    ),
    (
        "q_sharp-offset-on-the-wrong-tokens",
        "algorithms/q_sharp.py",
        "offsets = soft_q(log_pmf, atoms, eta) / eta",
        "offsets = soft_q(log_pmf, atoms, eta).roll(1, -1) / eta",
        ["tests/test_samplers.py", "tests/test_loops.py::test_q_sharp_round_end_to_end"],
    ),
    (
        "q_sharp-labels-shifted",
        "algorithms/q_sharp.py",
        'switch = torch.tensor([example["switch"] for example in examples]',
        'switch = torch.tensor([example["switch"] + 1 for example in examples]',
        ["tests/test_loops.py::test_q_sharp_round_end_to_end"],
    ),
    # ---- the blind spots of issue 26 (each reproduced passing the suite before its test existed) ----
    (
        "grpo-minibatch-counts-of-the-whole-rollout",
        "algorithms/grpo.py",
        "counts = torch.stack([sequences, mask[mine].sum()]).double()",
        "counts = torch.stack([(mask.sum(-1) > 0).sum(), mask.sum()]).double()",
        ["tests/test_loops.py::test_one_step_end_to_end[grpo:mb2]"],
    ),
    (
        "grpo-sampler-ignores-the-rank",
        "algorithms/grpo.py",
        'seed_of(self.args, "sample", step, self.rank)',
        'seed_of(self.args, "sample", step)',
        ["tests/test_streams.py"],
    ),
    (
        "grpo-sampler-ignores-the-step",
        "algorithms/grpo.py",
        'seed_of(self.args, "sample", step, self.rank)',
        'seed_of(self.args, "sample", 0, self.rank)',
        ["tests/test_loops.py::test_one_step_end_to_end[grpo]"],
    ),
    (
        "grpo-eval-noise-changes-every-eval",
        "algorithms/grpo.py",
        'seed_of(self.args, "eval", self.rank)',
        'seed_of(self.args, "eval", getattr(self, "step", 0), self.rank)',
        ["tests/test_loops.py::test_one_step_end_to_end[grpo]"],
    ),
    (
        "grpo-streams-without-names",
        "algorithms/grpo.py",
        "entropy = [args.seed, name, *[k % 2**31 for k in keys]]",
        "entropy = [args.seed, *[k % 2**31 for k in keys]]",
        ["tests/test_loops.py::test_one_step_end_to_end[grpo]"],
    ),
    (
        "grpo-keep-last-off-by-one",
        "algorithms/grpo.py",
        "for old in sorted(glob.glob(saved))[: -self.args.keep_last]:",
        "for old in sorted(glob.glob(saved))[: -self.args.keep_last - 1]:",
        ["tests/test_flags.py::test_plumbing_counts_are_exact"],
    ),
    (
        "grpo-warmup-off-by-one",
        "algorithms/grpo.py",
        "warmup = min(1, (steps_done + 1) / max(args.warmup_steps, 1))",
        "warmup = min(1, (steps_done + 1) / max(args.warmup_steps + 1, 1))",
        ["tests/test_flags.py::test_plumbing_counts_are_exact"],
    ),
    (
        "grpo-weight-decay-ignored",
        "algorithms/grpo.py",
        "AdamW(parameters, lr=args.learning_rate, weight_decay=decay)",
        "AdamW(parameters, lr=args.learning_rate, weight_decay=0.0)",
        ["tests/test_flags.py::test_weight_decay_is_the_decoupled_adamw_decay"],
    ),
    (
        "grpo-grad-clip-ignored",
        "algorithms/grpo.py",
        "clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)",
        "clip_grad_norm_(model.parameters(), 1.0)",
        ["tests/test_loops.py::test_one_step_end_to_end[grpo]"],
    ),
    (
        "grpo-epsilon-ignored",
        "algorithms/grpo.py",
        "ratio.clamp(1 - epsilon_low, 1 + epsilon_high)",
        "ratio.clamp(0.8, 1 + epsilon_high)",
        ["tests/test_grpo.py::test_t6_clip_regions_with_asymmetric_eps"],
    ),
    (
        "grpo-no-old-logprobs-with-minibatches",
        "algorithms/grpo.py",
        "off_policy = args.num_iterations * args.num_minibatches > 1",
        "off_policy = args.num_iterations > 1",
        ["tests/test_loops.py::test_one_step_end_to_end[grpo:mb2mu1]"],
    ),
    (
        "grpo-rollout-sampled-by-the-reference",
        "algorithms/grpo.py",
        "batch = sample_batch(policy, group_prompts, args, eos, pad, run.sampler(step))",
        "batch = sample_batch(ref, group_prompts, args, eos, pad, run.sampler(step))",
        ["tests/test_loops.py::test_one_step_end_to_end[grpo]"],
    ),
    (
        "rpg_fkl-old-anchor-is-the-current-policy",
        "algorithms/rpg_fkl.py",
        'if args.kl_anchor == "init" else lp_old',
        'if args.kl_anchor == "init" else lp.detach()',
        ["tests/test_loops.py::test_one_step_end_to_end[rpg_fkl:old]"],
    ),
    (
        "rpg_fkl-resampled-by-the-initial-model",
        "algorithms/rpg_fkl.py",
        "batch = sample_batch(policy, group_prompts, args, eos, pad, sampler)",
        "batch = sample_batch(init, group_prompts, args, eos, pad, sampler)",
        ["tests/test_loops.py::test_one_step_end_to_end[rpg_fkl:old]"],
    ),
    (
        "dpo_kl-pairs-normalized-per-rank",
        "algorithms/dpo_kl.py",
        "micro_loss(token_lp, batch, rows, args, len(minibatch))",
        "micro_loss(token_lp, batch, rows, args, len(mine))",
        ["tests/test_distributed.py::test_two_processes_equal_one"],
    ),
    (
        "dpo_kl-fresh-kl-from-the-reference",
        "algorithms/dpo_kl.py",
        "metrics = sample_metrics(policy, batch, rewards, args)",
        "metrics = sample_metrics(ref, batch, rewards, args)",
        ["tests/test_loops.py::test_one_step_end_to_end[dpo_kl]"],
    ),
    (
        "gkd-teacher-pass-from-the-student",
        "algorithms/gkd.py",
        'evaluate(teacher, {}, run, eos)[0]["eval/pass@1"]',
        'evaluate(policy, {}, run, eos)[0]["eval/pass@1"]',
        ["tests/test_loops.py::test_one_step_end_to_end[gkd]"],
    ),
    (
        "gkd-eval-kl-to-the-teacher-is-to-init",
        "algorithms/gkd.py",
        'kl_models["teacher"] = teacher',
        'kl_models["teacher"] = kl_models["init"]',
        ["tests/test_loops.py::test_one_step_end_to_end[gkd]"],
    ),
    (
        "gkd-seq_kd-samples-the-student",
        "algorithms/gkd.py",
        "sample_batch(teacher, prompts",
        "sample_batch(policy, prompts",
        ["tests/test_loops.py::test_one_step_end_to_end[gkd:seq_kd]"],
    ),
    (
        "a_star_po-step-0-logged-twice-on-resume",
        "algorithms/a_star_po.py",
        'last_kept = self.state["step"] if self.state["step"] > 0 else -1',
        'last_kept = self.state["step"]',
        ["tests/test_a_star_po.py::test_p10_sigterm_in_stage1_keeps_the_finished_prompts_and_resume_completes_them"],
    ),
    (
        "a_star_po-unknown-estimator-is-the-soft-max",
        "algorithms/a_star_po.py",
        'if estimator != "soft_max":',
        "if False:",
        ["tests/test_a_star_po.py::test_p6_value_estimate_closed_forms"],
    ),
    (
        "q_sharp-rollin-at-eta",
        "algorithms/q_sharp.py",
        "args.rollin_eta or args.eta",
        "args.eta",
        ["tests/test_flags.py::test_every_flag_changes_the_run[q_sharp]"],
    ),
    (
        "grpo-pass-at-k-per-rank-average",
        "algorithms/grpo.py",
        'metrics[f"eval/pass@{k}"] = total / len(run.eval_prompts)',
        'metrics[f"eval/pass@{k}"] = total / len(my_prompts) / run.world',
        ["tests/test_eval_and_rewards.py::test_pass_at_k_is_exact_when_the_prompts_are_split_over_ranks"],
    ),
    (
        "grpo-reward-fn-ignored",
        "common/tasks.py",
        "task.reward_fn = load_reward_fn(args.reward_fn)",
        "load_reward_fn(args.reward_fn)",
        ["tests/test_eval_and_rewards.py::test_your_reward_function_scores_everything"],
    ),
    (
        "grpo-train-log-not-cut-on-resume",
        "algorithms/grpo.py",
        'for name in ("metrics.jsonl", "completions.jsonl", "train_completions.jsonl"):',
        'for name in ("metrics.jsonl",):',
        ["tests/test_eval_and_rewards.py::test_every_log_is_cut_back_to_the_checkpoint_on_resume"],
    ),
    (
        "grpo-lora-reference-keeps-its-adapters",
        "algorithms/grpo.py",
        "        return WithoutAdapters(policy)",
        "        return policy",
        ["tests/test_lora.py::test_adapters_start_at_zero_and_the_initial_model_is_the_base_with_adapters_off"],
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
    """-k TEXT: only the mutations whose id contains TEXT; -j N: N mutations at a time (default 1)."""
    from concurrent.futures import ThreadPoolExecutor

    select = sys.argv[sys.argv.index("-k") + 1] if "-k" in sys.argv else ""
    jobs = int(sys.argv[sys.argv.index("-j") + 1]) if "-j" in sys.argv else 1
    chosen = [m for m in MUTATIONS if select in m[0]]
    print("| planted bug | file | caught by |\n|---|---|---|")
    missed = 0
    with ThreadPoolExecutor(jobs) as pool:  # each mutation runs pytest in its own copy of the repository
        for m, (caught, failed) in zip(chosen, pool.map(run, chosen)):
            missed += not caught
            names = sorted({f.split("[")[0] for f in failed})
            params = [f.split("[", 1)[1].rstrip("]") for f in failed if "[" in f]
            shown = ", ".join(f"`{n}`" for n in names) + (f" ({', '.join(params[:4])})" if params else "")
            print(f"| {m[0]} | `{m[1]}` | {shown if caught else '**NOT CAUGHT**'} |", flush=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
