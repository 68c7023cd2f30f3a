"""Model files: ``NAME.safetensors`` (weights) + ``NAME.json`` (the :class:`ModelConfig`); training state.

Loading never unpickles: weights come from safetensors, everything else from JSON (``torch.load``
is never used). Writes are atomic (temporary file, fsync, rename), so a crash mid-save leaves the
previous file intact.

A resumable training state is the same pair: tensors (module weights, optimizer moments, RNG states)
in safetensors with flat dotted names, the rest (step counters, optimizer hyper-parameters, the numpy
generator state) in JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from model.networks.upete_model import ModelConfig, UPETeModel

__all__ = [
    "config_path",
    "load_checkpoint",
    "load_model_config",
    "load_training_state",
    "read_training_meta",
    "save_checkpoint",
    "save_training_state",
    "weights_digest",
    "write_model_files",
]


def config_path(weights: str | Path) -> Path:
    """The JSON config beside a ``.safetensors`` weights file."""
    return Path(weights).with_suffix(".json")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_model_files(
    path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str], config: dict[str, Any]
) -> Path:
    """Write a model's pair atomically: ``path`` (.safetensors, with ``metadata``) and its JSON ``config``.

    The one writer of shipped model files, whatever the network; returns the weights path.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"a checkpoint must be named *.safetensors, found {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save_tensors(path, dict(tensors), metadata)
    _atomic_write_bytes(config_path(path), (json.dumps(config, indent=2) + "\n").encode())
    return path


def save_checkpoint(path: str | Path, model: UPETeModel, config: ModelConfig | None = None) -> Path:
    """Write ``path`` (.safetensors) and its JSON config; returns the weights path."""
    config = config or model.config
    config.validate()
    metadata = {"format": "upete", "variant": config.variant.value}
    return write_model_files(path, model.state_dict(), metadata, config.to_json())


def load_model_config(path: str | Path) -> ModelConfig:
    """The validated :class:`ModelConfig` of a checkpoint (reads only the JSON)."""
    cfg = config_path(path)
    if not cfg.is_file():
        raise FileNotFoundError(f"checkpoint config {cfg} is missing (it must sit beside {Path(path).name})")
    try:
        data = json.loads(cfg.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg}: not valid JSON ({exc})") from None
    try:
        return ModelConfig.from_json(data)
    except (TypeError, ValueError, KeyError) as exc:
        raise ValueError(f"{cfg}: {exc}") from None


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> UPETeModel:
    """Build the model a checkpoint describes and load its weights (strict); eval mode, on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    model = UPETeModel(load_model_config(path))
    state = load_file(str(path), device="cpu")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
        raise ValueError(f"{path.name} does not match its config: {first}") from None
    if missing or unexpected:
        raise ValueError(
            f"{path.name} does not match its config: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
        )
    return model.to(device).eval()


def weights_digest(path: str | Path, length: int = 12) -> str:
    """Hex SHA-256 prefix of the weights file and its JSON config: the model version recorded in
    derived series. The config counts because it changes the output as the weights do (the sampler's
    steps, the noise curve that places an LPET on the schedule)."""
    digest = hashlib.sha256()
    for part in (Path(path), config_path(path)):
        if not part.is_file():
            continue  # a model without a JSON config (the supervised U-Net's older files)
        with open(part, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:length]


# --- training state ------------------------------------------------------------------------------


def _flatten_optimizer(
    name: str, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{name}.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(
    name: str, tensors: Mapping[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim.{name}."
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, field = key[len(prefix) :].split(".", 1)
            state.setdefault(int(index), {})[field] = value
    for index, fields in meta["scalars"].items():
        state.setdefault(int(index), {}).update(fields)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_training_state(
    path: str | Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    meta: dict[str, Any],
    rng: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a resumable state: ``path`` (.safetensors) + ``path.json``. ``meta`` must be JSON-able."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"module.{name}.{key}"] = value
    optim_meta = {}
    for name, optimizer in optimizers.items():
        flat, info = _flatten_optimizer(name, optimizer)
        tensors.update(flat)
        optim_meta[name] = info
    for name, value in (rng or {}).items():
        tensors[f"rng.{name}"] = value
    document = {"meta": meta, "optimizers": optim_meta}
    _atomic_save_tensors(path, tensors, {"format": "upete-training-state"})
    _atomic_write_bytes(config_path(path), (json.dumps(document, indent=1) + "\n").encode())
    return path


def read_training_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` a training state was saved with (JSON only; no tensors read)."""
    return json.loads(config_path(path).read_text())["meta"]


def load_training_state(
    path: str | Path,
    *,
    modules: Mapping[str, nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore modules and optimizers in place; returns ``(meta, rng tensors)``.

    Modules and optimizers missing from the file (a stage that had not started) are left as they are.
    """
    path = Path(path)
    tensors = load_file(str(path), device="cpu")
    document = json.loads(config_path(path).read_text())
    for name, module in modules.items():
        prefix = f"module.{name}."
        sub = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if sub:
            module.load_state_dict(sub, strict=True)
    for name, optimizer in optimizers.items():
        info = document["optimizers"].get(name)
        if info is not None:
            optimizer.load_state_dict(_unflatten_optimizer(name, tensors, info))
    rng = {k[len("rng.") :]: v for k, v in tensors.items() if k.startswith("rng.")}
    return document["meta"], rng
