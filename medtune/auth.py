"""Hub authentication (the walkthrough's step 00), without ever printing or writing the token.

The token is read from the environment (``HF_TOKEN``, the variable huggingface_hub itself reads), never typed
into a notebook. Only the account name and whether access was granted are shown and recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

from medtune import config as _config

TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class AuthError(RuntimeError):
    """Hub access is missing or refused; the message says what to do."""


def hub_token() -> str | None:
    """The Hub token from ``HF_TOKEN`` (or the older ``HUGGING_FACE_HUB_TOKEN``), or None. Never print it."""
    for name in TOKEN_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def is_hub_id(source: str) -> bool:
    """True for ``owner/name`` Hub ids; False for ``package:...`` sources and existing local paths."""
    if source.startswith("package:") or Path(source).exists() or source.endswith((".jsonl", ".json")):
        return False
    return source.count("/") == 1 and not source.startswith((".", "/", "~"))


def check_access(cfg: _config.RunConfig) -> dict:
    """Check that the run can read what it needs from the Hub, before any large download.

    On a profile whose model and dataset are local (the embedded default) no Hub access is needed and this returns
    at once. Otherwise: the token must be set, ``whoami`` must accept it, and the account must be able to read
    the (gated) model, checked with :func:`huggingface_hub.auth_check`.

    Returns:
        ``{"hub_needed": bool, "user": str | None, "model_access": bool | None, "endpoint": str}``; never the token.

    Raises:
        AuthError: token missing, rejected, or without access to the gated model (the message names the fix).
    """
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    needed = [s for s in (cfg.model, cfg.dataset) if is_hub_id(s)]
    if not needed:
        return {"hub_needed": False, "user": None, "model_access": None, "endpoint": endpoint}
    token = hub_token()
    if token is None:
        raise AuthError(
            "HF_TOKEN is not set. Create a read token at https://huggingface.co/settings/tokens, accept the model's "
            f"license on its page ({needed[0]}), then `export HF_TOKEN=...` in the shell that starts "
            "JupyterLab or `make run-all` (never paste it into a notebook)."
        )
    from huggingface_hub import HfApi, auth_check
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        user = HfApi(token=token).whoami()["name"]
    except HfHubHTTPError as err:
        raise AuthError(f"the Hub at {endpoint} rejected HF_TOKEN ({_status(err)}): create a new token and export it again.") from None
    access = None
    if is_hub_id(cfg.model):
        try:
            auth_check(cfg.model, token=token)
            access = True
        except GatedRepoError:
            raise AuthError(
                f"account '{user}' has no access to the gated model {cfg.model}: open its page on the Hub, accept "
                "the license, wait for approval (an e-mail), then run again."
            ) from None
        except RepositoryNotFoundError:
            raise AuthError(f"model {cfg.model} not found on {endpoint} (or private): check the id in your profile.") from None
    return {"hub_needed": True, "user": user, "model_access": access, "endpoint": endpoint}


def _status(err) -> str:
    response = getattr(err, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(err).__name__


def show(status: dict) -> None:
    """Print the result of :func:`check_access` in one or two lines (no token)."""
    if not status["hub_needed"]:
        print("This profile's model and dataset are local: no Hub access is needed. OK")
        return
    print(f"Hub endpoint: {status['endpoint']}\nlogged in as: {status['user']}")
    if status["model_access"]:
        print("access to the gated model: granted. OK")
