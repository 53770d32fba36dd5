"""medtune.settings.runs: run folders are new each time and never overwritten, ``latest`` is the newest, ``record``
merges, and ``session`` (the first call of every notebook) creates, continues, or refuses."""

from __future__ import annotations

import datetime as dt
import json
import types
from pathlib import Path

import pytest
import yaml

from medtune.settings import config as C
from medtune.settings import runs as R
from medtune.settings.runs import RunDir

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "params" / "smoke.yaml"


@pytest.fixture
def cfg() -> C.RunConfig:
    return C.load(SMOKE)


def test_create_makes_a_new_folder_each_call(tmp_path, cfg):
    a = RunDir.create(cfg, root=tmp_path)
    b = RunDir.create(cfg, root=tmp_path)
    assert a.path != b.path
    assert a.path.parent == b.path.parent == tmp_path
    for run in (a, b):
        assert run.path.is_dir() and (run.path / "data").is_dir()
        assert run.config_path == run.path / "config.yaml"
        assert C.load(run.config_path) == cfg
        assert run.config() == cfg
        assert "-smoke-" in run.run_id
        assert run.run_id == run.path.name and str(run) == str(run.path)


def test_run_ids_are_distinct(tmp_path, cfg):
    ids = [RunDir.create(cfg, root=tmp_path).run_id for _ in range(5)]
    assert len(set(ids)) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ids)


def test_create_never_overwrites(tmp_path, cfg, monkeypatch):
    """Same time and same random part: the second create fails and the first run is untouched."""
    fixed = dt.datetime(2026, 11, 29, 12, 0, 0, tzinfo=dt.UTC)
    monkeypatch.setattr(R, "_dt", types.SimpleNamespace(datetime=types.SimpleNamespace(now=lambda tz=None: fixed),
                                                        timezone=dt.timezone, UTC=dt.UTC))
    monkeypatch.setattr(R.secrets, "token_hex", lambda n: "abcdef")
    first = RunDir.create(cfg, root=tmp_path)
    (first.path / "marker").write_text("kept", encoding="utf-8")
    with pytest.raises(FileExistsError):
        RunDir.create(cfg.replace(seed=1), root=tmp_path)
    assert (first.path / "marker").read_text(encoding="utf-8") == "kept"
    assert first.config().seed == 42
    assert [p.name for p in tmp_path.iterdir()] == [first.run_id]


def test_create_under_outputs_env(outputs, cfg):
    run = RunDir.create(cfg)
    assert run.path.parent == outputs.resolve()
    assert R.outputs_root() == outputs.resolve()


def test_outputs_root_default_is_project_outputs(monkeypatch):
    monkeypatch.delenv("MEDTUNE_OUTPUTS", raising=False)
    monkeypatch.chdir(REPO / "notebooks")
    assert R.project_root() == REPO
    assert R.outputs_root() == REPO / "outputs"


def test_artifact_paths_are_inside_the_run(tmp_path, cfg):
    run = RunDir.create(cfg, root=tmp_path)
    expected = {
        "metrics_path": "metrics.json", "notebooks_dir": "notebooks", "heldout_path": "data/heldout.jsonl",
        "train_data_path": "data/train.jsonl", "baseline_path": "baseline.jsonl",
        "finetuned_path": "finetuned.jsonl", "checkpoints_dir": "checkpoints", "adapter_dir": "adapter",
        "train_log_path": "train_log.json", "loss_curve_path": "loss_curve.png", "push_dir": "push",
    }
    for attr, rel in expected.items():
        assert getattr(run, attr) == run.path / rel, attr


def test_open_existing_and_non_run(tmp_path, cfg):
    run = RunDir.create(cfg, root=tmp_path)
    assert RunDir.open(run.path) == run
    assert RunDir.open(str(run.path)).config() == cfg
    not_a_run = tmp_path / "plain"
    not_a_run.mkdir()
    with pytest.raises(FileNotFoundError) as err:
        RunDir.open(not_a_run)
    assert "RUN_DIR" in str(err.value) and str(not_a_run) in str(err.value)
    with pytest.raises(FileNotFoundError, match="RUN_DIR"):
        RunDir.open(tmp_path / "does-not-exist")


