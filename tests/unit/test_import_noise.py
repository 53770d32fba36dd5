"""What importing medtune does to other libraries' output: bitsandbytes' Hub-kernel hint is dropped, nothing else."""

from __future__ import annotations

import logging
import subprocess
import sys

import medtune  # noqa: F401  (installs the filter under test)


def _emitted(msg: str) -> list[str]:
    """Log ``msg`` as a warning through bitsandbytes' CPU-ops logger; returns what reached a handler."""
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(msg, "No module named 'kernels'")
    finally:
        logger.removeHandler(handler)
    return seen


def test_the_hub_kernel_hint_of_bitsandbytes_is_dropped():
    # the exact format string of bitsandbytes 0.50.2 (backends/cpu/ops.py)
    hint = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1")
    assert _emitted(hint) == []


def test_other_bitsandbytes_warnings_still_show():
    assert _emitted("4-bit weights on %s: something else") == ["4-bit weights on No module named 'kernels': "
                                                               "something else"]


def test_importing_bitsandbytes_after_medtune_prints_no_hint():
    out = subprocess.run([sys.executable, "-c", "import medtune, bitsandbytes"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr + out.stdout
