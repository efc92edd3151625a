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
from rollout.generation import SamplingConfig, generate
from tests.rollout.conftest import tiny_causal_lm

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


def generate_steps(rank: int, world: int) -> tuple[int, int, int]:
    """rollout.generation.generate with `finished_everywhere`: (forwards, response columns, longest response)."""
    model = tiny_causal_lm()
    forwards = []

    def gather(*_):  # stands in for a sharded forward's all-gather
        forwards.append(1)
        dist.barrier()

    model.register_forward_hook(gather)
    budget = FINISH[rank]
    cfg = SamplingConfig(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0, response_length=(budget, budget))
    ids = torch.tensor([[1, 10, 11], [1, 20, 21]])
    gen = generate(model, ids, torch.ones_like(ids), cfg, eos_token_id=63, pad_token_id=3,
                   finished=finished_everywhere)
    return len(forwards), gen.responses.shape[1], int(gen.response_length.max())


def worker(rank: int, world: int, port: int, results, steps=decode_steps) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))  # fail, not hang
    try:
        results[rank] = steps(rank, world)
    finally:
        dist.destroy_process_group()


def test_single_process_stops_on_its_own_rows():
    assert decode_steps(0, 1) == 2


def spawn_two(steps) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(2, port, results, steps), nprocs=2, join=True)
        return dict(results)


def test_two_processes_run_the_same_number_of_forwards():
    assert spawn_two(decode_steps) == {0: 5, 1: 5}


def test_generate_keeps_two_processes_in_step_and_pads_the_one_that_finished():
    """Rank 0's budget ends at 2 tokens, rank 1's at 5: both run 5 forwards (the prompt's and 4 more), and
    rank 0's 3 extra columns are padding outside its action mask."""
    assert spawn_two(generate_steps) == {0: (5, 5, 2), 1: (5, 5, 5)}
