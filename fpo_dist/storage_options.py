"""fsspec ``storage_options`` of a store URL: when they apply, and how they are kept out of logs and files."""

from __future__ import annotations

import re
from typing import Any

from fpo_dist.errors import ConfigError


def is_url(path: str) -> bool:
    """An fsspec URL (``s3://…``, ``gs://…``, ``memory://…``) rather than a local path."""
    return "://" in str(path)


def storage_options_for(path: str, storage_options: dict[str, Any]) -> dict[str, Any] | None:
    """The fsspec ``storage_options`` to open ``path`` with: the given ones for a URL, none for a local path
    (zarr refuses options on a local path)."""
    return dict(storage_options) if storage_options and is_url(path) else None


def check_storage_options(options: dict[str, Any], paths: dict[str, str]) -> None:
    """``storage_options`` must be used by one of ``paths`` (config key -> path): a flag is never silently ignored."""
    if options and not any(is_url(p) for p in paths.values() if p):
        keys = "/".join(f"'{k}'" for k in paths)
        raise ConfigError(f"'storage_options' is set but {keys} is a local path; the options are for an fsspec URL "
                          "such as s3://bucket/store: drop them or give a URL")


# option names that hold credentials (s3fs key/secret/token, client_kwargs' aws_*_key*, passwords, ...)
_SECRET = re.compile(r"key|secret|token|pass|credential|auth|session", re.IGNORECASE)
MASK = "***"


def mask_secrets(options: Any) -> Any:
    """``options`` with every value under a credential-like name replaced by ``***`` (recursively)."""
    if isinstance(options, dict):
        return {k: MASK if _SECRET.search(str(k)) and v not in (None, "") else mask_secrets(v)
                for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [mask_secrets(v) for v in options]
    return options
