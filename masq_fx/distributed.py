"""Data parallelism over the ranks of a ``torch.distributed`` process group (launched by ``torchrun``).

Every rank holds the whole model and a share of the calibration batches (:func:`assign`: each run of
``N`` consecutive batches gives one batch to every rank, the largest to the rank with the fewest tokens of
its modalities so far). The ranks meet at each decoder layer: they reduce the observers' statistics (maxima and
minima exactly, counts and second moments as sums), so every rank derives the same smoothing scales,
GPTQ weights and CMC branches; MAS learning sums its gradients over the ranks at every step, so every
rank holds the same learned scales. Rank 0 alone writes files. Without a process group, or in a group
of one process, nothing here does anything and nothing is communicated.

A collective that fails (another rank raised, died or timed out) raises :class:`DistributedError` naming
this rank and the work it was doing; the failing rank's own error names the cause.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from masq_fx.errors import InputError, MasqFxError

T = TypeVar("T")

#: how long a rank waits for the others at a collective before it gives up
TIMEOUT = timedelta(minutes=30)
#: tensors at least this large are reduced where they lie, not packed into one buffer with the others
_PACKED_MAX = 1 << 20


class DistributedError(MasqFxError, RuntimeError):
    """A collective operation failed: another rank stopped, died or timed out."""


@dataclass
class Traffic:
    """Time spent in collectives (waiting for the slowest rank included) and bytes reduced, since the start."""

    seconds: float = 0.0
    bytes: int = 0


#: this process's collectives so far (benchmarks read it)
traffic = Traffic()


@dataclass(frozen=True)
class Ranks:
    """This process's place in a process group of more than one process."""

    rank: int
    size: int


