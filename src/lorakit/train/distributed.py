"""Running the same `lorakit train` command under `torchrun --nproc_per_node=N`: DDP.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; we join the process group (gloo on CPU, nccl on
CUDA), put each process on its own GPU, and wrap the model in DistributedDataParallel, which
averages gradients across processes. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LorakitError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over processes (float64 on the CPU-friendly path)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.enabled:
            torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather_tensors(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """`tensor` from every process (same shape everywhere), on the CPU."""
        if not self.enabled:
            return [tensor.cpu()]
        local = tensor.to(self.device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, local)
        return [t.cpu() for t in out]


def pick_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise LorakitError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_choice: str) -> Dist:
    """Join the process group when launched by torchrun; otherwise a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    if world_size <= 1:
        return Dist(device=device)
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def wrap(model: nn.Module, dist: Dist) -> nn.Module:
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def teardown(dist: Dist) -> None:
    if dist.enabled and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
