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


# Flags for Chromium in a container with no network (see the env notes on headless Chromium): --no-sandbox because the
# tests may run as root; the background-networking flags stop Chromium's own calls home, which a closed network refuses.
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000")


@pytest.fixture(scope="session")
def browser(tmp_path_factory):
    """A real headless Chromium driven by Selenium (Debian's ``chromium`` and ``chromium-driver``, which ``make test``
    installs). Missing is a failure, never a skip. Session-scoped: tests open their own pages in it."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.fail("headless Chromium not found (chromium and chromedriver on PATH): `make test` installs them "
                    "(apt-get install chromium chromium-driver)", pytrace=False)
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
