"""The docs do not go stale: README.md and docs/*.md checked against the repository, in-process, in a few seconds.

1. Every relative link (and image) resolves to an existing file and, where a `#anchor` is given, to a heading of
   that file (GitHub anchor rules: lowercase, spaces to '-', punctuation other than '-' and '_' dropped,
   duplicates suffixed -1, -2, ...).
2. Every `--flag` a page names exists in the script it belongs to. A script's flags come from
   `dataclasses.fields(module.Args)` (module imported with `tests.harness.load_algorithm`): field `x` gives `--x`,
   a `bool` field also `--no_x` (tyro with use_underscores=True; an Optional[bool] such as `bf16` takes a value
   and has no `--no_` form). Attribution:
   * in a command (a line of a fenced code block or an inline code span that starts with an executable or names
     a script), the flags after `algorithms/<name>.py` (or a bare `<name>.py`) belong to that script; the flags
     of other tools (torchrun's `--standalone`, pip's, pytest's) are not checked; the flags after
     `benchmarks/<name>.py` are checked against that script's `add_argument("--...")` definitions, and the ones
     after a bare `--` (flags passed through to the trained script, `benchmarks/soak.py`) against the algorithm
     named by `--script` (default `grpo`);
   * elsewhere on an algorithm page they belong to that page's script(s) (rpg.md: at least one of the two RPG
     files); on README.md and the operational pages to at least one of the eight scripts.
3. README.md links every algorithm script (its table) and every page in docs/.
4. The seven algorithm pages have exactly the same `##` sections in the same order.
5. The default column of every algorithm page's Flags table equals the script's Args default.
6. Every test a page names (`tests/test_x.py::test_name`, or a file `tests/test_x.py`) exists.
7. README.md shows exactly the test command that `.ci/run` runs.
8. docs/metrics.md names every metric key that the scripts write as a string literal.
9. Every documented `python`/`torchrun` command of an algorithm script runs as written: the ones that need only
   the repository (built-in task, shipped models) for one step with the smoke-test sizes appended; the ones that
   name a hub model or data set or a user's file are checked for their flags (2.) and, on a hub data set with
   other field names (GSM8K's `question`), for naming those fields.
Each check is a function of a path and its text, so the negative controls at the end run it on a broken page.
"""

import ast
import dataclasses
import functools
import glob
import math
import os
import re
import unicodedata

import pytest

from tests.harness import ROOT, load_algorithm, read_metrics, run_in_process, tiny_flags

ALGOS = ["grpo", "rpg_fkl", "rpg_rkl", "pmd_mean", "a_star_po", "q_sharp", "dpo_kl", "gkd"]
ALGO_PAGES = {
    "grpo.md": ["grpo"],
    "rpg.md": ["rpg_fkl", "rpg_rkl"],
    "pmd_mean.md": ["pmd_mean"],
    "a_star_po.md": ["a_star_po"],
    "q_sharp.md": ["q_sharp"],
    "dpo_kl.md": ["dpo_kl"],
    "gkd.md": ["gkd"],
}
OPERATIONAL_PAGES = ["real_models.md", "benchmarks.md", "operations.md", "metrics.md", "kl.md"]
FLAG_SCOPE = {"kl.md": ["grpo"]}  # an operational page about one script's flags: they are checked against it
SECTIONS = [
    "Overview",
    "Usage",
    "What the loss really regularizes",
    "Flags",
    "Implementation details",
    "Logged metrics",
    "Results",
    "Tests",
]
EXECUTABLES = {"python", "python3", "torchrun", "pip", "pip3", "pytest", "bash", "sh", "env", "uv", "accelerate"}
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w-]*)")
SCRIPT = re.compile(r"(?:^|/)(?:(algorithms|benchmarks)/)?(\w+)\.py$")
TEST_REF = re.compile(r"tests/(test_\w+\.py)(?:::(test_\w+))?")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------------------------
# Markdown structure
# ---------------------------------------------------------------------------------------------------------------
def split_fences(text: str):
    """(prose, code_lines): the text with fenced blocks blanked (line numbers kept), and the fenced lines as
    (line_no, line)."""
    prose, code, in_fence = [], [], False
    for i, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            in_fence = not in_fence
            prose.append("")
        elif in_fence:
            code.append((i, line))
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def headings(text: str, level: int | None = None) -> list:
    """ATX headings outside code fences, as (level, title)."""
    prose, _ = split_fences(text)
    out = []
    for line in prose.split("\n"):
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if m and (level is None or len(m.group(1)) == level):
            out.append((len(m.group(1)), m.group(2)))
    return out


