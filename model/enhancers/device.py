"""Where inference runs: ``auto`` picks the GPU when torch sees one."""

from __future__ import annotations

import torch


def resolve_inference_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but torch sees no CUDA device")
    return device