def test_latest_is_the_newest(tmp_path, cfg):
    assert RunDir.latest(tmp_path / "none-yet") is None
    assert RunDir.latest(tmp_path) is None
    (tmp_path / "not-a-run").mkdir()  # folders without config.yaml are not runs
    created = []
    for i in range(5):  # within one second: the order must still be creation order
        created.append(RunDir.create(cfg.replace(seed=i), root=tmp_path))
        assert RunDir.latest(tmp_path) == created[-1], f"after creating run {i}"
    assert RunDir.latest(tmp_path).config().seed == 4


def test_latest_orders_by_time_not_profile(tmp_path, cfg):
    """Runs of different profiles: the newest wins, whatever its profile's name sorts as."""
    smoke = RunDir.create(cfg, root=tmp_path)
    default = RunDir.create(cfg.replace(profile="default"), root=tmp_path)  # "default" < "smoke" alphabetically
    assert RunDir.latest(tmp_path) == default
    zulu = RunDir.create(cfg.replace(profile="zulu"), root=tmp_path)
    assert RunDir.latest(tmp_path) == zulu
    assert smoke != default != zulu


def test_record_merges_sections(tmp_path, cfg):
    run = RunDir.create(cfg, root=tmp_path)
    assert run.metrics() == {}
    assert run.record("baseline", {"loss": 2.5, "tokens": 100}) == {"loss": 2.5, "tokens": 100}
    assert run.record("baseline", {"loss": 2.25, "perplexity": 9.49}) == {"loss": 2.25, "tokens": 100,
                                                                           "perplexity": 9.49}
    run.record("train", {"adapter": run.adapter_dir, "steps": 4})
    data = json.loads(run.metrics_path.read_text(encoding="utf-8"))
    assert data == {"baseline": {"loss": 2.25, "tokens": 100, "perplexity": 9.49},
                    "train": {"adapter": str(run.adapter_dir), "steps": 4}}
    assert run.metrics() == data
    assert list(run.path.glob("*.tmp")) == []
    run.record("notes", {"text": "发热"})
    assert "发热" in run.metrics_path.read_text(encoding="utf-8")


def test_record_is_shared_between_handles(tmp_path, cfg):
    run = RunDir.create(cfg, root=tmp_path)
    run.record("a", {"x": 1})
    RunDir.open(run.path).record("b", {"y": 2})
    assert run.metrics() == {"a": {"x": 1}, "b": {"y": 2}}


# ---------------------------------------------------------------------------------------------------------------
# session
# ---------------------------------------------------------------------------------------------------------------

def test_session_new_run_then_latest(outputs, capsys):
    cfg, run = R.session(str(SMOKE), "", new_run=True)
    assert cfg == C.load(SMOKE)
    assert run.path.parent == outputs.resolve()
    assert run.config() == cfg
    printed = capsys.readouterr().out
    assert str(run.path) in printed and "profile: smoke" in printed

    cfg2, run2 = R.session(str(SMOKE), "")
    assert run2 == run and cfg2 == cfg
    assert len(list(outputs.iterdir())) == 1  # continuing made no new run


def test_session_explicit_run_dir(outputs):
    _, first = R.session(str(SMOKE), "", new_run=True)
    _, second = R.session(str(SMOKE), "", new_run=True)
    assert first != second
    _, opened = R.session(str(SMOKE), str(first.path))
    assert opened == first
    assert R.session(str(SMOKE), "")[1] == second
    with pytest.raises(FileNotFoundError, match="RUN_DIR"):
        R.session(str(SMOKE), str(outputs / "nope"))


def test_session_without_runs(outputs):
    with pytest.raises(FileNotFoundError) as err:
        R.session(str(SMOKE), "")
    assert str(outputs.resolve()) in str(err.value)
    assert "notebook 00" in str(err.value)


