"""The files read like references: the bans of the plain-lines rule hold in algorithms/ and common/ (no `:=`, no
assigned `lambda`, no `for` over a conditional expression, no parallel assignment of three or more values), and every
algorithm file keeps its budgets: lines above the SHARED banner, the shared part's length, at most 6.0 expression
nodes per code line, at most 10% of lines wider than 100 columns (the definitions of
../shared/tools/style_metrics.py, re-implemented here so that a clean clone can check them). The negative control
plants each trick in a snippet and each budget overrun in a copy of a file, and shows that it is reported."""

import ast
import glob
import io
import os
import tokenize

import pytest

from tests.harness import ROOT, SCRIPTS

BANNER = "# SHARED:"
ABOVE = {  # lines above the SHARED banner (issue 27; later issues add what they state)
    "grpo": 320 + 15 + 40,  # issue 31: +15 each (reward function, pass@k flags); issue 29: +40
    "pmd_mean": 260 + 15,
    "rpg_fkl": 400 + 15,
    "rpg_rkl": 400 + 15,
    "a_star_po": 370 + 15,
    "dpo_kl": 450 + 15,
    "gkd": 380 + 15 + 60 + 20,  # issue 30: +60; issue 33: +20 (student_outputs, and its lines split)
    "q_sharp": 760 + 15 + 10,  # issue 32: +10 (its LoRA flags)
}
# the shared part, identical in every file: issue 27's 760 lines, issue 28's fixes (it set no budget), issue 31's
# pass@k, reward function and training-sample log (+40 allowed; +45, the density splits of its dense lines),
# issue 32's LoRA (+40; its 5 flag lines above the banner fit in the budgets above), issue 33's real shapes (+50: the
# chunked log-probs, the sharded AdamW state and frozen models: +69 until 19 docstring and comment lines were cut)
SHARED_LINES = 760 + 165 + 45 + 40 + 50
NODES_PER_LINE = 6.0
WIDE_SHARE = 0.10  # of lines wider than 100 columns


def tricks(text: str) -> list:
    """Each banned construct of `text`, as "line N: what"."""
    out = []
    for t in tokenize.generate_tokens(io.StringIO(text).readline):
        if t.type == tokenize.OP and t.string == ":=":
            out.append(f"line {t.start[0]}: `:=`")
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            out.append(f"line {node.lineno}: an assigned lambda")
        if isinstance(node, (ast.For, ast.comprehension)) and isinstance(node.iter, ast.IfExp):
            line = getattr(node, "lineno", node.iter.lineno)
            out.append(f"line {line}: `for` over a conditional expression")
        parallel = isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Tuple)
        if parallel and isinstance(node.value, ast.Tuple) and len(node.targets[0].elts) >= 3:
            out.append(f"line {node.lineno}: a parallel assignment of {len(node.targets[0].elts)} values")
    return out


def docstring_lines(tree) -> set:
    lines = set()
    for node in ast.walk(tree):
        documented = isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if not documented or not node.body:
            continue
        first = node.body[0]
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            if isinstance(first.value.value, str):
                lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


def measure(text: str) -> dict:
    """lines above the banner, lines of the shared part, expression nodes per code line, share of wide lines."""
    lines = text.splitlines()
    tree = ast.parse(text)
    docs = docstring_lines(tree)
    code = set()
    for i, line in enumerate(lines, 1):
        if line.strip() and not line.strip().startswith("#") and i not in docs:
            code.add(i)
    nodes = sum(1 for n in ast.walk(tree) if isinstance(n, ast.expr) and n.lineno in code)
    above = next(i - 1 for i, line in enumerate(lines, 1) if line.startswith(BANNER))
    return {
        "above": above,
        "shared": len(lines) - above,
        "nodes_per_line": nodes / max(len(code), 1),
        "wide": sum(len(line) > 100 for line in lines) / max(len(lines), 1),
    }


def overruns(script: str, text: str) -> list:
    m = measure(text)
    out = []
    if m["above"] > ABOVE[script]:
        out.append(f"{script}.py: {m['above']} lines above the banner > {ABOVE[script]}")
    if m["shared"] > SHARED_LINES:
        out.append(f"{script}.py: the shared part has {m['shared']} lines > {SHARED_LINES}")
    if m["nodes_per_line"] > NODES_PER_LINE:
        out.append(f"{script}.py: {m['nodes_per_line']:.2f} expression nodes per code line > {NODES_PER_LINE}")
    if m["wide"] > WIDE_SHARE:
        out.append(f"{script}.py: {m['wide']:.0%} of lines wider than 100 columns > {WIDE_SHARE:.0%}")
    return out


FILES = sorted(glob.glob(os.path.join(ROOT, "algorithms", "*.py")) + glob.glob(os.path.join(ROOT, "common", "*.py")))


@pytest.mark.parametrize("path", FILES, ids=[os.path.relpath(p, ROOT) for p in FILES])
def test_no_banned_constructs(path):
    with open(path) as f:
        assert tricks(f.read()) == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_budgets(script):
    with open(os.path.join(ROOT, "algorithms", f"{script}.py")) as f:
        assert overruns(script, f.read()) == []


def test_negative_controls():
    planted = """
def f(xs, c):
    if (n := len(xs)) > 1:
        pass
    g = lambda x: x + 1
    for x in xs if c else []:
        pass
    a, b, c = 1, 2, 3
    return [y for y in (xs if c else [])]
"""
    found = tricks(planted)
    assert [f.split(": ", 1)[1] for f in found] == [
        "`:=`",
        "an assigned lambda",
        "`for` over a conditional expression",
        "a parallel assignment of 3 values",
        "`for` over a conditional expression",
    ], found
    with open(os.path.join(ROOT, "algorithms", "grpo.py")) as f:
        text = f.read()
    above, shared = text.split("\n" + BANNER, 1)
    longer = above + "\nx = 1" * (ABOVE["grpo"] + 1 - measure(text)["above"]) + "\n" + BANNER + shared
    assert any("lines above the banner" in o for o in overruns("grpo", longer))
    assert any("the shared part" in o for o in overruns("grpo", text + "\n# x" * 800))
    dense = above + "\nx = [a + b * c - d / e for a, b, c, d, e in f(g(h(i)), j[k:l])]" * 300
    assert any("expression nodes" in o for o in overruns("pmd_mean", dense + "\n" + BANNER + shared))
    wide = above + ("\n# " + "w" * 120) * 200 + "\n" + BANNER + shared
    assert any("wider than 100" in o for o in overruns("q_sharp", wide))
