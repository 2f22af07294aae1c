"""Exact-enumeration harness shared by every algorithm's tests.

Tabular softmax policies in float64, expectations by summation over every outcome (no sampling), reference
gradients by autograd on the closed-form objective. Two settings:
  * a K-way categorical (one token per "sequence"): `random_logits(K)`, `enumerate_groups(K, G)`;
  * a tiny token tree: `TokenTree(vocab=3, max_len=2)`, every prefix is a state with its own logits, optionally
    with an EOS token that ends a sequence early (`TokenTree(vocab=3, max_len=4, eos=0)`).
Tests feed the log-prob tensors built here to the pure loss functions of `algorithms/*.py`, so the code under
test is the code that trains.
"""

import importlib.util
import itertools
import json
import os
import subprocess
import sys

import torch

DT = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_algorithm(name: str):
    """Import `algorithms/<name>.py` as a module (importing has no side effects by convention)."""
    if f"algo_{name}" in sys.modules:
        return sys.modules[f"algo_{name}"]
    spec = importlib.util.spec_from_file_location(f"algo_{name}", os.path.join(ROOT, "algorithms", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"algo_{name}"] = module  # registered: tyro reads the Args class's source through it
    spec.loader.exec_module(module)
    return module


def random_logits(shape, seed: int, scale: float = 1.0, requires_grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=DT) * scale).requires_grad_(requires_grad)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last axis, from log-probabilities."""
    return (logp.exp() * (logp - logq)).sum(-1)


def grad(value: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, wrt, retain_graph=True)[0]


def enumerate_groups(K: int, G: int) -> torch.Tensor:
    """Every ordered G-tuple of outcomes in 0..K-1: [K^G, G]."""
    return torch.tensor(list(itertools.product(range(K), repeat=G)), dtype=torch.long)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


class TokenTree:
    """All sequences over `vocab` tokens up to `max_len`; with `eos`, a sequence ends at its first EOS.

    States are the prefixes that can still be extended; each has its own row of logits, so a policy is a
    [num_states, vocab] tensor. Sequences are padded to max_len with a mask.
    """

    def __init__(self, vocab: int = 3, max_len: int = 2, eos=None):
        self.V, self.L, self.eos = vocab, max_len, eos
        seqs = []
        for n in range(1, max_len + 1):
            for s in itertools.product(range(vocab), repeat=n):
                ends_here = eos is not None and s[-1] == eos
                has_early_eos = eos is not None and eos in s[:-1]
                if has_early_eos or (n < max_len and not ends_here):
                    continue
                seqs.append(s)
        self.seq_list = seqs
        self.states = sorted({s[:t] for s in seqs for t in range(len(s))}, key=lambda p: (len(p), p))
        index = {p: i for i, p in enumerate(self.states)}
        self.tokens = torch.zeros(len(seqs), max_len, dtype=torch.long)
        self.mask = torch.zeros(len(seqs), max_len, dtype=DT)
        self.seq_states = torch.zeros(len(seqs), max_len, dtype=torch.long)
        for i, s in enumerate(seqs):
            self.tokens[i, : len(s)] = torch.tensor(s)
            self.mask[i, : len(s)] = 1.0
            self.seq_states[i, : len(s)] = torch.tensor([index[s[:t]] for t in range(len(s))])
        self.num_states = len(self.states)

    def random_logits(self, seed: int, scale: float = 1.0) -> torch.Tensor:
        return random_logits((self.num_states, self.V), seed, scale)

    def token_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """log pi(y_t | y_<t) for every sequence and position, 0 where masked: [N, max_len]."""
        lsm = torch.log_softmax(logits, -1)
        return lsm[self.seq_states, self.tokens] * self.mask

    def seq_logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        return self.token_logprobs(logits).sum(-1)

    def state_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """d(s) = probability that a sampled sequence passes through prefix s: [num_states]."""
        lsm = torch.log_softmax(logits, -1)
        d = []
        for p in self.states:
            d.append(sum(lsm[self.states.index(p[:t]), p[t]] for t in range(len(p))) if p else lsm.new_zeros(()))
        return torch.stack(d).exp()

    def seq_kl(self, logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
        """KL(P || Q) between the sequence distributions."""
        lp, lq = self.seq_logprobs(logits_p), self.seq_logprobs(logits_q)
        return (lp.exp() * (lp - lq)).sum()

    def per_state_kl(self, logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
        """KL(p(.|s) || q(.|s)) for every state: [num_states]."""
        return kl(torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1))


# ---- running the scripts ----------------------------------------------------------------------------------
# Small settings that make any default run take seconds: flags shared by the smoke tests of every script.
TINY_RUN = [
    "--prompts_per_step",
    "4",
    "--eval_num_prompts",
    "8",
    "--eval_samples_per_prompt",
    "2",
    "--total_steps",
    "2",
    "--eval_every",
    "1",
]
SCRIPTS = [
    "grpo",
    "rpg_fkl",
    "rpg_rkl",
    "pmd_mean",
    "a_star_po",
    "q_sharp",
    "dpo_kl",
    "gkd",
]  # every script in algorithms/
TINY_FLAGS = {
    "a_star_po": TINY_RUN + ["--max_train_prompts", "32", "--num_ref_samples", "2"],  # a short stage 1
    "q_sharp": (
        "--prompts_per_step 8 --samples_per_prompt 2 --epochs_per_round 1 --q_batch_size 8 --eval_num_prompts 8 "
        "--eval_samples_per_prompt 2 --eval_etas 0.1 --total_steps 1"
    ).split(),
}


def tiny_flags(script: str) -> list:
    return TINY_FLAGS.get(script, TINY_RUN)


def launch(path: str, *args: str, nproc: int = 1) -> tuple:
    """(argv, env) of `python path *args` (or torchrun with nproc > 1), offline, one thread, no GPU."""
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # the equality tests are float32 CPU tests, also on a GPU machine
    return [*launcher, path, *args], env


def script_command(name: str, *flags: str, nproc: int = 1) -> tuple:
    """(argv, env) of `python algorithms/<name>.py *flags` (or torchrun with nproc > 1)."""
    return launch(os.path.join(ROOT, "algorithms", f"{name}.py"), *flags, nproc=nproc)


def run_batch(tmp_path, runs: list, nproc: int = 2) -> tuple:
    """Several script runs ([(script, flags), ...]) in one torchrun (tests/script_batch.py): (each run's exit
    status, the torchrun's stderr)."""
    path = tmp_path / f"runs_{len(list(tmp_path.glob('runs_*.json')))}.json"
    path.write_text(json.dumps([[script, [str(f) for f in flags]] for script, flags in runs]))
    argv, env = launch(os.path.join(ROOT, "tests", "script_batch.py"), str(path), nproc=nproc)
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    codes_path = tmp_path / (path.name + ".codes")
    assert proc.returncode == 0 and codes_path.exists(), proc.stderr[-3000:]
    return json.loads(codes_path.read_text()), proc.stderr


def run_script(name: str, *flags: str, cwd=None, timeout: int = 300, nproc: int = 1) -> subprocess.CompletedProcess:
    argv, env = script_command(name, *flags, nproc=nproc)
    return subprocess.run(argv, cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start_script(name: str, *flags: str, nproc: int = 1) -> subprocess.Popen:
    """The same as run_script, in the background (to be signalled), in its own process group (torchrun's workers
    included: os.killpg reaches them all)."""
    argv, env = script_command(name, *flags, nproc=nproc)
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def run_in_process(script, flags, capsys, stdout=False):
    """main() with these flags in this process (no interpreter start-up per case): (exit code, stderr), and
    stdout too (a third item) with `stdout`."""
    algo = load_algorithm(script)
    torch.set_num_threads(1)  # as the subprocess runs (OMP_NUM_THREADS=1): xdist runs one worker per core
    argv, code = sys.argv, 0
    sys.argv = [f"{script}.py", *flags]
    try:
        algo.main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return (code, captured.err, captured.out) if stdout else (code, captured.err)


def read_metrics(run_dir) -> list:
    """Rows of metrics.jsonl, parsed strictly: a bare NaN or Infinity (not JSON) is an error."""

    def reject(constant):
        raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=reject) for line in f if line.strip()]


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The failure message, asserting it is a single `error: ...` line on stderr and a non-zero exit status."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


# ---- special functions and minimizers (float64) -------------------------------------------------------------
def lambert_w0_exp(s: torch.Tensor) -> torch.Tensor:
    """W0(e^s) for real s: the w > 0 with w + log w = s, by Newton on x = log w (stable for very large and very
    negative s, i.e. tiny tau)."""
    x = torch.where(s > 1, torch.log(s.clamp(min=1.0)), s)
    for _ in range(40):  # quadratic convergence: a handful of steps suffice from this start
        x = x - (torch.exp(x) + x - s) / (torch.exp(x) + 1)
    return torch.exp(x)


def bisect(f, lo: float, hi: float, iters: int = 100) -> float:
    """Root of a decreasing function f on [lo, hi]."""
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def lbfgs_minimize(loss_fn, z0: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """argmin of loss_fn(z) from z0 by L-BFGS with a strong-Wolfe line search, in float64."""
    z = z0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [z],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-15,
        tolerance_change=1e-20,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = loss_fn(z)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    return z.detach()
