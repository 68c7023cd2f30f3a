"""Where training runs: device choice, DDP under ``torchrun``, mixed precision, EMA and progress lines.

Kept apart from :mod:`model.training.diffusion` so the training loops read as the method, not as plumbing.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import os
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch import nn

__all__ = ["Distributed", "Ema", "Precision", "ProgressLog", "resolve_device", "software_version"]

log = logging.getLogger("model.training.diffusion")

#: The distribution this code ships in (pyproject.toml); its version is recorded in every checkpoint.
DISTRIBUTION = "upete-node"


def software_version() -> str:
    """The installed upete-node version, for a checkpoint's ``software_version`` ("unknown" if not installed).

    Read from the package metadata, so model/ never imports the command line for it.
    """
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA (this rank's GPU) when present, else CPU; ``cuda`` without a GPU is an error."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, found {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device("cuda", local_rank)


@dataclass
class Distributed:
    """The process group, when ``torchrun`` started several processes (WORLD_SIZE > 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device_preference: str) -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_preference != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        return cls(rank, world, local_rank)

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DDP-wrap ``module`` when distributed (gradients averaged over ranks), else return it."""
        if not self.enabled:
            return module
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=ids)

    def mean(self, values: list[float], device: torch.device) -> list[float]:
        """Average of ``values`` over ranks (identity when not distributed)."""
        return [v / self.world for v in self.sum(values, device)]

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch_dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


class Precision:
    """CUDA autocast (bfloat16 where supported, else float16 with a gradient scaler); off on CPU."""

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.dtype = torch.bfloat16
        if self.enabled and not torch.cuda.is_bf16_supported():
            self.dtype = torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)
        self.device_type = device.type

    def autocast(self) -> AbstractContextManager:
        if not self.enabled:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, params, clip: float | None) -> None:  # noqa: ANN001
        """Backward, optional gradient clipping, optimizer step (scaled when float16)."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if clip is not None:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, clip)
        self.scaler.step(optimizer)
        self.scaler.update()


class Ema(nn.Module):
    """Exponential moving average of a module's weights, with the usual warm-up (1 + n) / (10 + n)."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), found {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(module).requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        n = int(self.updates)
        decay = min(self.decay, (1 + n) / (10 + n))
        for ema_p, p in zip(self.shadow.parameters(), module.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
        for ema_b, b in zip(self.shadow.buffers(), module.buffers(), strict=True):
            ema_b.copy_(b)
        self.updates += 1


class ProgressLog:
    """One log line every ``every_s`` seconds: stage, step, mean loss since the last line, ETA."""

    def __init__(self, stage: str, *, total: int, start: int, every_s: float, enabled: bool) -> None:
        self.stage = stage
        self.total = total
        self.start_step = start
        self.every_s = every_s
        self.enabled = enabled
        self.t0 = self.last = time.monotonic()
        self.losses: list[float] = []

    def update(self, step: int, loss: float) -> None:
        """``step`` is the number of steps done (1-based)."""
        self.losses.append(loss)
        now = time.monotonic()
        if not self.enabled or (now - self.last < self.every_s and step < self.total):
            return
        done = step - self.start_step
        per_step = (now - self.t0) / max(done, 1)
        log.info(
            "training progress",
            extra={
                "fields": {
                    "stage": self.stage,
                    "step": step,
                    "steps": self.total,
                    "loss": f"{sum(self.losses) / len(self.losses):.5f}",
                    "s_per_step": f"{per_step:.3f}",
                    "eta_s": int(per_step * (self.total - step)),
                }
            },
        )
        self.losses.clear()
        self.last = now
