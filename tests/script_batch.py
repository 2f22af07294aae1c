"""Several script runs in one torchrun, one after another: one process group and one interpreter start-up per rank
for them all (a gloo group cannot be made twice in one process). Each run is the script's own main(), as the command
line runs it, except that it finds the group already made and leaves it for the next run.
Usage: python -m torch.distributed.run --nproc_per_node=N tests/script_batch.py RUNS.json
       (RUNS.json: [[script, [flag, ...]], ...]; rank 0 writes each run's exit status to RUNS.json.codes)
An entry ["copy_without", [SRC, DST, PART]] is no run: rank 0 copies the folder SRC to DST without DST/PART (what a
kill leaves, for a resume later in the batch); its status is 1 if that fails.
"""

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch.distributed as dist

from tests.harness import load_algorithm


def keep_the_group(*args, **kwargs) -> None:
    """Stands in for init_process_group and destroy_process_group while the runs share the group."""


def exit_status(script: str, flags: list) -> int:
    """main() of `script` with these flags: its exit status (1 for an `error:` message)."""
    sys.argv = [f"{script}.py", *flags]
    try:
        load_algorithm(script).main()
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr, flush=True)  # (what the interpreter prints for sys.exit(message))
            return 1
        return e.code or 0
    return 0


def copy_without(src: str, dst: str, part: str) -> int:
    """Rank 0: a copy of the folder src at dst, without dst/part (0), or 1 if that fails (src missing: its run failed)."""
    if dist.get_rank() > 0:
        return 0
    try:
        shutil.copytree(src, dst, symlinks=True)
        shutil.rmtree(os.path.join(dst, part))
    except OSError as e:
        print(f"copy_without {src}: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


def main() -> None:
    path = sys.argv[1]
    with open(path) as f:
        runs = json.load(f)
    dist.init_process_group("gloo")
    init, destroy = dist.init_process_group, dist.destroy_process_group
    dist.init_process_group = keep_the_group
    dist.destroy_process_group = keep_the_group
    codes = []
    for script, flags in runs:
        if script == "copy_without":
            codes.append(copy_without(*flags))
        else:
            codes.append(exit_status(script, flags))
        dist.barrier()  # the next run starts together on every rank
    if dist.get_rank() == 0:
        with open(path + ".codes", "w") as f:
            json.dump(codes, f)
    dist.init_process_group = init
    dist.destroy_process_group = destroy
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
