"""The one door between the DICOM node and the model: the Enhancer contract and :func:`load_enhancer`.

The contract lives in :mod:`model.enhancers.base` and is re-exported here: the node hands a PET
volume in Bq/ml (and the CT in HU on the PET grid, if it has one) and gets the enhanced PET back in
Bq/ml on the same grid. Nothing here knows DICOM; nothing in the node knows torch.
"""

from __future__ import annotations

from pathlib import Path

from model.enhancers.base import Enhancer, EnhancerInfo, Progress
from model.enhancers.classical import GaussianEnhancer

__all__ = [
    "Enhancer",
    "EnhancerInfo",
    "GaussianEnhancer",
    "Progress",
    "load_enhancer",
]


def load_enhancer(
    spec: str,
    *,
    device: str = "auto",
    steps: int | None = None,
    dose_fraction: float | None = None,
    seed: int = 0,
) -> Enhancer:
    """Build the enhancer a config names.

    ``spec`` is ``"classical:gaussian"`` (optionally ``"classical:gaussian:FWHM_MM"``) or the path of a
    ``.safetensors`` checkpoint with its JSON config beside it: a uPETe diffusion model, or the
    supervised reference U-Net when the JSON says ``"kind": "supervised"`` (``steps``,
    ``dose_fraction`` and ``seed`` do not apply to it).
    """
    if spec.startswith("classical:"):
        parts = spec.split(":")
        if parts[1] != "gaussian" or len(parts) > 3:
            raise ValueError(f"unknown classical enhancer {spec!r}; known: classical:gaussian[:FWHM_MM]")
        return GaussianEnhancer(fwhm_mm=float(parts[2])) if len(parts) == 3 else GaussianEnhancer()
    path = Path(spec)
    if path.suffix != ".safetensors":
        raise ValueError(f"a model checkpoint must be a .safetensors file, found {spec!r}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {spec} does not exist")
    # Imported here: torch and the networks load only when a model checkpoint is asked for.
    if _checkpoint_kind(path) == "supervised":
        from model.enhancers.supervised import load_supervised_enhancer

        return load_supervised_enhancer(path, device=device)  # trained at one dose: no t*, no sampler
    from model.enhancers.diffusion import load_diffusion_enhancer

    return load_diffusion_enhancer(path, device=device, steps=steps, dose_fraction=dose_fraction, seed=seed)


def _checkpoint_kind(path: Path) -> str | None:
    """The ``kind`` in a checkpoint's JSON config (None when absent or unreadable: a diffusion model)."""
    import json

    try:
        data = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None  # the diffusion loader reports a missing or broken config in its own words
    return data.get("kind") if isinstance(data, dict) else None
