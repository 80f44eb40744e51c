"""Where a process sits among the workers a launcher started, from --shard or the environment (standard library
only): its shard of the samples and its run folder.

    parse_shard("1/4")                    -> (1, 4): the samples whose index modulo 4 is 1
    parse_shard(None)                     -> from SLURM_ARRAY_TASK_ID/COUNT, torchrun's RANK/WORLD_SIZE, or None
    shard_folder("runs/scan/{shard}", "1/4") -> "runs/scan/1-of-4"
    launched_worker()                     -> (rank, world size, local rank) of a torchrun / accelerate worker

`devices.resolve_device` places a worker's "cuda" on its own GPU (cuda:LOCAL_RANK) from the same environment.
"""

from __future__ import annotations

import os
from pathlib import Path

from sinkscope.errors import SinkscopeError


def launched_worker(environ: dict | None = None) -> tuple[int, int, int | None] | None:
    """(rank, world size, local rank or None) of a process that torchrun or accelerate started among several
    (RANK, WORLD_SIZE > 1, LOCAL_RANK), else None."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", 1))
        if world <= 1 or "RANK" not in env:
            return None
        rank = int(env["RANK"])
        local = int(env["LOCAL_RANK"]) if "LOCAL_RANK" in env else None
    except ValueError as err:
        raise SinkscopeError(f"RANK / WORLD_SIZE / LOCAL_RANK of the launcher are not integers ({err}); start "
                             "sinkscope with torchrun or accelerate launch, or give --shard i/n") from None
    if not 0 <= rank < world:
        raise SinkscopeError(f"RANK / WORLD_SIZE give worker {rank} of {world}: the rank must be in 0..{world - 1}")
    return rank, world, local


def parse_shard(text: str | None, environ: dict | None = None) -> tuple[int, int] | None:
    """(i, n) of a sharded run: --shard i/n, else what the launcher's environment names, else None (the whole data).
    A shard keeps the samples whose index modulo n is i.

    The environment: a SLURM array (task SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, of SLURM_ARRAY_TASK_COUNT),
    workers of torchrun or accelerate (RANK of WORLD_SIZE > 1), or both (an array of multi-GPU jobs: shard
    task * WORLD_SIZE + RANK of COUNT * WORLD_SIZE)."""
    env = os.environ if environ is None else environ
    if text is None or not str(text).strip():
        parts = []  # (i, n, what), outermost first
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            try:
                task = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
                count = int(env["SLURM_ARRAY_TASK_COUNT"])
            except ValueError as err:
                raise SinkscopeError(f"SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT are not integers ({err}); "
                                     "give --shard i/n") from None
            parts.append((task, count, "SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT"))
        worker = launched_worker(env)
        if worker is not None:
            parts.append((worker[0], worker[1], "RANK / WORLD_SIZE"))
        if not parts:
            return None
        for i, n, what in parts:
            if not 0 <= i < n:
                raise SinkscopeError(f"{what} give shard {i} of {n}: the shard must be in 0..{n - 1}")
        i, n = 0, 1
        for part_i, part_n, _ in parts:
            i, n = i * part_n + part_i, n * part_n
        return i, n
    i, sep, n = str(text).strip().partition("/")
    if not sep or not i.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(i) < int(n):
        raise SinkscopeError(f"--shard {text!r}: give i/n with 0 <= i < n (e.g. 0/4 for the first of four shards)")
    return int(i), int(n)


SHARD_FIELD = "{shard}"  # in --out: replaced by the run's shard, "i-of-n" ("0-of-1" unsharded)


def shard_folder(out: str | Path, shard: str | tuple[int, int] | None) -> str:
    """--out with `{shard}` replaced by the shard ("runs/scan/{shard}" -> "runs/scan/1-of-4"), so that workers
    started with one command line (torchrun, accelerate launch, a SLURM array) each write their own folder."""
    out = str(out)
    if SHARD_FIELD not in out:
        return out
    i, n = (parse_shard(shard, {}) or (0, 1)) if isinstance(shard, str) or shard is None else shard
    return out.replace(SHARD_FIELD, f"{i}-of-{n}")
