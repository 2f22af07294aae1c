"""Smoke tests of algorithms/grpo.py as a program: --help, a 2-step run, save then resume, torchrun, bad input."""

import json
import os

import pytest
import torch

from tests.harness import TINY_RUN, one_line_error, read_metrics, run_script

TIMING = ("time_s", "perf/", "charts/step_time_s", "charts/tokens_per_s")


def untimed(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_help():
    proc = run_script("grpo", "--help")
    assert proc.returncode == 0
    for flag in ("--beta", "--kl_estimator", "--kl_importance_weight", "--epsilon_high", "--num_iterations",
                 "--scale_rewards", "--loss_agg", "--resume"):
        assert flag in proc.stdout


def test_two_steps_then_resume_equals_uninterrupted(tmp_path):
    from transformers import AutoModelForCausalLM

    flags = [*TINY_RUN, "--output_dir", str(tmp_path), "--eval_every", "2"]
    full = run_script("grpo", *flags, "--total_steps", "4", "--run_name", "full")
    assert full.returncode == 0, full.stderr[-3000:]
    part = run_script("grpo", *flags, "--total_steps", "2", "--run_name", "part")
    assert part.returncode == 0, part.stderr[-3000:]
    rows = read_metrics(tmp_path / "part")
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("eval/pass@1", "eval/kl_init_rkl_exact_seq", "charts/reward_mean", "losses/loss",
                "losses/kl_ref_rkl_k3", "losses/entropy", "charts/grad_norm", "charts/tokens_per_s"):
        assert key in rows[2] and torch.isfinite(torch.tensor(rows[2][key])), key
    assert abs(rows[0]["eval/kl_init_rkl_exact_seq"]) < 1e-6  # the policy starts at the reference
    res = run_script("grpo", "--resume", str(tmp_path / "part"), "--total_steps", "4")
    assert res.returncode == 0, res.stderr[-3000:]
    assert untimed(read_metrics(tmp_path / "part")) == untimed(read_metrics(tmp_path / "full"))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "part" / "final")
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    with open(tmp_path / "part" / "args.json") as f:
        assert json.load(f)["total_steps"] == 4


def test_torchrun_two_processes(tmp_path):
    proc = run_script("grpo", *TINY_RUN, "--output_dir", str(tmp_path), "--run_name", "ddp", nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "ddp")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert os.path.isfile(tmp_path / "ddp" / "final" / "model.safetensors")


# ---- bad input: one line, non-zero exit, nothing written --------------------------------------------------
def write(path, text):
    path.write_text(text)
    return str(path)


def bad_cases(tmp):
    good = '{"prompt": "1+1=", "answer": "2"}\n'
    return {
        "unknown task": (["--task", "nope"], "unknown task 'nope'"),
        "missing local model": (["--model_name_or_path", str(tmp / "no_such_model")], "no such local folder"),
        "missing hub model offline": (["--model_name_or_path", "nobody-xyz/no-such-model"], "could not load"),
        "malformed jsonl": (["--task", "jsonl", "--train_file", write(tmp / "bad.jsonl", good + "{oops\n"),
                             "--eval_file", write(tmp / "ok.jsonl", good)], "bad.jsonl:2: malformed JSON"),
        "empty dataset": (["--task", "jsonl", "--train_file", write(tmp / "empty.jsonl", "\n"),
                           "--eval_file", write(tmp / "ok2.jsonl", good)], "empty dataset"),
        "prompt too long": (["--max_prompt_length", "4"], "> --max_prompt_length 4"),
        "bad group split": (["--prompts_per_step", "3", "--num_minibatches", "5"], "not divisible"),
    }


BAD_CASES = ["unknown task", "missing local model", "missing hub model offline", "malformed jsonl", "empty dataset",
             "prompt too long", "bad group split"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_gives_one_line_error(tmp_path, case):
    flags, message = bad_cases(tmp_path)[case]
    out = tmp_path / "runs"
    proc = run_script("grpo", *TINY_RUN, "--output_dir", str(out), *flags)
    assert message in one_line_error(proc)
    assert not out.exists() or not any(out.iterdir())  # nothing written


def test_existing_run_folder_is_not_overwritten(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("keep me\n")
    proc = run_script("grpo", *TINY_RUN, "--output_dir", str(tmp_path), "--run_name", "taken")
    assert "already exists" in one_line_error(proc)
    assert (tmp_path / "taken" / "metrics.jsonl").read_text() == "keep me\n"
