"""Model tests run torch on one thread: their tensors are tiny, and the two cores are shared.

``load_enhancer`` sizes torch's pool from OMP_NUM_THREADS when it is set (model.enhancers.threads),
so setting it here keeps a test's loaded enhancer on the one thread the test expects.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_omp_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
