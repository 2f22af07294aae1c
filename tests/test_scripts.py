"""Smoke tests of the scripts as programs: --help, a 2-process torchrun run with its metrics, a hub id offline,
chat templates and other architectures. Resume, determinism and bad input: tests/test_reliability.py."""

import json
import math
import os
import shutil
import sys

import pytest
import torch
from safetensors import safe_open

from common import TINY_POLICY
from tests.harness import (
    ROOT,
    SCRIPTS,
    TINY_RUN,
    load_algorithm,
    one_line_error,
    read_metrics,
    run_batch,
    run_in_process,
    run_script,
    tiny_flags,
)
from tests.test_reliability import untimed

FLAGS = {  # flags each script must document in --help
    "grpo": [
        "--beta",
        "--kl_estimator",
        "--kl_importance_weight",
        "--epsilon_high",
        "--num_iterations",
        "--scale_rewards",
        "--loss_agg",
    ],
    "rpg_fkl": ["--unnormalized", "--form", "--kl_anchor", "--ratio_level", "--clip_eps_low", "--clip_c"],
    "rpg_rkl": ["--unnormalized", "--form", "--kl_anchor", "--ratio_level", "--clip_eps_high", "--no_clip"],
    "pmd_mean": ["--tau", "--baseline", "--length_norm", "--no_length_norm", "--num_minibatches"],
    "a_star_po": ["--num_ref_samples", "--beta1", "--beta2", "--entropy_coef", "--filter_unsolved", "--value_cache"],
    "q_sharp": [
        "--eta",
        "--head",
        "--num_atoms",
        "--v_min",
        "--top_k",
        "--topk_outside",
        "--total_steps",
        "--rollin_eta",
        "--only_switch_token",
        "--eval_etas",
        "--q_model_name_or_path",
    ],
    "dpo_kl": ["--beta", "--divergence", "--alpha", "--loss", "--label_smoothing", "--num_generations", "--pairs_path"],
    "gkd": [
        "--lmbda",
        "--seq_kd",
        "--divergence",
        "--beta",
        "--skew_alpha",
        "--akl_mu",
        "--temperature",
        "--teacher_name_or_path",
        "--divergence_chunk_size",
    ],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, capsys):
    code, _, stdout = run_in_process(script, ["--help"], capsys, stdout=True)
    assert code == 0
    for flag in FLAGS[script] + ["--resume", "--model_name_or_path", "--task", "--chat_template, --no_chat_template"]:
        assert flag in stdout, flag
    assert "--no_no_" not in stdout  # booleans read naturally


KEYS = {
    "grpo": ["losses/kl_ref_rkl_k3"],
    "rpg_fkl": ["losses/kl_term", "losses/ratio_max", "losses/clipfrac_high"],
    "rpg_rkl": ["losses/kl_old_rkl_k3w", "losses/ratio_min", "losses/clipfrac_dual"],
    "pmd_mean": [
        "losses/pmd_loss",
        "losses/residual_abs_mean",
        "losses/delta_max",
        "losses/ratio_seq_min",
        "losses/kl_old_fkl_k1",
    ],
    "a_star_po": ["losses/regression_loss", "losses/kl_ref_rkl_k1_seq", "losses/adv_mean", "perf/stage2_s"],
    "q_sharp": ["losses/q_loss", "charts/num_examples", "eval/sweep/cd_eta0.1/pass@1"],
    "dpo_kl": [
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "losses/kl_ref_rkl_k1_seq",
        "charts/kl_reg_objective",
        "charts/frac_usable_prompts",
        "losses/logratio_abs_max",
    ],
    "gkd": [
        "losses/kl_teacher_fkl_exact",
        "losses/kl_teacher_rkl_exact",
        "losses/entropy_teacher",
        "charts/teacher_logprob_mean",
        "charts/on_policy_frac",
        "eval/kl_teacher_rkl_exact_seq",
    ],
}


RESUMED = ("grpo", "a_star_po", "q_sharp", "dpo_kl", "gkd")  # rpg_fkl, rpg_rkl, pmd_mean resume as grpo does


