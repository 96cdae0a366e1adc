"""Data-parallel processes under ``accelerate launch``: rank, device and collectives.

Hugging Face accelerate starts the processes (``accelerate launch --num_processes N``) and
``PartialState`` joins them into one torch.distributed group: NCCL between CUDA devices, gloo
between CPU processes. A program started without a launcher runs as a group of one, where every
collective returns its input.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _launched() -> bool:
    """Return True when a launcher (accelerate, torchrun) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class ProcessContext:
    """This process's place in a data-parallel group.

    Attributes:
        rank: index of this process, 0 to ``world_size - 1``.
        world_size: number of processes.
        device: the device this process computes on.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """True for the process that writes shared files and prints results (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def close(self) -> None:
        """Leave the process group, so its backend threads stop before the interpreter exits.

        NOTE: a two-process CPU run once aborted at exit ("terminate called without an active
        exception") with the gloo group still open. That closing prevents it is likely, not proven.
        """
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def barrier(self) -> None:
        """Wait until every process reaches this call."""
        if self.distributed:
            torch.distributed.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place, and return it."""
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_true(self, flag: bool) -> bool:
        """Return True only when ``flag`` is True in every process."""
        if not self.distributed:
            return flag
        value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self._collective_device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MIN)
        return bool(value.item())

    def gather(self, value: Any) -> list[Any]:
        """Return every process's ``value`` (picklable), ordered by rank, in every process."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(values, value)
        return values

    def main_first(self, action: Callable[[], None]) -> None:
        """Run ``action`` in the main process only, then let every process continue.

        A ``ValueError`` or ``OSError`` that ``action`` raises is raised in every process, so
        no process waits forever at a later collective.
        """
        error = None
        if self.is_main:
            try:
                action()
            except (ValueError, OSError) as caught:
                error = caught
        messages = self.gather(str(error) if error is not None else None)
        if error is not None:
            raise error
        if messages[0] is not None:
            raise ValueError(messages[0])

    def data_parallel(self, module: nn.Module) -> nn.Module:
        """Wrap ``module`` in ``DistributedDataParallel``, which averages gradients over ranks.

        A group of one gets ``module`` back unchanged.
        """
        if not self.distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)

    @property
    def _collective_device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def process_context(device: str | torch.device | None = None) -> ProcessContext:
    """Return this process's context, joining the group that ``accelerate launch`` started.

    Args:
        device: ``None`` or ``"cuda"`` for this process's own device (``cuda:<local rank>``
            under a launcher, else CUDA when available), ``"cpu"``, or an explicit device such
            as ``"cuda:1"``.

    Returns:
        The context; a single-process context when no launcher started this program.
    """
    wants_cpu = device is not None and torch.device(device).type == "cpu"
    if not _launched():
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return ProcessContext(device=torch.device(device))

    from accelerate import PartialState

    # cpu=True makes accelerate join CPU processes with gloo instead of looking for GPUs.
    state = PartialState(cpu=wants_cpu or not torch.cuda.is_available())
    own_device = torch.device(state.device)
    if device is not None and str(device) not in ("cuda", "cpu"):
        own_device = torch.device(device)
    logger.info(
        "process %d of %d on %s (%s backend)",
        state.process_index,
        state.num_processes,
        own_device,
        state.backend,
    )
    return ProcessContext(
        rank=state.process_index, world_size=state.num_processes, device=own_device
    )
