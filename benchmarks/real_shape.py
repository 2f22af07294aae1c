"""Peak memory of grpo.py and gkd.py at a real model's shape on CPU, per rank and per phase, beside the prediction of
the memory model of docs/real_models.md.

The model: gpu_check.py's Qwen2.5-0.5B-shaped Qwen2 (24 layers, hidden 896, 151,936-token vocabulary, random weights,
a local tokenizer), built once; GKD's teacher is the same model. Each script runs 2 steps of a small batch (grpo 2
prompts x 2 completions, gkd 4 prompts) in micro-batches of 2, completions of 128 tokens (a random model almost never
emits EOS), float32, a checkpoint after each step; as 1 process and as 2 ranks under `torchrun` (FSDP2, gloo), then
resumed (`--resume`) from a copy of its folder cut back to the first checkpoint. Each rank runs through this file (a
hidden `--worker` mode) which wraps the script's phase functions and reads the process's peak RSS (VmHWM, reset
before each call through /proc/self/clear_refs) around every call: sampling (`sample_batch`), log-probs
(`batched_logprobs`: grpo's reference), GKD's teacher pass (`completion_log_softmax` on the teacher, in the update),
update (`update_policy`), eval (`evaluate`: its sampling and KL passes count there only), save (`Run.save`), load
(`load_model`), start (`Run.start`: sharding, AdamW, the step-0 eval) and, in the resumed run, resume (the checkpoint's
`load_model` and `Run.start`, which restores AdamW). Step time and tokens/s are the medians of metrics.jsonl.

    python benchmarks/real_shape.py --tree /work/main --label before   # the algorithm files of another checkout
    python benchmarks/real_shape.py --label after                       # this checkout's
    python benchmarks/real_shape.py --tiny --label smoke                # 2 layers, 64 wide, the full vocabulary

Writes LABEL.json and LABEL.md to benchmarks/results/real_shape/ (or --out).
"""

import argparse
import atexit
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
MICRO = 2  # --micro_batch_size
EVAL_PROMPTS = 2  # --eval_num_prompts, one sample each
BATCH = {"grpo": ["--prompts_per_step", "2", "--num_generations", "2"], "gkd": ["--prompts_per_step", "4"]}
ROWS = {"grpo": 4, "gkd": 4}  # completions per step, all ranks together
FROZEN = {"grpo": 1, "gkd": 2}  # frozen float32 copies of the model: grpo's reference (also the eval's initial
# model); gkd's teacher (here the same model) and its initial student
PHASES = ["load", "start", "sampling", "logprobs", "teacher", "update", "eval", "save", "process"]
RESUMED = ["resume", "process"]


# ---- the worker: one rank of an algorithm file, its phases measured -------------------------------------------------
PEAKS = {}  # phase -> the highest VmHWM (bytes) seen in it
ENTRY = {}  # phase -> VmRSS (bytes) when it was first entered
STACK = []  # the phases in progress, outermost first
RECORD = {}  # what this rank writes at exit


