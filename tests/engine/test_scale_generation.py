"""engine.distributed.finished_everywhere keeps two processes decoding in step: a process whose rows finish at
step 2 keeps stepping until the other's finish at step 5, so both run 5 forwards (a sharded model's gathers
then always meet), where stopping on local `done.all()` would give 2 and 5 and hang FSDP or ZeRO-3."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.distributed import finished_everywhere

FINISH = {0: 2, 1: 5}  # the step at which each process's rows are all done
MAX_NEW_TOKENS = 8


def decode_steps(rank: int, world: int) -> int:
    done = torch.zeros(3, dtype=torch.bool)
    forwards = 0
    for step in range(MAX_NEW_TOKENS):
        forwards += 1  # the model's forward for this step
        if world > 1:
            dist.barrier()  # stands in for a sharded forward's all-gather: a process missing it would hang
        done |= step + 1 >= torch.tensor([1, FINISH[rank], FINISH[rank]])
        if finished_everywhere(done):
            break
    return forwards


def worker(rank: int, world: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))  # fail, not hang
    try:
        results[rank] = decode_steps(rank, world)
    finally:
        dist.destroy_process_group()


def test_single_process_stops_on_its_own_rows():
    assert decode_steps(0, 1) == 2


def test_two_processes_run_the_same_number_of_forwards():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, port, results), nprocs=2, join=True)
        assert dict(results) == {0: 5, 1: 5}