def github_anchor(title: str) -> str:
    """GitHub's heading anchor: markup removed, lowercase, letters/marks/numbers/'_'/'-'/spaces kept, spaces to '-'."""
    title = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", title)  # a link in a heading keeps its text
    title = title.replace("`", "").replace("*", "").lower()
    kept = "".join(
        c for c in title if c in " -" or unicodedata.category(c)[0] in "LMN" or unicodedata.category(c) == "Pc"
    )
    return kept.replace(" ", "-")


def anchors(text: str) -> set:
    seen, out = {}, set()
    for _, title in headings(text):
        a = github_anchor(title)
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# 1. Links
# ---------------------------------------------------------------------------------------------------------------
def check_links(path: str, text: str | None = None) -> list:
    """Every relative link of a markdown file resolves to a file and, with '#anchor', to one of its headings."""
    text = read(path) if text is None else text
    prose, _ = split_fences(text)
    prose = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose)  # `[x](y)` inside code is not a link
    errors = []
    for m in LINK.finditer(prose):
        target = m.group(1)
        line = prose.count("\n", 0, m.start()) + 1
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            errors.append(f"{path}:{line}: link to a missing file: {target}")
            continue
        if anchor:
            dest_text = text if dest == path else (read(dest) if dest.endswith(".md") else None)
            if dest_text is None:
                errors.append(f"{path}:{line}: anchor on a non-markdown file: {target}")
            elif anchor not in anchors(dest_text):
                errors.append(f"{path}:{line}: no heading for anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    return errors


def link_targets(path: str, text: str | None = None) -> set:
    """Repository-relative paths of the files a page links to."""
    text = read(path) if text is None else text
    prose, _ = split_fences(text)
    out = set()
    for m in LINK.finditer(INLINE_CODE.sub(lambda m: " " * len(m.group(0)), prose)):
        file_part = m.group(1).partition("#")[0]
        if file_part and not re.match(r"^[a-z][a-z0-9+.-]*:", file_part, re.IGNORECASE):
            out.add(os.path.relpath(os.path.normpath(os.path.join(os.path.dirname(path), file_part)), ROOT))
    return out


# ---------------------------------------------------------------------------------------------------------------
# 2. Flags
# ---------------------------------------------------------------------------------------------------------------
def _is_bool(field) -> bool:
    return field.type is bool or field.type == "bool"


@functools.cache
def args_fields(name: str) -> dict:
    return {f.name: f for f in dataclasses.fields(load_algorithm(name).Args)}


@functools.cache
def script_flags(name: str) -> frozenset:
    """The `--flags` of algorithms/<name>.py: field x gives --x, a bool field also --no_x; tyro adds --help."""
    flags = {"help"}
    for f in args_fields(name).values():
        flags.add(f.name)
        if _is_bool(f):
            flags.add(f"no_{f.name}")
    return frozenset(flags)


@functools.cache
def benchmark_flags(name: str) -> frozenset:
    """The `--flags` of benchmarks/<name>.py, read from its argparse `add_argument("--x", ...)` calls."""
    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    if not os.path.exists(path):
        return frozenset()
    return frozenset(re.findall(r"add_argument\(\s*[\"']--([\w-]+)[\"']", read(path)))


def _flag_name(token: str) -> str | None:
    m = re.match(r"^--([A-Za-z][\w-]*)", token)
    return m.group(1).rstrip("-") if m else None


def command_flags(command: str) -> list:
    """(owner, flag) for every flag of a command line; owner ('algo', name), ('bench', name), or None for flags of
    other tools (not checked)."""
    out, owner = [], None
    tokens = command.replace("\\\n", " ").split()
    for i, tok in enumerate(tokens):
        if tok in ("&&", "||", ";", "|"):
            owner = None
            continue
        if names_a_script(tok):
            m = SCRIPT.search(tok.strip("\"'`(),"))
            owner = ("bench", m.group(2)) if m.group(1) == "benchmarks" else ("algo", m.group(2))
            continue
        if tok == "--" and owner and owner[0] == "bench":  # pass-through flags of the trained script
            target = "grpo"
            for j in range(i):
                if tokens[j] == "--script" and j + 1 < i:
                    target = tokens[j + 1]
            owner = ("algo", target)
            continue
        name = _flag_name(tok)
        if name:
            out.append((owner, name.split("=")[0]))
    return out


def names_a_script(token: str) -> bool:
    m = SCRIPT.search(token.strip("\"'`(),"))
    return bool(m) and (m.group(1) == "benchmarks" or (m.group(1) in (None, "algorithms") and m.group(2) in ALGOS))


def is_command(segment: str) -> bool:
    """A shell command: starts with an executable (or VAR=value) or names an algorithm or benchmark script."""
    tokens = segment.split()
    if not tokens:
        return False
    if tokens[0] in EXECUTABLES or re.match(r"^[A-Z_]+=\S*$", tokens[0]):
        return True
    return any(names_a_script(t) for t in tokens)


def fenced_commands(text: str) -> list:
    """(line_no, body, comment) of every fenced line, continuation lines joined, a shell comment split off."""
    _, code = split_fences(text)
    joined, buf, start = [], "", None
    for line_no, line in code:
        if start is None:
            start = line_no
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append((start, buf + line))
        buf, start = "", None
    if buf:
        joined.append((start, buf))
    out = []
    for line_no, line in joined:
        m = re.search(r"(?:^|\s)#\s", line)
        out.append((line_no, *((line[: m.start()], line[m.end() :]) if m else (line, ""))))
    return out


def flag_mentions(text: str) -> list:
    """(line, owner, flag, in_command) for every --flag of a page. owner None outside commands means 'the page's
    scripts'; inside a command it means another tool (skipped)."""
    prose, _ = split_fences(text)
    out = []
    for line_no, body, comment in fenced_commands(text):  # shell comments are checked as loose text
        if is_command(body):
            out += [(line_no, owner, flag, True) for owner, flag in command_flags(body)]
        else:
            out += [(line_no, None, flag, False) for flag in FLAG.findall(body)]
        out += [(line_no, None, flag, False) for flag in FLAG.findall(comment)]

    # prose: inline code spans that are commands, then everything else as loose text
    def span(m):
        seg = m.group(1)
        line_no = prose.count("\n", 0, m.start()) + 1
        if is_command(seg):
            out.extend((line_no, owner, flag, True) for owner, flag in command_flags(seg))
            return " " * len(m.group(0))
        return m.group(0)

    rest = INLINE_CODE.sub(span, prose)
    rest = LINK.sub(lambda m: m.group(0).split("](")[0], rest)  # link targets are not flags
    for m in FLAG.finditer(rest):
        out.append((rest.count("\n", 0, m.start()) + 1, None, m.group(1).rstrip("-"), False))
    return out


def check_flags(path: str, text: str | None = None, page_scripts: list | None = None) -> list:
    """Every --flag a page names exists where it belongs (see the module docstring). page_scripts: the scripts of
    an algorithm page; None: README and operational pages (a flag must exist in at least one of the eight)."""
    text = read(path) if text is None else text
    scope = page_scripts or ALGOS
    errors = []
    for line, owner, flag, in_command in flag_mentions(text):
        if in_command and owner is None:
            continue  # torchrun's, pip's, pytest's own flags
        if owner is None:
            if not any(flag in script_flags(s) for s in scope):
                errors.append(f"{path}:{line}: --{flag} is not a flag of {' or '.join(s + '.py' for s in scope)}")
        elif owner[0] == "algo":
            if owner[1] not in ALGOS:
                errors.append(f"{path}:{line}: --{flag} passed to unknown script {owner[1]}")
            elif flag not in script_flags(owner[1]):
                errors.append(f"{path}:{line}: --{flag} is not a flag of algorithms/{owner[1]}.py")
        elif flag not in benchmark_flags(owner[1]):
            errors.append(f"{path}:{line}: --{flag} is not a flag of benchmarks/{owner[1]}.py")
    return errors


# ---------------------------------------------------------------------------------------------------------------
# 9. Every documented command of a script runs as written
# ---------------------------------------------------------------------------------------------------------------
# A hub data set's fields, where they are not the scripts' defaults (prompt, answer): a command that uses it must
# name them, or it fails after the download with "missing field".
DATASET_FIELDS = {"openai/gsm8k": {"prompt_field": "question"}}
# A value naming something outside the repository (hub model or data set, a user's file, a placeholder): such a
# command is checked for its flags (test_flags_exist) and its data set fields only, not run.
EXTERNAL = re.compile(r"^(hf:|jsonl$)|<|\.jsonl$|\.txt$|^runs/|^[\w.-]+/[\w.-]+$")
LOCAL_PATHS = ("common/models/",)


def script_invocations(text: str) -> list:
    """(line, script, argv, nproc) for every command of a page (fenced line or inline code span) that runs an
    algorithm script; argv: the tokens after the script, nproc: torchrun's --nproc_per_node (1 for python)."""
    prose, _ = split_fences(text)
    segments = [(line, body) for line, body, _ in fenced_commands(text)]
    segments += [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in INLINE_CODE.finditer(prose)]
    out = []
    for line, body in segments:
        for part in re.split(r"&&|\|\||;", body):
            tokens = part.split()
            at = [i for i, t in enumerate(tokens) if names_a_script(t) and "benchmarks/" not in t]
            if not at or not tokens or tokens[0] not in ("python", "python3", "torchrun"):
                continue
            nproc = 1
            for i, t in enumerate(tokens[: at[0]]):
                if t.startswith("--nproc_per_node"):
                    nproc = int(t.split("=")[1] if "=" in t else tokens[i + 1])
            out.append((line, SCRIPT.search(tokens[at[0]]).group(2), tokens[at[0] + 1 :], nproc))
    return out


def external_values(argv: list) -> list:
    """The values of argv that name something outside the repository (see EXTERNAL)."""
    values = [v for v in argv if not v.startswith("--")]
    return [v for v in values if EXTERNAL.search(v) and not v.startswith(LOCAL_PATHS)]


def check_dataset_fields(path: str, text: str | None = None) -> list:
    """A command on a hub data set with non-default field names names those fields."""
    errors = []
    for line, script, argv, _ in script_invocations(read(path) if text is None else text):
        for i, tok in enumerate(argv[:-1]):
            dataset = argv[i + 1].removeprefix("hf:").split(":")[0] if tok == "--task" else None
            for field, value in DATASET_FIELDS.get(dataset, {}).items():
                given = [argv[j + 1] for j in range(len(argv) - 1) if argv[j] == f"--{field}"]
                if given != [value]:
                    errors.append(f"{path}:{line}: {script}.py on {dataset} needs --{field} {value}")
    return errors


def runnable_commands() -> list:
    """pytest params (page:line id) of the documented commands that need only the repository, each distinct
    command once."""
    out = {}
    for path in all_pages():
        for line, script, argv, nproc in script_invocations(read(path)):
            if not external_values(argv) and "--help" not in argv:
                name = f"{os.path.relpath(path, ROOT)}:{line}"
                out.setdefault((script, *argv), pytest.param(script, argv, nproc, id=name))
    return list(out.values())


def run_documented(script: str, argv: list, tmp_path, capsys) -> tuple:
    """The command as written, then the smoke-test sizes (one step, a few prompts) appended: later flags win, so a
    flag of the command that the sizes do not set keeps its documented value. A torchrun command runs as one
    process here (the 2-rank path of every script: tests/test_distributed.py)."""
    sizes = [*tiny_flags(script), "--total_steps", "1", "--eval_every", "0", "--output_dir", str(tmp_path)]
    return run_in_process(script, [*argv, *sizes], capsys)


# ---------------------------------------------------------------------------------------------------------------
# 4-7. Sections, Flags-table defaults, test references, the CI command
# ---------------------------------------------------------------------------------------------------------------
def check_sections(path: str, text: str | None = None) -> list:
    text = read(path) if text is None else text
    found = [t for _, t in headings(text, level=2)]
    return [] if found == SECTIONS else [f"{path}: ## sections {found}, expected {SECTIONS}"]


def section(text: str, title: str) -> str:
    prose, _ = split_fences(text)
    m = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", prose, re.MULTILINE | re.DOTALL)
    return m.group(1) if m else ""


def _same_default(cell: str, default) -> bool | None:
    """True/False when the cell is a literal comparable with the default; None when it is not a literal."""
    c = cell.replace("`", "").strip()
    words = {"on": True, "true": True, "off": False, "false": False, "none": None}
    if c.lower() in words:
        return words[c.lower()] == default if (default is None or isinstance(default, bool)) else False
    nums = c.replace(",", " ").split()
    try:
        values = [float(x) for x in nums]
    except ValueError:
        values = None
    if values is not None and nums:
        if isinstance(default, bool) or default is None:
            return False
        if isinstance(default, (tuple, list)):
            return len(default) == len(values) and all(
                math.isclose(a, b, rel_tol=1e-9) for a, b in zip(default, values)
            )
        if isinstance(default, (int, float)):
            return len(values) == 1 and math.isclose(float(default), values[0], rel_tol=1e-9)
        return False
    if re.fullmatch(r"[\w.@-]+", c):
        return isinstance(default, str) and default == c
    return None


def check_flag_defaults(path: str, text: str | None = None, page_scripts: list | None = None) -> list:
    """In the page's `## Flags` table, a row whose first cell is one `--flag` has our default in the second cell,
    written as a literal (number, on/off, None, a word, numbers separated by spaces); it must equal the Args
    default of every page script that has the field. Path defaults (strings with '/') are not compared."""
    text = read(path) if text is None else text
    errors = []
    for line in section(text, "Flags").split("\n"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.strip().startswith("|") else []
        if len(cells) < 2 or not re.fullmatch(r"`--\w+`", cells[0]):
            continue
        name = cells[0].strip("`")[2:]
        fields = [args_fields(s)[name] for s in page_scripts if name in args_fields(s)]
        if not fields:
            errors.append(f"{path}: Flags table: --{name} is not a field of {page_scripts}")
            continue
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, str) and "/" in default:
                continue
            same = _same_default(cells[1], default)
            if same is None:
                errors.append(f"{path}: Flags table: --{name}: default cell {cells[1]!r} is not a literal")
            elif not same:
                errors.append(f"{path}: Flags table: --{name}: default {cells[1]!r}, the script says {default!r}")
    return errors


@functools.cache
def functions_of_test_file(filename: str) -> frozenset:
    tree = ast.parse(read(os.path.join(ROOT, "tests", filename)))
    return frozenset(n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test"))


def check_test_refs(path: str, text: str | None = None) -> list:
    text = read(path) if text is None else text
    errors = []
    for m in TEST_REF.finditer(text):
        filename, func = m.group(1), m.group(2)
        line = text.count("\n", 0, m.start()) + 1
        if not os.path.exists(os.path.join(ROOT, "tests", filename)):
            errors.append(f"{path}:{line}: no test file tests/{filename}")
        elif func and func not in functions_of_test_file(filename):
            errors.append(f"{path}:{line}: no test {func} in tests/{filename}")
    return errors


METRIC_KEY = re.compile(r"[\"']((?:losses|charts|eval|perf|rewards|logps)/[\w@/]+)[\"']")


def script_metric_keys(name: str) -> set:
    """The metric names written as string literals in algorithms/<name>.py (keys built from a loss's stats dict,
    `losses/{k}`, and f-string keys are not literals and are not collected)."""
    return set(METRIC_KEY.findall(read(os.path.join(ROOT, "algorithms", f"{name}.py"))))


def check_metric_glossary(path: str, text: str | None = None) -> list:
    """Every literal metric key of the eight scripts is named (in backticks) in the glossary page."""
    text = read(path) if text is None else text
    named = set(INLINE_CODE.findall(text))
    return [
        f"{path}: metric {key} (algorithms/{name}.py) is not in the glossary"
        for name in ALGOS
        for key in sorted(script_metric_keys(name))
        if key not in named
    ]


def ci_test_command() -> str:
    lines = [ln.strip() for ln in read(os.path.join(ROOT, ".ci", "run")).split("\n")]
    marker = lines.index("# README test command:")
    return lines[marker + 1]


def all_pages() -> list:
    return [README] + sorted(glob.glob(os.path.join(DOCS, "*.md")))


def page_scripts(path: str) -> list | None:
    name = os.path.basename(path)
    return (ALGO_PAGES.get(name) or FLAG_SCOPE.get(name)) if os.path.dirname(path) == DOCS else None


# ---------------------------------------------------------------------------------------------------------------
# The checks on the real pages
# ---------------------------------------------------------------------------------------------------------------
def test_every_expected_page_exists():
    missing = [p for p in list(ALGO_PAGES) + OPERATIONAL_PAGES if not os.path.exists(os.path.join(DOCS, p))]
    assert not missing, f"missing docs pages: {missing}"


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{p}" for p in list(ALGO_PAGES) + OPERATIONAL_PAGES])
def test_links_resolve(page):
    assert check_links(os.path.join(ROOT, page)) == []


def test_every_docs_page_is_checked():
    """A new page in docs/ must be added to ALGO_PAGES or OPERATIONAL_PAGES (so its flags get a scope)."""
    extra = (
        {os.path.basename(p) for p in glob.glob(os.path.join(DOCS, "*.md"))} - set(ALGO_PAGES) - set(OPERATIONAL_PAGES)
    )
    assert not extra, f"docs pages not covered by tests/test_docs.py: {sorted(extra)}"


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{p}" for p in list(ALGO_PAGES) + OPERATIONAL_PAGES])
def test_flags_exist(page):
    path = os.path.join(ROOT, page)
    assert check_flags(path, page_scripts=page_scripts(path)) == []


@pytest.mark.parametrize("script, argv, nproc", runnable_commands())
def test_documented_command_runs(script, argv, nproc, tmp_path, capsys):
    code, err = run_documented(script, argv, tmp_path, capsys)
    assert code in (0, None), err[-2000:]
    (run_dir,) = glob.glob(os.path.join(tmp_path, "*", "metrics.jsonl"))
    assert any(row.get("step") == 1 for row in read_metrics(os.path.dirname(run_dir)))


def test_documented_commands_found():
    """The collector sees the commands: every script has a runnable one, and the hub commands are left out."""
    found = {p.values[0] for p in runnable_commands()}
    assert found == set(ALGOS), set(ALGOS) - found
    assert external_values(["--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct"]) == ["Qwen/Qwen2.5-0.5B-Instruct"]
    assert external_values(["--teacher_name_or_path", "common/models/tiny-teacher", "--lmbda", "0.5"]) == []


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{p}" for p in list(ALGO_PAGES) + OPERATIONAL_PAGES])
def test_dataset_fields_named(page):
    assert check_dataset_fields(os.path.join(ROOT, page)) == []


def test_readme_links_every_script_and_every_page():
    targets = link_targets(README)
    missing = [f"algorithms/{a}.py" for a in ALGOS if f"algorithms/{a}.py" not in targets]
    missing += [
        os.path.relpath(p, ROOT)
        for p in glob.glob(os.path.join(DOCS, "*.md"))
        if os.path.relpath(p, ROOT) not in targets
    ]
    assert not missing, f"README.md does not link: {missing}"


def test_readme_table_links_each_script_and_its_page():
    """Each script's row of the README table links the script and its docs page."""
    prose, _ = split_fences(read(README))
    page_of = {s: p for p, scripts in ALGO_PAGES.items() for s in scripts}
    for algo in ALGOS:
        rows = [ln for ln in prose.split("\n") if ln.startswith("|") and f"(algorithms/{algo}.py)" in ln]
        assert rows, f"no README table row links algorithms/{algo}.py"
        assert any(f"(docs/{page_of[algo]})" in r for r in rows), (
            f"the row of {algo}.py does not link docs/{page_of[algo]}"
        )


def test_each_script_names_its_docs_page_on_line_1():
    page_of = {s: p for p, scripts in ALGO_PAGES.items() for s in scripts}
    for algo in ALGOS:
        with open(os.path.join(ROOT, "algorithms", f"{algo}.py")) as f:
            assert f.readline().strip() == f"# docs: docs/{page_of[algo]}", algo


@pytest.mark.parametrize("page", list(ALGO_PAGES))
def test_algorithm_page_sections_in_order(page):
    assert check_sections(os.path.join(DOCS, page)) == []


@pytest.mark.parametrize("page", list(ALGO_PAGES))
def test_flags_table_defaults_match_args(page):
    path = os.path.join(DOCS, page)
    assert check_flag_defaults(path, page_scripts=ALGO_PAGES[page]) == []


@pytest.mark.parametrize("page", ["README.md"] + [f"docs/{p}" for p in list(ALGO_PAGES) + OPERATIONAL_PAGES])
def test_named_tests_exist(page):
    assert check_test_refs(os.path.join(ROOT, page)) == []


def test_metric_glossary_names_every_metric():
    assert check_metric_glossary(os.path.join(DOCS, "metrics.md")) == []


def test_readme_shows_the_ci_test_command():
    command = ci_test_command()
    _, code = split_fences(read(README))
    assert any(line.strip() == command for _, line in code), f"README.md does not show `{command}` (.ci/run)"


def test_readme_is_a_landing_page():
    assert len(read(README).split("\n")) <= 201  # at most 200 lines (a trailing newline adds one empty field)


# ---------------------------------------------------------------------------------------------------------------
# Negative controls: the same checkers on a deliberately broken page
# ---------------------------------------------------------------------------------------------------------------
def test_negative_control_broken_link_and_unknown_flag(tmp_path):
    page = tmp_path / "broken.md"
    (tmp_path / "other.md").write_text("# Other\n\n## Real heading\n")
    page.write_text(
        "# Broken\n\n## Usage\n\n"
        "See [a missing page](missing.md), [a missing anchor](other.md#no-such-heading), "
        "[a good one](other.md#real-heading) and [here](#usage).\n\n"
        "```bash\npython algorithms/grpo.py --beta 0.1 --no_such_flag 3\n"
        "torchrun --standalone --nproc_per_node=2 algorithms/gkd.py --lmbda 0.5\n"
        "pip install -r requirements.txt --index-url https://example.org\n```\n\n"
        "With `--kl_estimator k2` and `--made_up_knob` (loose flags), `gkd.py --tau 0.1`.\n"
    )
    link_errors = check_links(str(page))
    assert len(link_errors) == 2, link_errors
    assert "missing.md" in link_errors[0] and "no-such-heading" in link_errors[1]
    flag_errors = check_flags(str(page), page_scripts=["grpo"])  # as if it were docs/grpo.md
    assert len(flag_errors) == 3, flag_errors
    assert "--no_such_flag is not a flag of algorithms/grpo.py" in flag_errors[0]
    assert any("--made_up_knob is not a flag of grpo.py" in e for e in flag_errors)
    assert any("--tau is not a flag of algorithms/gkd.py" in e for e in flag_errors)  # gkd has no tau
    # the same page read as README / operational page: loose flags only need to exist in some script
    assert len(check_flags(str(page))) == 3  # the same three: --kl_estimator exists in grpo.py, --made_up_knob nowhere


def test_negative_control_documented_command(tmp_path, capsys):
    """A planted bad flag in a runnable command fails its run (and its flag check); a GSM8K command without
    --prompt_field question is flagged."""
    page = tmp_path / "grpo.md"
    page.write_text(
        "```bash\ntorchrun --standalone --nproc_per_node=2 algorithms/grpo.py --beta 0.1 \\\n    --no_such_flag 3\n"
        "python algorithms/grpo.py --task hf:openai/gsm8k:main --model_name_or_path Qwen/Qwen2.5-0.5B   # hub\n```\n"
    )
    runs = script_invocations(page.read_text())
    assert [(line, script, nproc) for line, script, _, nproc in runs] == [(2, "grpo", 2), (4, "grpo", 1)]
    assert external_values(runs[0][2]) == [] and external_values(runs[1][2]) != []
    code, err = run_documented("grpo", runs[0][2], tmp_path, capsys)
    assert code not in (0, None) and "no_such_flag" in err, err[-2000:]
    code, _ = run_documented("grpo", ["--beta", "0.1"], tmp_path, capsys)  # the same command, flag removed
    assert code in (0, None)
    errors = check_dataset_fields(str(page))
    assert len(errors) == 1 and "--prompt_field question" in errors[0], errors


def test_negative_control_sections_defaults_and_test_names(tmp_path):
    page = tmp_path / "grpo.md"
    shuffled = SECTIONS[:2] + SECTIONS[3:4] + SECTIONS[2:3] + SECTIONS[4:]
    body = "\n\n".join(f"## {s}\n\ntext" for s in shuffled)
    body = body.replace(
        "## Flags\n\ntext",
        "## Flags\n\n| flag | default |\n|---|---|\n| `--beta` | 0.05 |\n"
        "| `--kl_estimator` | None |\n| `--epsilon` | about 0.2 |",
    )
    page.write_text(
        f"# GRPO\n\n{body}\n\nProved by `tests/test_grpo.py::test_t99_missing` and "
        "`tests/test_grpo.py::test_t3_on_policy_estimator_gradients`.\n"
    )
    assert len(check_sections(str(page))) == 1
    defaults = check_flag_defaults(str(page), page_scripts=["grpo"])
    assert len(defaults) == 2 and "--beta" in defaults[0] and "not a literal" in defaults[1], defaults
    refs = check_test_refs(str(page))
    assert len(refs) == 1 and "test_t99_missing" in refs[0], refs


def test_negative_control_metric_glossary(tmp_path):
    page = tmp_path / "metrics.md"
    full = read(os.path.join(DOCS, "metrics.md"))
    page.write_text(full.replace("`charts/frac_unsolved`", "frac_unsolved"))
    errors = check_metric_glossary(str(page))
    assert len(errors) == 1 and "charts/frac_unsolved" in errors[0], errors


def test_github_anchor_rules():
    assert github_anchor("What the loss really regularizes") == "what-the-loss-really-regularizes"
    assert github_anchor("Q♯ (`algorithms/q_sharp.py`)") == "q-algorithmsq_sharppy"
    assert github_anchor("Outputs, checkpoints, resume") == "outputs-checkpoints-resume"
    assert github_anchor("grpo.py vs TRL's GRPOTrainer") == "grpopy-vs-trls-grpotrainer"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n## A") == {"a", "a-1", "a-2"}


def test_bool_fields_give_no_flags():
    flags = script_flags("grpo")
    assert {"chat_template", "no_chat_template", "kl_importance_weight", "no_kl_importance_weight"} <= flags
    assert "bf16" in flags and "no_bf16" not in flags  # Optional[bool]: `--bf16 {None,True,False}`
    assert "no_beta" not in flags


def test_negative_control_kl_page_scope(tmp_path):
    """docs/kl.md names grpo.py's flags: another script's flag there is an error."""
    page = tmp_path / "kl.md"
    page.write_text("`--kl_placement reward`, `--kl_estimator k1` and pmd_mean's `--tau`.\n")
    errors = check_flags(str(page), page_scripts=page_scripts(os.path.join(DOCS, "kl.md")))
    assert len(errors) == 1 and "--tau" in errors[0], errors
