"""The NF4 experts cache is keyed by the checkpoint it was quantized from (issue: a moved ``main`` or an edited
local copy must not reuse a stale cache)."""

from __future__ import annotations

import os

import pytest

from medtune.settings import config
from medtune.stages import modeling


def snapshot(tmp_path, commit):
    folder = tmp_path / "models--meta-llama--Llama-4-Scout-17B-16E-Instruct" / "snapshots" / commit
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return folder


def test_hub_snapshot_is_named_by_its_commit(tmp_path):
    old = snapshot(tmp_path, "7dab2f5f854fe665b6b2f1eccbd3c48e5f627ad8")
    new = snapshot(tmp_path, "92f3b1597a195b523d8d9e5700e57e4fbb8f20d3")
    assert modeling.checkpoint_fingerprint(old) == "7dab2f5f854f"
    cfg = config.load("params/scout.yaml")
    a = modeling.nf4_experts_cache(cfg, False, checkpoint=old)
    b = modeling.nf4_experts_cache(cfg, False, checkpoint=new)
    assert a != b
    assert a.name == "meta-llama--Llama-4-Scout-17B-16E-Instruct--main--7dab2f5f854f-dq0"
    assert modeling.nf4_experts_cache(cfg, True, checkpoint=old).name.endswith("7dab2f5f854f-dq1")


def test_local_folder_changes_its_fingerprint_when_a_weight_file_changes(tmp_path):
    folder = tmp_path / "scout-local"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    shard = folder / "model-00001-of-00002.safetensors"
    shard.write_bytes(b"\0" * 64)
    (folder / "README.md").write_text("notes")
    first = modeling.checkpoint_fingerprint(folder)
    assert len(first) == 12 and int(first, 16) >= 0
    (folder / "README.md").write_text("other notes")  # not a weight or the config: same checkpoint
    assert modeling.checkpoint_fingerprint(folder) == first
    shard.write_bytes(b"\1" * 65)
    assert modeling.checkpoint_fingerprint(folder) != first
    second = modeling.checkpoint_fingerprint(folder)
    os.utime(shard, ns=(1, 1))  # same size, another modification time: a rewrite counts as new
    assert modeling.checkpoint_fingerprint(folder) != second


def test_fingerprint_of_a_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-folder: no such checkpoint folder"):
        modeling.checkpoint_fingerprint(tmp_path / "no-such-folder")
