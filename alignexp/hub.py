"""Is the Hugging Face hub reachable? Asked once, in a few seconds, before anything downloads.

Without network, ``from_pretrained`` and ``load_dataset`` retry with back-off for a minute or more
before they fail. alignexp checks first (a TCP connection to the hub's host, 3 s at most) and, when
the hub cannot be reached, switches the libraries to offline mode, so a missing local copy fails in
seconds with alignexp's own message, and a cached copy still loads.
"""

from __future__ import annotations

import functools
import os
import socket
import sys
from urllib.parse import urlparse


def _offline_by_env() -> bool:
    return any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline mode is set or the hub's host does not answer within ``timeout`` seconds."""
    if _offline_by_env():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_offline_if_unreachable() -> bool:
    """Switch huggingface_hub, transformers and datasets to offline mode when the hub is unreachable.

    Returns whether the hub is reachable.
    """
    if hub_reachable():
        return True
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[key] = "1"
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        sys.modules["datasets"].config.HF_HUB_OFFLINE = True
    return False
