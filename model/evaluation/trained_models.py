"""Trained models in the quality report: which checkpoint is which, and how each was trained.

A checkpoint is recognised by its JSON config alone (no torch import): ``"kind": "supervised"`` is the
supervised reference U-Net, otherwise the ``"variant"`` field names the diffusion variant (LDM, LDM-P,
LDM-CT, LDM-P-CT; ``model.networks.diffusion.Variant``). The method key a checkpoint is scored under is its
file's stem, so cached scores stay attached to the file; the label is what the tables print.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ABLATION_ORDER",
    "SUPERVISED",
    "UPETE",
    "ModelCheckpoint",
    "describe_checkpoint",
    "find_checkpoints",
    "models_title",
    "training_header",
]

#: The paper's ablation (Table 1), worst to best as the paper finds them.
ABLATION_ORDER = ("ldm", "ldm-p", "ldm-ct", "ldm-p-ct")
#: The full model, uPETe, is the LDM-P-CT variant.
UPETE = "ldm-p-ct"
#: ``ModelCheckpoint.variant`` of the supervised reference.
SUPERVISED = "supervised"


@dataclass(frozen=True)
class ModelCheckpoint:
    """One checkpoint as the report sees it: file, method key, label, variant, training summary."""

    path: Path
    variant: str  # one of ABLATION_ORDER, or SUPERVISED
    training: Mapping[str, Any] = field(default_factory=dict)
    sampler_steps: int | None = None  # the checkpoint's default sampler steps (diffusion only)

    @property
    def key(self) -> str:
        return self.path.stem

    @property
    def label(self) -> str:
        if self.variant == SUPERVISED:
            return "Supervised U-Net"
        return f"uPETe ({self.variant.upper()})" if self.variant == UPETE else self.variant.upper()


def describe_checkpoint(path: Path) -> ModelCheckpoint | None:
    """The :class:`ModelCheckpoint` of ``path``, or None for a file that is no trained model
    (a training state, an autoencoder-only stage file, a JSON that is no model config)."""
    try:
        data = json.loads(Path(path).with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    training = data.get("training") if isinstance(data.get("training"), dict) else {}
    if data.get("kind") == SUPERVISED:
        return ModelCheckpoint(Path(path), SUPERVISED, training)
    variant = data.get("variant")
    if variant not in ABLATION_ORDER:
        return None
    if not (training.get("denoiser") or {}).get("steps"):
        return None  # the autoencoder stage's file: nothing to enhance with
    steps = (data.get("sampler") or {}).get("steps")
    return ModelCheckpoint(Path(path), variant, training, int(steps) if steps else None)


def find_checkpoints(paths: Iterable[str | Path]) -> list[ModelCheckpoint]:
    """Every trained model among ``paths`` (files, or folders searched for ``*.safetensors``).

    A file named explicitly must be a model; files found in a folder that are not (training states,
    autoencoders) are skipped. Raises ValueError when two checkpoints claim the same variant, since the
    ablation and comparison tables need to know which one is meant.
    """
    found: list[ModelCheckpoint] = []
    for item in map(Path, paths):
        if item.is_dir():
            found += [m for p in sorted(item.glob("*.safetensors")) if (m := describe_checkpoint(p))]
            continue
        if not item.is_file():
            raise ValueError(f"checkpoint {item} does not exist")
        model = describe_checkpoint(item)
        if model is None:
            raise ValueError(f"{item} is no trained model (no variant or supervised kind in its JSON, "
                             "or a denoiser never trained)")
        found.append(model)
    by_variant: dict[str, ModelCheckpoint] = {}
    for model in found:
        if model.variant in by_variant and by_variant[model.variant].path != model.path:
            raise ValueError(f"two {model.variant} checkpoints: {by_variant[model.variant].path} and "
                             f"{model.path}; name one of them")
        by_variant[model.variant] = model
    order = (*ABLATION_ORDER, SUPERVISED)  # the report lists them in the paper's order
    return sorted(by_variant.values(), key=lambda m: order.index(m.variant))


def models_title(models: Sequence[ModelCheckpoint]) -> str:
    """The report's title, naming what it compares (the classical-only title when no model is given)."""
    variants = {m.variant for m in models}
    if not variants:
        return "Quality benchmark: classical baselines on simulated low-dose PET"
    parts = []
    if UPETE in variants:
        parts.append("uPETe")
    others = sorted(variants & set(ABLATION_ORDER) - {UPETE}, key=ABLATION_ORDER.index)
    if others:
        parts.append("its ablation variants (" + ", ".join(v.upper() for v in others) + ")")
    if SUPERVISED in variants:
        parts.append("a supervised U-Net")
    return f"Quality benchmark: {', '.join(parts)} and classical baselines on simulated low-dose PET"


def _size(values: Any) -> str:
    return "×".join(str(v) for v in values) if isinstance(values, (list, tuple)) else str(values)


def _stage(summary: Mapping[str, Any]) -> str:
    """One training stage's summary (steps, patch, batch, cases, reconstructions) in words."""
    parts = []
    if summary.get("steps") is not None:
        parts.append(f"{summary['steps']} steps")
    if summary.get("patch_size") is not None:
        parts.append(f"patch {_size(summary['patch_size'])}")
    if summary.get("batch_size") is not None:
        parts.append(f"batch {summary['batch_size']}")
    if summary.get("cases") is not None:
        parts.append(f"{summary['cases']} cases")
    if summary.get("dose") is not None:
        parts.append(f"dose {100 * float(summary['dose']):g} %")
    if summary.get("recons"):
        parts.append(f"{len(summary['recons'])} reconstruction settings")
    if summary.get("parameters") is not None:
        parts.append(f"{float(summary['parameters']) / 1e6:.2f} M parameters")
    return ", ".join(parts) or "no settings recorded"


def _duration(seconds: Any) -> str:
    if seconds is None:
        return "training time not recorded"
    s = float(seconds)
    return f"training time {s / 3600:.1f} h ({s:.0f} s, as recorded in the checkpoint)"


def training_header(models: Sequence[ModelCheckpoint]) -> dict[str, str]:
    """Header lines ``{"model LABEL": "file; settings; training time"}`` from each checkpoint's JSON."""
    lines = {}
    for model in models:
        t = model.training
        if model.variant == SUPERVISED:
            stages = _stage(t)
        else:
            # The autoencoder is shared by the four variants; the denoiser is each variant's own.
            stages = (f"autoencoder: {_stage(t.get('autoencoder') or {})}; "
                      f"denoiser: {_stage(t.get('denoiser') or {})}")
            if model.sampler_steps:
                stages += f"; default sampler steps {model.sampler_steps}"
        lines[f"model {model.label}"] = f"`{model.path.name}`; {stages}; {_duration(t.get('seconds'))}"
    return lines
