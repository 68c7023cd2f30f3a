"""Inference precision and layout: ``auto`` is bf16 only where the CPU has it natively; bf16 and
channels-last stay close to float32 in the contiguous layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.enhance import InferenceOptions, load_enhancer
from model.enhancers import precision
from model.enhancers.precision import cpu_has_native_bf16, resolve_precision
from tests.support.model_toys import one_thread, tiny_checkpoint, tiny_phantom  # noqa: F401 - one_thread: autouse fixture

CPU = torch.device("cpu")


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 {flags}\n")
    return path


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path) -> None:
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, "amx_tile amx_bf16"))
    assert not cpu_has_native_bf16(_cpuinfo(tmp_path, "avx2 avx512f"))
    assert not cpu_has_native_bf16(tmp_path / "missing")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_picks_bf16_only_on_a_cpu_with_it(
    monkeypatch: pytest.MonkeyPatch, native: bool, expected: str
) -> None:
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_an_unknown_precision_is_refused_with_the_value_found() -> None:
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16, found 'fp16'"):
        InferenceOptions(precision="fp16")


def test_bf16_output_stays_close_to_float32(tmp_path) -> None:
    path = str(tiny_checkpoint(tmp_path, "ldm-p-ct"))
    pet, ct = tiny_phantom(2, (16, 32, 32))
    outputs = {}
    for name in ("fp32", "bf16"):
        enhancer = load_enhancer(path, options=InferenceOptions(device="cpu", steps=2, dose_fraction=0.1,
                                                                precision=name))
        assert enhancer.precision == name
        outputs[name] = enhancer.enhance_array(pet, ct, spacing_mm=(2.0, 2.0, 2.0))
    body = ct > -900.0
    a, b = outputs["fp32"], outputs["bf16"]
    assert not np.array_equal(a, b)  # bf16 did run
    # bf16 keeps 8 bits of mantissa: a random tiny model's output moves by well under 5 % of its range.
    assert float(np.abs(a - b)[body].max()) < 0.05 * float(a.max() - a.min())


def test_channels_last_gives_the_contiguous_layouts_output(tmp_path) -> None:
    path = str(tiny_checkpoint(tmp_path, "ldm-p-ct"))
    pet, ct = tiny_phantom(2, (16, 32, 32))
    outputs = []
    for channels_last in (False, True):
        options = InferenceOptions(device="cpu", steps=2, dose_fraction=0.1, precision="fp32",
                                   channels_last=channels_last)
        enhancer = load_enhancer(path, options=options)
        outputs.append(enhancer.enhance_array(pet, ct, spacing_mm=(2.0, 2.0, 2.0)))
    span = float(outputs[0].max() - outputs[0].min())
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=0, atol=1e-4 * span)
