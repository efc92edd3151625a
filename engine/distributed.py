"""Generation that cannot hang when the weights are sharded (FSDP, DeepSpeed ZeRO-3).

Each forward of a sharded model gathers every layer's shards from all processes, so every process must run
the same number of forwards. A decoding loop that stops as soon as its own rows are finished breaks that: the
process whose responses ended first leaves while the others wait in their next gather. The remedy, as
transformers' `synced_gpus`: a process whose rows are all done keeps stepping (its new tokens are padding,
outside the action mask) until every process is done.

    for step in range(cfg.max_new_tokens):        # the same bound everywhere, not this process's budgets
        ...
        if finished_everywhere(done):              # instead of `if bool(done.all()): break`
            break
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def finished_everywhere(done: torch.Tensor) -> bool:
    """True once every row of `done` (B,) bool is True on every process: an all-reduce (MIN) of this process's
    `done.all()`, on `done`'s device (a CUDA tensor under NCCL). Without a process group it is `done.all()`."""
    flag = done.all().to(torch.int32).reshape(1)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())
