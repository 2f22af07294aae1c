"""Issue 31's additions, shared by every script: the unbiased pass@k (against a brute-force count of k-subsets, with
the with-replacement bootstrap as the negative control; exact when the prompts are split over ranks), your own reward
function (--reward_fn: used wherever a script scores, every problem with it one line before any model loads), and
training samples in the log (--log_train_completions: the rows, and the same rows after a kill and a resume, in
tests/test_reliability.py::test_kill_then_resume_equals_uninterrupted_run)."""

import itertools
import json
import math
import re

import pytest
import torch

from tests.harness import SCRIPTS, load_algorithm, read_metrics, run_in_process, tiny_flags
from tests.test_reliability import untimed

grpo = load_algorithm("grpo")


def brute_force_pass_at_k(hits: list, k: int) -> float:
    """The share of the k-subsets (without replacement) of one prompt's samples that hold a correct one."""
    subsets = list(itertools.combinations(hits, k))
    return sum(any(s) for s in subsets) / len(subsets)


def bootstrap_pass_at_k(hits: list, k: int) -> float:
    """The with-replacement estimate (verl's best@N bootstrap in expectation): 1 - (1 - c/n)^k, biased low."""
    return 1 - (1 - sum(hits) / len(hits)) ** k


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8])
def test_pass_at_k_is_the_share_of_k_subsets(n):
    for c in range(n + 1):
        hits = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            exact = brute_force_pass_at_k(hits, k)
            ours = grpo.pass_at_k(torch.tensor([c]), n, k).item()
            assert abs(ours - exact) < 1e-12, (n, c, k)
    # negative control: the bootstrap is biased low (one correct of four: 0.684 instead of 1 at k = 4)
    assert abs(bootstrap_pass_at_k([True, False, False, False], 4) - 0.684) < 1e-3
    assert grpo.pass_at_k(torch.tensor([1]), 4, 4).item() == 1.0
    assert grpo.pass_at_k_sizes(4) == [2, 4] and grpo.pass_at_k_sizes(6) == [2, 4, 6] and grpo.pass_at_k_sizes(1) == []


def test_pass_at_k_is_exact_when_the_prompts_are_split_over_ranks(monkeypatch):
    """3 held-out prompts on 2 ranks (2 and 1 prompts): the ranks' sums over their prompts, added up by the
    all-reduce and divided by the global number of prompts, give the pass@k of all prompts. (A per-rank average
    would weigh rank 1's single prompt like rank 0's two.)"""
    table = {0: [1, 0, 0, 0], 1: [1, 1, 1, 0], 2: [0, 0, 0, 1]}  # correctness of prompt p's sample j
    n = 4

    class Task:
        @staticmethod
        def score(texts, answers):
            return [float(table[int(t[1])][int(t[3])]) for t in texts]

    class Run:
        args = grpo.Args(eval_samples_per_prompt=n, micro_batch_size=64, log_completions=0)
        world, eval_prompts, eval_answers, task = 2, [[0], [1], [2]], ["", "", ""], Task()

        def eval_sampler(self):
            return None

    def fake_sample_batch(policy, prompts, *a, **k):
        return {"completion_mask": torch.ones(len(prompts), 1), "prompts": prompts}

    def fake_decode(tokenizer, batch):
        counts = {}
        texts = []
        for prompt in batch["prompts"]:
            j = counts.setdefault(prompt[0], 0)
            counts[prompt[0]] += 1
            texts.append(f"p{prompt[0]}s{j}")
        return texts

    monkeypatch.setattr(grpo, "sample_batch", fake_sample_batch)
    monkeypatch.setattr(grpo, "decode", fake_decode)
    monkeypatch.setattr(grpo, "gathered", lambda *a: __import__("contextlib").nullcontext())
    total = {}
    for rank in (0, 1):  # the all-reduce adds the ranks' values: here, this loop does
        run = Run()
        run.rank = rank
        run.tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()
        metrics, _ = grpo.evaluate(None, {}, run, None)
        for key, value in metrics.items():
            total[key] = total.get(key, 0.0) + value
    for k in (2, 4):
        want = sum(brute_force_pass_at_k([bool(x) for x in table[p]], k) for p in table) / 3
        assert abs(total[f"eval/pass@{k}"] - want) < 1e-12
    per_rank_average = (brute_force_pass_at_k([1, 0, 0, 0], 2) + brute_force_pass_at_k([1, 1, 1, 0], 2)) / 2 / 2
    per_rank_average += brute_force_pass_at_k([0, 0, 0, 1], 2) / 2
    assert abs(per_rank_average - total["eval/pass@2"]) > 1e-3  # negative control


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("script", SCRIPTS)
def test_your_reward_function_scores_everything(script, tmp_path, capsys):
    """A reward file that gives 0.5 to every completion: every reward the script logs is 0.5 (training, eval)."""
    reward = write(tmp_path, "half.py", "def half(completion, answer):\n    return 0.5\n")
    flags = [*tiny_flags(script), "--total_steps", "1", "--reward_fn", f"{reward}:half"]
    code, err = run_in_process(script, [*flags, "--output_dir", str(tmp_path), "--run_name", "r"], capsys)
    assert code == 0, err[-3000:]
    rows = read_metrics(tmp_path / "r")
    logged = {k: v for row in rows for k, v in row.items() if k.endswith("reward_mean")}
    assert logged and all(abs(v - 0.5) < 1e-12 for v in logged.values()), logged
    assert json.loads((tmp_path / "r" / "args.json").read_text())["reward_fn"] == f"{reward}:half"


