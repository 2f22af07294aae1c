"""One policy update on a fixed global batch, run plainly or under `torchrun --nproc_per_node=N` (gloo).

Every rank builds the same global batch (the tiny policy sampled with a fixed seed on CPU), keeps its shard of
whole groups, and calls the algorithm's `update_policy` -- the function its training loop calls. Rank 0 writes
the updated parameters (SGD, lr 1: the update is minus the clipped gradient) to OUT, so tests can compare 1
process against 2 and 1 micro-batch against several.
Usage: python tests/dp_worker.py ALGO OUT [key=value ...]   (ALGO: grpo, rpg_fkl, ...; keys: Args fields)
       python tests/dp_worker.py --cases CASES.json   ([[ALGO, OUT, {key: value}], ...]: one process group and one
                                                     interpreter start-up for all; q_sharp's own Run joins it)
"""

import gc
import json
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from common import TINY_POLICY, TINY_TEACHER
from common.tasks import arithmetic_task
from tests.harness import load_algorithm


def fill_grpo(algo, batch, rewards, G, frozen_logprobs):
    batch["advantages"] = algo.group_advantages(rewards, G)
    batch["ref_logprobs"] = frozen_logprobs


def fill_rpg(algo, batch, rewards, G, frozen_logprobs):
    batch["advantages"] = algo.group_mean_advantages(rewards, G)
    batch["anchor_logprobs"] = frozen_logprobs  # used with kl_anchor=init


def fill_pmd(algo, batch, rewards, G, frozen_logprobs):
    batch["advantages"] = algo.pmd_advantages(rewards, G, "loo", 0.1)


def fill_a_star_po(algo, batch, rewards, G, frozen_logprobs):
    batch["rewards"], batch["ref_logprobs"] = rewards, frozen_logprobs
    batch["v_hat"] = torch.linspace(0.1, 0.9, rewards.numel())  # any fixed stage-1 values


def fill_dpo_kl(algo, batch, rewards, G, frozen_logprobs, pairs="first_half"):
    """pairs "first_half": only the groups of the first half of the batch (rank 0 of 2) have a pair, the others tie,
    so rank 1 runs only zero-weighted backwards; "all": every group has a pair, so every mini-batch's pairs are
    split across both ranks and each rank's loss must be normalized by the GLOBAL pair count."""
    groups = rewards.clone().view(-1, G)
    has_pair = (
        torch.arange(len(groups)) < len(groups) // 2
        if pairs == "first_half"
        else torch.ones(len(groups), dtype=torch.bool)
    )
    groups[:] = 0.0
    groups[has_pair, 0] = 1.0  # one winner, G - 1 losers in each group with a pair
    batch["pair_role"] = algo.pair_roles(groups.view(-1), G)
    batch["ref_logprobs"] = frozen_logprobs


def fill_gkd(algo, batch, rewards, G, frozen_logprobs):
    batch["teacher"] = algo.load_model(TINY_TEACHER, algo.Args()).double()  # micro_loss runs it per micro-batch


FILL = {
    "grpo": fill_grpo,
    "rpg_fkl": fill_rpg,
    "rpg_rkl": fill_rpg,
    "pmd_mean": fill_pmd,
    "a_star_po": fill_a_star_po,
    "gkd": fill_gkd,
}