def test_torchrun_two_processes(tmp_path, capsys, monkeypatch):
    """Every script, a 2-rank FSDP2 run: it logs its metrics and writes its model. A copy of its folder cut back to
    the first checkpoint (what a kill after that checkpoint leaves, plus later rows and a dangling `final`), resumed on
    2 ranks, logs the same rows and ends with the same weights (SIGKILL itself: tests/test_reliability.py). The resume
    is checked for the scripts whose state differs (rpg_fkl, rpg_rkl and pmd_mean resume through the shared Run only,
    as grpo does). Also grpo's sharded AdamW state across world sizes (`sharded_state_failures`). All runs and
    resumes share one torchrun (tests/script_batch.py: one interpreter start-up per rank for all of them); a failure
    names its script."""
    # a 1-process run (its checkpoints hold the whole AdamW state, as torchrun's did before sharded saves)
    one = tmp_path / "grpo_one"
    flags = [*tiny_flags("grpo"), "--output_dir", str(one), "--total_steps", "2", "--save_every", "1"]
    code, err = run_in_process("grpo", [*flags, "--run_name", "one"], capsys)
    assert code == 0, err[-3000:]
    runs = []
    for script in SCRIPTS:
        flags = [*tiny_flags(script), "--output_dir", tmp_path / script, "--total_steps", "2", "--save_every", "1"]
        runs.append((script, [*flags, "--run_name", "ddp"]))
    for script in RESUMED:
        cut = ["copy_without", [tmp_path / script / "ddp", tmp_path / script / "kill", "checkpoints/step_000002"]]
        runs += [cut, (script, ["--resume", tmp_path / script / "kill"])]
    runs += [["copy_without", [one / "one", one / "on_two", "checkpoints/step_000002"]]]
    runs += [("grpo", ["--resume", one / "on_two"])]  # the whole state read by 2 ranks
    codes, err = run_batch(tmp_path, runs)
    failures = {script: f"exit status {code}" for script, code in zip(SCRIPTS, codes) if code != 0}
    assert not failures and codes[-2:] == [0, 0], (failures, codes[-2:], err[-3000:])
    for i, script in enumerate(RESUMED):
        found = smoke_failures(tmp_path / script / "ddp", script)
        start = len(SCRIPTS) + 2 * i  # (a copy_without entry, then the resume)
        copied, resumed = codes[start : start + 2]
        if copied != 0 or resumed != 0:
            found.append(f"the resume's exit status {resumed}")
        elif untimed(read_metrics(tmp_path / script / "kill")) != untimed(read_metrics(tmp_path / script / "ddp")):
            found.append("the resumed run logs other rows")
        elif not same_weights(tmp_path / script / "ddp" / "final", tmp_path / script / "kill" / "final"):
            found.append("the resumed run ends with other weights")
        failures[script] = found
    for script in set(SCRIPTS) - set(RESUMED):
        failures[script] = smoke_failures(tmp_path / script / "ddp", script)
    failures["grpo"] += sharded_state_failures(
        tmp_path / "grpo" / "ddp", one / "one", one / "on_two", capsys, monkeypatch
    )
    failures = {script: found for script, found in failures.items() if found}
    assert not failures, (failures, err[-3000:])


