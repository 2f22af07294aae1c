"""Tasks and data shared by every algorithm file.

A task is a list of training prompts, a list of held-out prompts, and a reward function. Three sources:
  * ``arithmetic`` (default): built-in ``a+b=`` prompts with an exact integer answer. No files, no network.
  * ``jsonl``: ``--train_file`` / ``--eval_file``, one JSON object per line, with configurable field names.
  * ``hf:<dataset>[:<config>]``: a Hugging Face hub dataset, through the optional ``datasets`` package.

Answers in files are reduced to their final value when written in a known style: GSM8K's ``... #### 42`` and
MATH's ``... \\boxed{42}``. Any problem with the input raises ``TaskError`` with a one-line message that
names the file and line; the algorithm scripts print it as one line and exit with status 1.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from common.rewards import exact_match_reward, last_boxed, math_reward


class TaskError(ValueError):
    """Bad user input (task name, data file, lengths): reported as one line, never a traceback."""


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


@dataclass
class Task:
    name: str
    train: list[Example]
    eval: list[Example]
    reward_fn: Callable[[str, str], float]  # (completion text, reference answer) -> finite reward
    max_prompt_length: int  # task default for --max_prompt_length (tokens)
    max_new_tokens: int  # task default for --max_new_tokens

    def score(self, completions: list[str], answers: list[str]) -> list[float]:
        """Rewards of completion texts against reference answers; a non-finite reward stops the run (TaskError
        naming the reward function and the completion) instead of reaching a loss or a histogram."""
        rewards = [float(self.reward_fn(c, a)) for c, a in zip(completions, answers)]
        for r, c in zip(rewards, completions):
            if not math.isfinite(r):
                raise TaskError(
                    f"reward function {getattr(self.reward_fn, '__name__', self.reward_fn)} returned {r} "
                    f"for the completion {c[:80]!r}"
                )
        return rewards


def token_ids(tokenizer, texts: list, add_special_tokens: bool) -> list:
    """tokenizer(texts)["input_ids"], the same ids: a fast tokenizer's backend encodes the batch directly (6x faster
    on 10,000 prompts: no per-row BatchEncoding), with truncation and padding off as the tokenizer's own call sets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    backend.no_truncation()
    backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def encode_prompts(tokenizer, examples: list[Example], chat_template: bool, max_length: int, split: str) -> list:
    """Token ids of each prompt, wrapped in the tokenizer's chat template when it has one (and `chat_template`);
    a prompt longer than `max_length` tokens is an error, never truncated."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": e.prompt}], tokenize=False, add_generation_prompt=True
            )
            for e in examples
        ]
        ids = token_ids(tokenizer, texts, add_special_tokens=False)  # the template already has any BOS
    else:
        ids = token_ids(tokenizer, [e.prompt for e in examples], add_special_tokens=True)
    for i, seq in enumerate(ids):
        if len(seq) > max_length:
            raise TaskError(
                f"{split} prompt {i} has {len(seq)} tokens > --max_prompt_length {max_length}: "
                f"{examples[i].prompt[:60]!r}"
            )
    return ids


# ----------------------------------------------------------------------------------------------------------
# Built-in arithmetic task
# ----------------------------------------------------------------------------------------------------------
ARITHMETIC_MAX_OPERAND = 99  # operands a, b in 0..99; answers have at most 3 digits (+ EOS = 4 tokens)
ARITHMETIC_NUM_EVAL = 500  # held-out pairs, never trained on (neither by the tiny models nor by RL)
ARITHMETIC_SPLIT_SEED = 1234  # fixed, independent of --seed: every run and every algorithm sees the same split


def arithmetic_task() -> Task:
    """All 100 x 100 pairs ``a+b=``, split once by a fixed permutation into 9500 train / 500 held-out."""
    pairs = [(a, b) for a in range(ARITHMETIC_MAX_OPERAND + 1) for b in range(ARITHMETIC_MAX_OPERAND + 1)]
    order = np.random.default_rng(ARITHMETIC_SPLIT_SEED).permutation(len(pairs))
    examples = [Example(f"{pairs[i][0]}+{pairs[i][1]}=", str(sum(pairs[i]))) for i in order]
    return Task(
        "arithmetic",
        examples[ARITHMETIC_NUM_EVAL:],
        examples[:ARITHMETIC_NUM_EVAL],
        exact_match_reward,
        max_prompt_length=16,
        max_new_tokens=4,
    )


# ----------------------------------------------------------------------------------------------------------
# Answer extraction (GSM8K "#### 42", MATH "\boxed{42}")
# ----------------------------------------------------------------------------------------------------------
def extract_answer(text: str) -> str:
    """Final answer of a reference solution: after the last ``####`` (GSM8K), else the last ``\\boxed{}``
    (MATH), else the whole text. GSM8K thousands separators are dropped (``1,000`` -> ``1000``)."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    boxed = last_boxed(text)
    return boxed if boxed is not None else text.strip()


