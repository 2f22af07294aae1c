"""LoRA (--lora_r): the trained model is the base model with peft adapters (B starts at 0), and the frozen initial
model (reference, anchor, the eval's KL to init) is that same model with its adapters off, not a second copy. At step
0 the policy's log-probs equal the base model's exactly and the logged KL is 0; the adapters-off model equals a
separately loaded base model after training too; a stopped and resumed run ends as the uninterrupted one; `final`
loads with from_pretrained (adapters merged) and gives the trained log-probs. (2 processes = 1, FSDP2 over the LoRA
model: tests/test_distributed.py.)"""

import os
import shutil
from importlib.util import find_spec

import pytest
import torch

from common import TINY_POLICY
from tests.harness import load_algorithm, read_metrics, run_in_process, tiny_flags
from tests.test_reliability import final_params, untimed

# (not importorskip: importing peft takes 6 s, which every pytest-xdist worker would pay while collecting)
pytestmark = pytest.mark.skipif(find_spec("peft") is None, reason="--lora_r needs peft")
grpo = load_algorithm("grpo")
IDS = torch.tensor([[1, 5, 7, 9, 11, 4], [1, 8, 3, 2, 6, 10]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_adapters_start_at_zero_and_the_initial_model_is_the_base_with_adapters_off():
    from transformers import AutoModelForCausalLM

    args = grpo.Args(lora_r=4, bf16=False)
    policy = grpo.load_model(TINY_POLICY, args, trainable=True)
    base = AutoModelForCausalLM.from_pretrained(TINY_POLICY)
    initial = grpo.initial_model(policy, args)
    assert torch.equal(logits(policy), logits(base))  # B = 0: the policy starts as the base model
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # only the adapters train
    for name, p in policy.named_parameters():  # as training would: the adapters move
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    assert (logits(policy) - logits(base)).abs().max() > 1e-3  # negative control: the adapters act
    assert torch.equal(logits(initial), logits(base))  # and off, they do not
    # no second copy held: every tensor of the initial model is one of the policy's
    policy_tensors = {id(p) for p in policy.parameters()}
    assert all(id(p) in policy_tensors for p in initial.parameters())
    copy = grpo.initial_model(policy, grpo.Args(bf16=False))  # negative control: full fine-tuning
    assert not any(id(p) in policy_tensors for p in copy.parameters())


def test_a_lora_run_resumes_bit_for_bit_and_its_final_folder_loads_merged(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    flags = [*tiny_flags("grpo"), "--lora_r", "8", "--learning_rate", "0.01", "--save_every", "1"]
    flags += ["--total_steps", "3", "--output_dir", str(tmp_path)]
    code, err = run_in_process("grpo", [*flags, "--run_name", "full"], capsys)
    assert code == 0, err[-3000:]
    rows = read_metrics(tmp_path / "full")
    assert rows[0]["eval/kl_init_rkl_exact_seq"] == 0.0 and rows[-1]["eval/kl_init_rkl_exact_seq"] > 1e-4
    # a kill after step 1: the folder cut back to its first checkpoint, resumed
    shutil.copytree(tmp_path / "full", tmp_path / "kill", symlinks=True)
    for step in ("step_000002", "step_000003"):
        shutil.rmtree(tmp_path / "kill" / "checkpoints" / step)
    code, err = run_in_process("grpo", ["--resume", str(tmp_path / "kill")], capsys)
    assert code == 0, err[-3000:]
    assert untimed(read_metrics(tmp_path / "kill")) == untimed(rows)
    a, b = final_params(tmp_path / "full", "grpo"), final_params(tmp_path / "kill", "grpo")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # `final` is an ordinary causal LM (merged), with the trained model's log-probs
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")
    args = grpo.Args(lora_r=8, bf16=False)
    trained = grpo.load_model(str(tmp_path / "full" / "final"), args, trainable=True)  # base + final/adapter
    assert (logits(merged) - logits(trained)).abs().max() < 1e-4  # (float32 merge W + s B A)
    base = AutoModelForCausalLM.from_pretrained(TINY_POLICY)
    assert (logits(merged) - logits(base)).abs().max() > 1e-3  # negative control: it trained
    assert not os.path.exists(tmp_path / "full" / "checkpoints" / "step_000001" / "model.safetensors")


@pytest.mark.parametrize("script", ["rpg_fkl", "a_star_po", "dpo_kl", "gkd", "pmd_mean"])
def test_every_policy_script_trains_adapters(script, tmp_path, capsys):
    """One step with --lora_r 4: the run ends, its step-0 KL to init is exactly 0 (the adapters-off model is the
    initial one), and only adapter weights are in the checkpoint's adapter folder."""
    flags = [*tiny_flags(script), "--lora_r", "4", "--total_steps", "1", "--output_dir", str(tmp_path)]
    code, err = run_in_process(script, [*flags, "--run_name", "r"], capsys)
    assert code == 0, err[-3000:]
    assert read_metrics(tmp_path / "r")[0]["eval/kl_init_rkl_exact_seq"] == 0.0
    assert os.path.isfile(tmp_path / "r" / "final" / "adapter" / "adapter_model.safetensors")
