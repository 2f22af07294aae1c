"""The exact Q# and CD frontiers of the tiny reference on the held-out arithmetic prompts (no learning).

With the exact-match reward each prompt has one correct completion y* (the answer, then EOS), so the return law
of pi_ref is known in closed form: after a prefix of y* and the next token a, P(R = 1) = p(a) = the reference
probability of the rest of y* if a continues y*, else 0. Off the path every token's return is 0, both guides add
offset 0 and equal pi_ref there, so pass@1 and the sequence KL of any guided policy are exact sums along y*:
    pass@1 = prod_t pi_g(y*_t | y*_<t),   KL = sum_t P_g(reach y*_<t) KL(pi_g(.|y*_<t) || pi_ref(.|y*_<t)),
with offsets ln(1 - p + p e^{1/eta}) (Q#, the exact soft Q*/eta) or p / eta (CD). This is the frontier a perfect
Q model would give `algorithms/q_sharp.py`, and how far apart Q# and CD can be on this task at best.
(Answers with surrounding spaces, e.g. " 95", also score 1; the tiny reference almost never writes them, which
these sums ignore.)  Usage: python benchmarks/q_sharp_oracle.py [--etas 0.05 0.1 ...] [--num_prompts 500]

`--q_model RUN/final` also compares a trained Q model (a q_sharp.py checkpoint: its backbone as a Hugging Face
folder plus head.pt; --head q with 2 atoms on {0, 1}, the defaults) with the exact law on the states along y*: the
reference-weighted calibration of its p_hat(a) = P_theta(R = 1 | prefix, a) over every next token, and its mean
p_hat on the correct and on the wrong next tokens (whose exact p is 0).
"""

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch

from common import TINY_POLICY
from common.tasks import load_task


def path_frontier(paths: list, offset, eta: float) -> tuple:
    """Mean exact pass@1 and sequence KL over prompts; paths: (log pi_ref rows [L, V], y* tokens [L])."""
    total_pass, total_kl = 0.0, 0.0
    for log_ref, y in paths:
        tok_lp = log_ref[torch.arange(len(y)), y]
        reach, kl = 1.0, 0.0
        for t in range(len(y)):
            p = tok_lp[t + 1 :].sum().exp()  # P(R = 1 | prefix, y*_t) under pi_ref
            g = log_ref[t].clone()
            g[y[t]] += offset(p, eta)
            g = torch.log_softmax(g, -1)
            kl += reach * (g.exp() * (g - log_ref[t])).sum().item()
            reach *= g[y[t]].exp().item()
        total_pass += reach
        total_kl += kl
    return total_pass / len(paths), total_kl / len(paths)