def sharded_state_failures(ddp, one, on_two, capsys, monkeypatch) -> list:
    """What is wrong with grpo's AdamW state across world sizes. A 2-rank checkpoint holds it in optimizer/, one part
    per rank (neither whole), not in trainer_state.pt. Read in 1 process (`adamw_read`: the parts into whole tensors),
    it is the state of the step taken: theta_1 = theta_0 (1 - lr wd) - lr m^ / (sqrt(v^) + eps) with
    m^ = m / (1 - b1), v^ = v / (1 - b2), exactly; not when the parts are not read (negative control). A 1-process
    checkpoint (the whole state in trainer_state.pt, the older format) resumed on 2 ranks continues from its state:
    the next step's state satisfies m_2 = b1 m_1 + (1 - b1) g, v_2 = b2 v_1 + (1 - b2) g^2 for one g."""
    found = []
    step_1 = ddp / "checkpoints" / "step_000001"
    parts = sorted(os.listdir(step_1 / "optimizer"))
    sizes = [os.path.getsize(step_1 / "optimizer" / p) for p in parts if p.endswith(".distcp")]
    if parts != [".metadata", "__0_0.distcp", "__1_0.distcp"] or max(sizes) > 0.75 * sum(sizes):
        found.append(f"optimizer/ holds {parts} ({sizes} bytes): not one part per rank")
    if torch.load(step_1 / "trainer_state.pt", weights_only=False)["optimizer"] is not None:
        found.append("trainer_state.pt of a 2-rank run holds an optimizer state")
    theta_0 = weights(TINY_POLICY)
    theta_1 = weights(step_1)
    lr = read_metrics(ddp)[1]["charts/learning_rate"]
    for read in (True, False):
        m, v = adamw_read(ddp, "cut" if read else "unread", read, capsys, monkeypatch)
        gap = max((theta_1[k] - (theta_0[k] - lr * m[k] / 0.1 / ((v[k] / 1e-3).sqrt() + 1e-8))).abs().max() for k in m)
        if read and gap > 1e-3 * lr:
            found.append(f"the 2-rank state read in 1 process is not the step's: off by {gap:.3g} (lr {lr})")
        if not read and gap < 0.1 * lr:
            found.append(f"negative control: the step is explained without the state ({gap:.3g})")
    whole = torch.load(one / "checkpoints" / "step_000001" / "trainer_state.pt", weights_only=False)["optimizer"]
    m_1 = {k: state["exp_avg"].double() for k, state in whole["state"].items()}
    v_1 = {k: state["exp_avg_sq"].double() for k, state in whole["state"].items()}
    m_2, v_2 = adamw_read(on_two, "three", True, capsys, monkeypatch, ["--total_steps", "3"])  # its step-2 state
    if m_2.keys() != m_1.keys():
        found.append("the 1-process and 2-rank states name other parameters")
        return found
    for start, name in (((m_1, v_1), "whole state"), (({}, {}), "negative control: no state")):
        m_0, v_0 = start
        gap = 0.0
        for k in m_2:
            g = (m_2[k] - 0.9 * m_0.get(k, 0.0)) / 0.1  # the step's gradient, from the first moment
            expected = 0.999 * v_0.get(k, 0.0) + 0.001 * g**2
            gap = max(gap, ((v_2[k] - expected).abs().max() / v_2[k].abs().max()).item())
        if (gap > 1e-4) == (name == "whole state"):
            found.append(f"{name}: the 2 ranks' next AdamW state is off its chain by {gap:.3g} (relative)")
    return found


def weights(folder) -> dict:
    """A save_pretrained folder's tensors, by name, in float64."""
    tensors = safe_open(os.path.join(folder, "model.safetensors"), "pt")
    return {k: tensors.get_tensor(k).double() for k in tensors.keys()}


def adamw_read(run_dir, copy: str, read: bool, capsys, monkeypatch, flags=()) -> tuple:
    """(m, v) by parameter name, float64: the AdamW state that grpo's --resume of a copy of run_dir (cut back to
    step 1 unless `flags` go on) reads in 1 process; read False: with DCP's load doing nothing (a negative control)."""
    target = run_dir.parent / copy
    shutil.copytree(run_dir, target, symlinks=True)
    if not flags:
        shutil.rmtree(target / "checkpoints" / "step_000002")
    algo = load_algorithm("grpo")
    real_start = algo.Run.start
    m, v = {}, {}

    def start(self, policy, evaluate):  # the state as read, before the run goes on (float64 copies)
        model, optimizer = real_start(self, policy, evaluate)
        for name, p in model.named_parameters():
            m[name] = optimizer.state[p]["exp_avg"].double()
            v[name] = optimizer.state[p]["exp_avg_sq"].double()
        return model, optimizer

    def not_read(*args, **kwargs):
        return None

    with monkeypatch.context() as patch:
        patch.setattr(algo.Run, "start", start)
        if not read:
            patch.setattr(algo.DCP, "load", not_read)
        code, err = run_in_process("grpo", ["--resume", str(target), *flags], capsys)
    assert code == 0, err[-3000:]
    return m, v


