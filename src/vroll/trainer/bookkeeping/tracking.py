"""``--report_to wandb`` that works on machines without network (GPU boxes often have none).

W&B needs its server and an API key to log online. Without either it would fail or wait at
``wandb.init``, so the run logs offline instead (into ``<output_dir>/wandb``) and says so in
one line, with the command that uploads it later. ``WANDB_MODE`` set by the user always wins.
"""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_WANDB_URL = "https://api.wandb.ai"


def wandb_reachable(url: str, timeout_s: float = 3.0) -> bool:
    """Whether a TCP connection to the W&B server opens (DNS failures are quick)."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _has_api_key(url: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(urlparse(url).hostname or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def offline_reason() -> str | None:
    """Why this run cannot log to W&B online (None: it can, or ``WANDB_MODE`` decides)."""
    if os.environ.get("WANDB_MODE"):
        return None
    url = os.environ.get("WANDB_BASE_URL", DEFAULT_WANDB_URL)
    if not wandb_reachable(url):
        return f"{urlparse(url).hostname} is unreachable (no network)"
    if not _has_api_key(url):
        return "no API key (set WANDB_API_KEY or run `wandb login`)"
    return None


def open_wandb(run_name: str | None, config: dict[str, Any], directory: Path) -> Any:
    """``wandb.init`` online when possible, else offline with a clear message."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--report_to wandb needs the wandb package: pip install wandb (or 'vroll[wandb]'), "
                         "or use --report_to none / tensorboard") from None
    reason = offline_reason()
    if reason is not None:
        log.warning("wandb: %s: logging offline to %s; upload later with `wandb sync %s`", reason,
                    directory / "wandb", directory / "wandb" / "offline-run-*")
    return wandb.init(name=run_name, config=config, dir=str(directory), mode="offline" if reason else None)
