"""Random training patches, clean and Poisson-perturbed, as ``B×1×D×H×W`` tensors.

A perturbed patch must come from perturbing **whole axial slices**: reconstructed PET noise depends
on every line of response through the slice, so perturbing a cut-out patch as if it were the whole
object gives the wrong noise. :class:`PerturbedPool` therefore makes slabs (``patch_z`` full slices)
at a random dose — counts in the sinogram, binomial thinning, FBP/OSEM — and crops patches from them.
Reusing a slab for a few crops only correlates neighbouring samples, which ``refresh`` (slabs
replaced per batch, may be fractional: 0.5 = one every other batch) trades against time.

The forward process (:class:`ForwardProcess`) is by default :func:`model.physics.inject_dose_noise`,
a real lower-dose acquisition of the patient (mean kept, noise of that dose); ``perturb`` re-projects
the reconstructed SPET (the first runs', kept to reproduce them). With ``styles`` each slab is made on
the native grid of a random scanner style (:mod:`model.training.styles`) and both clean and noisy slabs
are resampled onto the model grid as inference does: a model that has seen one noise texture loses
much of its gain on another.

Doses are drawn log-uniformly over ``dose_range`` (1–100 % by default: the doses users meet). The step
t a slab is labelled with is where the node would place it: with a ``noise_curve`` (a calibrated
autoencoder's) the curve's t for the slab's measured noise index — the very estimate the node makes
when no dose is given, so training and inference agree on t whatever the reconstruction — otherwise
t of its dose on the schedule.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from model.grid import AIR_HU
from model.networks.diffusion import ScheduleConfig
from model.networks.noise_level import NoiseCurve
from model.training.data import TrainingCase, body_candidates, pad_to, random_patch_origin
from model.training.settings import ForwardProcess
from model.training.styles import ScannerStyle, draw_style, to_model_grid, to_native

__all__ = ["ForwardProcess", "PatchBatch", "PatchSampler", "PerturbedPool", "recon_variants"]


@dataclass
class PatchBatch:
    """``clean`` SPET and (Poisson) ``noisy`` patches in normalised units, ``ct`` in HU, steps ``t``."""

    clean: torch.Tensor
    ct: torch.Tensor | None = None
    noisy: torch.Tensor | None = None
    t: torch.Tensor | None = None

    def to(self, device: torch.device) -> PatchBatch:
        move = lambda v: v.to(device, non_blocking=True) if v is not None else None  # noqa: E731
        return PatchBatch(move(self.clean), move(self.ct), move(self.noisy), move(self.t))


def recon_variants(base):  # noqa: ANN001, ANN201 - ReconSettings; physics is imported lazily
    """Reconstruction settings around ``base``: its iterations ±1, post-filter ±1.5 mm, and FBP."""
    from model.physics import ReconAlgorithm

    out = [base]
    if base.algorithm is ReconAlgorithm.OSEM:
        out += [dataclasses.replace(base, iterations=max(1, base.iterations + k)) for k in (-1, 1)]
    out += [
        dataclasses.replace(base, postfilter_fwhm_mm=max(0.0, base.postfilter_fwhm_mm + k))
        for k in (-1.5, 1.5)
    ]
    out.append(
        dataclasses.replace(
            base, algorithm=ReconAlgorithm.FBP, postfilter_fwhm_mm=max(base.postfilter_fwhm_mm, 4.0)
        )
    )
    return [r for i, r in enumerate(out) if r not in out[:i]]


class PatchSampler:
    """Body-centred random patches of ``patch`` voxels ``(z, y, x)`` from a list of cases.

    Cases smaller than the patch are padded (PET with 0, CT with air). Normalisation is Bq/ml ÷
    ``scale_bqml`` (the fixed scale) or, with ``minmax``, each case's own [min, max] → [0, 1].
    """

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        *,
        patch: Sequence[int],
        scale_bqml: float,
        rng: np.random.Generator,
        with_ct: bool,
        minmax: bool = False,
        flip: bool = True,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.patch = tuple(int(p) for p in patch)
        self.rng = rng
        self.with_ct = with_ct
        self.flip = flip
        self.cases = list(cases)
        self.pet: list[np.ndarray] = []
        self.ct: list[np.ndarray | None] = []
        self.expectation: list[np.ndarray | None] = []
        self.scales: list[float] = []
        self.offsets: list[float] = []
        for case in cases:
            pet = pad_to(case.pet, self.patch, 0.0)
            if minmax:
                low, high = float(pet.min()), float(pet.max())
                self.offsets.append(low)
                self.scales.append(max(high - low, 1e-6))
            else:
                self.offsets.append(0.0)
                self.scales.append(scale_bqml)
            self.pet.append(pet.astype(np.float32))
            expectation = case.expectation
            if expectation is not None:
                expectation = pad_to(expectation, self.patch, 0.0).astype(np.float32)
            self.expectation.append(expectation)
            if with_ct:
                if case.ct is None:
                    raise ValueError(f"case {case.name} has no CT")
                self.ct.append(pad_to(case.ct, self.patch, AIR_HU).astype(np.float32))
            else:
                self.ct.append(None)
        self.candidates = [body_candidates(p) for p in self.pet]

    def normalise(self, index: int, bqml: np.ndarray) -> np.ndarray:
        return (bqml - self.offsets[index]) / self.scales[index]

    def _crop(self, array: np.ndarray, corner: Sequence[int]) -> np.ndarray:
        z, y, x = corner
        pz, py, px = self.patch
        return array[z : z + pz, y : y + py, x : x + px]

    def _stack(self, arrays: list[np.ndarray], flips: list[bool]) -> torch.Tensor:
        out = [np.ascontiguousarray(a[..., ::-1] if f else a) for a, f in zip(arrays, flips, strict=True)]
        return torch.from_numpy(np.stack(out)[:, None])

    def _flips(self, n: int) -> list[bool]:
        return [bool(self.flip and self.rng.random() < 0.5) for _ in range(n)]

    def clean_batch(self, batch_size: int) -> PatchBatch:
        """``batch_size`` random SPET patches (and their CT)."""
        pets, cts = [], []
        for _ in range(batch_size):
            i = int(self.rng.integers(len(self.pet)))
            corner = random_patch_origin(
                self.pet[i].shape, self.patch, self.rng, candidates=self.candidates[i]
            )
            pets.append(self.normalise(i, self._crop(self.pet[i], corner)))
            if self.with_ct:
                cts.append(self._crop(self.ct[i], corner))
        flips = self._flips(batch_size)
        return PatchBatch(self._stack(pets, flips), self._stack(cts, flips) if self.with_ct else None)


@dataclass
class _Slab:
    case: int
    z0: int
    t: int
    clean: np.ndarray  # (pz, Y, X) Bq/ml: the SPET as the slab's scanner style shows it
    noisy: np.ndarray  # (pz, Y, X) Bq/ml
    candidates: np.ndarray  # body voxels of the clean slab (flat indices), crop centres


class PerturbedPool:
    """A pool of perturbed slabs; :meth:`batch` crops ``(clean, noisy, ct, t)`` patches from it.

    ``timesteps`` (T) and ``dose_min`` define the schedule d_t = d_min^(t/T). Each :meth:`batch` call
    first replaces ``refresh`` slabs on average (all of them on the first call; a fraction
    accumulates). ``forward``, ``styles``, ``dose_range`` and ``noise_curve``: see the module's notes.
    """

    def __init__(
        self,
        sampler: PatchSampler,
        *,
        timesteps: int,
        dose_min: float,
        size: int = 8,
        refresh: float = 1.0,
        vary_recon: bool = True,
        spacing_mm: float = 2.0,
        use_ct_attenuation: bool = True,
        forward: ForwardProcess | str = ForwardProcess.INJECT,
        styles: bool = False,
        dose_range: tuple[float, float] = (0.01, 1.0),
        noise_curve: NoiseCurve | None = None,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> None:
        from model.physics import ReconSettings, ScannerModel

        if size < 1 or refresh < 0:
            raise ValueError(f"pool size ({size}) must be ≥ 1 and refresh ({refresh}) ≥ 0")
        if not 0 < dose_range[0] <= dose_range[1] <= 1:
            raise ValueError(f"dose_range must satisfy 0 < low ≤ high ≤ 1, found {dose_range}")
        self.sampler = sampler
        self.schedule = ScheduleConfig(timesteps=timesteps, dose_min=dose_min)
        self.size = size
        self.refresh = refresh
        self.forward = ForwardProcess(forward)
        self.styles = styles
        self.dose_range = dose_range
        self.noise_curve = noise_curve
        self._due = 0.0
        # Per case: the reconstruction and count level the SPET was made with when the data say
        # (simulated cases), the defaults otherwise; the first choice is that base setting.
        self.recons: list[list] = []
        self.scanners: list = []
        for case in sampler.cases:
            base = ReconSettings.from_dict(case.recon) if case.recon else ReconSettings()
            self.recons.append(recon_variants(base) if vary_recon else [base])
            self.scanners.append(ScannerModel(**case.scanner) if case.scanner else ScannerModel())
        self.spacing_mm = spacing_mm
        self.use_ct_attenuation = use_ct_attenuation
        self.device = torch.device(device)
        self.generator = generator
        self.slabs: list[_Slab] = []
        self._next = 0

    def dose(self, t: int) -> float:
        return self.schedule.dose_at(t)

    def t_of_dose(self, dose: float) -> int:
        return int(round(self.schedule.t_from_dose(dose)))

    def _attenuation(self, ct: np.ndarray, size: int, pixel_mm: float) -> torch.Tensor:
        """Survival factors of ``ct (pz, H, W)`` padded to the centred ``size`` square, as the physics
        pads the activity."""
        from model.physics import attenuation_factors, get_projector, mu_map_from_ct

        h, w = ct.shape[-2:]
        top, left = (size - h) // 2, (size - w) // 2
        ct_sq = F.pad(
            torch.from_numpy(np.ascontiguousarray(ct)).to(self.device),
            (left, size - w - left, top, size - h - top),
            value=AIR_HU,
        )
        projector = get_projector(size, pixel_size_mm=pixel_mm, device=self.device)
        return attenuation_factors(projector, mu_map_from_ct(ct_sq)).clamp_min(1e-6)

    def _acquire(  # noqa: PLR0913 - the physics of one slab
        self,
        pet: np.ndarray,
        ct: np.ndarray | None,
        dose: float,
        *,
        recon,  # noqa: ANN001 - ReconSettings
        scanner,  # noqa: ANN001 - ScannerModel
        pixel_mm: float,
        slice_mm: float | None,
    ) -> np.ndarray:
        """``pet (pz, H, W)`` Bq/ml on a grid of ``pixel_mm`` → its dose-``dose`` image, same grid."""
        from model.physics import inject_dose_noise, perturb

        attenuation = None
        if self.use_ct_attenuation and ct is not None:
            attenuation = self._attenuation(ct, max(pet.shape[-2:]), pixel_mm)
        process = inject_dose_noise if self.forward is ForwardProcess.INJECT else perturb
        noisy = process(
            torch.from_numpy(np.ascontiguousarray(pet)).to(self.device),
            dose,
            scanner=scanner,
            recon=recon,
            pixel_size_mm=pixel_mm,
            slice_thickness_mm=slice_mm,
            attenuation=attenuation,
            generator=self.generator,
        )
        return noisy.cpu().numpy()

    def perturb_slab(self, case: int, z0: int, t: int, *, recon=None) -> np.ndarray:  # noqa: ANN001
        """Full axial slices ``z0 … z0+patch_z`` of a case at step ``t``'s dose on the model grid;
        ``(pz, Y, X)`` Bq/ml. ``recon`` (a ``ReconSettings``) defaults to a random choice among the
        case's variants."""
        rng = self.sampler.rng
        choices = self.recons[case]
        recon = recon or choices[int(rng.integers(len(choices)))]
        pz = self.sampler.patch[0]
        ct = self.sampler.ct[case]
        return self._acquire(
            self.sampler.pet[case][z0 : z0 + pz],
            None if ct is None else ct[z0 : z0 + pz],
            self.dose(t),
            recon=recon,
            scanner=self.scanners[case],
            pixel_mm=self.spacing_mm,
            slice_mm=None,
        )

    def styled_slab(
        self, case: int, z0: int, dose: float, style: ScannerStyle, *, source: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(clean, noisy)`` slabs on the model grid, Bq/ml, as a ``style`` scanner shows the case.

        ``source``: a model-grid volume of the case to acquire in place of its SPET (calibration
        passes the noiseless expectation)."""
        pz = self.sampler.patch[0]
        spet = (self.sampler.pet[case] if source is None else source)[z0 : z0 + pz]
        ct = self.sampler.ct[case]
        grid = self.spacing_mm
        native = to_native(spet, grid, style)
        native_ct = None if ct is None else to_native(ct[z0 : z0 + pz], grid, style)
        scanner = dataclasses.replace(
            self.scanners[case],
            frame_duration_s=self.scanners[case].frame_duration_s * style.count_scale,
        )
        noisy = self._acquire(
            native,
            native_ct,
            dose,
            recon=style.recon,
            scanner=scanner,
            pixel_mm=style.pixel_mm,
            slice_mm=style.slice_mm,
        )
        return to_model_grid(native, spet.shape, grid, style), to_model_grid(noisy, spet.shape, grid, style)

    def own_style(self, case: int) -> ScannerStyle | None:
        """A site's SPET is already its scanner's image: its lower-dose version is made on its own
        native grid, with its reconstruction and count level (the case's, from the headers where they
        say, else the defaults). None for cases made on the model grid (simulated)."""
        native = self.sampler.cases[case].native_spacing_mm
        if native is None:
            return None
        return ScannerStyle(
            pixel_mm=float(native[1]), slice_mm=float(native[0]), recon=self.recons[case][0], count_scale=1.0
        )

    def _label(self, case: int, noisy: np.ndarray, dose: float) -> int:
        """The step t of a slab: the noise curve's for its noise index, else its dose's."""
        if self.noise_curve is None:
            return self.t_of_dose(dose)
        t = self.noise_curve.t_from_image(self.sampler.normalise(case, noisy))
        return int(round(min(max(t, 0.0), self.schedule.timesteps)))

    def _new_slab(self) -> _Slab:
        rng = self.sampler.rng
        case = int(rng.integers(len(self.sampler.pet)))
        shape = self.sampler.pet[case].shape
        pz = self.sampler.patch[0]
        z0, _, _ = random_patch_origin(
            shape, (pz, shape[1], shape[2]), rng, candidates=self.sampler.candidates[case]
        )
        low, high = (math.log(d) for d in self.dose_range)
        dose = float(math.exp(rng.uniform(low, high)))
        own = self.own_style(case)
        if own is not None:
            clean, noisy = self.styled_slab(case, z0, dose, own)
        elif self.styles:
            clean, noisy = self.styled_slab(case, z0, dose, draw_style(rng))
        else:
            clean = self.sampler.pet[case][z0 : z0 + pz]
            noisy = self.perturb_slab(case, z0, self.t_of_dose(dose))
        return _Slab(case, z0, self._label(case, noisy, dose), clean, noisy, body_candidates(clean, stride=2))

    def _replace(self, n: int) -> None:
        for _ in range(n):
            slab = self._new_slab()
            if len(self.slabs) < self.size:
                self.slabs.append(slab)
            else:
                self.slabs[self._next] = slab
                self._next = (self._next + 1) % self.size

    def batch(self, batch_size: int) -> PatchBatch:
        """``batch_size`` crops from random pool slabs: clean and noisy patches, their CT and t."""
        if len(self.slabs) < self.size:
            self._replace(self.size - len(self.slabs))
        else:
            self._due += self.refresh
            self._replace(int(self._due))
            self._due -= int(self._due)
        s = self.sampler
        _, py, px = s.patch
        cleans, noisies, cts, ts = [], [], [], []
        for _ in range(batch_size):
            slab = self.slabs[int(s.rng.integers(len(self.slabs)))]
            pz = s.patch[0]
            # Centre the in-plane crop on the body within this slab.
            _, y0, x0 = random_patch_origin(slab.clean.shape, s.patch, s.rng, candidates=slab.candidates)
            window = (slice(None), slice(y0, y0 + py), slice(x0, x0 + px))
            cleans.append(s.normalise(slab.case, slab.clean[window]))
            noisies.append(s.normalise(slab.case, slab.noisy[window]))
            if s.with_ct:
                cts.append(s.ct[slab.case][slab.z0 : slab.z0 + pz][window])
            ts.append(slab.t)
        flips = s._flips(batch_size)
        return PatchBatch(
            s._stack(cleans, flips),
            s._stack(cts, flips) if s.with_ct else None,
            s._stack(noisies, flips),
            torch.tensor(ts, dtype=torch.long),
        )