def smoke_failures(run_dir, script) -> list:
    """What a 2-rank run's folder lacks: its step-0 eval at the reference, finite last metrics, its model."""
    rows = read_metrics(run_dir)
    found = []
    if not (rows[0]["step"] == 0 and "eval/pass@1" in rows[0] and len(rows) >= 2):
        found.append("no step-0 eval row and a later row")
    if abs(rows[0].get("eval/kl_init_rkl_exact_seq", 1.0)) >= 1e-6:
        found.append("the step-0 KL to the initial model is not 0")  # the start is the reference
    keys = ["eval/pass@1", "eval/kl_init_rkl_exact_seq", *KEYS[script]]
    if script != "q_sharp":
        keys += ["charts/reward_mean", "losses/loss", "losses/entropy", "charts/grad_norm", "charts/tokens_per_s"]
    for key in keys:
        if key not in rows[-1] or not math.isfinite(rows[-1][key]):
            found.append(f"{key} missing or not finite")
    if not os.path.isfile(run_dir / "final" / "model.safetensors"):
        found.append("no final/model.safetensors")
    return found


def same_weights(a_dir, b_dir) -> bool:
    a, b = weights(a_dir), weights(b_dir)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("script", SCRIPTS)
def test_log_completions_status_lines_and_strict_json(tmp_path, script, capsys, monkeypatch):
    """--log_completions 3 writes 3 held-out (prompt, completion, reward) rows per eval; "loading" and "step 0:
    evaluating" are printed before the first eval starts; a non-finite metric is logged as null (valid JSON)."""
    algo = load_algorithm(script)
    real_log = algo.Run.log
    monkeypatch.setattr(algo.Run, "log", lambda self, step, m: real_log(self, step, m | {"test/nan": float("nan")}))
    monkeypatch.setattr(
        sys,
        "argv",
        [script, *tiny_flags(script), "--output_dir", str(tmp_path), "--run_name", "r", "--log_completions", "3"],
    )
    with pytest.raises(SystemExit) as done:
        algo.main()
    out = capsys.readouterr().out.splitlines()
    assert done.value.code == 0 and out[:2] == ["loading common/models/tiny-policy", "step 0: evaluating"], out[:3]
    rows = read_metrics(tmp_path / "r")
    assert all(r["test/nan"] is None for r in rows)
    evals = [r["step"] for r in rows if "eval/pass@1" in r]
    with open(tmp_path / "r" / "completions.jsonl") as f:
        shown = [json.loads(line) for line in f]
    assert [r["step"] for r in shown] == [s for s in evals for _ in range(3)]
    assert all(set(r) >= {"prompt", "completion", "reward"} for r in shown)


# ---- bad input: one line, non-zero exit, nothing written --------------------------------------------------
def test_missing_hub_model_offline_is_one_line(tmp_path):
    """(the other bad-input cases, for every script, are in tests/test_reliability.py)"""
    out = tmp_path / "runs"
    proc = run_script("grpo", *TINY_RUN, "--output_dir", str(out), "--model_name_or_path", "nobody-xyz/no-such-model")
    assert "could not load" in one_line_error(proc)
    assert not out.exists() or not any(out.iterdir())


# ---- any causal LM, chat templates ------------------------------------------------------------------------
CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def chat_tokenizer():
    from transformers import AutoTokenizer

    from common import TINY_POLICY

    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    tok.chat_template = CHAT
    return tok


def test_chat_template_is_applied_unless_disabled():
    from common.tasks import Example, encode_prompts

    tok, ex = chat_tokenizer(), [Example("37+58=", "95")]
    assert tok.decode(encode_prompts(tok, ex, True, 32, "train")[0]) == "<user>37+58=\n<assistant>"
    assert tok.decode(encode_prompts(tok, ex, False, 32, "train")[0], skip_special_tokens=True) == "37+58="


