"""How a model-based enhancer runs: one frozen set of inference options, from the config to the sampler.

None of them changes the weights. ``steps`` and ``tile_overlap`` default to the checkpoint's own;
``steps``, ``dose_fraction``, ``seed`` and the CT-air knobs apply to the diffusion model only.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.enhancers.precision import PRECISIONS

__all__ = ["DEFAULT_OPTIONS", "TILING_MODES", "InferenceOptions"]

#: ``auto``: tiles of the training patch (the whole volume when it fits in one); ``whole``: one pass.
TILING_MODES = ("auto", "whole")


@dataclass(frozen=True)
class InferenceOptions:
    """Inference settings for :func:`model.enhance.load_enhancer`; validated when built.

    ``device``: ``auto`` (the GPU when torch sees one), ``cpu`` or ``cuda``. ``steps``: sampler steps
    (None: the checkpoint's). ``dose_fraction``: the LPET's known dose (None: t* from its measured
    noise). ``seed``: the sampler's noise. ``tiling``: one of :data:`TILING_MODES`. ``tile_batch``:
    tiles per network call (per-sample GroupNorm makes it exact). ``tile_overlap``: None for the
    checkpoint's. ``skip_air_ct``: with a CT, tiles whose CT is air (≤ ``air_hu`` everywhere: no
    patient) and whose PET stays below ``air_max_bqml`` are kept as they are (outside the body a
    10 %-dose MLEM LPET stayed below ≈1100 Bq/ml; tissue beyond a smaller CT field of view does not).
    ``precision``: ``auto`` (bf16 autocast where the device computes bf16 natively, else fp32),
    ``fp32`` or ``bf16`` (:mod:`model.enhancers.precision`; benchmarks/results/speed.md measured it).
    ``channels_last``: on a CPU, the networks' 3D convolutions run on channels-last tensors (oneDNN's
    fast layout: encode and decode ≈1.5× faster here); no effect on a GPU.
    ``crop_to_body``: with ``tiling="auto"``, the model grid covers only the box of what the tiles
    would run plus a tile's margin (:class:`model.grid.ModelGrid`); the body's output is the same,
    beyond the box the output is the input (as for tiles of air); off: the whole field of view.
    """

    device: str = "auto"
    steps: int | None = None
    dose_fraction: float | None = None
    seed: int = 0
    tiling: str = "auto"
    tile_batch: int = 8
    tile_overlap: float | None = None
    skip_air_ct: bool = True
    air_hu: float = -900.0
    air_max_bqml: float = 1500.0
    precision: str = "auto"
    crop_to_body: bool = True
    channels_last: bool = True

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, found {self.steps}")
        if self.dose_fraction is not None and not 0 < self.dose_fraction <= 1:
            raise ValueError(f"dose_fraction must be in (0, 1], found {self.dose_fraction}")
        if self.tiling not in TILING_MODES:
            raise ValueError(f"tiling must be one of {', '.join(TILING_MODES)}, found {self.tiling!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, found {self.precision!r}")
        if self.tile_batch < 1:
            raise ValueError(f"tile_batch must be ≥ 1, found {self.tile_batch}")
        if self.tile_overlap is not None and not 0 <= self.tile_overlap < 1:
            raise ValueError(f"tile_overlap must be in [0, 1), found {self.tile_overlap}")


#: The options of a bare ``load_enhancer(spec)`` (frozen, so one shared instance is safe).
DEFAULT_OPTIONS = InferenceOptions()
