"""Rewards: binary, 1.0 = correct, 0.0 = incorrect, always finite (unparseable answers score 0).

* ``exact_match_reward``: the built-in arithmetic task. The completion (special tokens removed) must equal
  the answer after stripping surrounding whitespace: ``"95"`` is right, ``"95 "`` too, ``"095"`` is not.
* ``math_reward``: real data (GSM8K, MATH). Uses ``math_verify`` when installed. Otherwise a built-in
  normaliser, documented in ``normalize_math``: the predicted answer is the last ``\\boxed{}``, else the
  text after the last ``####``, else the last number in the completion; both sides are normalised; numbers
  (integers, decimals, ``a/b``, ``\\frac{a}{b}``, thousands commas) compare by value within 1e-6 relative,
  anything else compares as normalised strings.
"""

from __future__ import annotations

import re


def exact_match_reward(completion: str, answer: str) -> float:
    return 1.0 if completion.strip() == answer.strip() else 0.0


# ----------------------------------------------------------------------------------------------------------
# Math answers
# ----------------------------------------------------------------------------------------------------------
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces matched; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None  # unbalanced braces: no answer


def predicted_answer(completion: str) -> str | None:
    """Last ``\\boxed{}``, else after the last ``####``, else the last number; None if none of them."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    if "####" in completion:
        return completion.rsplit("####", 1)[1].strip().split("\n")[0]
    numbers = _NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def normalize_math(s: str) -> str:
    """Drop LaTeX presentation (``$``, ``\\left``/``\\right``, thin spaces, ``\\text{}`` wrappers, degrees,
    percent), unify ``\\dfrac``/``\\tfrac`` to ``\\frac``, remove spaces and a trailing period."""
    s = s.strip()
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)
    for old, new in (
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", ""),
        ("%", ""),
        ("$", ""),
        (" ", ""),
    ):
        s = s.replace(old, new)
    return s.rstrip(".")


def _as_number(s: str) -> float | None:
    frac = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s) or re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
    try:
        if frac:
            sign = -1.0 if frac.group(1) else 1.0
            return sign * float(frac.group(2)) / float(frac.group(3))
        if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
            s = s.replace(",", "")
        if re.fullmatch(r"-?\d+/\d+", s):
            num, den = s.split("/")
            return float(num) / float(den)
        return float(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s) else None
    except (ValueError, ZeroDivisionError):
        return None


def builtin_math_match(completion: str, answer: str) -> float:
    pred = predicted_answer(completion)
    if pred is None:
        return 0.0
    p, a = normalize_math(pred), normalize_math(answer)
    pn, an = _as_number(p), _as_number(a)
    if pn is not None and an is not None:
        return 1.0 if abs(pn - an) <= 1e-6 * max(1.0, abs(an)) else 0.0
    return 1.0 if p == a else 0.0


def math_reward(completion: str, answer: str) -> float:
    """``math_verify`` when installed (symbolic equivalence), else ``builtin_math_match``."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return builtin_math_match(completion, answer)
    try:
        gold = parse("\\boxed{" + answer + "}")
        pred = parse(completion)
        return 1.0 if gold and pred and verify(gold, pred) else 0.0
    except Exception:  # math_verify parse/timeout failures count as wrong, never crash a run
        return 0.0
