"""The headless smoke run that several tests read: all eight notebooks through ``medtune.pipeline`` on the smoke
profile, once per test session, as ``make run-all`` runs them (report at the end)."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from medtune import pipeline
from medtune.settings.runs import RunDir

ROOT = Path(__file__).resolve().parents[2]
CANARY = "hf_medtuneCANARY" + "Zq7" * 10  # looks like a Hub token; must never reach a file
MS_CANARY = "ms-medtuneCANARY" + "4Kp" * 10  # the same for a ModelScope token


@dataclass(frozen=True)
class SmokeRun:
    """The run, everything the pipeline printed (stdout and stderr), and the token canaries that were in the
    environment of every kernel."""

    run: RunDir
    printed: str
    canaries: tuple[str, str] = (CANARY, MS_CANARY)


@pytest.fixture(scope="session")
def headless_smoke_run(tmp_path_factory) -> SmokeRun:
    """``pipeline.run_all(params/smoke.yaml, report=True)`` into a session tmp outputs/ folder, with HF_TOKEN and
    MODELSCOPE_API_TOKEN set to canaries (ModelScope and the Hub are never contacted: the profile is local). A
    failing run fails every test that uses it."""
    outputs = tmp_path_factory.mktemp("smoke") / "outputs"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTUNE_OUTPUTS", str(outputs))
        mp.setenv("HF_TOKEN", CANARY)
        mp.setenv("MODELSCOPE_API_TOKEN", MS_CANARY)
        with redirect_stdout(printed), redirect_stderr(printed):
            run = pipeline.run_all(ROOT / "params" / "smoke.yaml", report=True)
    return SmokeRun(run, printed.getvalue())
