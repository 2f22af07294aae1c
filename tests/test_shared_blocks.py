"""Duplicated code must be identical code. Everything below the SHARED banner of an algorithm file (the rollout
helpers, the update loop and the plumbing) is the same text in all eight files; every function or class that more
than one file defines above the banner has the same source in each (apart from the declared differences below); and
no file redefines above the banner a name of the shared part. So a fix made in one copy cannot drift."""

import ast
import os
import shutil

from tests.harness import ROOT, SCRIPTS

BANNER = "# SHARED:"
ALLOWED = {  # names that several files define above the banner, each its own way: why
    "Args": "every script has its own flags",
    "check_args": "every script has its own constraints",
    "train": "the algorithm's step loop",
    "micro_loss": "the algorithm's loss of one micro-batch",
    "kl_surrogate": "rpg_fkl.py and rpg_rkl.py: the forward and reverse KL terms",
    "reinforce_coef": "rpg_fkl.py and rpg_rkl.py: the forward and reverse KL coefficients",
}


def split(text: str) -> tuple:
    """(the algorithm's part, the shared part from its banner line on)."""
    assert text.count(f"\n{BANNER}") == 1, "one SHARED banner per file"
    start = text.rindex("\n# ====", 0, text.index(f"\n{BANNER}")) + 1  # the banner's opening rule
    return text[:start], text[start:]


def definitions(text: str) -> dict:
    """name -> source of every top-level function and class."""
    tree = ast.parse(text)
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    return {n.name: ast.get_source_segment(text, n) for n in nodes}


def differences(root: str) -> list:
    """Every violation: a shared part that differs from grpo.py's, a name of the shared part redefined above it, or
    a name defined above the banner in several files with different sources."""
    texts = {s: open(os.path.join(root, "algorithms", f"{s}.py")).read() for s in SCRIPTS}
    parts = {s: split(text) for s, text in texts.items()}
    out = [f"{s}.py: its shared part differs from grpo.py's" for s in SCRIPTS if parts[s][1] != parts["grpo"][1]]
    shared_names = set(definitions(parts["grpo"][1]))
    sources = {}
    for s, (above, _) in parts.items():
        for name, src in definitions(above).items():
            if name in shared_names:
                out.append(f"{s}.py redefines {name} of the shared part above the banner")
            sources.setdefault(name, {}).setdefault(src, []).append(s)
    for name, variants in sources.items():
        if len(variants) > 1 and name not in ALLOWED:
            groups = " | ".join(", ".join(files) for files in variants.values())
            out.append(f"{name} has {len(variants)} versions: {groups}")
    return out


def test_shared_part_and_duplicated_definitions_are_identical():
    assert differences(ROOT) == []


def test_allowed_differences_have_reasons():
    assert all(reason.strip() for reason in ALLOWED.values())


def test_negative_controls(tmp_path):
    """One character of one file's shared part, a copy of an algorithm helper that two files share, and a shared
    name redefined above the banner: each is reported."""
    shutil.copytree(os.path.join(ROOT, "algorithms"), tmp_path / "algorithms")
    path = tmp_path / "algorithms" / "pmd_mean.py"
    path.write_text(path.read_text().replace("def all_reduce(x, op", "def all_reduce(x,  op", 1))
    found = differences(str(tmp_path))
    assert found == ["pmd_mean.py: its shared part differs from grpo.py's"], found
    path = tmp_path / "algorithms" / "rpg_rkl.py"  # an algorithm helper that both RPG files define
    text = path.read_text()
    edited = "def group_mean_advantages(rewards, group_size: int):\n    # edited\n"
    path.write_text(text.replace("def group_mean_advantages(rewards, group_size: int):\n", edited, 1))
    assert any(d.startswith("group_mean_advantages has 2 versions") for d in differences(str(tmp_path)))
    path = tmp_path / "algorithms" / "gkd.py"
    above, shared = split(path.read_text())
    path.write_text(above + "def seed_of(args, stream, *keys):\n    return 0\n\n\n" + shared)
    assert "gkd.py redefines seed_of of the shared part above the banner" in differences(str(tmp_path))


def sync(root: str = ROOT, source: str = "grpo", scripts=SCRIPTS) -> None:
    """Copy `source`'s shared part into every algorithm file: `python -m tests.test_shared_blocks --sync [script ...]`
    after changing shared code in grpo.py."""
    with open(os.path.join(root, "algorithms", f"{source}.py")) as f:
        master = split(f.read())[1]
    for s in scripts:
        path = os.path.join(root, "algorithms", f"{s}.py")
        with open(path) as f:
            above = split(f.read())[0]
        with open(path, "w") as f:
            f.write(above + master)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--sync"]:
        sync(scripts=sys.argv[2:] or SCRIPTS)
