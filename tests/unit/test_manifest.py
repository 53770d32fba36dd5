"""The run manifest (medtune.reports.manifest): what it records is checked against git, importlib.metadata, the
files themselves and the clock; it holds no environment variable; and a run's status (finished, failed in NN,
running, stopped by SIGTERM or with its process gone) is told right."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

import pytest

from medtune.reports import manifest
from medtune.settings.runs import RunDir

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "params" / "smoke.yaml"
BOOKS = ["00_authenticate", "01_load_quantized_model", "02_check_gpu", "03_format_prompts", "04_baseline"]


@pytest.fixture(scope="module")
def smoke_config():
    from medtune.settings import config

    return config.load(SMOKE)


@pytest.fixture
def make_run(tmp_path, smoke_config):
    """A new run of the smoke profile, made by RunDir.create."""
    return lambda: RunDir.create(smoke_config, tmp_path / "outputs")


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_start_and_finish_record_code_versions_hardware_data_seeds_profile_and_times(tmp_path, make_run):
    run = make_run()
    data = manifest.start(run, SMOKE, BOOKS)
    assert json.loads(run.manifest_path.read_text()) == data
    assert data["status"] == "running" and data["ended_at"] is None and data["notebooks"] == BOOKS
    # the code that runs: this checkout's commit, and whether a tracked file differs from it
    assert data["code"]["git_commit"] == git("rev-parse", "HEAD")
    assert data["code"]["git_dirty"] is bool(git("status", "--porcelain", "--untracked-files=no"))
    assert data["python"]["version"] == platform.python_version()
    assert data["packages"]["torch"] == importlib.metadata.version("torch")
    assert data["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert data["packages"]["nbconvert"] == importlib.metadata.version("nbconvert")
    import torch

    assert data["hardware"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert data["hardware"]["cuda_torch"] == torch.version.cuda and data["hardware"]["cpu_cores"] == os.cpu_count()
    # profile and settings hashed as files
    assert data["profile"] == {"path": "params/smoke.yaml", "sha256": hashlib.sha256(SMOKE.read_bytes()).hexdigest()}
    assert data["config_sha256"] == hashlib.sha256(run.config_path.read_bytes()).hexdigest()
    assert data["seeds"] == {"seed": 42, "sft.seed": 42, "sft.data_seed": None}
    assert data["dataset"]["source"] == "package:medtune/assets/medical_reasoning_illustrative.jsonl"
    assert data["dataset"]["read_from"] == "package" and data["dataset"]["split"] == "train"
    assert data["dataset"]["train_rows"] == {"file": "data/train.jsonl", "rows": None, "sha256": None}  # 03 not run

    # 03 writes the rows during the session: finish fingerprints them
    rows = b'{"row": 1, "text": "a"}\n{"row": 3, "text": "b"}\n{"row": 4, "text": "c"}\n'
    run.train_data_path.write_bytes(rows)
    done = manifest.finish(run, "finished")
    assert done["dataset"]["train_rows"] == {"file": "data/train.jsonl", "rows": 3,
                                             "sha256": hashlib.sha256(rows).hexdigest()}
    assert done["status"] == "finished" and done["notebook"] is None and done["error"] is None
    assert done["started_at"] <= done["ended_at"] and done["ended_at"].endswith("Z")
    assert done["sessions"] == [{"started_at": data["started_at"], "ended_at": done["ended_at"], "status": "finished",
                                 "params": "params/smoke.yaml", "params_sha256": data["profile"]["sha256"],
                                 "resumed": False}]
    assert manifest.status(run) == manifest.RunStatus("finished", None, "finished")


def test_a_resumed_run_keeps_its_start_and_profile_and_adds_a_session(tmp_path, make_run):
    run = make_run()
    first = manifest.start(run, SMOKE, BOOKS)
    manifest.finish(run, "failed", "04_baseline", "PapermillExecutionError")
    assert manifest.status(run).text == "failed in 04_baseline"
    other = tmp_path / "fixed.yaml"
    other.write_text(SMOKE.read_text() + "\n# fixed\n")
    second = manifest.start(run, other, BOOKS, resumed=True)
    assert second["started_at"] == first["started_at"] and second["profile"] == first["profile"]
    assert second["status"] == "running" and second["notebook"] is None and second["error"] is None
    assert [s["resumed"] for s in second["sessions"]] == [False, True]
    assert second["sessions"][0]["status"] == "failed"
    assert second["sessions"][1]["params_sha256"] == hashlib.sha256(other.read_bytes()).hexdigest()


def test_the_manifest_holds_no_environment_variable(make_run, monkeypatch):
    """Tokens live in the environment: nothing of it reaches manifest.json, neither a value nor a name."""
    secret = "hf_manifestCANARY" + "Xy9" * 8
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("MEDTUNE_MANIFEST_CANARY_NAME", "some-value-4471")
    run = make_run()
    manifest.start(run, SMOKE, BOOKS)
    manifest.finish(run, "interrupted", "02_check_gpu", "KeyboardInterrupt")
    text = run.manifest_path.read_text()
    assert secret not in text and "MEDTUNE_MANIFEST_CANARY_NAME" not in text and "some-value-4471" not in text
    assert "HF_TOKEN" not in text and "environ" not in text


def test_git_state_of_a_checkout_clean_dirty_and_none(tmp_path):
    assert manifest.code_version(tmp_path)["git_commit"] == manifest.NOT_A_CHECKOUT
    assert manifest.code_version(tmp_path)["git_dirty"] is None
    repo = tmp_path / "repo"
    repo.mkdir()
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*cmd, "init", "-q"], check=True)
    (repo / "a.py").write_text("x = 1\n")
    subprocess.run([*cmd, "add", "a.py"], check=True)
    subprocess.run([*cmd, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*cmd, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert manifest.code_version(repo)["git_commit"] == head and len(head) == 40
    assert manifest.code_version(repo)["git_dirty"] is False
    (repo / "new.py").write_text("untracked\n")  # untracked files do not count
    assert manifest.code_version(repo)["git_dirty"] is False
    (repo / "a.py").write_text("x = 2\n")
    assert manifest.code_version(repo)["git_dirty"] is True


def test_status_running_stopped_and_no_manifest(tmp_path, make_run):
    run = make_run()
    assert manifest.status(run) == manifest.RunStatus(
        "unknown", None, "no manifest (not run by make run-all); 0 notebooks recorded")
    manifest.start(run, SMOKE, BOOKS)
    run.record("pipeline", {"completed": ["00_authenticate.ipynb", "01_load_quantized_model.ipynb"]})
    assert manifest.status(run) == manifest.RunStatus("running", "02_check_gpu", "running 02_check_gpu")
    # the pipeline's process was killed (no finish): a process that has exited stands in for it
    gone = subprocess.Popen(["true"])
    gone.wait()
    data = json.loads(run.manifest_path.read_text())
    data["process"]["pid"] = gone.pid
    run.manifest_path.write_text(json.dumps(data))
    assert manifest.status(run) == manifest.RunStatus("stopped", "02_check_gpu",
                                                      "stopped in 02_check_gpu (its process is gone)")
    # the pipeline got SIGTERM and recorded it: stopped where it says, and no longer a live run
    manifest.finish(run, "stopped", "02_check_gpu", "Terminated")
    assert manifest.status(run) == manifest.RunStatus("stopped", "02_check_gpu", "stopped in 02_check_gpu (SIGTERM)")
    assert manifest.live_process(run) is None


def test_finish_refuses_an_unknown_status_and_a_run_without_manifest(tmp_path, make_run):
    run = make_run()
    with pytest.raises(ValueError, match="has no manifest.json"):
        manifest.finish(run, "finished")
    manifest.start(run, SMOKE, BOOKS)
    with pytest.raises(ValueError, match="status must be 'finished', 'failed', 'interrupted' or 'stopped', got 'done'"):
        manifest.finish(run, "done")


def test_where_the_dataset_is_read_from():
    assert manifest.read_from({"dataset": "package:medtune/assets/x.jsonl"}) == "package"
    assert manifest.read_from({"dataset": "FreedomIntelligence/medical-o1-reasoning-SFT", "source": "hub"}) == "hub"
    assert manifest.read_from({"dataset": "FreedomIntelligence/medical-o1-reasoning-SFT", "source": "hub",
                               "hub_endpoint": "https://hf-mirror.com"}) == "hub (https://hf-mirror.com)"
    assert manifest.read_from({"dataset": "a/b", "source": "modelscope", "dataset_source": "hub"}) == "hub"
    assert manifest.read_from({"dataset": "a/b", "source": "modelscope"}) == "modelscope"
    assert manifest.read_from({}) is None
