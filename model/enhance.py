"""The one door between the DICOM node and the model: the Enhancer contract and :func:`load_enhancer`.

The contract lives in :mod:`model.enhancers.base` and is re-exported here: the node hands a PET
volume in Bq/ml (and the CT in HU on the PET grid, if it has one) and gets the enhanced PET back in
Bq/ml on the same grid. Nothing here knows DICOM; nothing in the node knows torch.
"""

from __future__ import annotations

from pathlib import Path

from model.enhancers.base import Enhancer, EnhancerInfo, Progress
from model.enhancers.classical import GaussianEnhancer
from model.enhancers.options import DEFAULT_OPTIONS, InferenceOptions

__all__ = [
    "Enhancer",
    "EnhancerInfo",
    "GaussianEnhancer",
    "InferenceOptions",
    "Progress",
    "load_enhancer",
]


def load_enhancer(spec: str, *, options: InferenceOptions = DEFAULT_OPTIONS) -> Enhancer:
    """Build the enhancer a config names, run as ``options`` say.

    ``spec`` is ``"classical:gaussian"`` (optionally ``"classical:gaussian:FWHM_MM"``) or the path of a
    ``.safetensors`` checkpoint with its JSON config beside it: a uPETe diffusion model, or the
    supervised reference U-Net when the JSON says ``"kind": "supervised"`` (of ``options`` only the
    device applies to it). The classical filter ignores ``options``.
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
    from model.enhancers.threads import use_usable_cpus

    use_usable_cpus()
    if _checkpoint_kind(path) == "supervised":
        from model.enhancers.supervised import load_supervised_enhancer

        return load_supervised_enhancer(path, options)
    from model.enhancers.diffusion import load_diffusion_enhancer

    return load_diffusion_enhancer(path, options)


def _checkpoint_kind(path: Path) -> str | None:
    """The ``kind`` in a checkpoint's JSON config (None when absent or unreadable: a diffusion model)."""
    import json

    try:
        data = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None  # the diffusion loader reports a missing or broken config in its own words
    return data.get("kind") if isinstance(data, dict) else None