def test_other_architecture_with_chat_template(tmp_path, capsys):
    """The real-model path on CPU: a Qwen2-architecture model built from a config, a tokenizer with a chat
    template, bf16 autocast and gradient checkpointing."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = chat_tokenizer()
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "qwen")
    tok.save_pretrained(tmp_path / "qwen")
    flags = [
        *TINY_RUN,
        "--model_name_or_path",
        str(tmp_path / "qwen"),
        "--max_prompt_length",
        "32",
        "--bf16",
        "True",
        "--gradient_checkpointing",
        "--output_dir",
        str(tmp_path),
        "--run_name",
        "q",
    ]
    code, err = run_in_process("grpo", flags, capsys)
    assert code == 0, err[-3000:]
    rows = read_metrics(tmp_path / "q")
    assert [r["step"] for r in rows] == [0, 1, 2]  # (a random model scores 0: no reward signal to check)
    assert rows[2]["losses/entropy"] > 0 and "eval/kl_init_rkl_exact_seq" in rows[2]


def test_generation_uses_the_kv_cache_under_gradient_checkpointing():
    """HF switches the cache off for a training-mode model with gradient checkpointing; `generate` must not let
    that happen (it would feed single tokens without their past)."""
    from transformers import AutoTokenizer

    from common import TINY_POLICY
    from tests.harness import load_algorithm

    grpo = load_algorithm("grpo")
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    prompts = [tok(p)["input_ids"] for p in ("12+34=", "5+6=", "99+99=")]
    eos = torch.tensor([tok.eos_token_id])
    outs = []
    for checkpointing in (False, True):
        args = grpo.Args(max_new_tokens=4, gradient_checkpointing=checkpointing, bf16=False)
        model = grpo.load_model(TINY_POLICY, args, trainable=True)
        assert getattr(model, "is_activation_checkpointing", model.is_gradient_checkpointing) == checkpointing
        batch = grpo.sample_batch(model, prompts, args, eos, tok.pad_token_id, torch.Generator().manual_seed(0))
        assert model.training  # mode restored
        outs.append(batch["completion_ids"])
    assert torch.equal(outs[0], outs[1])


def test_gpu_check_runs_on_cpu(tmp_path, monkeypatch, capsys):
    """benchmarks/gpu_check.py, the prepared GPU script, end to end in its CPU mode (--device cpu --tiny: the same
    model and tokenizer builder at 2 layers, the same flags and table), so it cannot rot before a GPU is lent: every
    run completes with finite losses and KL (online DPO on a random model finds no pair: no update, said so). Its
    script runs happen in this process (the same command lines, without an interpreter start-up each)."""
    import importlib.util
    import subprocess

    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    real_run = subprocess.run

    def in_process(cmd, **kwargs):
        if cmd[0] != sys.executable or os.path.dirname(cmd[1]) != os.path.join(ROOT, "algorithms"):
            return real_run(cmd, **kwargs)  # (TRL's worker, where TRL is installed)
        script = os.path.basename(cmd[1]).removesuffix(".py")
        code, err = run_in_process(script, cmd[2:], capsys)
        return subprocess.CompletedProcess(cmd, code if isinstance(code, int) else 1, "", err)

    monkeypatch.setattr(gpu_check.subprocess, "run", in_process)
    argv = ["gpu_check.py", "--device", "cpu", "--tiny", "--steps", "1", "--max_new_tokens", "16"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as done:
        gpu_check.main()
    assert done.value.code == 0, capsys.readouterr().out[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {*SCRIPTS, "dpo_kl offline pairs", "TRL GRPOTrainer"}
    for name in [*SCRIPTS, "dpo_kl offline pairs"]:
        r = results[name]
        assert r["loss_finite"] is True or (name, r["loss_finite"]) == ("dpo_kl", "no update"), (name, r)
        assert r["kl_finite"] is True and r["step_s"] > 0 and r["tokens_per_s"] > 0, (name, r)
    assert "error" not in results["TRL GRPOTrainer"] or results["TRL GRPOTrainer"]["error"] == "not installed"
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} |" in table for name in results)
