"""Shared fixtures: the real data and tokenizer in ``shared/`` (beside the clone, as CI lays it out) and an
``outputs/`` folder per test.

``MEDTUNE_CACHE`` is left alone on purpose: converted models are kept in the default ``~/.cache/medtune`` so the
tests that load a model reuse them.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Triton kernels run in Triton's interpreter on a machine without a GPU (set before anything imports triton), so the
# CPU suite checks their numerics; on a GPU box they run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared() -> Path:
    """``<clone>/../shared``: the real data and tokenizers. Missing is a failure, never a skip."""
    if not SHARED.is_dir():
        pytest.fail(
            f"shared folder not found at {SHARED}: the tests read real data and the Llama 4 tokenizer from "
            "shared/ beside the clone (see shared/data/README.md). Lay it out there; these tests do not skip.",
            pytrace=False,
        )
    return SHARED


@pytest.fixture(scope="session")
def llama4_tokenizer(shared):
    """The real Llama 4 tokenizer (201,134 tokens; eos ``<|eot|>`` 200008, pad ``<|finetune_right_pad|>`` 200018).

    Session-scoped: tests that change it (padding side, pad token) must work on a copy or restore it.
    """
    from transformers import AutoTokenizer

    folder = shared / "tokenizers" / "llama4"
    if not (folder / "tokenizer.json").is_file():
        pytest.fail(f"Llama 4 tokenizer missing: {folder}/tokenizer.json", pytrace=False)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def outputs(tmp_path, monkeypatch) -> Path:
    """``MEDTUNE_OUTPUTS`` pointed at ``tmp_path/outputs`` for this test; returns that folder (not yet created)."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(root))
    return root


@pytest.fixture(autouse=True)
def _no_autocast_leak():
    """A trainer that fails mid-step (tests/llama4/test_compat.py shows TRL's unpatched Llama 4 failure on purpose)
    leaves CPU autocast (bf16) switched on for the process; later fp32 numerics tests would then compute in bf16."""
    import torch

    yield
    if torch.is_autocast_enabled("cpu"):
        torch.set_autocast_enabled("cpu", False)