def test_a_changed_reward_file_is_named_on_resume(tmp_path, capsys):
    reward = write(tmp_path, "half.py", "def half(completion, answer):\n    return 0.5\n")
    flags = [*tiny_flags("grpo"), "--total_steps", "1", "--reward_fn", f"{reward}:half"]
    assert run_in_process("grpo", [*flags, "--output_dir", str(tmp_path), "--run_name", "r"], capsys)[0] == 0
    write(tmp_path, "half.py", "def half(completion, answer):\n    return 0.25\n")
    code, err = run_in_process("grpo", ["--resume", str(tmp_path / "r"), "--total_steps", "2"], capsys)
    assert code == 0 and f"{reward}:half changed since the run started" in err


def test_bad_reward_functions_are_one_line_before_any_model_loads(tmp_path, capsys):
    files = {
        "syntax.py": "def half(completion, answer) return 0.5\n",
        "value.py": "half = 0.5\n",
        "one.py": "def half(completion):\n    return 0.5\n",
        "nan.py": "def half(completion, answer):\n    return float('nan')\n",
    }
    paths = {name: write(tmp_path, name, text) for name, text in files.items()}
    cases = {
        "no colon": ("half.py", "expected FILE.py:NAME or module:NAME"),
        "missing file": (f"{tmp_path}/none.py:half", "no such file"),
        "missing module": ("no_such_module_xyz:half", "cannot import module 'no_such_module_xyz'"),
        "missing name": (f"{paths['value.py']}:other", "has no 'other'"),
        "not callable": (f"{paths['value.py']}:half", "is not callable"),
        "wrong signature": (f"{paths['one.py']}:half", "must take (completion, answer)"),
        "fails to import": (f"{paths['syntax.py']}:half", "fails to import (SyntaxError"),
        "a NaN reward": (f"{paths['nan.py']}:half", "returned nan for the completion"),
    }
    for name, (spec, message) in cases.items():
        out = tmp_path / f"runs_{name.replace(' ', '_')}"
        flags = [*tiny_flags("grpo"), "--reward_fn", spec, "--output_dir", str(out)]
        code, err = run_in_process("grpo", flags, capsys)
        assert isinstance(code, str) and code.startswith("error: ") and message in code, (name, code)
        assert "Traceback" not in err
        assert name == "a NaN reward" or not out.exists()  # before any model loads: nothing written


def test_training_samples_in_the_log(tmp_path, capsys):
    """--log_train_completions 3: three rows per step with the prompt, completion, reward, advantage, length and
    truncation, each row true to the step's batch (the reward is the completion's)."""
    flags = [*tiny_flags("grpo"), "--total_steps", "2", "--log_train_completions", "3"]
    code, err = run_in_process("grpo", [*flags, "--output_dir", str(tmp_path), "--run_name", "r"], capsys)
    assert code == 0, err[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "r" / "train_completions.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 1, 1, 2, 2, 2]
    for row in rows:
        assert set(row) == {"step", "prompt", "completion", "reward", "advantage", "completion_len", "truncated"}
        a, b = re.search(r"(\d+)\+(\d+)=", row["prompt"]).groups()
        correct = row["completion"].strip() == str(int(a) + int(b))
        assert row["reward"] == float(correct) and math.isfinite(row["advantage"])
        assert 1 <= row["completion_len"] <= 4 and (not row["truncated"] or row["completion_len"] == 4)


def test_every_log_is_cut_back_to_the_checkpoint_on_resume(tmp_path, capsys):
    """A run folder cut back to its step-1 checkpoint (what a kill after step 3's rows but before its checkpoint
    leaves: later rows in every log, a dangling `final`) resumes to the uninterrupted run's metrics.jsonl,
    completions.jsonl and train_completions.jsonl, line for line: the rows after the checkpoint are dropped, not
    doubled. (The kill tests cannot always see this: a SIGKILL right after a checkpoint usually leaves no later row.)"""
    import shutil

    logs = ["--log_completions", "2", "--log_train_completions", "2", "--eval_every", "1"]
    flags = [*tiny_flags("grpo"), "--total_steps", "3", "--save_every", "1", *logs, "--output_dir", str(tmp_path)]
    code, err = run_in_process("grpo", [*flags, "--run_name", "full"], capsys)
    assert code == 0, err[-3000:]
    shutil.copytree(tmp_path / "full", tmp_path / "cut", symlinks=True)
    for step in ("step_000002", "step_000003"):
        shutil.rmtree(tmp_path / "cut" / "checkpoints" / step)
    code, err = run_in_process("grpo", ["--resume", str(tmp_path / "cut")], capsys)
    assert code == 0, err[-3000:]
    assert untimed(read_metrics(tmp_path / "cut")) == untimed(read_metrics(tmp_path / "full"))  # (not the times)
    for log in ("completions.jsonl", "train_completions.jsonl"):
        assert (tmp_path / "cut" / log).read_text() == (tmp_path / "full" / log).read_text(), log
