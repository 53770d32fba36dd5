"""Test doubles shared by the test modules: the recording fake that stands in for the Hub and ModelScope clients of
:mod:`medtune.io.sources` (``FakeClient``, installed with ``use_fake``), HTTP responses for the SDK's error types
(``response``) and a model repo laid out as the Hub lists it (``model_repo``).

Imported as ``from tests.helpers import ...`` (``tests`` is a package; pytest puts the project folder on the path).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx2
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

from medtune.io import sources as S


class FakeClient:
    """Stands in for :class:`medtune.io.sources.Client`: records every call as ``(method, kwargs)`` in ``calls``.

    ``repos`` maps ``(repo_type, repo_id)`` to a local folder served as that repo (snapshot_download copies the files
    that the patterns select into ``cache``, with huggingface_hub's own pattern filter); ``errors`` maps a method
    name to an exception it raises; ``upload_folder`` keeps a copy of what was uploaded, which becomes a repo that
    can be downloaded back.
    """

    def __init__(self, cache: Path, endpoint: str = "https://hub.invalid", repos: dict | None = None,
                 errors: dict | None = None, user: str = "alice"):
        self.cache, self.endpoint, self.user = Path(cache), endpoint, user
        self.repos = dict(repos or {})
        self.errors = dict(errors or {})
        self.calls: list[tuple[str, dict]] = []

    def _record(self, method: str, **kwargs):
        self.calls.append((method, kwargs))
        if method in self.errors:
            raise self.errors[method]

    def _folder(self, repo_id, repo_type) -> Path:
        folder = self.repos.get((repo_type, repo_id))
        if folder is None:
            raise RepositoryNotFoundError(f"{repo_id} not found", response=response(404))
        return Path(folder)

    def whoami(self, token):
        self._record("whoami", token=token)
        return self.user

    def auth_check(self, repo_id, repo_type, revision, token):
        self._record("auth_check", repo_id=repo_id, repo_type=repo_type, revision=revision, token=token)
        self._folder(repo_id, repo_type)

    def files(self, repo_id, repo_type, revision, token):
        self._record("files", repo_id=repo_id, repo_type=repo_type, revision=revision, token=token)
        folder = self._folder(repo_id, repo_type)
        return {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}

    def snapshot_download(self, repo_id, repo_type, revision, token, *, allow_patterns=None, ignore_patterns=None,
                          local_files_only=False, progress=None):
        from huggingface_hub.utils import filter_repo_objects

        self._record("snapshot_download", repo_id=repo_id, repo_type=repo_type, revision=revision, token=token,
                     allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                     local_files_only=local_files_only, progress=progress)
        folder = self._folder(repo_id, repo_type)
        out = self.cache / repo_type / repo_id.replace("/", "--")
        if local_files_only:
            if not out.is_dir():
                raise LocalEntryNotFoundError("not in the cache")
            return str(out)
        names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(folder / name, out / name)
        out.mkdir(parents=True, exist_ok=True)
        return str(out)

    def create_repo(self, repo_id, private, token):
        self._record("create_repo", repo_id=repo_id, private=private, token=token)
        return f"{self.endpoint}/{repo_id}"

    def upload_folder(self, repo_id, folder, commit_message, token):
        self._record("upload_folder", repo_id=repo_id, folder=folder, commit_message=commit_message, token=token,
                     files=sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()))
        remote = self.cache / "uploaded" / repo_id.replace("/", "--")
        shutil.rmtree(remote, ignore_errors=True)
        shutil.copytree(folder, remote)
        self.repos[("model", repo_id)] = remote
        return f"{self.endpoint}/{repo_id}/commit/1"

    def methods(self) -> list[str]:
        return [m for m, _ in self.calls]


def use_fake(monkeypatch, fake: FakeClient, kind: str = "hub") -> FakeClient:
    """Make ``sources.get(kind, ...)`` use ``fake``; the endpoint the package asks for is recorded on it."""
    def factory(endpoint):
        if endpoint is not None:
            fake.endpoint = endpoint
        return fake

    monkeypatch.setitem(S.CLIENTS, kind, factory)
    return fake


def response(status: int, url: str = "https://hub.invalid/api/models/x") -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", url))


def model_repo(folder: Path) -> Path:
    """A model repo as the Hub lists it: config, tokenizer, safetensors, plus copies in other formats."""
    folder.mkdir(parents=True)
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}", "tokenizer_config.json": b"{}",
             "model-00001-of-00002.safetensors": b"s" * 3000, "model-00002-of-00002.safetensors": b"s" * 2000,
             "pytorch_model.bin": b"b" * 5000, "original/consolidated.00.pth": b"p" * 5000, "README.md": b"# x"}
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def tiny_scout_config():
    """Scout's layout (``Llama4Config``: text model plus vision tower) at toy sizes, with the real Llama 4 tokenizer's
    vocabulary and special ids. intermediate_size 64: see tests/llama4/test_llama4.py (bitsandbytes' AVX512-BF16 CPU
    repacking fails on narrower Linears)."""
    from transformers import Llama4Config

    from medtune.llama4 import scout_text_config

    text = scout_text_config(vocab_size=201135, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                             num_local_experts=4, num_experts_per_tok=1, pad_token_id=200018,
                             eos_token_id=200008, bos_token_id=200000)
    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                  vision_output_dim=64, image_size=56, patch_size=14, projector_input_dim=64, projector_output_dim=64)
    return Llama4Config(text_config=text.to_dict(), vision_config=vision)


def tiny_scoring_llama(tok, max_positions: int):
    """A one-layer ``LlamaForCausalLM`` (fp32, eval, seed 1) over ``tok``'s vocabulary, with large random weights
    (initializer_range 0.5) so that option log-likelihoods differ clearly: the scoring tests' model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=max_positions,
                       initializer_range=0.5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(conf).float().eval()
