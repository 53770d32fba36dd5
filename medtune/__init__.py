"""medtune: QLoRA fine-tuning of Llama 4 (and small Llama-architecture models) on medical reasoning.

The notebooks in ``notebooks/`` tell the walkthrough's story; this package holds the logic they call.
Subpackages: ``settings`` (``config``: run settings; ``runs``: the run directory), ``io`` (``sources``: every Hub,
mirror and ModelScope call, and the one parser of source strings), ``stages`` (one module per stage: ``auth``,
``preflight``, ``modeling`` (quantized load), ``hardware`` (GPU check), ``data`` (prompt templates, held-out split),
``train`` (LoRA SFT), ``publish`` (push, model card, merged export)), ``evaluation`` (``heldout``,
``multiple_choice``), ``llama4`` (what is Llama 4 specific); and the modules ``pipeline`` (headless papermill runs),
``compat`` (every workaround for a library bug, in one place) and ``families`` (the one "is this Llama 4" decision).
"""

import logging as _logging
import os as _os
import warnings as _warnings

__version__ = "0.1.0"

# Progress bars: live in JupyterLab they are text bars (no ipywidgets, so the executed copy shows text too, not a
# widget placeholder). In headless runs (the pipeline sets MEDTUNE_HEADLESS=1) the libraries' per-file bars would
# leave hundreds of lines in the report, so they are switched off there; medtune's own bars and the Trainer's
# progress table remain.
_warnings.filterwarnings("ignore", message="IProgress not found")
# transformers 5.23 renamed gradient checkpointing to activation checkpointing; PEFT 0.21.2 and TRL 1.16 still call the
# old names, so every 05-07 report would carry these FutureWarnings about code that is not ours.
_warnings.filterwarnings("ignore", message=r"`(is_)?gradient_checkpointing(_enable)?` is deprecated",
                         category=FutureWarning)


class _DropHubKernelHint(_logging.Filter):
    """Drops bitsandbytes 0.50's "Failed to load CPU gemm_4bit_forward from kernels-community" warning.

    On CPUs with AVX512-BF16 bitsandbytes tries, at import, to fetch a kernel from the Hub with the ``kernels``
    package and, when that package is missing, warns in every notebook. Its own C++ kernel is used instead, which is
    what medtune wants: no code downloaded at import (offline boxes, mainland China)."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "from kernels-community" not in str(record.msg)


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropHubKernelHint())
if _os.environ.get("MEDTUNE_HEADLESS") == "1":
    _os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    _os.environ.setdefault("TQDM_MININTERVAL", "30")
