"""Is the Hugging Face hub reachable right now? Answered in about a second, before transformers tries.

Without network, ``from_pretrained("org/model")`` retries its HEAD request five times with
back-off (about 26–40 s) before it fails. :func:`hub_status` instead asks the local cache and makes
one TCP connection to the hub (or to the HTTPS proxy, when one is set) with a short timeout, so
:func:`patchtrace.models.load.load_model` can either read a cached copy offline or fail at once,
saying how to load a local folder instead.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

#: Seconds to wait for the TCP connection to the hub (or proxy).
PROBE_TIMEOUT_S = 1.5


def _endpoint() -> tuple[str, int]:
    """Host and port the hub is reached through: the HTTPS proxy if set, else ``HF_ENDPOINT``."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    url = urlparse(proxy if proxy else os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    default = 443 if url.scheme == "https" else 80
    return url.hostname or "huggingface.co", url.port or default


def offline_mode() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "") not in ("", "0", "false", "False") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def unreachable_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be reached now (``None`` when a connection to it succeeds)."""
    if offline_mode():
        return "offline mode is set (HF_HUB_OFFLINE)"
    host, port = _endpoint()
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return f"cannot connect to {host}:{port} ({e.strerror or type(e).__name__})"


def cached(repo_id: str, revision: str | None = None) -> bool:
    """True when the hub cache holds ``repo_id``'s ``config.json`` (so it can load without network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # an id the hub library refuses (bad characters ...): not cached
        return False
    return isinstance(hit, str)


__all__ = ["PROBE_TIMEOUT_S", "cached", "offline_mode", "unreachable_reason"]
