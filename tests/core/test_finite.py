"""The per-step NaN/inf check: immediate on CPU, one step late on CUDA, never lost."""

from __future__ import annotations

import pytest
import torch

from imagezoo.finite import FiniteWatch

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="CUDA"))])
def test_finite_watch_reports_the_bad_step(device) -> None:
    watch = FiniteWatch(torch.device(device))
    good = torch.zeros(2, 3, device=device)
    bad = good.clone()
    bad[1, 2] = float("nan")
    found = [watch.push(good, "step 1"), watch.push(bad, "step 2"), watch.push(good, "step 3"), watch.finish()]
    # CPU: at once; CUDA: with the next push, when the GPU has long computed the flag.
    assert found == ([None, "step 2", None, None] if device == "cpu" else [None, None, "step 2", None])
    assert watch.push(good, "step 4") is None and watch.finish() is None


@pytest.mark.skipif(not CUDA, reason="CUDA")
def test_finite_watch_flags_the_last_step_at_finish() -> None:
    watch = FiniteWatch(torch.device("cuda"))
    assert watch.push(torch.full((4,), float("inf"), device="cuda"), "last") is None
    assert watch.finish() == "last"
