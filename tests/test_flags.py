"""Every flag that changes what a script computes is used: one short run of each script with the flag at another value
differs (final parameters or a logged metric) from the same run at the base values (or, for "CONTEXT | FLAG", from the
run with CONTEXT alone). A script that ignored the flag
would log the same rows and end with the same weights. Off-by-one errors of the integer plumbing flags are checked
exactly below (checkpoints kept, eval steps, warm-up learning rates, prompts seen), and weight decay by its exact
effect on one AdamW step. Flags that must NOT change results (micro_batch_size, gen_batch_size with external noise,
divergence_chunk_size, gradient_checkpointing, reshard_after_forward) have invariance tests elsewhere."""

import os

import pytest
import torch
from safetensors.torch import load_file

from tests.harness import SCRIPTS, read_metrics, run_in_process
from tests.test_reliability import untimed

SHORT = "--total_steps 1 --eval_num_prompts 2 --eval_samples_per_prompt 2 --learning_rate 0.01".split()
BASE = {  # off-policy updates (two passes, two mini-batches), so clipping and old log-probs matter
    "grpo": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --num_minibatches 2".split(),
    "rpg_fkl": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --num_minibatches 2".split(),
    "rpg_rkl": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --num_minibatches 2".split(),
    "pmd_mean": "--prompts_per_step 4 --num_generations 4 --num_iterations 2 --num_minibatches 2".split(),
    "a_star_po": "--prompts_per_step 4 --num_iterations 2 --max_train_prompts 8 --num_ref_samples 2".split(),
    "dpo_kl": "--prompts_per_step 4 --num_generations 4 --num_iterations 2".split(),
    "gkd": "--prompts_per_step 4 --num_iterations 2".split(),
    "q_sharp": (
        "--prompts_per_step 4 --samples_per_prompt 2 --epochs_per_round 1 --q_batch_size 8 --eval_etas 0.1 "
        "--total_steps 2 --heldout_frac 0.5"
    ).split(),
}
SHARED = [  # the shared machinery's flags, checked once (in grpo.py; the code is identical in every file)
    "--seed 2",
    "--temperature 0.7",
    "--learning_rate 0.02",
    "--weight_decay 0.5",
    "--max_grad_norm 0.01",
    "--warmup_steps 3",
    "--max_new_tokens 3",
    "--num_iterations 1",
    "--num_minibatches 1",
    "--prompts_per_step 2",
    "--eval_num_prompts 3",
    "--eval_samples_per_prompt 1",
    "--no_eval_kl",
    "--model_name_or_path common/models/tiny-teacher",
]
EFFECTS = {
    "grpo": SHARED
    + [
        "--num_generations 2",
        "--beta 0.5",
        "--beta 0",
        "--kl_estimator k2",
        "--kl_importance_weight",
        "--kl_placement reward",
        "--kl_placement reward | --kl_estimator k3",
        "--epsilon 0.001",
        "--epsilon_high 0.001",
        "--scale_rewards batch",
        "--scale_rewards none",
        "--loss_agg token_mean",
        "--loss_agg seq_mean_token_sum_norm",
        "--max_new_tokens 2 | --mask_truncated_completions",
    ],
    "rpg_fkl": [
        "--beta 0.5",
        "--unnormalized",
        "--form reinforce",
        "--beta 0.5 | --kl_anchor init",
        "--ratio_level sequence",
        "--form reinforce --learning_rate 0.001 | --clip_eps_low 0.001",
        "--form reinforce --learning_rate 0.001 | --clip_eps_high 0.001",
        "--form reinforce | --clip_c 1.001",
        "--form reinforce | --no_clip",
        "--loss_agg seq_mean_token_sum_norm",
        "--dynamic_sampling",
        "--dynamic_sampling | --max_gen_batches_per_step 1",
    ],
    "pmd_mean": [
        "--tau 1.0",
        "--baseline mean_incl_self",
        "--baseline partition",
        "--no_length_norm",
        "--num_generations 2",
    ],
    "a_star_po": [
        "--beta1 2.0",
        "--beta2 0.01",
        "--value_estimator mean",
        "--entropy_coef 0.1",
        "--max_train_prompts 32 --num_ref_samples 4 | --filter_unsolved",
        "--num_ref_samples 3",
        "--max_train_prompts 6",
    ],
    "dpo_kl": [
        "--beta 1.0",
        "--divergence js",
        "--divergence forward_kl",
        "--alpha 0.5",
        "--loss ipo",
        "--loss hinge",
        "--loss robust | --label_smoothing 0.2",
        "--label_smoothing 0.2",
        "--num_generations 2",
        "--num_minibatches 2",
    ],
    "gkd": [
        "--lmbda 0",
        "--lmbda 0 --temperature 5 | --seq_kd",
        "--divergence fkl",
        "--beta 0.1",
        "--divergence skl | --skew_alpha 0.5",
        "--divergence akl --temperature 2 | --akl_mu 0.9",
        "--no_eval_teacher",
        "--teacher_name_or_path common/models/tiny-policy",
        "--teacher_top_k 5",
        "--update pg",
        "--update pg | --opd_discount 1",
        "--update pg | --task_reward_weight 1",
        "--update pg | --epsilon 0.001",
    ],
    "q_sharp": [
        "--eta 0.5",
        "--learning_rate 0.05 --epochs_per_round 4 | --rollin_eta 1.0",
        "--samples_per_prompt 3",
        "--epochs_per_round 2",
        "--q_batch_size 4",
        "--heldout_frac 0.25",
        "--head v",
        "--num_atoms 3",
        "--v_min 0.5",
        "--v_max 2",
        "--top_k 3",
        "--top_k 3 | --topk_outside mask",
        "--only_switch_token",
        "--drop_no_variation",
        "--q_loss_weighting sequences",
        "--eval_etas 0.5",
        "--no_eval_cd",
        "--q_model_name_or_path common/models/tiny-teacher",
    ],
}
EFFECTS["rpg_rkl"] = EFFECTS["rpg_fkl"]


