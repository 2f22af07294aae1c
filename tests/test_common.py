"""common/: the arithmetic task, JSONL and hub loaders, answer extraction, rewards, and the shipped tiny models."""

import math
import sys

import pytest
import torch

from common import TINY_POLICY, TINY_TEACHER
from common.rewards import builtin_math_match, exact_match_reward, math_reward, normalize_math, predicted_answer
from common.tasks import ARITHMETIC_NUM_EVAL, TaskError, arithmetic_task, extract_answer, load_jsonl, load_task


# ---- arithmetic task --------------------------------------------------------------------------------------
def test_arithmetic_split_is_fixed_disjoint_and_complete():
    a, b = arithmetic_task(), arithmetic_task()
    assert a.train == b.train and a.eval == b.eval
    assert len(a.eval) == ARITHMETIC_NUM_EVAL and len(a.train) + len(a.eval) == 100 * 100
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.eval}
    for ex in a.eval[:50]:
        x, y = ex.prompt[:-1].split("+")
        assert ex.prompt.endswith("=") and int(ex.answer) == int(x) + int(y)


def test_exact_match_reward():
    assert exact_match_reward("95", "95") == 1.0 and exact_match_reward(" 95\n", "95") == 1.0
    assert exact_match_reward("095", "95") == 0.0 and exact_match_reward("9", "95") == 0.0
    assert exact_match_reward("", "95") == 0.0


