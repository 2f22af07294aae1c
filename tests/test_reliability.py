"""Reliability of every script: a kill (SIGTERM, or SIGKILL after a checkpoint) and `--resume` reproduce an
uninterrupted run bit for bit; the same seed gives the same run, another seed other samples; bad input gives a
one-line error, a non-zero exit and writes nothing (the table at the bottom)."""

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.harness import ROOT, SCRIPTS, read_metrics, run_in_process, start_script, tiny_flags

TIMING = ("time_s", "perf/", "charts/step_time_s", "charts/tokens_per_s")
FINAL_ONLY = ("eval/sweep/", "eval/frontier/")  # q_sharp's eta sweep runs after the last round of a run only


def untimed(rows):
    """Rows without timing keys, and without the end-of-run sweep except on the last row (a run resumed past
    its old end has that sweep on an inner row; an uninterrupted run has it only at its own end)."""
    return [
        {
            k: v
            for k, v in r.items()
            if not k.startswith(TIMING) and (i == len(rows) - 1 or not k.startswith(FINAL_ONLY))
        }
        for i, r in enumerate(rows)
    ]


def final_params(run_dir, script):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final"))
    return dict(model.named_parameters())


def kill_when(proc, ready, sig, timeout=240, wait=True, group=False):
    """Send `sig` once ready() holds (to the process, or to its whole group: torchrun and its workers); the
    process must still be running then (else the test would be vacuous). With `wait`: (exit status, stderr)."""
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert time.time() - t0 < timeout, "timed out waiting to kill"
        time.sleep(0.02)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    if not wait:
        return None
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def signal_in_process(script, flags, capsys, ready, sig=signal.SIGTERM, timeout=240):
    """main() in this process (no interpreter start-up), sent `sig` by a watcher thread once ready() holds; the
    script's handler runs in this thread, as in its own process: (exit status, stderr). The signal must come while
    the run is running (else the test would be vacuous). The handlers of this process are restored afterwards."""
    done = threading.Event()
    sent = []

    def watch():
        t0 = time.time()
        while not done.is_set() and time.time() - t0 < timeout:
            try:
                now = ready()
            except ValueError:  # a log line read while it was being written
                now = False
            if now:
                sent.append(sig)
                os.kill(os.getpid(), sig)
                return
            time.sleep(0.02)

    def after_the_run(signum, frame):
        sent.append("after the run")  # (recorded: the exit status then shows the run was not stopped)

    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(sig, after_the_run)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        code, err = run_in_process(script, flags, capsys)
    finally:
        done.set()
        watcher.join()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert sent == [sig], f"the run was not signalled while it ran ({sent}): {err[-3000:]}"
    return code, err


