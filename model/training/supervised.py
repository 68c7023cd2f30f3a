"""Training the supervised reference U-Net (:mod:`model.networks.supervised_unet`) on simulated pairs.

Pairs come from simulated cases (:mod:`model.simulation.dataset`) that hold an LPET at the training dose: the
simulator's own binomial thinning of the SPET's counts, so SPET and LPET share counts as list-mode
subsampling does. A pair cannot be made from a SPET volume alone (its counts are not stored), so a
folder without that dose is refused with the command that makes one.

Per step: random body-centred patches of the same place in LPET and SPET, the same random flips on
each axis, L1 (+ optional SSIM) on the fixed-scale normalised volumes (Bq/ml ÷ ``scale_bqml``), Adam,
an EMA of the weights (the shipped ones). Progress lines with ETA; the state (weights, EMA, optimizer,
RNGs) is saved every ``checkpoint_every_s`` and at the end, and ``resume`` continues it. Deterministic
by ``seed`` on a given device. The run ends with ``OUT/supervised-unet.safetensors`` + ``.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from model.grid import resample_isotropic
from model.networks.checkpoint import load_training_state, read_training_meta, save_training_state
from model.networks.supervised_unet import SupervisedConfig, SupervisedUNet, parameter_count, save_supervised
from model.training.data import TrainingCase, body_candidates, fixed_scale_bqml, pad_to, random_patch_origin
from model.training.losses import ssim_loss
from model.training.runtime import Ema, Precision, ProgressLog, resolve_device, software_version
from model.training.settings import SupervisedSettings

__all__ = [
    "CHECKPOINT_NAME",
    "STATE_NAME",
    "PairCase",
    "PairSampler",
    "SupervisedResult",
    "SupervisedSettings",
    "load_pairs",
    "train_supervised",
]

log = logging.getLogger("model.training.diffusion")

STATE_NAME = "supervised-state.safetensors"
CHECKPOINT_NAME = "supervised-unet.safetensors"


@dataclass
class PairCase:
    """One training pair on the model grid, ``(z, y, x)`` Bq/ml: the LPET at the dose and its SPET."""

    name: str
    lpet: np.ndarray
    spet: np.ndarray
    recon: str = ""


@dataclass
class SupervisedResult:
    checkpoint: Path
    losses: list[float]


def load_pairs(root: str | Path, *, dose: float, spacing_mm: float = 2.0) -> list[PairCase]:
    """Every simulated case under ``root`` as an LPET/SPET pair at ``dose`` on the ``spacing_mm`` grid.

    Raises ``ValueError`` when ``root`` holds no simulated case or a case has no LPET at ``dose``.
    """
    from model.simulation import dataset

    root = Path(root)
    paths = dataset.list_cases(root) if root.is_dir() else []
    if not paths:
        raise ValueError(
            f"{root} holds no simulated case (case_*/arrays.npz + meta.json); the supervised U-Net "
            "trains on simulated LPET/SPET pairs: use --simulate N"
        )
    pairs = []
    for path in paths:
        case = dataset.load_case(path)
        lpet = next((v for d, v in case.lpet_bqml.items() if abs(float(d) - dose) < 1e-9), None)
        if lpet is None:
            raise ValueError(
                f"case {path.name} has no LPET at dose {dose:g} (it has {sorted(case.lpet_bqml)}); "
                f"simulate pairs at that dose with --simulate N --dose {dose:g}"
            )
        pairs.append(
            PairCase(
                path.name,
                resample_isotropic(lpet, case.spacing_mm, spacing_mm),
                resample_isotropic(case.spet_bqml, case.spacing_mm, spacing_mm),
                str(case.meta.get("recon_name", "")),
            )
        )
    log.info("training pairs loaded", extra={"fields": {"cases": len(pairs), "dose": dose}})
    return pairs


class PairSampler:
    """Random body-centred patches ``(lpet, spet)``, each ``B×1×D×H×W`` normalised, same crop and flips.

    Cases smaller than the patch are padded with air (0 Bq/ml), as the enhancer pads.
    """

    def __init__(
        self,
        cases: Sequence[PairCase],
        *,
        patch: Sequence[int],
        scale_bqml: float,
        rng: np.random.Generator,
        flip: bool = True,
    ) -> None:
        if not cases:
            raise ValueError("PairSampler needs at least one case")
        self.patch = tuple(int(p) for p in patch)
        self.scale = float(scale_bqml)
        self.rng = rng
        self.flip = flip
        self.lpet = [pad_to(c.lpet, self.patch, 0.0).astype(np.float32) for c in cases]
        self.spet = [pad_to(c.spet, self.patch, 0.0).astype(np.float32) for c in cases]
        # Centres are drawn on the SPET's body: the LPET's noise in the air would move them around.
        self.candidates = [body_candidates(s) for s in self.spet]

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        lpets, spets = [], []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.spet)))
            corner = random_patch_origin(
                self.spet[i].shape, self.patch, self.rng, candidates=self.candidates[i]
            )
            window = tuple(slice(c, c + p) for c, p in zip(corner, self.patch, strict=True))
            lpet, spet = self.lpet[i][window], self.spet[i][window]
            # Noise statistics do not depend on orientation (per-slice 2D reconstruction, symmetric in z):
            # every axis may flip, the same way for input and target.
            axes = tuple(a for a in range(3) if self.flip and self.rng.random() < 0.5)
            if axes:
                lpet, spet = np.flip(lpet, axes), np.flip(spet, axes)
            lpets.append(np.ascontiguousarray(lpet) / self.scale)
            spets.append(np.ascontiguousarray(spet) / self.scale)
        return torch.from_numpy(np.stack(lpets)[:, None]), torch.from_numpy(np.stack(spets)[:, None])


def _summary(settings: SupervisedSettings, cases: Sequence[PairCase], model: SupervisedUNet, **extra: Any):  # noqa: ANN202
    # Counts and settings only: case names could carry patient identifiers.
    return {
        "cases": len(cases),
        "dose": settings.dose,
        "patch_size": list(settings.patch_size),
        "batch_size": settings.batch_size,
        "lr": settings.lr,
        "warmup_steps": settings.warmup_steps,
        "ssim_weight": settings.ssim_weight,
        "ema_decay": settings.ema_decay,
        "seed": settings.seed,
        "parameters": parameter_count(model),
        "recons": sorted({c.recon for c in cases if c.recon}),
        **extra,
    }


def train_supervised(
    settings: SupervisedSettings,
    *,
    on_step: Callable[[int, float], None] | None = None,
) -> SupervisedResult:
    """Train (or resume) the supervised U-Net; returns the checkpoint written and the losses per step."""
    settings.validate()
    started = time.monotonic()
    device = resolve_device(settings.device)
    precision = Precision(device, settings.amp)
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, 0x5E9])
    out = Path(settings.out_dir)
    state_path = out / STATE_NAME
    resumed = settings.resume and state_path.is_file()
    if settings.resume and not resumed:
        log.info("no training state to resume; starting afresh", extra={"fields": {"out": str(out)}})
    saved = _saved_config(state_path, settings) if resumed else None  # refused before any data is read
    cases = load_pairs(settings.data_dir, dose=settings.dose)
    config = saved or _fresh_config(settings, cases)
    model = SupervisedUNet(config).to(device)
    ema = Ema(model, settings.ema_decay).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    start, losses, seconds_before = 0, [], 0.0
    if resumed:
        start, losses, seconds_before = _restore(state_path, model, ema, optimizer, rng)
    sampler = PairSampler(cases, patch=config.patch_size, scale_bqml=config.scale_bqml, rng=rng)

    def save_state(step: int) -> None:
        meta = {
            "step": step,
            "config": config.to_json(),
            "numpy_rng": rng.bit_generator.state,
            "losses": losses,
            "seconds": round(seconds_before + time.monotonic() - started, 3),
        }
        save_training_state(
            state_path,
            modules={"model": model, "ema": ema},
            optimizers={"adam": optimizer},
            meta=meta,
            rng={"torch_cpu": torch.get_rng_state()},
        )

    progress = ProgressLog(
        "supervised", total=settings.steps, start=start, every_s=settings.log_every_s, enabled=True
    )
    model.train()
    last_save = time.monotonic()
    for step in range(start, settings.steps):
        lpet, spet = (t.to(device, non_blocking=True) for t in sampler.batch(settings.batch_size))
        for group in optimizer.param_groups:  # a function of the step only: resumes exactly
            group["lr"] = settings.lr * min(1.0, (step + 1) / max(settings.warmup_steps, 1))
        value = _step(model, optimizer, precision, lpet, spet, ssim_weight=settings.ssim_weight)
        ema.update(model)
        losses.append(value)
        progress.update(step + 1, value)
        if on_step:
            on_step(step + 1, value)
        if time.monotonic() - last_save >= settings.checkpoint_every_s:
            save_state(step + 1)
            last_save = time.monotonic()
    save_state(settings.steps)

    recent = losses[-100:]
    training = _summary(
        settings,
        cases,
        model,
        steps=settings.steps,
        final_loss=round(float(np.mean(recent)), 6) if recent else None,
        seconds=round(seconds_before + time.monotonic() - started, 3),
    )
    final = dataclasses.replace(config, training=training, software_version=software_version())
    # The shipped weights are the EMA's: smoother and better than the last step's.
    path = save_supervised(out / CHECKPOINT_NAME, ema.shadow, final)
    log.info("model saved", extra={"fields": {"checkpoint": str(path), "kind": "supervised"}})
    return SupervisedResult(path, losses)


def _saved_config(state_path: Path, settings: SupervisedSettings) -> SupervisedConfig:
    """The config of the state being resumed; refused when it trains at another dose."""
    config = SupervisedConfig.from_json(read_training_meta(state_path)["config"])
    if abs(config.dose - settings.dose) > 1e-9:
        raise ValueError(
            f"the state in {state_path.parent} trains at dose {config.dose:g}, not {settings.dose:g}"
        )
    return config


def _fresh_config(settings: SupervisedSettings, cases: Sequence[PairCase]) -> SupervisedConfig:
    """A new network's config: the settings' sizes and the cases' fixed Bq/ml scale."""
    total, count = fixed_scale_bqml([TrainingCase(c.name, c.spet, None) for c in cases])
    return SupervisedConfig(
        channels=tuple(settings.channels),
        res_blocks=settings.res_blocks,
        norm_groups=settings.norm_groups,
        patch_size=tuple(settings.patch_size),  # type: ignore[arg-type]
        scale_bqml=total / count,
        dose=settings.dose,
    )