def status(field: str) -> int:
    """A /proc/self/status memory field (VmHWM: peak RSS since the last reset; VmRSS: now), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """VmHWM back to the current RSS (Linux: 5 to clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def note(value: int) -> None:
    """A peak reading: it belongs to every phase in progress, and to the process."""
    for phase in STACK:
        PEAKS[phase] = max(PEAKS.get(phase, 0), value)
    PEAKS["process"] = max(PEAKS.get("process", 0), value)


def measured(phase, function):
    """`function`, with the peak RSS of each call kept under `phase` (a name, or a function of the call's arguments
    that gives one, or None: not measured). It only calls through: the results are the function's. The peak so far
    is credited to the phases in progress before the reset, so a phase nested in another counts in both; inside the
    eval nothing else is measured (the eval's sampling and KL passes are the eval's)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        name = phase(*args, **kwargs) if callable(phase) else phase
        if name is None or "eval" in STACK:
            return function(*args, **kwargs)
        note(status("VmHWM"))
        reset_peak()
        ENTRY.setdefault(name, status("VmRSS"))
        STACK.append(name)
        try:
            return function(*args, **kwargs)
        finally:
            note(status("VmHWM"))
            STACK.pop()

    return wrapper


def teacher_phase(model, batch, *args, **kwargs):
    """GKD's teacher pass: completion_log_softmax on the batch's teacher (micro_loss, in the update)."""
    return "teacher" if isinstance(batch, dict) and batch.get("teacher") is model else None


def load_phase(path, *args, **kwargs):
    """load_model: the checkpoint of a resumed run is the resume phase, any other model the load phase."""
    return "resume" if os.path.basename(os.path.dirname(os.path.abspath(str(path)))) == "checkpoints" else "load"


def start_phase(run, *args, **kwargs):
    """Run.start: it restores AdamW when resuming (resume), else shards, makes AdamW and evaluates at step 0."""
    return "resume" if run.checkpoint else "start"


def install(module) -> None:
    """Wrap the module's phase functions in place: they call each other through its globals."""
    for name, phase in [
        ("sample_batch", "sampling"),
        ("batched_logprobs", "logprobs"),
        ("update_policy", "update"),
        ("evaluate", "eval"),
        ("completion_log_softmax", teacher_phase),
        ("load_model", load_phase),
    ]:
        if hasattr(module, name):  # (a checkout without it: that phase is not measured; `wrapped` says which are)
            setattr(module, name, measured(phase, getattr(module, name)))
            RECORD["wrapped"].append(name)
    module.Run.start = measured(start_phase, module.Run.start)
    module.Run.save = measured("save", module.Run.save)
    RECORD["wrapped"] += ["Run.start", "Run.save"]


def write_phases(path: str) -> None:
    note(status("VmHWM"))
    RECORD["peaks"] = PEAKS
    RECORD["entry_rss"] = ENTRY
    with open(path, "w") as f:
        json.dump(RECORD, f, indent=1)


def worker(script: str, phase_out: str, flags: list) -> None:
    """One rank: `script` loaded as the module `algo` (tyro reads its Args through sys.modules), its phases wrapped,
    its main() run with `flags`; the peaks go to phase_out + RANK + .json at exit."""
    spec = importlib.util.spec_from_file_location("algo", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["algo"] = module
    spec.loader.exec_module(module)
    import transformers  # noqa: F401  (the scripts import it when they load a model: counted in the baseline)

    RECORD.update(rank=int(os.environ.get("RANK", 0)), script=script, rss_after_imports=status("VmRSS"), wrapped=[])
    path = f"{phase_out}{RECORD['rank']}.json"
    atexit.register(write_phases, path)
    install(module)
    sys.argv = [script, *flags]
    try:
        module.main()
    finally:
        write_phases(path)


# ---- the memory model ---------------------------------------------------------------------------------------------
def predict(script, world, phase, n_params, V, m, C, P, rank=0, rows=None, eval_rows=None, chunk=0, sharded=False):
    """Predicted peak bytes of one rank in one phase, CPU float32, by docs/real_models.md's model: the trained model's
    weights W = 4N/w, gradients G = 4N/w and AdamW moments A = 8N/w (sharded by FSDP2 on w ranks, whole in one
    process), F = 4N per frozen model held whole on every rank (grpo 1: the reference, also the eval's initial
    model; gkd 2: the teacher and the initial student), U = 4N for the weights FSDP2 all-gathers for an inference
    phase (0 in one process), and L = m C V 4 bytes per float32 [m, C, V] logits or log-softmax tensor, as many as
    the unchunked code (--logprob_chunk_size absent or >= C) holds at its peak; k = 1 when the rank runs two or more
    micro-batches (rows > m: the previous micro-batch's log-softmax is still referenced while the next is computed).
    chunk (--logprob_chunk_size, 0: the code has none): the log-prob pass and grpo's update hold the same copies of
    one chunk's [m, min(chunk, C), V] tensors (L_c) in place of L (the backward recomputes each chunk's logits);
    gkd's teacher pass and update keep the whole [m, C, V] log-softmax. P (prompt tokens) does not enter: the code keeps only the completion's logits (prefill: the last prompt
    position; whole rows under --gradient_checkpointing: logits_to_keep C + 1). Not modelled: the interpreter and
    libraries (the `imports` row), the layers' activations, the KV cache (< 1% here) and allocator slack.

    load      4N + F: every model loaded whole (the trained one before sharding).
    start     max(4N + 4N/w [w > 1: whole and shards while sharding] + F, the step-0 eval without A).
    sampling  W + U + A + F.
    logprobs  W + A + F + (4 + k) L: the reference's pass (not gathered): lm_head's output (C - 1 positions), its
              concatenation with the prefill's position, logits / T, the log-softmax, + the previous one.
    teacher   W + A + F + k G + 5 L: the student's log-softmax and the teacher's 4 as in logprobs.
    update    W + G + A + F + c L; grpo c = 4 + k: the forward as in logprobs (the backward holds 3: the
              log-softmax, its gradient, the gradient of logits / T); gkd c = 11: one divergence chunk (jsd): the
              teacher's and student's log-softmax, their exps, log t + log b, log s + log(1 - b) and log s - log m
              kept for the backward, log m, and the stats' two exps, difference and product (no grad).
    eval      W + U + A + F + (4 + f) L_e, L_e at m_e = min(m, eval rows): log p kept, log q being computed (4),
              f = the frozen models in the KL (grpo 1, gkd 2: the previous model's log p, log q still held).
    save      W + A + F, + 12N on rank 0 under FSDP2 (whole weights and AdamW state gathered to its CPU memory;
              in one process the state dict references the tensors).
    resume    max(load of the checkpoint, W + F + 8N + G + A): torch.load reads the whole AdamW state (8N) on every
              rank, then set_optimizer_state_dict first makes AdamW's own state by a step on zero gradients (torch's
              _init_optim_state: G, A) and copies this rank's share into it.
    The process's peak is the max of its run's phases (a resumed run: resume, load and sampling to save).

    sharded (the tree shards the frozen models and the AdamW state under torchrun; w > 1 only): F becomes the frozen
    models' shards F_s = F / w, and a frozen model is whole (4N more) only while it is gathered for its own inference
    phase (grpo's reference pass) or while it is loaded and sharded; the eval's KL runs both models in lockstep (one
    layer gathered at a time: no U); the teacher in GKD's update as well.
    load      8N + F_s: the trained model whole (sharded later, in start), the last frozen model whole and its shards.
    start     max(4N + 4N/w + F_s, W + U + F_s [the step-0 eval's sampling], W + F_s + eval copies [its KL]).
    logprobs  W + A + F_s + 4N + (4 + k) L_c: the reference gathered for its pass.
    eval      max(W + U + A + F_s, W + A + F_s + eval copies).
    save      W + A + F_s, + 4N on rank 0 (the whole weights only: each rank writes its part of the AdamW state).
    resume    max(load, W + F_s + G + A): each rank reads its part of the AdamW state into the state that
              set_optimizer_state_dict's step on zero gradients made (G, A), in place.
    """
    N, w = n_params, world
    W, G, A = 4 * N / w, 4 * N / w, 8 * N / w
    U = 4 * N if w > 1 else 0
    f = FROZEN[script]
    F = 4 * N * f
    if sharded and w > 1:
        return predict_sharded(script, w, phase, N, V, m, C, rows, eval_rows, chunk)
    L = m * C * V * 4
    L_c = m * min(chunk or C, C) * V * 4
    k = 1 if (rows or m) > m else 0
    m_e = min(m, eval_rows or m)
    eval_copies = (4 + f) * m_e * C * V * 4
    shard = 4 * N + (4 * N / w if w > 1 else 0) + F
    if phase == "load":
        return 4 * N + F
    if phase == "start":
        return max(shard, W + U + F + eval_copies)
    if phase == "sampling":
        return W + U + A + F
    if phase == "logprobs":
        return W + A + F + (4 + k) * L_c if script == "grpo" else None  # (gkd: no such pass, --update supervised)
    if phase == "teacher":
        return W + A + F + k * G + 5 * L if script == "gkd" else None
    if phase == "update":
        return W + G + A + F + ((4 + k) * L_c if script == "grpo" else 11 * L)
    if phase == "eval":
        return W + U + A + F + eval_copies
    if phase == "save":
        return W + A + F + (12 * N if w > 1 and rank == 0 else 0)
    if phase == "resume":
        return max(shard, W + F + 8 * N + G + A)
    raise ValueError(phase)


def predict_sharded(script, w, phase, N, V, m, C, rows, eval_rows, chunk):
    """`predict` for a tree that shards the frozen models and the AdamW state under torchrun (w > 1)."""
    W, G, A, U = 4 * N / w, 4 * N / w, 8 * N / w, 4 * N
    F_s = 4 * N * FROZEN[script] / w
    L = m * C * V * 4
    L_c = m * min(chunk or C, C) * V * 4
    k = 1 if (rows or m) > m else 0
    m_e = min(m, eval_rows or m)
    eval_copies = (4 + FROZEN[script]) * m_e * C * V * 4
    if phase == "load":
        return 8 * N + F_s
    if phase == "start":
        return max(4 * N + 4 * N / w + F_s, W + U + F_s, W + F_s + eval_copies)
    if phase == "sampling":
        return W + U + A + F_s
    if phase == "logprobs":
        return W + A + F_s + 4 * N + (4 + k) * L_c if script == "grpo" else None
    if phase == "teacher":
        return W + A + F_s + k * G + 5 * L if script == "gkd" else None
    if phase == "update":
        return W + G + A + F_s + ((4 + k) * L_c if script == "grpo" else 11 * L)
    if phase == "eval":
        return max(W + U + A + F_s, W + A + F_s + eval_copies)
    if phase == "save":
        return W + A + F_s + (4 * N if w > 1 else 0)
    if phase == "resume":
        return max(8 * N + F_s, W + F_s + G + A)
    raise ValueError(phase)


def shards_state(tree: str) -> bool:
    """Whether the tree's scripts shard the frozen models and the AdamW state under torchrun (this change)."""
    with open(os.path.join(tree, "algorithms", "grpo.py")) as f:
        return "DCP.save(" in f.read()


def chunk_size(tree: str, given) -> int:
    """The --logprob_chunk_size the tree's scripts run with: the one given, else grpo.py's default (0: none)."""
    with open(os.path.join(tree, "algorithms", "grpo.py")) as f:
        found = re.search(r"logprob_chunk_size: int = (\d+)", f.read())
    if found is None:
        return 0
    return int(found.group(1)) if given is None else given


# ---- the driver -----------------------------------------------------------------------------------------------------
def load_gpu_check():
    """benchmarks/gpu_check.py of this checkout, as a module (build_model, write_data)."""
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_facts(model: str, train: str) -> dict:
    """The parameter count (tied embeddings once; built on the meta device), the vocabulary, the mean prompt length."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with open(train) as f:
        prompts = [json.loads(line)["prompt"] for line in f][:16]
    lengths = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        lengths.append(len(tokenizer(text, add_special_tokens=False)["input_ids"]))
    n_params = sum(p.numel() for p in net.parameters())
    return {"n_params": n_params, "V": config.vocab_size, "P": statistics.mean(lengths)}


def script_flags(tree: str, script: str, env: dict) -> set:
    """The flags a script's --help lists."""
    path = os.path.join(tree, "algorithms", f"{script}.py")
    done = subprocess.run([sys.executable, path, "--help"], env=env, capture_output=True, text=True, check=True)
    return {word.strip(",").split("[")[0] for word in done.stdout.split() if word.startswith("--")}


def run_flags(script: str, model: str, train: str, held: str, a, known: set) -> list:
    flags = ["--model_name_or_path", model, "--task", "jsonl", "--train_file", train, "--eval_file", held]
    flags += ["--no_cuda", "--bf16", "False", "--total_steps", "2", "--save_every", "1"]
    flags += ["--max_new_tokens", str(a.max_new_tokens), "--micro_batch_size", str(MICRO), *BATCH[script]]
    flags += ["--eval_num_prompts", str(EVAL_PROMPTS), "--eval_samples_per_prompt", "1"]
    flags += ["--max_prompt_length", "256", "--learning_rate", "1e-6"]
    if script == "gkd":
        flags += ["--teacher_name_or_path", model]
    if a.logprob_chunk_size is not None and "--logprob_chunk_size" in known:  # (a checkout without it: not passed)
        flags += ["--logprob_chunk_size", str(a.logprob_chunk_size)]
    missing = [x for x in flags if x.startswith("--") and x not in known]
    if missing:
        raise SystemExit(f"{script}.py has no {' '.join(missing)}")
    return flags


def launch(a, tree: str, script: str, world: int, flags: list, phase_out: str, env: dict) -> dict:
    """One run of the script through the worker mode; its rank files, wall time, and error if it failed."""
    program = [os.path.abspath(__file__), "--worker", os.path.join(tree, "algorithms", f"{script}.py")]
    program += ["--phase_out", phase_out, "--", *flags]
    if world == 1:
        command = [sys.executable, *program]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        command += program
    t = time.time()
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=a.timeout)
        error = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
    except subprocess.TimeoutExpired:
        error = f"timed out after {a.timeout} s"
    result = {"wall_s": time.time() - t, "ranks": []}
    for rank in range(world):
        path = f"{phase_out}{rank}.json"
        if os.path.isfile(path):
            with open(path) as f:
                result["ranks"].append(json.load(f))
    if error:
        result["error"] = error
    return result


def summarize(run_dir: str, after_step: int) -> dict:
    """Median step time and tokens/s, mean completion length of the run's steps after `after_step`."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    steps = [row for row in rows if "perf/step_s" in row and row["step"] > after_step]
    if not steps:
        return {}
    out = {"step_s": statistics.median(row["perf/step_s"] for row in steps)}
    if all("charts/tokens_per_s" in row for row in steps):
        out["tokens_per_s"] = statistics.median(row["charts/tokens_per_s"] for row in steps)
    out["completion_len"] = statistics.mean(row["charts/completion_len_mean"] for row in steps)
    laps = sorted({key for row in steps for key in row if key.startswith("perf/") and key != "perf/step_s"})
    out["laps"] = {key: statistics.median(row[key] for row in steps if key in row) for key in laps}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tree", default=ROOT, help="the checkout whose algorithms/<script>.py run (default: this one)")
    ap.add_argument("--label", default=None, help="names the outputs LABEL.json, LABEL.md (default: the commit)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "real_shape"))
    ap.add_argument("--work", default=None, help="a folder for the model, data and runs, kept (default: a temp one)")
    ap.add_argument("--tiny", action="store_true", help="2 layers, 64 wide, the full vocabulary (a smoke run)")
    ap.add_argument("--scripts", nargs="*", default=["grpo", "gkd"], choices=sorted(BATCH))
    ap.add_argument("--worlds", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--logprob_chunk_size", type=int, default=None, help="passed where a script has the flag")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each process")
    ap.add_argument("--timeout", type=int, default=7200, help="seconds per run")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one rank: the algorithm file to run
    ap.add_argument("--phase_out", default=None, help=argparse.SUPPRESS)  # where it writes its peaks
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # the worker's script flags follow `--`
    a = ap.parse_args(argv[:split])
    if a.worker:
        return worker(a.worker, a.phase_out, argv[split + 1 :])
    work = a.work or tempfile.mkdtemp(prefix="real_shape_")
    os.makedirs(work, exist_ok=True)
    try:
        measure(a, work, "python " + shlex.join([os.path.relpath(__file__), *argv]))
    finally:  # a 0.5B run's checkpoints are ~6 GB each
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def measure(a, work: str, command: str) -> None:
    tree = os.path.abspath(a.tree)
    commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = commit.stdout.strip() or "?"
    label = a.label or ("tiny-" if a.tiny else "") + commit
    gpu_check = load_gpu_check()
    model = os.path.join(work, "model_tiny" if a.tiny else "model_0.5b")
    if not os.path.isfile(os.path.join(model, "config.json")):
        gpu_check.build_model(model, a.tiny, 151936)
    train, held, _ = gpu_check.write_data(work, a.max_new_tokens)
    facts = model_facts(model, train)
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["TOKENIZERS_PARALLELISM"] = "false"
    results = {"command": command, "tree": tree, "commit": commit, "tiny": a.tiny, "m": MICRO, **facts, "runs": {}}
    results["chunk"] = chunk_size(tree, a.logprob_chunk_size)
    results["sharded"] = shards_state(tree)
    for script in a.scripts:
        flags = run_flags(script, model, train, held, a, script_flags(tree, script, env))
        for world in a.worlds:
            name = f"{script} x{world}"
            out_dir = os.path.join(work, "runs", f"{script}_{world}")
            shutil.rmtree(out_dir, ignore_errors=True)
            os.makedirs(os.path.join(work, "phases"), exist_ok=True)
            prefix = os.path.join(work, "phases", f"{script}_{world}_")
            fresh_flags = [*flags, "--output_dir", out_dir, "--run_name", "fresh"]
            fresh = launch(a, tree, script, world, fresh_flags, prefix + "fresh.rank", env)
            if "error" not in fresh:
                fresh |= summarize(os.path.join(out_dir, "fresh"), 0)
            results["runs"][name] = {"world": world, "script": script, "fresh": fresh}
            print(f"{name}: {json.dumps({k: v for k, v in fresh.items() if k != 'ranks'})}", flush=True)
            if "error" not in fresh:  # what a kill after the first checkpoint leaves (no step 2, no `final`)
                copy = os.path.join(out_dir, "resumed")
                ignore = shutil.ignore_patterns("step_000002", "final")
                shutil.copytree(os.path.join(out_dir, "fresh"), copy, symlinks=True, ignore=ignore)
                resumed = launch(a, tree, script, world, ["--resume", copy], prefix + "resume.rank", env)
                if "error" not in resumed:
                    resumed |= summarize(copy, 1)
                results["runs"][name]["resume"] = resumed
                print(f"{name} resumed: {json.dumps({k: v for k, v in resumed.items() if k != 'ranks'})}", flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            write_outputs(a, results, label)
    print(write_outputs(a, results, label))


def table_rows(results: dict) -> list:
    """One row per script x world x rank x phase: measured and predicted peak (GiB), step time, tokens/s."""
    lines = []
    N, V, P = results["n_params"], results["V"], results["P"]
    for name, run in results["runs"].items():
        script, world = run["script"], run["world"]
        for kind, shown in (("fresh", PHASES), ("resume", RESUMED)):
            result = run.get(kind)
            if result is None:
                continue
            if "error" in result:
                lines.append(f"| {name} | {kind} | | error: {result['error'][:100]} | | | | | |")
            C = round(result.get("completion_len") or run["fresh"].get("completion_len") or 0)
            speed = f"{result.get('step_s', float('nan')):.2f} | {result.get('tokens_per_s', float('nan')):.0f}"
            modelled = PHASES[:-1] if kind == "fresh" else ["resume", "load", *PHASES[2:-1]]
            for record in result["ranks"]:
                rank = record["rank"]
                rows = -(-ROWS[script] // world)  # this rank's rows: the global batch split over the ranks
                eval_rows = len(range(rank, EVAL_PROMPTS, world))
                expected = {}
                for phase in modelled:
                    shape = (N, V, MICRO, C, P, rank, rows, eval_rows, results.get("chunk", 0))
                    expected[phase] = predict(script, world, phase, *shape, results.get("sharded", False))
                expected["process"] = max(v for v in expected.values() if v is not None)
                imports = record["rss_after_imports"] / GIB
                lines.append(f"| {name} | {kind} | {rank} | imports | {imports:.2f} | | | {speed} |")
                for phase in [p for p in shown if p in record["peaks"]]:
                    guess = "" if expected.get(phase) is None else f"{expected[phase] / GIB:.2f}"
                    peak = record["peaks"][phase] / GIB
                    measured_gib = f"{peak:.2f} | {peak - imports:.2f}"
                    lines.append(f"| {name} | {kind} | {rank} | {phase} | {measured_gib} | {guess} | {speed} |")
    return lines


def write_outputs(a, results: dict, label: str) -> str:
    """LABEL.md (the table) and LABEL.json (everything measured) under --out; returns the table."""
    runs = [r[k] for r in results["runs"].values() for k in ("fresh", "resume") if k in r]
    lengths = [r["completion_len"] for r in runs if "completion_len" in r]
    C = statistics.mean(lengths) if lengths else float("nan")
    walls = [f"{name} {r['fresh']['wall_s']:.0f} s" for name, r in results["runs"].items()]
    walls += [f"{name} resumed {r['resume']['wall_s']:.0f} s" for name, r in results["runs"].items() if "resume" in r]
    lines = [
        f"`{results['command']}`: `{results['tree']}` at {results['commit']}, "
        f"{'tiny (2 layers, 64 wide)' if results['tiny'] else 'Qwen2.5-0.5B shape'}, "
        f"{results['n_params']:,} parameters, V = {results['V']:,}, C = {C:.1f} (mean completion length logged), "
        f"m = {results['m']}, P = {results['P']:.0f} (mean prompt tokens); CPU float32, OMP_NUM_THREADS={a.threads}.",
        "",
        "Peak RSS per rank and phase (GiB = 2^30 B); `imports`: the RSS after importing the script and transformers, "
        "not modelled, so `above imports` is what `predicted` (`predict`, docs/real_models.md's model) estimates. "
        "Step time (s) and tokens/s: the run's medians.",
        "",
        "| run | kind | rank | phase | peak RSS (GiB) | above imports (GiB) | predicted (GiB) | step (s) | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
        *table_rows(results),
        "",
        "Wall time: " + ", ".join(walls) + ".",
    ]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{label}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, f"{label}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
