"""medtune.io.sources, the network seam, offline: a recording fake stands in for the Hub and ModelScope, the real SDK
error types are raised through it, and the real clients are checked against the real SDK signatures without a
single request. Also: where a run's model and dataset are resolved from (modeling.resolve_model, data.load_rows).

The recording fake (``FakeClient``, ``use_fake``) is in tests/helpers.py, shared with test_auth_hub.py,
test_preflight.py and test_hub_roundtrip.py.
"""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import httpx2
import pytest
import requests
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from medtune.io import sources as S
from medtune.settings import config as C
from medtune.stages import data, modeling
from tests.helpers import FakeClient, model_repo, response, use_fake

REPO = Path(__file__).resolve().parents[2]
REAL_ROWS = REPO.parent / "shared" / "data" / "medical-o1" / "medical_o1_sft_en_604.jsonl"
HF_CANARY = "hf_CANARYsources" + "Q" * 24
MS_CANARY = "ms-CANARY" + "7" * 30
MIRROR = "https://hf-mirror.com"


# ---------------------------------------------------------------------------------------------------------------
# No real client; a dataset repo (the recording fake itself: tests/helpers.py)
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def no_real_clients(monkeypatch):
    """A test that forgets to install a fake fails instead of reaching the network."""
    def refuse(endpoint):
        raise AssertionError("a real client was created in a test")

    monkeypatch.setitem(S.CLIENTS, "hub", refuse)
    monkeypatch.setitem(S.CLIENTS, "modelscope", refuse)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)


def dataset_repo(folder: Path, en_rows: int = 12, zh_rows: int = 3) -> Path:
    """A dataset repo laid out like medical-o1-reasoning-SFT: a card whose ``configs:`` name a JSON file each."""
    rows = [json.loads(line) for line in REAL_ROWS.read_text(encoding="utf-8").splitlines()]
    folder.mkdir(parents=True)
    (folder / "medical_o1_sft.json").write_text(json.dumps(rows[:en_rows]), encoding="utf-8")
    (folder / "medical_o1_sft_Chinese.json").write_text(json.dumps(rows[100:100 + zh_rows]), encoding="utf-8")
    (folder / "README.md").write_text(
        "---\nlicense: apache-2.0\nconfigs:\n- config_name: en\n  data_files: medical_o1_sft.json\n"
        "- config_name: zh\n  data_files:\n  - split: train\n    path: medical_o1_sft_Chinese.json\n---\n# card\n",
        encoding="utf-8")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Choosing the source and the endpoint
# ---------------------------------------------------------------------------------------------------------------

def test_hub_endpoint_profile_then_env_then_default(monkeypatch):
    assert S.hub_endpoint() == "https://huggingface.co"
    monkeypatch.setenv("HF_ENDPOINT", "https://env-mirror.example/")
    assert S.hub_endpoint() == "https://env-mirror.example"
    assert S.hub_endpoint(MIRROR + "/") == MIRROR  # the profile's hub_endpoint wins
    assert S.hub_endpoint("hf-mirror.com") == MIRROR


def test_profile_keys_are_validated():
    cfg = C.from_dict({"source": "modelscope", "dataset_source": "hub", "hub_endpoint": MIRROR,
                       "push_to": "modelscope"})
    assert (cfg.source, cfg.dataset_source, cfg.hub_endpoint, cfg.push_to) == \
        ("modelscope", "hub", MIRROR, "modelscope")
    with pytest.raises(C.ConfigError, match="'source' must be one of 'hub', 'modelscope', 'local'"):
        C.from_dict({"source": "hf"})
    with pytest.raises(C.ConfigError, match="hub_endpoint"):
        C.from_dict({"hub_endpoint": "hf-mirror.com"})
    with pytest.raises(C.ConfigError, match="push_to"):
        C.from_dict({"push_to": "local"})


