"""Device selection and the out-of-memory fallback of batched projection."""
from __future__ import annotations

import pytest
import torch

from deconvis.utils.device import auto_batch_size, batched, resolve_device
from deconvis.errors import DeconvisError


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(DeconvisError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(DeconvisError, match="unknown device"):
        resolve_device("tpu9")


def test_batched_halves_on_oom_and_keeps_every_item():
    seen = []

    def fn(chunk):
        if len(chunk) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        seen.append(len(chunk))
        return chunk * 2

    items = torch.arange(10)
    with pytest.warns(RuntimeWarning, match="retrying"):
        out = batched(fn, items, 8)
    assert torch.equal(torch.cat(out), items * 2)
    assert max(seen) <= 3


def test_batched_gives_clear_error_when_one_item_does_not_fit():
    def fn(chunk):
        raise RuntimeError("out of memory")

    with pytest.raises(DeconvisError, match="single projection"), pytest.warns(RuntimeWarning):
        batched(fn, torch.arange(4), 4, "projection")


def test_batched_reraises_other_errors():
    def fn(chunk):
        raise ValueError("boom")

    with pytest.raises(ValueError):
        batched(fn, torch.arange(4), 2)


def test_auto_batch_size_bounds():
    cpu = torch.device("cpu")
    assert auto_batch_size(1, cpu, cap=64) == 64
    assert auto_batch_size(1 << 50, cpu) == 1
