"""Random streams across ranks: every rank samples with its own noise, the same at every eval and new at every
step, and every rank draws the same prompts and takes its own share of them. (Streams across steps, evals and call
sites are checked on real runs in tests/test_loops.py::check_streams; a resumed run repeating its draws in
tests/test_reliability.py.)"""

import pytest
import torch

from tests.harness import SCRIPTS, load_algorithm

WORLD, PROMPTS = 2, 8


def runs(algo) -> list:
    """One Run per rank of a WORLD-rank job, with only what the stream methods read."""
    out = []
    for rank in range(WORLD):
        run = algo.Run.__new__(algo.Run)
        run.args, run.rank, run.world = algo.Args(prompts_per_step=PROMPTS), rank, WORLD
        run.train_prompts = list(range(100))
        out.append(run)
    return out


def problems(ranks) -> list:
    """What is wrong with the streams of these ranks' Runs (empty: nothing)."""
    out = []
    train = {(r.rank, step): r.sampler(step).initial_seed() for r in ranks for step in (1, 2, 3)}
    if len(set(train.values())) < len(train):
        out.append(f"two (rank, step) pairs share sampling noise: {train}")
    if any(r.sampler(2).initial_seed() != train[r.rank, 2] for r in ranks):
        out.append("the sampler of a step is not repeatable (a resume would differ)")
    evals = [r.eval_sampler().initial_seed() for r in ranks]
    if len(set(evals)) < len(ranks) or set(evals) & set(train.values()):
        out.append(f"eval noise shared between ranks or with training: {evals}")
    if [r.eval_sampler().initial_seed() for r in ranks] != evals:
        out.append("eval noise differs between evals")
    draws = []
    for step in (1, 2):
        together = sorted(p for r in ranks for p in r.prompts(step))
        if len(together) != PROMPTS or len(set(together)) < len(together):
            out.append(f"step {step}: the ranks' prompts are not one draw split without overlap: {together}")
        draws.append(together)
    if draws[0] == draws[1]:
        out.append("two steps draw the same prompts")
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_rank_and_step_has_its_own_noise(script):
    assert problems(runs(load_algorithm(script))) == []


def rank_blind_sampler(self, step):
    return torch.Generator().manual_seed(step)


def step_blind_sampler(self, step):
    return torch.Generator().manual_seed(1000 + self.rank)


def rank_blind_prompts(self, step):
    return list(range(step, step + PROMPTS))[: PROMPTS // self.world]


@pytest.mark.parametrize(
    "name,planted", [("sampler", rank_blind_sampler), ("sampler", step_blind_sampler), ("prompts", rank_blind_prompts)]
)
def test_negative_controls(name, planted, monkeypatch):
    """Each planted stream bug is reported."""
    algo = load_algorithm("grpo")
    monkeypatch.setattr(algo.Run, name, planted)
    assert problems(runs(algo)) != []