# ----------------------------------------------------------------------------------------------------------
# JSONL files and hub datasets
# ----------------------------------------------------------------------------------------------------------
def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a missing file, malformed JSON or a non-object is a
    TaskError naming the file and line."""
    if os.path.isdir(path):
        raise TaskError(f"{path} is a directory, not a JSONL data file")
    if not os.path.isfile(path):
        raise TaskError(f"data file not found: {path}")
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:  # a UTF-8 byte-order mark on the first line is accepted
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise TaskError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


def load_jsonl(path: str, prompt_field: str, answer_field: str) -> list[Example]:
    """One JSON object per non-blank line; ``answer_field`` goes through ``extract_answer``."""
    examples = [
        _example_from_row(row, prompt_field, answer_field, f"{path}:{lineno}") for lineno, row in read_jsonl(path)
    ]
    if not examples:
        raise TaskError(f"{path}: empty dataset (no examples)")
    return examples


def _example_from_row(row: dict, prompt_field: str, answer_field: str, where: str) -> Example:
    for field in (prompt_field, answer_field):
        if field not in row:
            raise TaskError(
                f"{where}: missing field {field!r} (has {sorted(row)}); set --prompt_field / --answer_field"
            )
    prompt, answer = row[prompt_field], row[answer_field]
    if not isinstance(prompt, str) or not prompt.strip():
        raise TaskError(f"{where}: field {prompt_field!r} must be a non-empty string")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise TaskError(f"{where}: field {answer_field!r} must be a non-empty string or number")
    if not extract_answer(answer):  # `####` or `\boxed{}` with nothing in it would match any completion ending so
        raise TaskError(f"{where}: the answer {answer[-40:]!r} is empty after extracting its final value")
    return Example(prompt, extract_answer(answer))


def load_hub_dataset(spec: str, prompt_field: str, answer_field: str) -> tuple[list[Example], list[Example]]:
    """``hf:openai/gsm8k:main`` -> (train split, test split) via the optional ``datasets`` package."""
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 2:
        raise TaskError(f"bad hub task {spec!r}: expected hf:<dataset>[:<config>], e.g. hf:openai/gsm8k:main")
    try:
        import datasets
    except ImportError:
        raise TaskError(
            f"task {spec!r} needs the optional package `datasets` (pip install datasets); "
            f"or export the data to JSONL and use --task jsonl --train_file ..."
        ) from None
    try:
        ds = datasets.load_dataset(parts[0], parts[1] if len(parts) == 2 else None)
    except Exception as e:  # offline, unknown name, ...: one line, not a deep traceback
        raise TaskError(f"could not load hub dataset {spec!r}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    splits = {}
    for name in ("train", "test"):
        if name not in ds:
            raise TaskError(f"hub dataset {spec!r} has no {name!r} split (has {list(ds)})")
        rows = [
            _example_from_row(r, prompt_field, answer_field, f"{spec}[{name}][{i}]") for i, r in enumerate(ds[name])
        ]
        if not rows:
            raise TaskError(f"hub dataset {spec!r}: empty {name!r} split")
        splits[name] = rows
    return splits["train"], splits["test"]


# ----------------------------------------------------------------------------------------------------------
# Entry point used by every algorithm file
# ----------------------------------------------------------------------------------------------------------
def load_task(
    task: str,
    train_file: str | None = None,
    eval_file: str | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> Task:
    """Resolve ``--task`` (+ files) into a Task. Real-data tasks are scored by ``math_reward``."""
    if task == "arithmetic":
        if train_file or eval_file:
            raise TaskError("--train_file / --eval_file need --task jsonl (the arithmetic task is built in)")
        return arithmetic_task()
    if task == "jsonl":
        if not train_file or not eval_file:
            raise TaskError("--task jsonl needs both --train_file and --eval_file")
        train = load_jsonl(train_file, prompt_field, answer_field)
        held_out = load_jsonl(eval_file, prompt_field, answer_field)
        return Task("jsonl", train, held_out, math_reward, max_prompt_length=512, max_new_tokens=1024)
    if task.startswith("hf:"):
        train, held_out = load_hub_dataset(task, prompt_field, answer_field)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", task[3:])
        return Task(name, train, held_out, math_reward, max_prompt_length=512, max_new_tokens=1024)
    raise TaskError(
        f"unknown task {task!r}: use 'arithmetic', 'jsonl' (with --train_file/--eval_file) or 'hf:<dataset>[:<config>]'"
    )


# ----------------------------------------------------------------------------------------------------------
# What a run reads before any weights load: the task with its default lengths, the model's folder, the tokenizer
# and the encoded prompts (the algorithm scripts' `Run` calls these)
# ----------------------------------------------------------------------------------------------------------
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_task(args) -> Task:
    """The task of the flags, scored by --reward_fn when given; the lengths left unset (None) are set in place to
    the task's defaults, so that args.json records the values the run used."""
    task = load_task(args.task, args.train_file, args.eval_file, args.prompt_field, args.answer_field)
    if args.reward_fn:
        task.reward_fn = load_reward_fn(args.reward_fn)
    if args.max_prompt_length is None:
        args.max_prompt_length = task.max_prompt_length
    if args.max_new_tokens is None:
        args.max_new_tokens = task.max_new_tokens
    return task