def q_sharp_update(algo, out):
    """Q#'s update: one Q-model step (q_batch_size 16) on 16 round-1 examples collected from pi_ref; every rank
    takes its slice of the global batch inside train_q_epoch. The script's own Run reads the processes (it finds
    their group already made)."""
    args = algo.Args(
        max_new_tokens=4,
        max_prompt_length=16,
        q_batch_size=16,
        micro_batch_size=16,
        samples_per_prompt=2,
        learning_rate=1.0,
        max_grad_norm=0.0,
        bf16=False,
        output_dir=out + ".runs",
    )
    with mock.patch.object(dist, "init_process_group"):  # (a gloo group cannot be made twice in one process)
        run = algo.Run(args)
    ref = algo.load_model(TINY_POLICY, args)
    torch.manual_seed(0)
    qmodel = algo.QModel(algo.load_model(TINY_POLICY, args, trainable=True).base_model, "q", 2, ref.config.vocab_size)
    torch.nn.init.normal_(qmodel.head.weight, std=0.1)
    atoms, eos = torch.tensor([0.0, 1.0]), torch.tensor([run.tokenizer.eos_token_id])
    examples = algo.collect(1, ref, None, run, list(range(8))[run.rank :: run.world], atoms, eos)
    examples = sorted(
        (e for part in algo.all_gather(examples) for e in part), key=lambda e: (e["prompt_id"], e["sample"])
    )
    examples[0]["reward"] = 1.0  # both labels present
    init = flat(qmodel)
    model = algo.shard(qmodel, args)
    opt = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    loss = algo.train_q_epoch(model, opt, examples, run, atoms, eos, seed=7)
    params = flat(model)
    if run.rank == 0:
        torch.save({"params": params, "init": init, "metrics": {"q_loss": loss}}, out)


def checkpoint_roundtrip(algo, model, opt, tok, args, batch, out, ref):
    """The script's own checkpoint writer (Run.save) on the trained, possibly sharded, model; then the `final` folder
    loaded by from_pretrained: (max |log-prob difference| on the batch, the same against the initial model: the
    update did move them) on rank 0; None elsewhere."""
    from transformers import AutoModelForCausalLM

    run = algo.Run.__new__(algo.Run)  # only what save() reads
    run.args, run.model, run.optimizer, run.tokenizer = args, model, opt, tok
    run.world, run.rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    run.run_dir, run.state, run.t0 = out + ".run", {"step": 0}, 0.0
    args.total_steps, args.keep_last = 1, 0
    trained = algo.batched_logprobs(model, batch, args)  # FSDP: gathered once for the pass
    initial = algo.batched_logprobs(ref, batch, args)  # (on every rank: the frozen model is sharded too)
    run.save(1)
    if run.rank != 0:
        return None
    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(run.run_dir, "final"), dtype=torch.float64)
    saved = algo.batched_logprobs(loaded, batch, args)
    return (saved - trained).abs().max().item(), (initial - trained).abs().max().item()


def flat(model):
    """Every parameter, whole (FSDP shards are gathered), as one vector."""
    return torch.cat(
        [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().reshape(-1) for p in model.parameters()]
    )


def logprobs(algo, model, batch, C):
    return algo.batched_logprobs(model, batch, algo.Args(temperature=1.0, micro_batch_size=64, bf16=False))


def main():
    world = int(os.environ.get("WORLD_SIZE", 1))
    if sys.argv[1] == "--cases":
        with open(sys.argv[2]) as f:
            cases = json.load(f)
    else:
        cases = [(sys.argv[1], sys.argv[2], dict(kv.split("=", 1) for kv in sys.argv[3:]))]
    if world > 1:
        dist.init_process_group("gloo")
    for name, out, overrides in cases:
        if name == "q_sharp":
            q_sharp_update(load_algorithm("q_sharp"), out)
        else:
            update(name, out, overrides, world)
    teardown(world)


