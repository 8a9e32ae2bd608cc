"""Several processes training one model: torchrun or SLURM, DistributedDataParallel, no home-made launcher.

Full mode splits each update's episodes between the ranks (rank r takes a contiguous share), the
gradients are all-reduced by DDP, and rank 0 writes checkpoints and metrics. What DDP does not do
for us, and a result equal to the single-process run needs:

* BatchNorm running statistics. DDP would broadcast rank 0's buffers (dropping the other ranks'
  episodes); :func:`merge_running_stats` instead combines every rank's updates as if one process had
  run all the update's episodes in order (the update rule is affine in the running value).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mdmf_cache.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn

# torch is imported inside the functions that use it: where this process stands (World, world_from_env) is
# read by every command first, and a command's one-line errors must not wait for torch to load.


@dataclass(frozen=True)
class World:
    """This process's place: rank, world size, local rank (its GPU on the node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun (or SLURM): joins a process group even alone

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Runs under DDP with a process group: several processes, or one that torchrun launched (so a 1-GPU
        torchrun exercises NCCL, DDP and the statistics merge exactly as a larger job does)."""
        return self.size > 1 or self.launched


def world_from_env() -> World:
    """(rank, world size, local rank) from torchrun's or SLURM's variables; a single process otherwise."""
    env = os.environ
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                     launched="MASTER_ADDR" in env)  # torchrun sets it; a bare RANK/WORLD_SIZE does not
    if "SLURM_NTASKS" in env and "SLURM_PROCID" in env and int(env["SLURM_NTASKS"]) > 1:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World()


def init_process_group(world: World, device: torch.device, timeout_min: float = 120.0) -> None:
    """Join the process group (NCCL on GPUs, gloo on CPUs); a no-op for one process.

    The timeout is long because rank 0 scores the val episodes and writes checkpoints while the others wait.

    Raises:
        ConfigError: the rendezvous variables are missing (a SLURM job without MASTER_ADDR/PORT).
    """
    import torch
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise ConfigError(f"rank {world.rank} of {world.size}: MASTER_ADDR and MASTER_PORT are not set; launch with "
                          "torchrun (it sets them), or export them in the SLURM script")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":  # NCCL's communicators and barriers use the current device: this rank's GPU
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(minutes=timeout_min))


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def _tracking_batchnorms(module: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    from torch import nn

    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def running_stats_snapshot(module: nn.Module) -> dict[str, Tensor]:
    """Copies of every BatchNorm's running buffers in ``module``: the start of an interval for
    :func:`merge_running_stats` (take it right after the last merge, when all ranks agree)."""
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in _tracking_batchnorms(module)
            for k in ("running_mean", "running_var", "num_batches_tracked")}


def _local_stats(module: nn.Module, snapshot: dict[str, Tensor]) -> Tensor:
    """``(L,)`` float64, per BatchNorm: running mean (C), running var (C), updates since ``snapshot`` (1)."""
    import torch

    with torch.no_grad():
        return _local_stats_of(module, snapshot)


def _local_stats_of(module: nn.Module, snapshot: dict[str, Tensor]) -> Tensor:
    import torch

    parts = [torch.cat([m.running_mean.double(), m.running_var.double(),
                        (m.num_batches_tracked - snapshot[f"{n}.num_batches_tracked"]).double().reshape(1)])
             for n, m in _tracking_batchnorms(module)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _apply_merged(module: nn.Module, snapshot: dict[str, Tensor], ranks: Tensor) -> None:
    """Set every BatchNorm's running statistics from ``ranks`` ``(W, L)``, the flat statistics of W ranks
    that all started from ``snapshot``, as one process running rank 0's batches, then rank 1's, ... would.

    With momentum m, n_k updates take rank k from r_0 to ``r_k = (1 - m)^n_k r_0 + S_k``, so in rank
    order ``r <- (1 - m)^n_k r + S_k``; with ``momentum=None`` (cumulative average from count c) the
    result is ``(c r_0 + sum_k ((c + n_k) r_k - c r_0)) / (c + sum_k n_k)``.
    """
    import torch

    with torch.no_grad():
        _apply_merged_stats(module, snapshot, ranks)


def _apply_merged_stats(module: nn.Module, snapshot: dict[str, Tensor], ranks: Tensor) -> None:
    offset = 0
    for name, bn in _tracking_batchnorms(module):
        c = bn.num_features
        count0 = float(snapshot[f"{name}.num_batches_tracked"])
        n = ranks[:, offset + 2 * c].round()  # (W,) updates on each rank
        for key, lo in (("running_mean", offset), ("running_var", offset + c)):
            r0 = snapshot[f"{name}.{key}"].to(ranks.dtype)  # (C,)
            rk = ranks[:, lo:lo + c]  # (W, C)
            if bn.momentum is None:
                total = count0 + float(n.sum())
                r = (count0 * r0 + ((count0 + n)[:, None] * rk - count0 * r0).sum(0)) / max(total, 1.0)
            else:
                keep = (1 - bn.momentum) ** n  # (W,)
                r = r0
                for k in range(ranks.shape[0]):
                    r = keep[k] * r + (rk[k] - keep[k] * r0)
            getattr(bn, key).copy_(r.to(getattr(bn, key).dtype))
        bn.num_batches_tracked.fill_(int(count0 + float(n.sum())))
        offset += 2 * c + 1


def merge_running_stats(module: nn.Module, snapshot: dict[str, Tensor], group=None) -> None:
    """Make BatchNorm running statistics under DistributedDataParallel equal one process's.

    Each rank updates its BatchNorms from its own share of the episodes (wrap the model with
    ``broadcast_buffers=False``, else rank 0's buffers overwrite the others' at every forward). Called
    on every rank at the same point (e.g. after each optimiser update), this gathers what each rank's
    buffers became since ``snapshot`` and sets every rank's to the statistics of one process that ran
    rank 0's episodes, then rank 1's, ... (exact up to rounding: the updates are affine in the running
    value). Ranks must own consecutive shares of the episodes in rank order for it to be the
    single-process order. A no-op outside an initialised process group or with one rank.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    local = _local_stats(module, snapshot)  # (L,)
    if not local.numel():
        return
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, local, group=group)
    _apply_merged(module, snapshot, torch.stack(gathered))  # (W, L)


def gather_shares(x: Tensor, world: World) -> Tensor:
    """Every rank's rows ``rank::world`` of ``x`` ``(N, ...)`` put together: the whole ``x`` on every rank.

    Each rank computed only its share (the other rows are ignored); the shares are padded to one size,
    all-gathered (in float32 when ``x`` is half: exact) and interleaved back. A no-op for one process.
    """
    if not world.distributed:
        return x
    import torch
    import torch.distributed as dist

    n = x.shape[0]
    size = -(-n // world.size)  # ceil
    mine = x[world.rank::world.size]
    wire = x.dtype if x.dtype not in (torch.float16, torch.bfloat16) else torch.float32
    padded = x.new_zeros((size, *x.shape[1:]), dtype=wire)
    padded[: len(mine)] = mine.to(wire)
    gathered = [torch.empty_like(padded) for _ in range(world.size)]
    dist.all_gather(gathered, padded)
    out = x.clone()
    for k, g in enumerate(gathered):
        count = len(range(k, n, world.size))
        out[k::world.size] = g[:count].to(x.dtype)
    return out