def logged_rows(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return len(read_metrics(run_dir)) if os.path.exists(path) else 0


def has_checkpoint(run_dir):
    ckpt = os.path.join(run_dir, "checkpoints")
    return os.path.isdir(ckpt) and any(
        os.path.isfile(os.path.join(ckpt, d, "trainer_state.pt"))
        for d in os.listdir(ckpt)
        if not d.endswith((".tmp", ".old"))
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_then_resume_equals_uninterrupted_run(tmp_path, script, capsys):
    n = "3" if script == "q_sharp" else "4"
    base = [*tiny_flags(script), "--output_dir", str(tmp_path)]
    flags = [*base, "--total_steps", n, "--log_completions", "2", "--log_train_completions", "2"]
    if script != "q_sharp":
        flags += ["--eval_every", "2"]
    code, err = run_in_process(script, [*flags, "--run_name", "full"], capsys)
    assert code == 0, err[-3000:]
    want = untimed(read_metrics(tmp_path / "full"))
    # SIGTERM mid-run: the step (round) in flight finishes, a checkpoint is written, exit status 143
    term = [*flags, "--run_name", "term", "--save_every", "1000"]
    rc, err = signal_in_process(script, term, capsys, lambda: logged_rows(tmp_path / "term") >= 2)
    assert rc == 143 and "stopped: SIGTERM" in err, err[-3000:]
    assert has_checkpoint(tmp_path / "term")
    # SIGKILL right after a periodic checkpoint: nothing is flushed, the checkpoint is what survives
    kill = start_script(script, *flags, "--run_name", "kill", "--save_every", "2")
    rc, _ = kill_when(kill, lambda: has_checkpoint(tmp_path / "kill"), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    before = untimed(read_metrics(tmp_path / "kill"))
    assert before == want[: len(before)]  # determinism: a fresh run with the same seed logs the same rows
    for name in ("term", "kill"):  # resumed in this process (saves an interpreter start-up per run)
        code, err = run_in_process(script, ["--resume", str(tmp_path / name)], capsys)
        assert code == 0, err[-3000:]
        assert untimed(read_metrics(tmp_path / name)) == want, name  # nothing lost, nothing duplicated
        for log in ("completions.jsonl", "train_completions.jsonl"):  # the sample logs too
            assert (tmp_path / name / log).read_text() == (tmp_path / "full" / log).read_text(), (name, log)
        a, b = final_params(tmp_path / "full", script), final_params(tmp_path / name, script)
        for key, p in a.items():
            assert torch.equal(p, b[key]), (name, key)
    # another seed: other samples (its first logged training row differs)
    code, err = run_in_process(script, [*base, "--total_steps", "1", "--seed", "2", "--run_name", "seed2"], capsys)
    assert code == 0, err[-3000:]
    assert untimed(read_metrics(tmp_path / "seed2"))[1] != want[1]


# ---- bad input: one line, exit status != 0, nothing written or overwritten ----------------------------------
GOOD = '{"prompt": "1+1=", "answer": "2"}\n'
SPLIT = {  # a batch that cannot be split as asked (N/A: the script has no such split)
    "grpo": (["--prompts_per_step", "3", "--num_minibatches", "5"], "does not split"),
    "rpg_fkl": (["--prompts_per_step", "3", "--num_minibatches", "5"], "does not split"),
    "rpg_rkl": (["--prompts_per_step", "3", "--num_minibatches", "5"], "does not split"),
    "pmd_mean": (["--prompts_per_step", "3", "--num_minibatches", "5"], "does not split"),
    "a_star_po": (["--prompts_per_step", "3", "--num_minibatches", "2"], "does not split"),
    "gkd": (["--prompts_per_step", "3", "--num_minibatches", "2"], "does not split"),
}
NONFINITE = {  # flags that make an update non-finite (default: a learning rate of 1e30). DPO: after a 1e30 step
    "dpo_kl": [
        "--loss",
        "ipo",
        "--beta",
        "1e-30",
    ],  # no prompt has a pair (an honest 0 loss); IPO's 1/(2 beta) overflows
}
MISMATCH = {"q_sharp": "--q_model_name_or_path", "gkd": "--teacher_name_or_path"}
ALGO_CASES = {  # values that make no sense for one algorithm's math
    "grpo": {
        "negative beta": (["--beta", "-0.1"], "--beta must be >= 0"),
        "importance weight of a reward": (
            ["--kl_placement", "reward", "--kl_importance_weight"],
            "--kl_importance_weight needs --kl_placement loss",
        ),
    },
    "rpg_fkl": {"negative beta": (["--beta", "-0.1"], "--beta must be >= 0")},
    "rpg_rkl": {"negative beta": (["--beta", "-0.1"], "--beta must be >= 0")},
    "pmd_mean": {"zero tau": (["--tau", "0"], "--tau must be > 0")},
    "a_star_po": {"zero beta2": (["--beta2", "0"], "--beta2 must be > 0")},
    "dpo_kl": {"zero beta": (["--beta", "0"], "--beta must be > 0")},
    "gkd": {"beta above 1": (["--beta", "1.5"], "--beta")},
    "q_sharp": {
        "zero eta": (["--eta", "0"], "--eta must be > 0"),
        "sampling a folder that is no run": (["--sample_from", "/no/such/run"], "is not a run folder"),
        "prompts file without a run": (["--prompts_file", "p.jsonl"], "go with --sample_from RUN"),
    },
}  # a second model that must share the tokenizer


def bad_cases(script, tmp):
    def write(name, text):
        (tmp / name).write_text(text)
        return str(tmp / name)

    def write_bytes(name, data):
        (tmp / name).write_bytes(data)
        return str(tmp / name)

    cases = {
        "unknown flag value": (["--learning_rate", "fast"], "--learning_rate"),
        "unknown task": (["--task", "nope"], "unknown task 'nope'"),
        "missing local model": (["--model_name_or_path", str(tmp / "no_such_model")], "no such local folder"),
        "malformed jsonl": (
            [
                "--task",
                "jsonl",
                "--train_file",
                write("bad.jsonl", GOOD + "{oops\n"),
                "--eval_file",
                write("ok.jsonl", GOOD),
            ],
            "bad.jsonl:2: malformed JSON",
        ),
        "empty dataset": (
            ["--task", "jsonl", "--train_file", write("empty.jsonl", "\n"), "--eval_file", write("ok2.jsonl", GOOD)],
            "empty dataset",
        ),
        "prompt too long": (["--max_prompt_length", "4"], "> --max_prompt_length 4"),
        "non-finite loss": (NONFINITE.get(script, ["--learning_rate", "1e30"]), "stopping without saving"),
        "negative learning rate": (["--learning_rate", "-1e-4"], "--learning_rate must be >= 0"),
        "negative grad clip": (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0"),
        "zero new tokens": (["--max_new_tokens", "0"], "--max_new_tokens must be > 0"),
        "zero prompt length": (["--max_prompt_length", "0"], "--max_prompt_length must be > 0"),
        "longer than the model": (["--max_new_tokens", "600"], "the model's 512 positions"),
        "zero temperature": (["--temperature", "0"], "--temperature must be > 0"),
        "output dir is a file": (["--output_dir", write("a_file", "x")], "a_file"),
        "non-utf8 jsonl": (
            [
                "--task",
                "jsonl",
                "--train_file",
                write_bytes("latin.jsonl", GOOD.encode() + b'{"prompt": "\xe9"}\n'),
                "--eval_file",
                write("ok3.jsonl", GOOD),
            ],
            "latin.jsonl:2: not UTF-8",
        ),
        "empty answer": (
            [
                "--task",
                "jsonl",
                "--train_file",
                write("hash.jsonl", GOOD + '{"prompt": "2+2=", "answer": "4 ####"}\n'),
                "--eval_file",
                write("ok4.jsonl", GOOD),
            ],
            "hash.jsonl:2: the answer",
        ),
        "data file is a directory": (
            ["--task", "jsonl", "--train_file", str(tmp), "--eval_file", write("ok5.jsonl", GOOD)],
            "is a directory",
        ),
        "resume of another script's run": (["--resume", foreign_run(tmp)], "is a run of another script"),
        "resume of a twin script's run": (["--resume", twin_run(tmp, script)], "is a run of twin.py"),
        "not-a-number flag": (["--learning_rate", "nan"], "--learning_rate must be a finite number"),
        "infinite flag": (["--temperature", "inf"], "--temperature must be a finite number"),
        "empty model folder": (["--model_name_or_path", empty_folder(tmp)], "has no config.json"),
        "default lengths beyond the model": (
            ["--task", "jsonl", "--train_file", write("ok6.jsonl", GOOD), "--eval_file", write("ok7.jsonl", GOOD)],
            "--max_prompt_length 512 (the task's default) + --max_new_tokens 1024 (the task's default)",
        ),
        **ALGO_CASES.get(script, {}),
    }
    if not tracking_installed():  # (--track with TensorBoard or W&B installed is no error)
        cases["tracking without a backend"] = (["--track"], "--track needs tensorboard or wandb")
    if script in SPLIT:
        cases["batch split"] = SPLIT[script]
    if script in MISMATCH:
        other = tmp / "other_tokenizer"
        make_other_tokenizer_model(other)
        cases["tokenizer mismatch"] = ([MISMATCH[script], str(other)], "tokenizer")
    return cases


def foreign_run(tmp) -> str:
    """A run folder whose args.json holds a flag no script has."""
    (tmp / "foreign_run").mkdir(exist_ok=True)
    (tmp / "foreign_run" / "args.json").write_text('{"no_such_flag": 1}')
    return str(tmp / "foreign_run")


def twin_run(tmp, script) -> str:
    """A run folder of a script with this script's flags (rpg_fkl.py and rpg_rkl.py are such twins)."""
    from tests.harness import load_algorithm

    folder = tmp / f"twin_run_{script}"
    folder.mkdir(exist_ok=True)
    saved = dataclasses.asdict(load_algorithm(script).Args()) | {"script": "twin.py"}
    (folder / "args.json").write_text(json.dumps(saved))
    return str(folder)


def empty_folder(tmp) -> str:
    (tmp / "empty_model").mkdir(exist_ok=True)
    return str(tmp / "empty_model")


def tracking_installed() -> bool:
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("tensorboard", "wandb"))


def make_other_tokenizer_model(path):
    """The tiny policy's weights under a tokenizer whose vocabulary differs in one token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import TINY_POLICY

    AutoModelForCausalLM.from_pretrained(TINY_POLICY).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(path)


def assert_one_line_error(code, message, err=""):
    """`error: ...` in one line naming `message`; or tyro's own usage error (exit status 2) naming the flag."""
    if code == 2 and message.startswith("--"):
        assert message in err, err
        return
    assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, code
    assert message in code, code


CASE_NAMES = [
    "unknown flag value",
    "unknown task",
    "missing local model",
    "malformed jsonl",
    "empty dataset",
    "prompt too long",
    "non-finite loss",
    "batch split",
    "tokenizer mismatch",
    "negative learning rate",
    "negative grad clip",
    "zero new tokens",
    "zero prompt length",
    "longer than the model",
    "zero temperature",
    "output dir is a file",
    "non-utf8 jsonl",
    "empty answer",
    "data file is a directory",
    "resume of another script's run",
    "resume of a twin script's run",
    "not-a-number flag",
    "infinite flag",
    "empty model folder",
    "default lengths beyond the model",
    "tracking without a backend",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_non_finite_reward_stops_the_run(tmp_path, script, capsys, monkeypatch):
    """A reward function that returns NaN for one completion: one line naming it, before it reaches a loss or a
    histogram (Q# used to bin NaN into an atom, DPO-KL to crash in the pair builder)."""
    import common.tasks

    monkeypatch.setattr(common.tasks, "exact_match_reward", lambda c, a: math.nan if c.strip() == a else 0.0)
    code, err = run_in_process(script, [*tiny_flags(script), "--output_dir", str(tmp_path)], capsys)
    assert_one_line_error(code, "returned nan for the completion", err)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_input_table(tmp_path, script, capsys):
    """Every case of the table for this script (cases that do not apply to it are listed in SPLIT / MISMATCH)."""
    cases = bad_cases(script, tmp_path)
    assert set(cases) <= set(CASE_NAMES) | set(ALGO_CASES.get(script, {}))
    for name, (flags, message) in cases.items():
        out = tmp_path / f"runs_{name.replace(' ', '_')}"
        code, err = run_in_process(script, [*tiny_flags(script), "--output_dir", str(out), *flags], capsys)
        assert_one_line_error(code, message, err)
        assert "Traceback" not in err, (name, err[-2000:])
        written = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs] if out.exists() else []
        if name == "non-finite loss":  # the run folder holds its log, but no model, final or intermediate
            assert not any(f.endswith((".safetensors", ".pt")) for f in written), (script, written)
        else:
            assert written == [], (name, written)


def test_a_run_folder_in_use_is_not_resumed(tmp_path, capsys):
    """Two processes on one folder: while a run holds RUN/.lock (here this test, as the other process), --resume of
    that folder is a one-line error that writes nothing; once it is free the resume runs. (The lock is shared
    PLUMBING: one script tests it for all.)"""
    import fcntl

    run = tmp_path / "r"
    flags = [*tiny_flags("grpo"), "--output_dir", str(tmp_path), "--run_name", "r", "--total_steps", "1"]
    assert run_in_process("grpo", flags, capsys)[0] == 0
    logged = (run / "metrics.jsonl").read_text()
    with open(run / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again: the finished run released it
        code, _ = run_in_process("grpo", ["--resume", str(run), "--total_steps", "2"], capsys)
        assert_one_line_error(code, "is in use by another run")
        assert (run / "metrics.jsonl").read_text() == logged and not (run / "checkpoints" / "step_000002").exists()
    assert run_in_process("grpo", ["--resume", str(run), "--total_steps", "2"], capsys)[0] == 0
    assert (run / "checkpoints" / "step_000002").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_existing_run_folder_is_not_overwritten(tmp_path, script, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("keep me\n")
    code, _ = run_in_process(
        script, [*tiny_flags(script), "--output_dir", str(tmp_path), "--run_name", "taken"], capsys
    )
    assert_one_line_error(code, "already exists")
    assert (tmp_path / "taken" / "metrics.jsonl").read_text() == "keep me\n"
    assert os.listdir(tmp_path / "taken") == ["metrics.jsonl"]


def test_a_real_full_disk_during_a_save(tmp_path, capsys):
    """A 15 MB tmpfs as --output_dir (root only; skipped where mounting is refused): the second checkpoint does
    not fit. torch.save then raises RuntimeError ("unexpected pos"), not OSError; and on a 2 MB tmpfs the first
    one's weights do not fit (safetensors raises SafetensorError). Each: one line naming the checkpoint, the .tmp
    folder gone, the earlier checkpoint and the log intact."""
    for size, steps, kept in (("15m", 2, ["step_000001"]), ("2m", 1, [])):
        disk = tmp_path / f"disk_{size}"
        disk.mkdir()
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()[:80]}")
        try:
            flags = [*tiny_flags("grpo"), "--output_dir", str(disk), "--run_name", "r", "--save_every", "1"]
            code, err = run_in_process("grpo", [*flags, "--total_steps", str(steps)], capsys)
            assert_one_line_error(code, f"could not save {disk / 'r' / 'checkpoints'}")
            assert "nothing was saved" in code if not kept else f"{kept[-1]} is intact" in code
            assert sorted(os.listdir(disk / "r" / "checkpoints")) == kept and "Traceback" not in err
            assert [r["step"] for r in read_metrics(disk / "r")] == list(range(steps + 1))
        finally:
            subprocess.run(["umount", str(disk)])


@pytest.mark.parametrize("error", ["OSError", "RuntimeError", "SafetensorError"])
def test_every_kind_of_failed_write_is_one_line(tmp_path, capsys, monkeypatch, error):
    """The exceptions a full disk raises through torch.save and safetensors, injected into the final save."""
    from safetensors import SafetensorError

    raised = {
        "OSError": OSError(28, "No space left on device"),
        "RuntimeError": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1 vs 2"),
        "SafetensorError": SafetensorError("Error while serializing: I/O error: No space left on device"),
    }[error]
    real_save = torch.save

    def fail(obj, f, *a, **k):
        if "_000002" in str(f):
            raise raised
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fail)
    flags = [*tiny_flags("grpo"), "--output_dir", str(tmp_path), "--run_name", "r", "--total_steps", "2"]
    code, err = run_in_process("grpo", [*flags, "--save_every", "1"], capsys)
    assert_one_line_error(code, "step_000001 is intact")
    assert sorted(os.listdir(tmp_path / "r" / "checkpoints")) == ["step_000001"] and "Traceback" not in err


@pytest.mark.parametrize("script", SCRIPTS)
def test_failed_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path, script, capsys, monkeypatch):
    """Disk full while saving the last checkpoint: one line, and the periodic checkpoint before it is intact."""
    flags = [
        *tiny_flags(script),
        "--output_dir",
        str(tmp_path),
        "--run_name",
        "r",
        "--total_steps",
        "2",
        "--save_every",
        "1",
    ]
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        if "_000002" in str(f):
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    code, _ = run_in_process(script, flags, capsys)
    assert_one_line_error(code, "No space left on device")
    run = tmp_path / "r"
    assert not os.path.lexists(run / "final")
    ckpts = os.listdir(run / "checkpoints")  # the interrupted save was removed, the one before it kept
    assert len(ckpts) == 1 and os.path.isfile(run / "checkpoints" / ckpts[0] / "trainer_state.pt")
    # and the run continues from that checkpoint once the disk has room again
    monkeypatch.setattr(torch, "save", real_save)
    code, _ = run_in_process(script, ["--resume", str(run)], capsys)
    assert code == 0
    assert (run / "final").is_dir()


def test_resume_after_a_kill_or_a_full_disk_keeps_every_complete_record(tmp_path, capsys):
    """What a kill or a full disk can leave, in copies of a finished run: a cut newest checkpoint (its trainer
    state, or its weights), an interrupted save's .tmp folder, a cut last line of metrics.jsonl. --resume names
    each, sets the cut checkpoint aside (step_N.corrupt), removes the .tmp folder, drops the cut line, resumes from
    the newest intact checkpoint and ends exactly as the uninterrupted run (rows and weights)."""
    flags = [*tiny_flags("grpo"), "--output_dir", str(tmp_path), "--total_steps", "3", "--save_every", "1"]
    assert run_in_process("grpo", [*flags, "--run_name", "full"], capsys)[0] == 0
    want = untimed(read_metrics(tmp_path / "full"))
    for broken in ("trainer_state.pt", "model.safetensors"):
        run = tmp_path / broken
        shutil.copytree(tmp_path / "full", run, symlinks=True)
        path = run / "checkpoints" / "step_000003" / broken
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        (run / "checkpoints" / "step_000004.tmp").mkdir()
        with open(run / "metrics.jsonl", "a") as f:
            f.write('{"step": 4, "time_')
        code, err = run_in_process("grpo", ["--resume", str(run)], capsys)
        assert code == 0, err[-2000:]
        assert f"{path} is unreadable" in err and "resuming from step_000002" in err
        assert "removing" in err and "step_000004.tmp" in err and "dropping the cut last line" in err
        left = ["step_000001", "step_000002", "step_000003", "step_000003.corrupt"]
        assert sorted(os.listdir(run / "checkpoints")) == left
        assert untimed(read_metrics(run)) == want
        a, b = final_params(tmp_path / "full", "grpo"), final_params(run, "grpo")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_a_finished_run_and_changed_flags(tmp_path, capsys):
    """A finished run says where its results are; --resume with --total_steps below its last checkpoint is an
    error that writes nothing, and equal to it says the run is finished (exit 0); --keep_last may change on resume;
    a flag missing from args.json is named in a warning."""
    run = tmp_path / "r"
    flags = [*tiny_flags("grpo"), "--output_dir", str(tmp_path), "--run_name", "r", "--total_steps", "2"]
    code, err, out = run_in_process("grpo", [*flags, "--save_every", "1"], capsys, stdout=True)
    assert code == 0 and "finished step 2: eval/pass@1 " in out and f"results: {run}" in out
    before = {name: (run / name).read_text() for name in ("args.json", "metrics.jsonl")}
    code, _ = run_in_process("grpo", ["--resume", str(run), "--total_steps", "1"], capsys)
    assert_one_line_error(code, "--total_steps 1 < the checkpoint's step 2")
    code, err = run_in_process("grpo", ["--resume", str(run)], capsys)
    assert code == 0 and err.strip() == f"finished: {run} has run its 2 steps (to go on: raise --total_steps)"
    assert {name: (run / name).read_text() for name in before} == before
    saved = json.loads((run / "args.json").read_text())
    del saved["beta"]
    (run / "args.json").write_text(json.dumps(saved))
    code, err = run_in_process("grpo", ["--resume", str(run), "--total_steps", "3", "--keep_last", "1"], capsys)
    assert code == 0 and "args.json lacks --beta 0.04" in err
    assert os.listdir(run / "checkpoints") == ["step_000003"]


def test_ctrl_c(tmp_path, capsys, monkeypatch):
    """Ctrl-C while the models load: one line, exit status 130. A second Ctrl-C during a run stops it at once
    (the first one waits for the step and its checkpoint), in one line."""
    from tests.harness import load_algorithm

    algo = load_algorithm("grpo")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(algo, "load_model", interrupted)
        flags = [*tiny_flags("grpo"), "--output_dir", str(tmp_path), "--run_name", "load"]
        code, err = run_in_process("grpo", flags, capsys)
    assert code == 130 and err.strip() == "stopped at once (Ctrl-C): nothing was saved since the last checkpoint"
    run = tmp_path / "twice"
    slow = ["--prompts_per_step", "64", "--num_generations", "16", "--total_steps", "1000"]  # seconds a step
    proc = start_script("grpo", *tiny_flags("grpo"), *slow, "--output_dir", str(tmp_path), "--run_name", "twice")
    kill_when(proc, lambda: logged_rows(run) >= 1, signal.SIGINT, wait=False)  # in step 1
    time.sleep(0.2)  # (two signals before Python's handler runs would count as one)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "s/it" not in line]
    assert proc.returncode == 130 and lines[-1].startswith("stopped at once"), err[-2000:]
    assert not os.path.exists(run / "checkpoints")  # it did not wait for the step and its checkpoint


def test_torchrun_one_run_name_and_one_stop_line(tmp_path):
    """Under torchrun with the default run name: one folder (the name is chosen on rank 0), and SIGTERM gives one
    `stopped:` line, whose --resume path exists."""
    proc = start_script("grpo", *tiny_flags("grpo"), "--total_steps", "1000", "--output_dir", str(tmp_path), nproc=2)

    def logged():
        folders = os.listdir(tmp_path)
        return len(folders) == 1 and logged_rows(tmp_path / folders[0]) >= 2

    _, err = kill_when(proc, logged, signal.SIGTERM, group=True)
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert len(os.listdir(tmp_path)) == 1 and len(stopped) == 1, err[-3000:]
    assert os.path.isdir(stopped[0].rsplit("--resume ", 1)[1])


def test_a_copied_script_says_what_it_needs(tmp_path):
    """A script copied alone (the card's own use) fails with one line naming the common/ folder."""
    shutil.copy(os.path.join(ROOT, "algorithms", "grpo.py"), tmp_path)
    proc = subprocess.run([sys.executable, str(tmp_path / "grpo.py"), "--help"], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: ") and "common/ folder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