def update(name, out, overrides, world):
    """One case: the update of `name` with these Args overrides; rank 0 writes the result to `out`."""
    algo = load_algorithm(name)
    rank = dist.get_rank() if world > 1 else 0
    args = algo.Args(
        max_new_tokens=4, max_prompt_length=16, micro_batch_size=16, num_minibatches=1, learning_rate=1.0, bf16=False
    )
    for k, v in {"loss_agg": "token_mean", "beta": 0.1, "num_generations": 4}.items():  # where the script has them
        if hasattr(args, k):
            setattr(args, k, v)
    for k, v in overrides.items():
        if k in ("save", "pairs"):  # not flags: also check the checkpoint round trip; DPO's pair layout
            continue
        default = getattr(algo.Args(), k)
        setattr(args, k, v if default is None else (v == "True") if isinstance(default, bool) else type(default)(v))
    # 16 sequences: 16 / G prompts x G samples, or 16 prompts x 1 sample where a script samples once per prompt
    args.prompts_per_step = 16 // getattr(args, "num_generations", 1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(TINY_POLICY)
    policy = algo.load_model(TINY_POLICY, args, trainable=True).double()  # float64: rounding far below 1e-6
    ref = algo.load_model(TINY_POLICY, args).double()
    task = arithmetic_task()
    examples = task.train[: args.prompts_per_step]
    G = getattr(args, "num_generations", 1)
    prompts = [tok(e.prompt)["input_ids"] for e in examples for _ in range(G)]
    eos = torch.tensor([tok.eos_token_id])
    batch = algo.sample_batch(policy, prompts, args, eos, tok.pad_token_id, torch.Generator().manual_seed(123))
    texts = algo.decode(tok, batch)
    rewards = torch.tensor(
        [task.reward_fn(t, e.answer) for t, e in zip(texts, [e for e in examples for _ in range(G)])]
    )
    rewards[0] = 1.0 - rewards[1]  # make sure the first group has signal
    batch["loss_mask"] = batch["completion_mask"].clone()
    C = batch["completion_ids"].shape[1]
    frozen = logprobs(algo, ref, batch, C) if hasattr(algo, "batched_logprobs") else None  # GKD: none
    if name == "dpo_kl":  # (its pair layout is an override)
        fill_dpo_kl(algo, batch, rewards, G, frozen, overrides.get("pairs", "first_half"))
    else:
        FILL[name](algo, batch, rewards, G, frozen)
    if args.num_iterations * args.num_minibatches > 1 and frozen is not None:
        batch["old_logprobs"] = logprobs(algo, policy, batch, C)
    per_rank = len(prompts) // world
    # prompt_ids/prompt_mask are the table of distinct prompts that the rows' prompt_index points into
    shard = {
        k: v if k in ("prompt_ids", "prompt_mask", "teacher") else v[rank * per_rank : (rank + 1) * per_rank]
        for k, v in batch.items()
    }
    init = flat(policy)
    model = algo.shard(policy, args)  # FSDP2 over the ranks, as the script's Run does
    # plain SGD: parameter differences are gradient differences (Adam's g / sqrt(v) would amplify float rounding
    # on parameters whose gradient is ~0 into differences of order lr)
    opt = torch.optim.SGD(model.parameters(), lr=args.learning_rate)
    if name == "dpo_kl":  # DPO trains on chosen/rejected pairs
        metrics = algo.update_pairs(model, opt, shard, args, 7)
    else:
        outputs = getattr(algo, "student_outputs", algo.completion_logprobs)  # GKD: the whole log-softmax
        metrics = algo.update_policy(model, opt, shard, args, 7, algo.micro_loss, outputs)
    params = flat(model)  # a collective under FSDP: every rank gathers
    saved_gap = checkpoint_roundtrip(algo, model, opt, tok, args, batch, out, ref) if "save" in overrides else None
    frozen_sharded = hasattr(next(ref.parameters()), "full_tensor")  # the frozen model: a DTensor per rank
    if rank == 0:
        result = {"params": params, "init": init, "metrics": metrics, "saved_gap": saved_gap}
        torch.save(result | {"frozen_sharded": frozen_sharded}, out)
    del model, opt  # the sharded model goes before its process group (teardown collects it)
    if world > 1:  # (a collection in a big process, the pytest one, takes 0.3 s)
        gc.collect()


def teardown(world: int) -> None:
    """Free the sharded model (FSDP hooks form reference cycles: `del` alone leaves it to a later collection, which
    could then run after the group is gone), wait until every rank is done (rank 0 may still be writing), and only
    then destroy the gloo group. Destroying it while a peer was busy, or before the model's cycles were collected,
    aborted one rank under load (`terminate called without an active exception`, SIGABRT)."""
    if world > 1:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