def load_reward_fn(spec: str) -> Callable[[str, str], float]:
    """--reward_fn FILE.py:NAME or module:NAME: your reward, `NAME(completion: str, answer: str) -> float`, the
    completion's text (special tokens dropped) and the example's reference answer (any string your data carries).
    It replaces the task's reward everywhere the script scores (training, eval, pass@k). Loaded once, before any
    model; a missing file or name, a module that fails to import, a non-callable or a signature that does not take
    (completion, answer) is a one-line TaskError. A non-finite reward stops the run (Task.score)."""
    import importlib
    import importlib.util
    import inspect

    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise TaskError(f"--reward_fn {spec!r}: expected FILE.py:NAME or module:NAME")
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise TaskError(f"--reward_fn: no such file {where}")
        loader = importlib.util.spec_from_file_location(f"reward_fn_{abs(hash(where))}", where)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # any failure of the user's file: one line naming it
            raise TaskError(f"--reward_fn: {where} fails to import ({type(e).__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise TaskError(f"--reward_fn: cannot import module {where!r} ({e})") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise TaskError(f"--reward_fn: {where} has no {name!r}")
    if not callable(fn):
        raise TaskError(f"--reward_fn: {where}:{name} is not callable")
    try:
        inspect.signature(fn).bind("completion", "answer")
    except TypeError:
        raise TaskError(f"--reward_fn: {where}:{name} must take (completion, answer)") from None
    return fn


def reward_fn_digest(spec) -> str | None:
    """The SHA-256 of a --reward_fn file (None for a module or no --reward_fn): recorded in args.json, so that a
    resumed run can say when the file changed since the run started."""
    import hashlib

    where = (spec or "").rpartition(":")[0]
    if not where.endswith(".py") or not os.path.isfile(where):
        return None
    with open(where, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def model_path(path: str) -> str:
    """A relative path that does not exist here is read from the repository root (the shipped tiny models); a
    local folder must hold a model (config.json); any other path that exists nowhere is an error; the rest are hub
    ids."""
    if not os.path.exists(path) and os.path.exists(os.path.join(REPOSITORY, path)):
        path = os.path.join(REPOSITORY, path)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        raise TaskError(f"{path} has no config.json: not a model folder")
    if os.path.exists(path):
        return path
    if os.path.isabs(path) or path.startswith(".") or path.count("/") > 1:
        raise TaskError(f"{path}: no such local folder (nor a hub id)")
    return path


def load_tokenizer(args, task: Task):
    """The policy's tokenizer (its pad token: EOS when it has none). Prompt and completion lengths that the model
    cannot hold are an error, before any weights load."""
    import transformers

    path = model_path(args.model_name_or_path)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        config = transformers.AutoConfig.from_pretrained(path)
    except OSError as e:
        first_line = str(e).strip().splitlines()[0]
        raise TaskError(f"could not load {args.model_name_or_path!r}: {first_line}") from None
    positions = getattr(config, "max_position_embeddings", math.inf)
    if args.max_prompt_length + args.max_new_tokens > positions:
        lengths = []
        for flag in ("max_prompt_length", "max_new_tokens"):
            value = getattr(args, flag)
            default = " (the task's default)" if value == getattr(task, flag) else ""
            lengths.append(f"--{flag} {value}{default}")
        raise TaskError(f"{' + '.join(lengths)} > the model's {positions} positions: set smaller ones")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer


def encode_task(tokenizer, task: Task, args) -> tuple:
    """(training prompts, held-out prompts, held-out answers): token ids of every training prompt and of the first
    --eval_num_prompts held-out ones; more --prompts_per_step than training prompts is an error."""
    held_out = task.eval[: args.eval_num_prompts]
    template, limit = args.chat_template, args.max_prompt_length
    train_prompts = encode_prompts(tokenizer, task.train, template, limit, "train")
    eval_prompts = encode_prompts(tokenizer, held_out, template, limit, "eval")
    if args.prompts_per_step > len(train_prompts):
        raise TaskError(f"--prompts_per_step {args.prompts_per_step} > {len(train_prompts)} training prompts")
    return train_prompts, eval_prompts, [e.answer for e in held_out]