def ranks() -> Ranks | None:
    """The ranks of the initialised default process group, or ``None`` outside one (or in a group of one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    return Ranks(dist.get_rank(), dist.get_world_size())


def is_leader() -> bool:
    """Whether this process writes files and prints results: rank 0, or the only process."""
    group = ranks()
    return group is None or group.rank == 0


def launched() -> bool:
    """Whether ``torchrun`` (or another launcher of its protocol) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(device: torch.device) -> Ranks:
    """Join the process group ``torchrun`` describes: NCCL on CUDA (one device per local rank), gloo on CPU."""
    if not dist.is_available():
        raise InputError("this torch build has no torch.distributed: run one process, without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
    dist.init_process_group(backend, timeout=TIMEOUT)
    group = ranks()
    assert group is not None  # launched() was true
    return group


def leave() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This rank's device: a CUDA device is the one of its local rank."""
    if device.type == "cuda" and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def assign(costs: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The rank that holds each item, from its cost (tokens of each modality); all rank 0 without a group.

    Items ``kN … kN + N - 1`` go one to each rank (so a step over ``N`` consecutive samples, as MAS learning
    takes, spreads evenly); within such a block the costliest item goes first, each to the rank whose
    heaviest modality share (tokens so far over the modality's total) stays lowest. The same on every
    rank: ties go to the lower item and rank.
    """
    group = ranks()
    if group is None:
        return (0,) * len(costs)
    totals = [sum(column) or 1 for column in zip(*costs)]
    load = [[0] * len(totals) for _ in range(group.size)]

    def share(rank: int, cost: Sequence[int]) -> tuple[float, int, int]:
        after = [held + c for held, c in zip(load[rank], cost)]
        return max(a / t for a, t in zip(after, totals)), sum(after), rank

    owner = [0] * len(costs)
    for start in range(0, len(costs), group.size):
        block = sorted(range(start, min(start + group.size, len(costs))), key=lambda i: (-max(c / t for c, t in zip(costs[i], totals)), i))
        free = list(range(group.size))
        for item in block:
            owner[item] = min(free, key=lambda r: share(r, costs[item]))
            free.remove(owner[item])
            load[owner[item]] = [held + c for held, c in zip(load[owner[item]], costs[item])]
    return tuple(owner)


def shard(items: Sequence[T], owners: Sequence[int], what: str = "calibration batches") -> list[T]:
    """This rank's share of ``items``, ``owners`` being each item's rank (:func:`assign`); every item without a group."""
    group = ranks()
    if group is None:
        return list(items)
    if len(items) < group.size:
        raise InputError(
            f"{group.size} ranks but only {len(items)} {what}: give every rank at least one (more batches, or fewer processes)"
        )
    return [item for item, owner in zip(items, owners, strict=True) if owner == group.rank]


@contextmanager
def collective(what: str, layer: int | None = None) -> Iterator[None]:
    """Turn a failed collective inside the block into a :class:`DistributedError` naming this rank and ``what``."""
    try:
        yield
    except (RuntimeError, ValueError) as error:  # gloo and NCCL raise RuntimeError subclasses
        group = ranks()
        where = "" if layer is None else f" at decoder layer {layer}"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        rank = "?" if group is None else group.rank
        raise DistributedError(
            f"rank {rank}: {what}{where} failed ({first}); another rank stopped or timed out, and its own error says why"
        ) from error


@contextmanager
def located(layer: int) -> Iterator[None]:
    """In a process group, note on any error raised inside the block which rank raised it, at which layer."""
    try:
        yield
    except Exception as error:
        group = ranks()
        if group is not None and not isinstance(error, DistributedError):  # that one says where already
            error.add_note(f"raised on rank {group.rank} of {group.size}, at decoder layer {layer}")
        raise


def reduce(tensors: Sequence[Tensor], op: str, what: str, layer: int | None = None) -> None:
    """All-reduce ``tensors`` in place with ``op`` (``"sum"``, ``"max"``, ``"min"``); small ones are packed by
    dtype into one collective. Nothing happens without a group."""
    if ranks() is None or not tensors:
        return
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    packed: dict[torch.dtype, list[Tensor]] = {}
    alone = []
    for tensor in tensors:
        if tensor.numel() >= _PACKED_MAX and tensor.is_contiguous():
            alone.append(tensor)
        else:
            packed.setdefault(tensor.dtype, []).append(tensor)
    device = _device()
    began = time.perf_counter()
    with collective(what, layer):
        for tensor in alone:
            if tensor.device == device:
                dist.all_reduce(tensor, op=reduce_op)
            else:  # NCCL reduces CUDA tensors only
                moved = tensor.to(device)
                dist.all_reduce(moved, op=reduce_op)
                tensor.copy_(moved)
        for same in packed.values():
            flat = torch.cat([t.reshape(-1).to(device) for t in same])
            dist.all_reduce(flat, op=reduce_op)
            for tensor, part in zip(same, flat.split([t.numel() for t in same])):
                tensor.copy_(part.view_as(tensor))
    traffic.seconds += time.perf_counter() - began
    traffic.bytes += sum(t.numel() * t.element_size() for t in tensors)


def _device() -> torch.device:
    """Where the group's collectives run: this rank's CUDA device for NCCL, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def gather(value: T) -> list[T]:
    """Every rank's ``value`` (picklable), in rank order; ``[value]`` without a group."""
    if ranks() is None:
        return [value]
    found: list = [None] * dist.get_world_size()
    with collective("gathering every rank's values"):
        dist.all_gather_object(found, value)
    return found


def gather_shards(items: Sequence[T], owners: Sequence[int]) -> list[T]:
    """Every rank's :func:`shard` of a sequence put back in its order (``owners`` as given to it); ``items``
    without a group."""
    shards = [iter(held) for held in gather(list(items))]
    if len(shards) == 1:
        return list(items)
    return [next(shards[owner]) for owner in owners]


def owners(costs: Sequence[float]) -> list[int]:
    """The rank that solves each task: the costliest first, each to the least loaded rank (rank 0 for all without a
    group). The same on every rank: ties go to the lower task index and rank."""
    group = ranks()
    size = 1 if group is None else group.size
    load = [0.0] * size
    owner = [0] * len(costs)
    for task in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        owner[task] = min(range(size), key=lambda r: (load[r], r))
        load[owner[task]] += costs[task]
    return owner


def solve_once(
    tasks: Sequence[T],
    solve: Callable[[T], list[Tensor]],
    template: Callable[[T], list[Tensor]],
    costs: Sequence[float],
    what: str,
    layer: int | None = None,
) -> list[list[Tensor]]:
    """Each task's tensors, computed by ``solve`` on one rank (:func:`owners`) and broadcast to the others, which
    receive them into ``template``'s tensors (same shapes and dtypes); without a group, ``solve`` of every task."""
    group = ranks()
    if group is None:
        return [solve(task) for task in tasks]
    owner = owners(costs)
    results = [solve(task) if owner[i] == group.rank else template(task) for i, task in enumerate(tasks)]
    device = _device()
    began = time.perf_counter()
    with collective(what, layer):
        for source, tensors in zip(owner, results):
            for index, tensor in enumerate(tensors):
                moved = tensor.to(device).contiguous()
                dist.broadcast(moved, src=source)
                tensors[index] = moved.to(tensor.device)
    traffic.seconds += time.perf_counter() - began
    traffic.bytes += sum(t.numel() * t.element_size() for tensors in results for t in tensors)
    return results


def total(value: float, what: str, layer: int | None = None) -> float:
    """``value`` summed over the ranks; ``value`` itself without a group."""
    if ranks() is None:
        return value
    box = torch.tensor([value], dtype=torch.float64)
    reduce([box], "sum", what, layer)
    return float(box)