def outcome(script, flags, tmp_path, capsys, name):
    """(logged rows without timings, final parameters) of one in-process run."""
    code, err = run_in_process(
        script, [*SHORT, *BASE[script], *flags, "--output_dir", str(tmp_path)] + ["--run_name", name], capsys
    )
    assert code == 0, err[-3000:]
    params = load_file(os.path.join(tmp_path, name, "final", "model.safetensors"))
    return untimed(read_metrics(tmp_path / name)), params


def same(a, b) -> bool:
    rows_a, params_a = a
    rows_b, params_b = b
    return (
        rows_a == rows_b
        and params_a.keys() == params_b.keys()
        and all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_changes_the_run(script, tmp_path, capsys):
    """An entry "CONTEXT | FLAG" compares CONTEXT + FLAG against CONTEXT alone (a flag that acts only in a context)."""
    runs = {}

    def run(flags: str):
        if flags not in runs:
            runs[flags] = outcome(script, flags.split(), tmp_path, capsys, f"r{len(runs)}")
        return runs[flags]

    assert same(run(""), outcome(script, [], tmp_path, capsys, "again"))  # negative control: a repeat is identical
    unchanged = []
    for entry in EFFECTS[script]:
        context, _, flag = entry.rpartition("|")
        if same(run(context.strip()), run(f"{context} {flag}".strip())):
            unchanged.append(entry)
    assert unchanged == [], f"these flags did not change the run: {unchanged}"


def test_plumbing_counts_are_exact(tmp_path, capsys):
    """One run, exact counts (an off-by-one in any of them changes a list below): --keep_last 2 keeps the checkpoints
    of steps 3 and 4 and `final` links to 4; --eval_every 2 evaluates at 0, 2 and 4; --warmup_steps 3 gives the
    learning rates lr/3, 2lr/3, lr, lr (one optimizer step per rollout); --prompts_per_step 4 counts 4 prompts a step."""
    lr, run = 0.01, tmp_path / "run"
    flags = "--total_steps 4 --save_every 1 --keep_last 2 --eval_every 2 --warmup_steps 3 --prompts_per_step 4"
    flags += f" --num_generations 2 --eval_num_prompts 2 --eval_samples_per_prompt 1 --learning_rate {lr}"
    code, err = run_in_process("grpo", [*flags.split(), "--output_dir", str(tmp_path), "--run_name", "run"], capsys)
    assert code == 0, err[-3000:]
    assert sorted(os.listdir(run / "checkpoints")) == ["step_000003", "step_000004"]
    assert os.readlink(run / "final") == os.path.join("checkpoints", "step_000004")
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "eval/pass@1" in r] == [0, 2, 4]
    assert [r["charts/learning_rate"] for r in rows[1:]] == pytest.approx([lr / 3, 2 * lr / 3, lr, lr], rel=1e-12)
    assert [r["charts/prompts_seen"] for r in rows[1:]] == [4, 8, 12, 16]


def test_weight_decay_is_the_decoupled_adamw_decay(tmp_path, capsys):
    """One AdamW step with --weight_decay 0.5 against 0: the same gradient, so the parameters differ by exactly
    -lr * weight_decay * p_init (decoupled decay); a decay applied twice, or not at all, or at another rate fails."""
    from common import TINY_POLICY

    lr, wd = 0.01, 0.5
    params = {}
    for decay in (0.0, wd):
        flags = "--total_steps 1 --prompts_per_step 2 --num_generations 2 --eval_num_prompts 2"
        flags += f" --eval_samples_per_prompt 1 --learning_rate {lr} --weight_decay {decay}"
        name = f"wd{decay}"
        code, err = run_in_process("grpo", [*flags.split(), "--output_dir", str(tmp_path), "--run_name", name], capsys)
        assert code == 0, err[-3000:]
        params[decay] = load_file(os.path.join(tmp_path, name, "final", "model.safetensors"))
    init = load_file(os.path.join(TINY_POLICY, "model.safetensors"))
    for key, p in params[wd].items():
        torch.testing.assert_close(p - params[0.0][key], -lr * wd * init[key], rtol=0, atol=2e-7)
    moved = max((params[0.0][k] - init[k]).abs().max().item() for k in init)
    assert moved > 1e-3  # (the step itself moved the weights: the difference above is the decay alone)