def calibration(paths: list, prompts: list, q_dir: str) -> None:
    """Print p_hat against the exact p on every next token of the states along y*, weighted by pi_ref."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("q_sharp", os.path.join(ROOT, "algorithms", "q_sharp.py"))
    qs = importlib.util.module_from_spec(spec)
    sys.modules["q_sharp"] = qs
    spec.loader.exec_module(qs)
    V = paths[0][0].shape[-1]
    flags = os.path.join(os.path.realpath(q_dir), "..", "..", "args.json")  # RUN/final -> RUN/checkpoints/step_N
    run = json.load(open(flags)) if os.path.exists(flags) else {}  # the run's flags
    if (run.get("head", "q"), run.get("num_atoms", 2), run.get("v_min", 0.0), run.get("v_max", 1.0)) != ("q", 2, 0, 1):
        sys.exit(f"--q_model {q_dir}: needs a run with --head q --num_atoms 2 --v_min 0 --v_max 1")
    backbone = qs.load_model(q_dir, qs.Args(bf16=False)).base_model  # the backbone folder, frozen, float32
    qmodel = qs.QModel(backbone, "q", 2, V)
    qmodel.head.load_state_dict(torch.load(os.path.join(q_dir, "head.pt"), map_location="cpu"))
    qmodel = qmodel.double().eval()
    p_hat, p_true, w = [], [], []
    with torch.no_grad():
        for (log_ref, y), prompt in zip(paths, prompts):
            ids = torch.tensor([prompt + y.tolist()])
            log_pmf = qmodel(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])[0]  # [L, V, 2]
            tok_lp = log_ref[torch.arange(len(y)), y]
            for t in range(len(y)):
                exact = torch.zeros(V, dtype=torch.float64)
                exact[y[t]] = tok_lp[t + 1 :].sum().exp()
                p_hat.append(log_pmf[len(prompt) - 1 + t, :, 1].exp())
                p_true.append(exact)
                w.append(log_ref[t].exp())
    p_hat, p_true, w = torch.cat(p_hat), torch.cat(p_true), torch.cat(w)
    mean = lambda x, m: ((w * x)[m].sum() / w[m].sum()).item()  # noqa: E731
    right = p_true > 0
    print(
        f"\nQ model {q_dir}: along y*, pi_ref-weighted. correct next token: p_hat {mean(p_hat, right):.3f} vs "
        f"exact {mean(p_true, right):.3f}; wrong next tokens: p_hat {mean(p_hat, ~right):.3f} vs exact 0"
    )
    print("| p_hat bin | pi_ref mass | mean p_hat | mean exact p |\n|---|---|---|---|")
    edges = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0 + 1e-9]
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (p_hat >= lo) & (p_hat < hi)
        if m.any():
            print(
                f"| [{lo:g}, {min(hi, 1):g}) | {(w[m].sum() / w.sum()).item():.3f} | {mean(p_hat, m):.3f} | "
                f"{mean(p_true, m):.3f} |"
            )


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--etas", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0])
    ap.add_argument("--num_prompts", type=int, default=500)
    ap.add_argument("--model", default=TINY_POLICY)
    ap.add_argument("--max_new_tokens", type=int, default=4)
    ap.add_argument("--q_model", default=None, help="a q_sharp.py final/ folder: also print its calibration")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model).double().eval()
    paths, prompts = [], []
    with torch.no_grad():
        for ex in load_task("arithmetic").eval[: a.num_prompts]:
            prompt = tok(ex.prompt)["input_ids"]
            prompts.append(prompt)
            y = (tok(ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[: a.max_new_tokens]
            logits = model(torch.tensor([prompt + y])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(y)]
            paths.append((torch.log_softmax(logits, -1), torch.tensor(y)))
    qsharp = lambda p, eta: torch.log1p(p * math.expm1(1 / eta))  # noqa: E731  soft Q*/eta of a Bernoulli law
    cd = lambda p, eta: p / eta  # noqa: E731
    ref_pass, _ = path_frontier(paths, lambda p, eta: 0.0, 1.0)
    cd_points = {eta: path_frontier(paths, cd, eta) for eta in a.etas}
    print(f"pi_ref pass@1 {ref_pass:.4f} ({len(paths)} held-out prompts, exact)")
    print("| eta | Q* pass@1 | Q* KL | CD pass@1 | CD KL | CD KL at Q*'s pass@1 (its eta) |\n|---|---|---|---|---|---|")
    for eta in a.etas:
        q, c = path_frontier(paths, qsharp, eta), cd_points[eta]
        lo, hi = math.log(1e-3), math.log(1e3)  # CD's pass@1 falls as its eta grows: bisect log eta
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if path_frontier(paths, cd, math.exp(mid))[0] > q[0] else (lo, mid)
        match = path_frontier(paths, cd, math.exp(lo))
        at = f"{match[1]:.3f} ({math.exp(lo):.3g})" if abs(match[0] - q[0]) < 1e-4 else "out of CD's range"
        print(f"| {eta:g} | {q[0]:.4f} | {q[1]:.3f} | {c[0]:.4f} | {c[1]:.3f} | {at} |")
    if a.q_model:
        calibration(paths, prompts, a.q_model)


if __name__ == "__main__":
    main()