def _restore(
    state_path: Path,
    model: SupervisedUNet,
    ema: Ema,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
) -> tuple[int, list[float], float]:
    """Load a saved state into the network, EMA, optimizer and generators; returns
    ``(step, losses, seconds of earlier invocations)``."""
    meta, rng_state = load_training_state(
        state_path, modules={"model": model, "ema": ema}, optimizers={"adam": optimizer}
    )
    if "torch_cpu" in rng_state:
        torch.set_rng_state(rng_state["torch_cpu"])
    rng.bit_generator.state = meta["numpy_rng"]
    step = int(meta["step"])
    log.info("resumed", extra={"fields": {"stage": "supervised", "step": step}})
    return step, list(meta.get("losses", [])), float(meta.get("seconds", 0.0))


def _step(
    model: SupervisedUNet,
    optimizer: torch.optim.Optimizer,
    precision: Precision,
    lpet: torch.Tensor,
    spet: torch.Tensor,
    *,
    ssim_weight: float,
) -> float:
    """One optimisation step on a batch: L1 (+ SSIM) of the prediction against the SPET; its loss."""
    with precision.autocast():
        pred = model(lpet)
    pred = pred.float()
    loss = F.l1_loss(pred, spet)
    if ssim_weight:
        loss = loss + ssim_weight * ssim_loss(pred, spet)
    precision.step(loss, optimizer, model.parameters(), clip=1.0)
    return float(loss.detach())