# ---- answer extraction and math rewards -------------------------------------------------------------------
@pytest.mark.parametrize(
    "text,answer",
    [
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("so the total is\n#### 1,234", "1234"),
        ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{x^{2}+1}", "x^{2}+1"),
        ("  42 ", "42"),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    "completion,answer,reward",
    [
        ("... so she has \\boxed{72} clips", "72", 1.0),
        ("The answer is 1,234.", "1234", 1.0),
        ("#### 18", "18", 1.0),
        ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{1/2}", "0.5", 1.0),
        ("\\boxed{10\\%}", "10", 1.0),
        ("\\boxed{\\text{(B)}}", "(B)", 1.0),
        ("it is 71", "72", 0.0),
        ("no number here", "72", 0.0),
        ("\\boxed{x+1}", "x+2", 0.0),
    ],
)
def test_builtin_math_match(completion, answer, reward):
    assert builtin_math_match(completion, answer) == reward


def test_math_reward_without_math_verify_uses_builtin(monkeypatch):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import fails as if not installed
    assert math_reward("\\boxed{72}", "72") == 1.0 and math_reward("\\boxed{71}", "72") == 0.0


def test_normaliser_and_prediction():
    assert normalize_math(" $\\left( 3 \\right)$. ") == "(3)"
    assert predicted_answer("a 1 b 2 c") == "2" and predicted_answer("none") is None


# ---- JSONL and hub loaders --------------------------------------------------------------------------------
def test_jsonl_loader_custom_fields(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text('{"question": "q1", "answer": "work\\n#### 3"}\n\n{"question": "q2", "answer": 7}\n')
    ex = load_jsonl(str(f), "question", "answer")
    assert [(e.prompt, e.answer) for e in ex] == [("q1", "3"), ("q2", "7")]


@pytest.mark.parametrize(
    "content,message",
    [
        ('{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": \n', "x.jsonl:2: malformed JSON"),
        ('{"prompt": "a", "answer": "1"}\n[1, 2]\n', "x.jsonl:2: expected a JSON object"),
        ('{"prompt": "a"}\n', "x.jsonl:1: missing field 'answer'"),
        ('{"prompt": "", "answer": "1"}\n', "x.jsonl:1: field 'prompt' must be a non-empty string"),
        ("\n\n", "empty dataset"),
        (
            '{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "so ####"}\n',
            "x.jsonl:2: the answer 'so ####' is empty",
        ),
        ('{"prompt": "a", "answer": "\\\\boxed{}"}\n', "x.jsonl:1: the answer .* is empty"),
        (b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "1"}\n', "x.jsonl:2: not UTF-8 text"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, content, message):
    """Each bad line is named by file and line; an answer with nothing after `####` or in `\\boxed{}` would match
    any completion ending that way, so it is a data error too."""
    f = tmp_path / "x.jsonl"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(TaskError, match=message.replace("[", r"\[")):
        load_jsonl(str(f), "prompt", "answer")


def test_jsonl_byte_order_mark_and_directory(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n')
    assert load_jsonl(str(tmp_path / "bom.jsonl"), "prompt", "answer")[0].prompt == "1+1="
    with pytest.raises(TaskError, match="is a directory, not a JSONL data file"):
        load_jsonl(str(tmp_path), "prompt", "answer")


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_reward_stops_with_the_completion_named(bad):
    task = arithmetic_task()
    task.reward_fn = lambda completion, answer: bad if completion == "7" else 1.0
    assert task.score(["5", "6"], ["5", "6"]) == [1.0, 1.0]
    with pytest.raises(TaskError, match=f"returned {bad} for the completion '7'"):
        task.score(["5", "7"], ["5", "7"])


def test_load_task_errors(tmp_path, monkeypatch):
    with pytest.raises(TaskError, match="unknown task 'nope'"):
        load_task("nope")
    with pytest.raises(TaskError, match="needs both --train_file and --eval_file"):
        load_task("jsonl", train_file=str(tmp_path / "a.jsonl"))
    with pytest.raises(TaskError, match="need --task jsonl"):
        load_task("arithmetic", train_file="x.jsonl")
    with pytest.raises(TaskError, match="data file not found"):
        load_task("jsonl", str(tmp_path / "missing.jsonl"), str(tmp_path / "missing.jsonl"))
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(TaskError, match="needs the optional package `datasets`"):
        load_task("hf:openai/gsm8k:main")
    with pytest.raises(TaskError, match="bad hub task"):
        load_task("hf:")


# ---- shipped tiny models ----------------------------------------------------------------------------------
@torch.no_grad()
def exact_pass_at_1(path):
    """Held-out P(answer + EOS | prompt) at T = 1 = expected sampled pass@1, by teacher forcing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
    total = 0.0
    for ex in arithmetic_task().eval:
        p = tok(ex.prompt)["input_ids"]
        c = tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1 : -1], -1)
        total += logp.gather(-1, torch.tensor(c)[:, None]).sum().exp().item()
    return total / ARITHMETIC_NUM_EVAL


def test_tiny_tokenizer_is_character_level_and_round_trips():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    ids = tok("37+58=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 7
    assert tok.decode(tok("Hello, world!\n", add_special_tokens=False)["input_ids"]) == "Hello, world!\n"
    assert tok.padding_side == "left" and tok.eos_token == "</s>" and tok.pad_token == "<pad>"


def test_fast_prompt_encoding_equals_the_tokenizers_own_call():
    """common/tasks.token_ids (the fast tokenizer's backend, batch-encoded) gives tokenizer(texts)["input_ids"]
    exactly, with and without special tokens, also after a call that set truncation on the backend. Negative
    control: the other special-token setting differs (the BOS)."""
    from transformers import AutoTokenizer

    from common.tasks import token_ids

    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    texts = [e.prompt for e in arithmetic_task().train[:200]] + ["Hello, world!\n", ""]
    tok(texts[:2], truncation=True, max_length=3)  # leaves truncation set on the backend
    for special in (True, False):
        assert token_ids(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
    assert token_ids(tok, texts, True) != token_ids(tok, texts, False)


def test_tiny_policy_is_weak_and_teacher_is_strong():
    policy, teacher = exact_pass_at_1(TINY_POLICY), exact_pass_at_1(TINY_TEACHER)
    assert 0.15 <= policy <= 0.5, policy
    assert teacher >= 0.9, teacher


def test_math_reward_with_math_verify():
    pytest.importorskip("math_verify")  # optional extra: symbolic equivalence
    assert math_reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0 and math_reward("\\boxed{71}", "72") == 0.0
