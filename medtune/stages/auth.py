"""Access to the model and dataset sources (the walkthrough's step 00), without ever printing or writing a token.

Tokens are read from the environment, never typed into a notebook: ``HF_TOKEN`` for the Hugging Face Hub and its
mirrors (the variable huggingface_hub itself reads), ``MODELSCOPE_API_TOKEN`` for ModelScope. Only the account
name, the endpoint and whether access was granted are shown and recorded. Every call goes through
:mod:`medtune.io.sources`.
"""

from __future__ import annotations

from medtune.io import sources as _sources
from medtune.settings import config as _config

TOKEN_VARIABLES = _sources.TOKEN_VARIABLES["hub"]

#: Raised when access is missing or refused; the message says what to do. Subclasses:
#: :class:`medtune.io.sources.TokenError` (401 / token unset) and :class:`medtune.io.sources.AccessDenied` (403, gated).
AuthError = _sources.AuthError


def hub_token() -> str | None:
    """The Hub token from ``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``), or None. Never print it."""
    return _sources.get_token("hub")


def is_hub_id(source: str) -> bool:
    """True for ``owner/name`` repo ids; False for ``package:...`` sources, ``*.json(l)`` files and existing paths."""
    return _sources.is_remote_id(source)


def check_access(cfg: _config.RunConfig) -> dict:
    """Check that the run can read what it needs, before any large download.

    On a profile whose model and dataset are local (the embedded default) nothing is contacted and this returns at
    once. Otherwise, for the model's source (``source``) and the dataset's (``dataset_source`` or ``source``):
    the token, if set, must be accepted (``whoami``); the model must be readable by that account, or anonymously
    when no token is set (a gated model needs the license accepted); its files are listed for their total size;
    the dataset must be readable.

    Returns:
        ``{"hub_needed": bool (a remote source is used), "source", "endpoint", "user" (None: anonymous),
        "model_access" (True, or None when the model is local), "model_files", "model_gb" (GB, 1e9 bytes, the
        weights that will be downloaded), "dataset_access", "transfer"}``, plus ``"rehearsal": True`` when
        ``rehearsal: true`` (then ``model_gb`` is the real run's download, not this run's); never a token.

    Raises:
        AuthError: token rejected, or no access to the gated model (the message names the fix).
        medtune.io.sources.SourceError: not found, rate limited, network down (each message names the fix).
        MissingExtra: ``source: modelscope`` without the SDK.
    """
    model_src, data_src = _sources.for_model(cfg), _sources.for_dataset(cfg)
    first = model_src or data_src
    status = {"hub_needed": first is not None, "source": cfg.source, "endpoint": None, "user": None,
              "model_access": None, "model_files": None, "model_gb": None, "dataset_access": None, "transfer": None}
    if first is None:
        status["endpoint"] = _sources.hub_endpoint(cfg.hub_endpoint) if cfg.source == "hub" else None
        return status
    status["endpoint"], status["transfer"] = first.endpoint, _sources.transfer_backend(first.kind)
    by_kind: dict = {}  # one Source per service, so the account name found by whoami is used in its messages
    for src in (model_src, data_src):
        if src is not None:
            by_kind.setdefault(src.kind, src)
    model_src = model_src and by_kind[model_src.kind]
    data_src = data_src and by_kind[data_src.kind]
    for src in by_kind.values():
        src.whoami()
    status["user"] = first.account
    if model_src is not None:
        model_src.check_read(cfg.model, "model", cfg.model_revision)
        _, kept = _sources.select_model_files(model_src.files(cfg.model, "model", cfg.model_revision))
        status.update(model_access=True, model_files=len(kept), model_gb=round(sum(kept.values()) / 1e9, 2))
        if cfg.rehearsal:  # the real run's download, for the record; the rehearsal fetches config and tokenizer only
            status["rehearsal"] = True
    if data_src is not None:
        data_src.check_read(cfg.dataset, "dataset")
        status["dataset_access"] = True
    return status


def show(status: dict) -> None:
    """Print the result of :func:`check_access` in a few lines (no token)."""
    if not status["hub_needed"]:
        print("This profile's model and dataset are local: no Hub or ModelScope access is needed. OK")
        return
    print(f"source: {status['source']}  endpoint: {status['endpoint']}  transfer: {status['transfer']}")
    print(f"logged in as: {status['user']}" if status["user"] else "no token set: anonymous access (public repos only)")
    if status["model_access"]:
        if status.get("rehearsal"):
            print(f"access to the model: granted. OK (rehearsal: config.json and the tokenizer only are downloaded, "
                  f"not its {status['model_files']} files of {status['model_gb']:,.2f} GB)")
        else:
            print(f"access to the model: granted. OK ({status['model_files']} files, {status['model_gb']:,.2f} GB to "
                  "download)")
    if status["dataset_access"]:
        print("access to the dataset: granted. OK")
