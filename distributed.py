"""
Several processes under torchrun: torchrun --nproc_per_node N rlaif.py (or ppo.py, ...), one process
(rank) per device. Each rank trains on its share of every batch (shard); the loss is the mean over
the global batch (all_sum is differentiable) and average_gradients() makes every rank take the same
step, as DistributedDataParallel would. Written by hand because the stages call the network through
hidden_states and selected positions of its head, which DDP's forward hooks would not see. Rank 0
alone samples, judges, evaluates and writes files (is_main); barrier() ends a run whose rank died.
Without torchrun: rank 0 of 1, and every function here returns its input.
"""

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    timeout: float = 3600.0


DIST = Dist()


def setup_distributed(device, timeout):
    """Join torchrun's process group when RANK is set (NCCL on GPUs, gloo on CPU) and take this
    rank's GPU; the other ranks print nothing (rank 0 speaks for all). Returns the device."""
    if "RANK" not in os.environ or DIST.world > 1:
        return device
    import torch.distributed as dist

    dist.init_process_group(
        "nccl" if device.startswith("cuda") else "gloo", timeout=datetime.timedelta(seconds=timeout)
    )
    DIST.rank, DIST.world, DIST.timeout = dist.get_rank(), dist.get_world_size(), timeout
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    if DIST.rank:
        import sys

        sys.stdout = open(os.devnull, "w")
    return device


def is_main():
    return DIST.rank == 0


def barrier(timeout=None):
    """Wait until every rank is here. A rank that does not come within the timeout (dead, or stuck)
    ends this one with an error that names it (gloo's monitored barrier; with NCCL, the group's
    timeout)."""
    if DIST.world == 1:
        return
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=timeout or DIST.timeout))
    else:
        dist.barrier()


def shard(items):
    """This rank's share of a batch: every world-th item from its rank on (one process: all of
    them)."""
    return items[DIST.rank :: DIST.world]


class AllSum(torch.autograd.Function):
    """all_reduce(SUM), differentiable: its backward pass sums the ranks' gradients too, so that a
    loss built from all_sum is the global batch's loss on every rank, with every rank's share of its
    gradient."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return AllSum.forward(ctx, grad)


def all_sum(x):
    """x summed over the ranks (one process: x itself)."""
    return x if DIST.world == 1 else AllSum.apply(x)


def global_mean(x):
    """The mean of x's entries over every rank's x (one process: x.mean())."""
    if DIST.world == 1:
        return x.mean()
    return all_sum(x.sum()) / all_sum(torch.tensor(float(x.numel()), device=x.device))


def global_std(x):
    """Standard deviation (unbiased) of x's entries over every rank's x, as a float (one process:
    x.std())."""
    if DIST.world == 1:
        return x.std().item()
    n = all_sum(torch.tensor(float(x.numel()), device=x.device))
    return (all_sum(((x - global_mean(x)) ** 2).sum()) / (n - 1)).sqrt().item()


def average_gradients(params):
    """Every rank's gradients averaged, in place: what DistributedDataParallel computes, with one
    all_reduce per bucket of 16M values and optimizer step (gradient-accumulation steps communicate
    nothing). The stages call the network through hidden_states and selected positions of its head,
    which DDP's forward hooks would not see."""
    if DIST.world == 1:
        return
    import torch.distributed as dist

    grads = [p.grad for p in params if p.grad is not None]
    bucket, size = [], 0
    for i, g in enumerate(grads):
        bucket, size = bucket + [g], size + g.numel()
        if size >= 1 << 24 or i == len(grads) - 1:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            for b, part in zip(
                bucket, flat.div_(DIST.world).split([b.numel() for b in bucket]), strict=True
            ):
                b.copy_(part.view_as(b))
            bucket, size = [], 0
