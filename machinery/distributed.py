"""torchrun: joining the process group, wrapping the network, and decisions all processes share.

Without torchrun (WORLD_SIZE unset or 1) every function here is a no-op or the obvious answer.
"""
import gc
import inspect
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils import UserError, select_device

# DDP need not broadcast the model's one buffer (the constant RGB mean) each step; torch 2.14
# renamed the flag, and deprecates the old name.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})


def setup(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world_size, device). Under torchrun (WORLD_SIZE > 1) join the process group:
    NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = select_device(device_name)
    if world_size == 1:
        return 0, 1, device
    if device.type == "cuda":
        local_rank, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local_rank >= gpus:
            raise UserError(f"torchrun started more processes on this machine than it has GPUs ({gpus}): "
                            f"use --nproc_per_node {gpus} or fewer")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Rank 0 validates while the others wait: give that an hour. device_id binds NCCL to this
    # process's GPU at once, instead of guessing it at the first collective.
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1),
                            device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), world_size, device


def barrier() -> None:
    """Wait for all processes. Before a clean exit: a rank that left while another was still
    finishing (rank 0 saves, prints) aborted at exit, now and then, with "terminate called
    without an active exception"."""
    if dist.is_initialized():
        dist.barrier()


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        gc.collect()  # a DDP wrapper held in a reference cycle goes now, not after its group at exit
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` under DDP, which averages the gradients across processes; itself without torchrun.

    The unwrapped `model` is what is saved, so infer.py and evaluate.py load a torchrun
    checkpoint unchanged.
    """
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   **NO_BUFFER_SYNC)


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def same_as_rank_0(value):
    """Rank 0's `value` on every process (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def in_order(pairs: list) -> list:
    """Every process's (index, item) `pairs` (picklable), on every process: the items, in index
    order, as one process holding them all would have them."""
    if dist.is_initialized():
        boxes = [None] * dist.get_world_size()
        dist.all_gather_object(boxes, pairs)
        pairs = [pair for box in boxes for pair in box]
    return [item for _, item in sorted(pairs, key=lambda pair: pair[0])]


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `t` over all processes (in place)."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def weights_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every process holds the same weights (a fingerprint's max equals its min)."""
    if not dist.is_initialized():
        return True
    fingerprint = torch.stack([sum(p.detach().double().sum() for p in model.parameters()),
                               sum(p.detach().double().square().sum() for p in model.parameters())]).to(device)
    high, low = fingerprint.clone(), -fingerprint
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MAX)
    return torch.equal(high, -low)