def test_session_overrides_apply_for_the_notebook_only(outputs):
    cfg, run = R.session(str(SMOKE), "", new_run=True, max_new_tokens=5, seed=None, hub_repo_id=None)
    assert cfg.max_new_tokens == 5
    assert cfg.seed == 42 and cfg.hub_repo_id is None
    assert run.config().max_new_tokens == 24  # the run's config.yaml keeps the profile's value
    assert yaml.safe_load(run.config_path.read_text(encoding="utf-8"))["max_new_tokens"] == 24
    cfg2, _ = R.session(str(SMOKE), "", language="zh")
    assert cfg2.language == "zh" and cfg2.max_new_tokens == 24
    with pytest.raises(C.ConfigError, match="Did you mean 'max_new_tokens'"):
        R.session(str(SMOKE), "", max_new_token=5)


def test_session_existing_run_keeps_its_config(outputs, tmp_path):
    _, run = R.session(str(SMOKE), "", new_run=True)
    other = tmp_path / "other.yaml"
    C.dump(C.load(SMOKE).replace(max_new_tokens=99), other)
    cfg, same = R.session(str(other), "")  # params is only used to create a run
    assert same == run and cfg.max_new_tokens == 24


def test_session_resolves_relative_params(outputs, monkeypatch):
    monkeypatch.chdir(REPO / "notebooks")
    cfg, _ = R.session("../params/smoke.yaml", "", new_run=True)
    assert cfg.profile == "smoke"
    cfg, _ = R.session("params/smoke.yaml", "", new_run=True)  # from the root's point of view
    assert cfg.profile == "smoke"
    with pytest.raises(C.ConfigError, match="profile not found"):
        R.session("params/no-such-profile.yaml", "", new_run=True)


def test_record_resources_and_table(tmp_path, cfg):
    """Each notebook's kernel records its wall time and peaks; the table lists them in run order with the total."""
    import time

    import psutil

    run = RunDir.create(cfg, root=tmp_path)
    assert run.resources_table() == "No notebook of this run has recorded its resources yet."
    ballast = bytearray(64 * 2**20)  # 64 MiB touched: the peak RSS must count it
    ballast[:: 4096] = b"x" * len(ballast[:: 4096])
    res = run.record_resources("01_load_quantized_model")
    r = res["01_load_quantized_model"]
    age = psutil.Process().create_time()
    assert 0 < r["wall_s"] <= time.time() - age + 1
    assert r["peak_gpu_gib"] is None  # this test process never initialized CUDA
    assert r["peak_rss_gib"] >= psutil.Process().memory_info().rss / 2**30 - 0.01 > 64 / 1024
    run.record("resources", {"00_authenticate": {"wall_s": 30.0, "peak_gpu_gib": 1.5, "peak_rss_gib": 0.75}})
    lines = run.resources_table().splitlines()
    assert lines[0] == "| notebook | wall time (min) | peak GPU memory (GiB) | peak CPU RSS (GiB) |"
    assert lines[2] == "| 00_authenticate | 0.50 | 1.50 | 0.75 |"
    assert lines[3].startswith(f"| 01_load_quantized_model | {r['wall_s'] / 60:.2f} | - | ")
    assert lines[4] == f"| total | {(30.0 + r['wall_s']) / 60:.2f} | | |"
    del ballast
    with pytest.raises(ValueError, match="notebook's name such as '04_baseline'"):
        run.record_resources("04_baseline.ipynb")


def test_peak_rss_is_the_kernels_own_not_its_parents():
    """A notebook kernel started by a large process (here this test, made 400 MB larger) reports its own peak RSS:
    Linux's ru_maxrss would report at least the parent's size (the forked copy before exec)."""
    import subprocess
    import sys

    ballast = bytearray(400 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])  # touch every page: resident
    out = subprocess.run([sys.executable, "-c", "import json; from medtune.settings.runs import peak_resources; "
                          "print(json.dumps(peak_resources()))"], capture_output=True, text=True, check=True)
    import json

    child = json.loads(out.stdout)
    assert 0 < child["peak_rss_gib"] < 0.3, child  # a bare interpreter with medtune.settings: ~20-100 MB
    del ballast
