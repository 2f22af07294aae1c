"""Duplicated code must be identical code. The PLUMBING block at the bottom of every algorithm file is the same
text in all eight files, and every other function or class that more than one file defines has the same source in
each (apart from the short list of declared differences below), so a fix made in one copy cannot drift."""

import ast
import os
import shutil

from tests.harness import ROOT, SCRIPTS

BANNER = "# PLUMBING"
ALLOWED = {  # (name, files that may differ from the others): why
    ("Args", "*"): "every script has its own flags",
    ("check_args", "*"): "every script has its own constraints",
    ("train", "*"): "the algorithm's step loop",
    ("micro_loss", "*"): "the algorithm's loss of one micro-batch",
    ("kl_surrogate", "*"): "rpg_fkl.py and rpg_rkl.py: the forward and reverse KL terms",
    ("reinforce_coef", "*"): "rpg_fkl.py and rpg_rkl.py: the forward and reverse KL coefficients",
}


def plumbing(text: str) -> str:
    assert text.count(BANNER) == 1, "one PLUMBING block per file"
    return text[text.index(BANNER) :]


def definitions(text: str) -> dict:
    """name -> source of every top-level function and class."""
    tree = ast.parse(text)
    return {
        n.name: ast.get_source_segment(text, n) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
    }


def differences(root: str) -> list:
    """Every violation: a PLUMBING block that differs from grpo.py's, or a shared name with two sources."""
    texts = {s: open(os.path.join(root, "algorithms", f"{s}.py")).read() for s in SCRIPTS}
    out = [
        f"{s}.py: its PLUMBING block differs from grpo.py's"
        for s in SCRIPTS
        if plumbing(texts[s]) != plumbing(texts["grpo"])
    ]
    sources = {}
    for s, text in texts.items():
        for name, src in definitions(text).items():
            sources.setdefault(name, {}).setdefault(src, []).append(s)
    for name, variants in sources.items():
        if len(variants) > 1 and (name, "*") not in ALLOWED:
            groups = " | ".join(", ".join(files) for files in variants.values())
            out.append(f"{name} has {len(variants)} versions: {groups}")
    return out


def test_plumbing_and_shared_helpers_are_identical():
    assert differences(ROOT) == []


def test_allowed_differences_have_reasons():
    assert all(reason.strip() for reason in ALLOWED.values())


def test_negative_control_one_edited_copy_fails(tmp_path):
    """Edit one copy of a shared helper and one character of one PLUMBING block in a temporary tree."""
    shutil.copytree(os.path.join(ROOT, "algorithms"), tmp_path / "algorithms")
    path = tmp_path / "algorithms" / "pmd_mean.py"
    text = path.read_text()
    path.write_text(text.replace("def all_reduce(x, op", "def all_reduce(x,  op", 1))
    found = differences(str(tmp_path))
    assert any("pmd_mean.py: its PLUMBING block differs" in d for d in found), found
    assert any(d.startswith("all_reduce has 2 versions") for d in found), found
    path = tmp_path / "algorithms" / "rpg_rkl.py"  # a shared ROLLOUT helper, outside the PLUMBING block
    edited = "def token_logprobs(log_softmax, tokens):\n    # edited\n"
    path.write_text(path.read_text().replace("def token_logprobs(log_softmax, tokens):\n", edited, 1))
    assert any(d.startswith("token_logprobs has 2 versions") for d in differences(str(tmp_path)))


def sync(root: str = ROOT, source: str = "grpo", scripts=SCRIPTS) -> None:
    """Copy `source`'s PLUMBING block, and its version of every helper another file also defines, into every
    algorithm file: `python -m tests.test_shared_blocks --sync [script ...]` after changing shared code in grpo.py."""
    with open(os.path.join(root, "algorithms", f"{source}.py")) as f:
        master = f.read()
    shared = {k: v for k, v in definitions(master).items() if (k, "*") not in ALLOWED}
    for s in scripts:
        path = os.path.join(root, "algorithms", f"{s}.py")
        with open(path) as f:
            text = f.read()
        text = text[: text.index(BANNER)] + plumbing(master)
        for name, src in definitions(text).items():
            if name in shared and text.count(src) == 1:
                text = text.replace(src, shared[name])
        with open(path, "w") as f:
            f.write(text)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--sync"]:
        sync(scripts=sys.argv[2:] or SCRIPTS)