def test_local_specs_need_no_source(monkeypatch):
    cfg = C.load(REPO / "params" / "default.yaml")
    assert S.for_model(cfg) is None and S.for_dataset(cfg) is None  # no client is even created
    with pytest.raises(FileNotFoundError, match="source is 'local'"):
        S.for_spec("meta-llama/Llama-4-Scout-17B-16E-Instruct", "local")


def test_real_hub_client_uses_the_mirror_endpoint():
    client = S.HubClient(MIRROR)
    assert client._api(None).endpoint == MIRROR  # HfApi(endpoint=...), whatever HF_ENDPOINT was at import


def test_modelscope_without_the_sdk_names_the_extra(monkeypatch):
    monkeypatch.setitem(S.CLIENTS, "modelscope", S.ModelScopeClient)
    for name in [m for m in sys.modules if m == "modelscope" or m.startswith("modelscope.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import modelscope -> ImportError
    with pytest.raises(S.MissingExtra) as err:
        S.get("modelscope")
    assert "pip install -e '.[modelscope]'" in str(err.value) and isinstance(err.value, ImportError)


def test_transfer_backend_is_hf_xet_unless_disabled(monkeypatch):
    from huggingface_hub import constants

    assert S.transfer_backend().startswith("hf_xet 1.")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    assert S.transfer_backend() == "HTTP (HF_HUB_DISABLE_XET is set)"


# ---------------------------------------------------------------------------------------------------------------
# The real clients against the real SDK signatures (every SDK entry point replaced by a binding recorder)
# ---------------------------------------------------------------------------------------------------------------

def recorder(real, calls, name, result=None):
    """A stand-in for ``real`` that checks each call binds to ``real``'s signature, records it, returns ``result``."""
    sig = inspect.signature(real)

    def fake(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        calls.append((name, {k: v for k, v in bound.arguments.items() if k != "self"}))
        return result() if callable(result) else result

    return fake


def test_hub_client_calls_huggingface_hub_as_documented(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import HfApi

    calls = []
    info = type("Info", (), {"siblings": [type("S", (), {"rfilename": "model.safetensors", "size": 7})()]})
    monkeypatch.setattr(HfApi, "whoami", recorder(HfApi.whoami, calls, "whoami", {"name": "alice"}))
    monkeypatch.setattr(HfApi, "auth_check", recorder(HfApi.auth_check, calls, "auth_check"))
    monkeypatch.setattr(HfApi, "repo_info", recorder(HfApi.repo_info, calls, "repo_info", info))
    monkeypatch.setattr(HfApi, "create_repo", recorder(HfApi.create_repo, calls, "create_repo", "https://x/me/r"))
    commit = type("Commit", (), {"commit_url": "https://x/me/r/commit/1"})()
    monkeypatch.setattr(HfApi, "upload_folder", recorder(HfApi.upload_folder, calls, "upload_folder", commit))
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        recorder(huggingface_hub.snapshot_download, calls, "snapshot_download", str(tmp_path)))
    c = S.HubClient(MIRROR)
    assert c.whoami(HF_CANARY) == "alice"
    c.auth_check("org/m", "model", None, HF_CANARY)
    assert c.files("org/m", "model", "abc", HF_CANARY) == {"model.safetensors": 7}
    got = c.snapshot_download("org/d", "dataset", None, None, allow_patterns=["README.md"],
                              progress=S._progress_class())
    assert got == str(tmp_path)
    assert c.create_repo("me/r", True, HF_CANARY) == "https://x/me/r"
    assert c.upload_folder("me/r", str(tmp_path), "medtune run x", HF_CANARY) == "https://x/me/r/commit/1"
    got = dict(calls)
    assert got["auth_check"] == {"repo_id": "org/m", "repo_type": "model"}
    assert got["repo_info"] == {"repo_id": "org/m", "repo_type": "model", "revision": "abc", "files_metadata": True}
    assert got["snapshot_download"]["endpoint"] == MIRROR and got["snapshot_download"]["repo_type"] == "dataset"
    assert issubclass(got["snapshot_download"]["tqdm_class"], __import__("tqdm").std.tqdm)
    assert got["create_repo"] == {"repo_id": "me/r", "private": True, "repo_type": "model", "exist_ok": True}
    assert got["upload_folder"]["repo_type"] == "model" and got["upload_folder"]["commit_message"] == "medtune run x"


def test_modelscope_client_calls_the_sdk_as_documented(monkeypatch, tmp_path):
    import importlib

    from modelscope.hub.api import HubApi
    from modelscope_hub.api import HubApi as InnerApi  # what modelscope's HubApi forwards whoami/list_repo_files to

    # the module (modelscope.hub re-exports a function of the same name)
    sd = importlib.import_module("modelscope.hub.snapshot_download")
    calls = []
    user = type("UserInfo", (), {"username": "li"})()
    listed = [type("FileInfo", (), {"path": "model.safetensors", "size": 9, "type": "blob"})(),
              type("FileInfo", (), {"path": "sub", "size": 0, "type": "tree"})()]
    monkeypatch.setattr(InnerApi, "whoami", recorder(InnerApi.whoami, calls, "whoami", user))
    monkeypatch.setattr(InnerApi, "list_repo_files",
                        recorder(InnerApi.list_repo_files, calls, "list_repo_files", listed))
    monkeypatch.setattr(HubApi, "create_repo", recorder(HubApi.create_repo, calls, "create_repo"))
    monkeypatch.setattr(HubApi, "upload_folder", recorder(HubApi.upload_folder, calls, "upload_folder"))
    monkeypatch.setattr(sd, "snapshot_download",
                        recorder(sd.snapshot_download, calls, "snapshot_download", str(tmp_path)))
    monkeypatch.setattr(sd, "dataset_snapshot_download",
                        recorder(sd.dataset_snapshot_download, calls, "dataset_snapshot_download", str(tmp_path)))
    c = S.ModelScopeClient()
    assert c.whoami(MS_CANARY) == "li"
    assert c.files("LLM-Research/Llama-4-Scout-17B-16E-Instruct", "model", None, MS_CANARY) == {"model.safetensors": 9}
    c.auth_check("LLM-Research/Llama-4-Scout-17B-16E-Instruct", "model", None, None)
    c.snapshot_download("LLM-Research/Llama-4-Scout-17B-16E-Instruct", "model", None, MS_CANARY,
                        ignore_patterns=["*.bin"])
    c.snapshot_download("org/ds", "dataset", None, None, allow_patterns=["README.md"])
    assert c.create_repo("me/r", True, MS_CANARY).endswith("/models/me/r")
    c.upload_folder("me/r", str(tmp_path), "medtune run x", MS_CANARY)
    got = dict(calls)
    assert got["list_repo_files"]["repo_type"] == "model"
    assert got["snapshot_download"]["model_id"] == "LLM-Research/Llama-4-Scout-17B-16E-Instruct"
    assert got["snapshot_download"]["ignore_patterns"] == ["*.bin"] and got["snapshot_download"]["token"] == MS_CANARY
    assert got["dataset_snapshot_download"]["dataset_id"] == "org/ds"
    assert got["create_repo"]["visibility"] == "private" and got["create_repo"]["exist_ok"] is True
    assert got["upload_folder"]["repo_id"] == "me/r"


# ---------------------------------------------------------------------------------------------------------------
# One actionable message per failure, from the real SDK error types
# ---------------------------------------------------------------------------------------------------------------

HUB_FAILURES = [
    # (id, method, error, token set, expected class, words the message must hold)
    ("401-rejected", "auth_check", HfHubHTTPError("401 Unauthorized", response=response(401)), True,
     S.TokenError, ["rejected HF_TOKEN", "HTTP 401", "settings/tokens", "export HF_TOKEN"]),
    ("401-unset", "auth_check", HfHubHTTPError("401 Unauthorized", response=response(401)), False,
     S.TokenError, ["HF_TOKEN is not set", "settings/tokens"]),
    ("401-private-or-missing", "auth_check", RepositoryNotFoundError("nope", response=response(401)), False,
     S.RepoNotFound, ["not found", "private", "HF_TOKEN is not set"]),
    ("gated-no-token", "auth_check", GatedRepoError("gated", response=response(401)), False,
     S.TokenError, ["gated", "HF_TOKEN is not set", "https://huggingface.co/org/model", "license"]),
    ("gated-403", "auth_check", GatedRepoError("gated", response=response(403)), True,
     S.AccessDenied, ["no access to the gated", "accept the license", "https://huggingface.co/org/model"]),
    ("403", "auth_check", HfHubHTTPError("403", response=response(403)), True, S.AccessDenied, ["HTTP 403"]),
    ("404", "auth_check", RepositoryNotFoundError("nope", response=response(404)), True,
     S.RepoNotFound, ["not found", "HTTP 404", "Check the id"]),
    ("revision", "auth_check", RevisionNotFoundError("no rev", response=response(404)), True,
     S.RepoNotFound, ["revision", "model_revision"]),
    ("429", "auth_check", HfHubHTTPError("429 Too Many Requests", response=response(429)), False,
     S.RateLimited, ["HTTP 429", "Wait a few minutes", "resumes", "HF_TOKEN set get higher limits"]),
    ("503", "auth_check", HfHubHTTPError("503", response=response(503)), True,
     S.ServiceUnavailable, ["HTTP 503", "run again later"]),
    ("connect", "auth_check", httpx2.ConnectError("[Errno -3] name resolution failed"), True,
     S.NetworkDown, ["cannot reach", "ConnectError", "hf-mirror.com", "source: modelscope", "resumes"]),
    ("timeout", "auth_check", httpx2.ReadTimeout("timed out"), True, S.NetworkDown, ["cannot reach", "ReadTimeout"]),
    ("requests", "auth_check", requests.exceptions.ConnectionError("down"), True, S.NetworkDown, ["cannot reach"]),
    ("builtin-timeout", "auth_check", TimeoutError("slow"), True, S.NetworkDown, ["cannot reach", "TimeoutError"]),
    ("offline", "auth_check", OfflineModeIsEnabled("HF_HUB_OFFLINE=1"), True, S.NetworkDown,
     ["not in the local cache"]),
    ("not-cached", "auth_check", LocalEntryNotFoundError("cannot find"), True, S.NetworkDown,
     ["not in the local cache"]),
]


@pytest.mark.parametrize("case", HUB_FAILURES, ids=[c[0] for c in HUB_FAILURES])
def test_hub_failures_become_one_actionable_error(case, monkeypatch, tmp_path, capsys):
    _, method, error, token, cls, words = case
    if token:
        monkeypatch.setenv("HF_TOKEN", HF_CANARY)
    fake = use_fake(monkeypatch, FakeClient(tmp_path, errors={method: error}))
    with pytest.raises(cls) as err:
        S.get("hub", MIRROR).check_read("org/model")
    msg = str(err.value)
    for word in words:
        assert word in msg, (word, msg)
    assert HF_CANARY not in msg and HF_CANARY not in capsys.readouterr().out
    assert err.value.__cause__ is None and err.value.__suppress_context__  # the SDK's own text is dropped
    assert err.value.source == "hub" and err.value.repo_id == "org/model"
    assert fake.calls[0][1]["token"] == (HF_CANARY if token else None)


def test_push_refused_for_lack_of_write_access(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", HF_CANARY)
    use_fake(monkeypatch, FakeClient(tmp_path, errors={"create_repo": HfHubHTTPError("403", response=response(403))}))
    with pytest.raises(S.AccessDenied, match="may not write to me/repo .*write access"):
        S.get("hub").push_folder(tmp_path, "me/repo", commit_message="m")


def test_push_without_token_names_the_variable(monkeypatch, tmp_path):
    fake = use_fake(monkeypatch, FakeClient(tmp_path), "modelscope")
    with pytest.raises(S.TokenError, match="MODELSCOPE_API_TOKEN is not set.*modelscope.cn/my/myaccesstoken"):
        S.get("modelscope").push_folder(tmp_path, "me/repo", commit_message="m")
    assert fake.calls == []  # nothing was sent


def test_modelscope_failures_from_its_error_types(monkeypatch, tmp_path):
    from modelscope_hub import errors as E

    monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_CANARY)
    cases = [(E.AuthenticationError("bad token", status_code=401), S.TokenError, "MODELSCOPE_API_TOKEN"),
             (E.PermissionDeniedError("denied", status_code=403), S.AccessDenied, "HTTP 403"),
             (E.NotExistError("missing", status_code=404), S.RepoNotFound,
              "LLM-Research/Llama-4-Scout-17B-16E-Instruct"),
             (E.RateLimitError("slow down"), S.RateLimited, "HTTP 429"),
             (E.NetworkError("unreachable"), S.NetworkDown, "cannot reach"),
             (E.RequestTimeoutError("timeout"), S.NetworkDown, "cannot reach")]
    for error, cls, word in cases:
        use_fake(monkeypatch, FakeClient(tmp_path, endpoint="https://www.modelscope.cn", errors={"files": error}),
                 "modelscope")
        with pytest.raises(cls) as err:
            S.get("modelscope").files("LLM-Research/Llama-4-Scout-17B-16E-Instruct")
        assert word in str(err.value) and MS_CANARY not in str(err.value), (cls, str(err.value))
        assert "modelscope.cn" in str(err.value)


def test_other_errors_pass_through_unchanged(monkeypatch, tmp_path):
    use_fake(monkeypatch, FakeClient(tmp_path, errors={"files": ValueError("a bug, not the network")}))
    with pytest.raises(ValueError, match="a bug"):
        S.get("hub").files("org/model")


# ---------------------------------------------------------------------------------------------------------------
# Downloads: one copy of the weights, sizes stated first, progress, resume from the cache when offline
# ---------------------------------------------------------------------------------------------------------------

def test_model_download_takes_one_copy_of_the_weights_and_states_its_size(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_TOKEN", HF_CANARY)
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache", repos={("model", "org/m"): model_repo(tmp_path / "m")}))
    cfg = C.from_dict({"model": "org/m", "hub_endpoint": MIRROR, "model_revision": "v1"})
    folder = Path(modeling.resolve_model(cfg))
    got = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert got == ["README.md", "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                   "tokenizer.json", "tokenizer_config.json"]
    assert fake.endpoint == MIRROR and fake.methods() == ["files", "snapshot_download"]
    call = fake.calls[1][1]
    assert call["revision"] == "v1" and call["token"] == HF_CANARY and "original/*" in call["ignore_patterns"]
    out = capsys.readouterr().out
    assert f"org/m from {MIRROR}: 6 files, 0.00 GB" in out and "free:" in out and "transfer: hf_xet" in out
    assert HF_CANARY not in out


def test_download_warns_when_the_disk_is_too_small(monkeypatch, tmp_path, capsys):
    use_fake(monkeypatch, FakeClient(tmp_path / "cache", repos={("model", "org/m"): model_repo(tmp_path / "m")}))
    monkeypatch.setattr(S, "free_bytes", lambda path: 10)
    S.get("hub").download_model("org/m")
    assert "WARNING: the disk" in capsys.readouterr().out


def test_offline_download_reuses_the_cached_copy(monkeypatch, tmp_path, capsys):
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache", repos={("model", "org/m"): model_repo(tmp_path / "m")}))
    first = S.get("hub").download_model("org/m")
    fake.errors["files"] = httpx2.ConnectError("network is unreachable")
    again = S.get("hub").download_model("org/m")
    assert again == first and "unreachable; using the copy of org/m downloaded earlier" in capsys.readouterr().out
    assert fake.calls[-1][1]["local_files_only"] is True
    fake.errors["files"] = httpx2.ConnectError("network is unreachable")
    with pytest.raises(S.NetworkDown):  # nothing cached for another repo
        fake.repos[("model", "org/other")] = tmp_path / "m"
        S.get("hub").download_model("org/other")


def test_hf_hub_offline_skips_the_listing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache", repos={("model", "org/m"): model_repo(tmp_path / "m")}))
    S.get("hub").download_model("org/m")
    assert fake.methods() == ["snapshot_download"]


def test_select_model_files():
    ignore, kept = S.select_model_files({"a.safetensors": 1, "pytorch_model.bin": 1, "original/x.pth": 1,
                                         "tok.json": 1})
    assert set(kept) == {"a.safetensors", "tok.json"} and "*.bin" in ignore
    ignore, kept = S.select_model_files({"pytorch_model.bin": 1, "model.gguf": 1})  # no safetensors: keep the .bin
    assert set(kept) == {"pytorch_model.bin"}


def test_dataset_files_from_the_card():
    text = ("---\nconfigs:\n- config_name: en\n  data_files: a.json\n- config_name: zh\n  data_files:\n"
            "  - split: train\n    path: [z1.json, z2.json]\n- config_name: mix\n  data_files: [m1.json, m2.json]\n"
            "  default: true\n---\n")
    assert S.dataset_files(text, "en") == ["a.json"]
    assert S.dataset_files(text, "zh") == ["z1.json", "z2.json"]
    assert S.dataset_files(text, None) == ["m1.json", "m2.json"]
    assert S.dataset_files(text, "fr") is None and S.dataset_files("# no metadata", "en") is None


def test_load_rows_from_a_hub_mirror_downloads_only_the_config(monkeypatch, tmp_path):
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache",
                                            repos={("dataset", "Org/medical"): dataset_repo(tmp_path / "ds")}))
    rows = data.load_rows("Org/medical", "en", "train", max_rows=10, source="hub", endpoint=MIRROR)
    assert len(rows) == 10 and set(rows[0]) == {"Question", "Complex_CoT", "Response"}
    expected = [json.loads(line) for line in REAL_ROWS.read_text(encoding="utf-8").splitlines()][:10]
    assert rows == expected
    assert fake.endpoint == MIRROR
    downloads = [c for m, c in fake.calls if m == "snapshot_download"]
    assert [d["allow_patterns"] for d in downloads] == [["README.md"], ["README.md", "medical_o1_sft.json"]]
    assert all(d["repo_type"] == "dataset" for d in downloads)
    cached = tmp_path / "cache" / "dataset" / "Org--medical"
    assert not (cached / "medical_o1_sft_Chinese.json").exists()  # the zh file was never fetched
    zh = data.load_rows("Org/medical", "zh", source="hub")
    assert len(zh) == 3


def test_prepare_uses_the_profile_source(monkeypatch, tmp_path):
    """data.prepare hands dataset_source/hub_endpoint to the download; ModelScope serves the dataset here."""
    from medtune.settings.runs import RunDir

    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache", endpoint="https://www.modelscope.cn",
                                            repos={("dataset", "Org/medical"): dataset_repo(tmp_path / "ds")}),
                    "modelscope")
    cfg = C.load(REPO / "params" / "smoke.yaml").replace(dataset="Org/medical", dataset_config="en",
                                                         dataset_source="modelscope", max_rows=None)
    run = RunDir.create(cfg, root=tmp_path / "outputs")
    tok = type("Tok", (), {"eos_token": "<|im_end|>"})()
    summary = data.prepare(cfg, run, tok)
    assert summary["rows"] == 12 and summary["heldout"] == 4
    assert fake.methods()[0] == "files" and fake.calls[0][1]["repo_type"] == "dataset"


def test_local_source_refuses_ids(tmp_path):
    with pytest.raises(data.DataError, match="source is 'local'"):
        data.load_rows("Org/medical", source="local")
    with pytest.raises(FileNotFoundError, match="source is 'local'"):
        modeling.resolve_model(C.from_dict({"model": "org/m", "source": "local"}))


def test_local_dataset_folder_with_its_card(tmp_path):
    rows = data.load_rows(str(dataset_repo(tmp_path / "downloaded")), "zh", source="local")
    assert len(rows) == 3


def test_tokenizer_alone_downloads_only_tokenizer_files(monkeypatch, tmp_path):
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache", repos={("model", "org/m"): model_repo(tmp_path / "m")}))
    with pytest.raises(Exception):  # noqa: B017 -- the fake tokenizer.json is empty (any error); what was fetched matters
        modeling.load_tokenizer("org/m")
    assert fake.calls[-1][1]["allow_patterns"] == modeling.TOKENIZER_FILES
    cached = tmp_path / "cache" / "model" / "org--m"
    assert not any(p.suffix in (".safetensors", ".bin") for p in cached.rglob("*"))


@pytest.mark.parametrize("value", [HF_CANARY + "\n" + HF_CANARY, HF_CANARY[:10] + " " + HF_CANARY[10:], "hf_a\tb"])
def test_token_with_whitespace_inside_is_named_not_blamed_on_the_network(value, monkeypatch):
    """A pasted line break inside HF_TOKEN made the HTTP client fail ("LocalProtocolError") and the message blamed
    the network. Surrounding whitespace is still stripped; the value itself is never shown."""
    monkeypatch.setenv("HF_TOKEN", value)
    with pytest.raises(S.TokenError) as err:
        S.get_token("hub")
    assert "HF_TOKEN holds a space or line break inside the token" in str(err.value)
    assert "export HF_TOKEN=<token>" in str(err.value) and HF_CANARY not in str(err.value)
    monkeypatch.setenv("HF_TOKEN", f"  {HF_CANARY}\n")
    assert S.get_token("hub") == HF_CANARY


def test_network_failure_while_checking_the_token_reads_well(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", HF_CANARY)
    use_fake(monkeypatch, FakeClient(tmp_path, errors={"whoami": httpx2.ConnectError("down")}))
    with pytest.raises(S.NetworkDown) as err:
        S.get("hub", MIRROR).whoami()
    assert "while checking the token (ConnectError)" in str(err.value)


def test_benchmarks_from_the_hub_go_through_the_seam_and_the_profile_mirror(monkeypatch, tmp_path):
    """A benchmark given as a Hub id is downloaded like the training data: through medtune.io.sources, from the
    profile's hub_endpoint (or ModelScope), with its card selecting the split's file; then read locally."""
    from medtune.evaluation import multiple_choice as B

    medqa = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks" / "medqa_usmle_4op_test.jsonl"
    repo = tmp_path / "medqa"
    repo.mkdir()
    (repo / "test.jsonl").write_text("".join(medqa.read_text(encoding="utf-8").splitlines(True)[:5]), encoding="utf-8")
    (repo / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: test\n"
                                    "    path: test.jsonl\n---\n# MedQA\n", encoding="utf-8")
    fake = use_fake(monkeypatch, FakeClient(tmp_path / "cache", repos={("dataset", "Org/medqa"): repo}))
    cfg = C.from_dict({"hub_endpoint": MIRROR, "benchmarks": {"medqa": "Org/medqa"}})
    items = B.read_benchmark("Org/medqa", split="test", remote=B._remote(cfg, "Org/medqa"))
    assert len(items) == 5 and fake.endpoint == MIRROR
    assert [c["repo_type"] for m, c in fake.calls if m == "snapshot_download"] == ["dataset", "dataset"]
    assert B._remote(cfg, "package:medtune/assets/mc_medqa_style_illustrative.jsonl") is None  # local: no client
    with pytest.raises(B.BenchmarkError, match="source is 'local'"):
        B._remote(cfg.replace(source="local"), "Org/medqa")
    fake.errors.update(files=httpx2.ConnectError("down"), snapshot_download=httpx2.ConnectError("down"))
    with pytest.raises(B.BenchmarkError) as err:  # one actionable message, from the seam's translation
        B.read_benchmark("Org/pubmedqa", split="test", remote=B._remote(cfg, "Org/pubmedqa"))
    assert str(err.value).startswith("benchmark 'Org/pubmedqa': cannot reach https://hf-mirror.com")
