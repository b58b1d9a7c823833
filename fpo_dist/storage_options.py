"""fsspec ``storage_options`` of a store URL: where they come from, when they apply, and how credentials are kept
off command lines, out of logs, error messages and files.

Where they come from (first match wins: command line > config YAML > environment):

- ``--storage_options @path.json`` (or ``storage_options: "@path.json"`` in a config YAML): a file holding a JSON
  (or YAML) mapping.  The way to pass credentials: the command line (which DeepSpeed's launcher logs, W&B records,
  ``ray job submit`` stores and every user of the machine sees in ``/proc/*/cmdline``) carries only the path.
- ``FPO_STORAGE_OPTIONS``: the environment variable, used when neither of the above gives options and a store path
  is a URL; it holds a JSON mapping (starts with ``{``) or the path of such a file (``@`` optional).
- ``--storage_options '{"endpoint_url": …}'``: inline JSON on the command line, for options that are not secret.  A
  value that :func:`mask_secrets` would hide (a credential-like key, URL userinfo, a connection string's
  ``AccountKey=``, a query-string signature) is refused there with a :class:`ConfigError` that names the key, not
  the value, and says how to pass it safely; ``FPO_ALLOW_SECRETS_ON_COMMAND_LINE=1`` accepts it with a warning.

Masking (:func:`mask_secrets`, :func:`mask_text`, :func:`mask_argv`) replaces with ``***``: every value under a
credential-like key (at any depth), the userinfo of any URL (``https://***@host``), and the value of any
credential-like ``name=value`` pair inside a string (connection strings, query strings: ``AccountKey=***``,
``sig=***``, ``X-Amz-Signature=***``).  Errors about a malformed value never echo the value.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fpo_dist.errors import ConfigError

ENV_VAR = "FPO_STORAGE_OPTIONS"
ALLOW_ENV_VAR = "FPO_ALLOW_SECRETS_ON_COMMAND_LINE"
MASK = "***"


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


# ------------------------------------------------------------------------------------------------ masking

# names that hold credentials: s3fs key/secret/token, client_kwargs' aws_*_key*, passwords, pwd, SAS tokens,
# Azure AccountKey / SharedAccessSignature, query-string signatures (sig, Signature, X-Amz-Signature, X-Amz-Credential)
_SECRET_NAME = re.compile(r"key|secret|token|pass|pwd|credential|auth|session|cookie|private|signature$|^sig$|sas",
                          re.IGNORECASE)
# scheme://userinfo@host: user[:password]@ right after '//' (a password may hold an unencoded '/', as AWS secret
# keys do; a user alone may not, so that hf://datasets/org/name@revision stays as it is)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s\"':]+:[^@\s\"']*|[^/@\s\"':]+)@")
# name=value inside a string: after the start, whitespace, a quote, '?', '&' or ';'; the value ends at '&', ';',
# whitespace or a quote (base64 '=' padding stays inside the value)
_PAIR = re.compile(r"(?P<pre>^|[\s?&;\"'])(?P<name>[A-Za-z_][\w.\-]*)=(?P<value>[^&;\s\"']+)")


def _secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def mask_text(text: str) -> str:
    """``text`` with URL userinfo and the values of credential-like ``name=value`` pairs replaced by ``***``."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _PAIR.sub(lambda m: f"{m['pre']}{m['name']}={MASK}" if _secret_name(m["name"]) else m[0], text)


def mask_secrets(options: Any) -> Any:
    """``options`` with every value under a credential-like name replaced by ``***`` (recursively), and secrets inside
    the other strings (:func:`mask_text`) masked too.  The given object is not changed."""
    if isinstance(options, dict):
        return {k: MASK if _secret_name(str(k)) and options[k] not in (None, "") else mask_secrets(options[k])
                for k in options}
    if isinstance(options, (list, tuple)):
        return [mask_secrets(v) for v in options]
    if isinstance(options, str):
        return mask_text(options)
    return options


def _keys_with_secrets(options: dict[str, Any]) -> list[str]:
    """The dotted keys of ``options`` whose values :func:`mask_secrets` hides (in part or whole)."""
    out = []
    for key, value in options.items():
        if _secret_name(key) and value not in (None, ""):
            out.append(key)
        else:
            out.extend(f"{key}.{k}" if k else key for k in _nested_secret_keys(value))
    return out


def _nested_secret_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return _keys_with_secrets(value)
    if isinstance(value, (list, tuple)):
        return [f"{i}" + (f".{k}" if k else "") for i, v in enumerate(value) for k in _nested_secret_keys(v)]
    return [""] if isinstance(value, str) and mask_text(value) != value else []


def mask_argv(argv: list[str]) -> list[str]:
    """A command line as it may be recorded: a ``--storage_options`` value other than ``@path`` becomes its
    :func:`mask_secrets` view (or ``***`` when it is not a mapping), every other argument its :func:`mask_text`."""
    out, i = [], 0
    names = ("--storage_options", "--storage-options")
    while i < len(argv):
        arg = argv[i]
        if arg in names and i + 1 < len(argv):
            out += [arg, _mask_option_text(argv[i + 1])]
            i += 2
            continue
        name, eq, value = arg.partition("=")
        out.append(f"{name}={_mask_option_text(value)}" if eq and name in names else mask_text(arg))
        i += 1
    return out


def _mask_option_text(text: str) -> str:
    if text.startswith("@"):
        return mask_text(text)
    try:
        return json.dumps(mask_secrets(_load_mapping_text(text, "", "")))
    except ConfigError:
        return MASK


@contextmanager
def masked_argv() -> Iterator[None]:
    """``sys.argv`` replaced by :func:`mask_argv` of itself while inside (for libraries that record it, e.g.
    W&B's run metadata)."""
    saved = sys.argv
    sys.argv = mask_argv(list(saved))
    try:
        yield
    finally:
        sys.argv = saved


# ------------------------------------------------------------------------------------------------ sources


def _load_mapping_text(text: str, key: str, where: str) -> dict[str, Any]:
    """JSON (or a YAML flow mapping) -> a mapping with string keys; a :class:`ConfigError` that never shows the text."""
    import yaml

    try:
        value = yaml.safe_load(text)  # JSON is YAML
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{where}: '{key}' must be a JSON mapping, e.g. '{{\"endpoint_url\": \"http://host:9000\"}}'"
                          f", or @path of a JSON file; the value given is not valid JSON/YAML{at} (not shown: it may "
                          "hold credentials)") from None
    return _mapping(value, key, where)


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    value = {} if value is None else value  # an empty YAML key / file
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ConfigError(f"{where}: '{key}' must be a mapping with string keys (JSON on the command line, e.g. "
                          f"'{{\"endpoint_url\": \"http://127.0.0.1:9000\"}}', or @path of a JSON file), got "
                          f"{type(value).__name__}")
    return dict(value)


def load_options_file(path: str | Path, key: str = "storage_options", where: str = "command line") -> dict[str, Any]:
    """The mapping in the JSON (or YAML) file at ``path``; a :class:`ConfigError` naming the file, never its text."""
    p = Path(path).expanduser()
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{where}: '{key}': cannot read the options file {mask_text(str(p))}: "
                          f"{e.strerror or type(e).__name__}") from None
    return _load_mapping_text(text, key, f"{where}: file {mask_text(str(p))}")


def resolve_storage_options(value: Any, key: str = "storage_options", where: str = "command line",
                            from_command_line: bool = True) -> dict[str, Any]:
    """A ``storage_options`` value as given -> the mapping.

    ``value`` is a mapping (YAML), ``@path`` (a JSON/YAML file), or inline JSON text.  Inline text on the command line that holds a secret (:func:`mask_secrets` would hide
    something) is refused, naming the keys, unless ``FPO_ALLOW_SECRETS_ON_COMMAND_LINE=1`` (then a warning)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("@"):
            return load_options_file(text[1:], key, where)
        options = _load_mapping_text(text, key, where)
        if from_command_line:
            _refuse_inline_secrets(options, key, where)
        return options
    return _mapping(value, key, where)


def check_command_line_value(key: str, value: str) -> None:
    """A ``--key value`` override other than ``storage_options`` (checked by :func:`resolve_storage_options`) that
    holds URL userinfo or a credential-like ``name=value`` is refused like an inline secret, naming the key only."""
    if not key.endswith("storage_options") and mask_text(value) != value:
        _refuse(f"'{key}'", "command line", "storage_options")


def _refuse_inline_secrets(options: dict[str, Any], key: str, where: str) -> None:
    found = _keys_with_secrets(options)
    if found:
        _refuse(", ".join(f"'{key}.{k}'" for k in found), where, key)


def _refuse(names: str, where: str, key: str) -> None:
    advice = (f"put the options in a file readable only by you (chmod 600) and pass --{key} @path.json, or set "
              f"{ENV_VAR} in the environment (JSON, or the file's path); for S3, credentials may also come from "
              "s3fs's own chain (AWS_PROFILE, ~/.aws/credentials, an instance role) and stay out of the options")
    if os.environ.get(ALLOW_ENV_VAR) == "1":
        print(f"warning: {names} on the {where} hold(s) a credential: the command line is visible to every user "
              f"of this machine and recorded by launchers and trackers; {advice}", file=sys.stderr, flush=True)
        return
    raise ConfigError(f"{where}: {names} hold(s) a credential (the value is not shown); a command line is visible "
                      f"to every user of the machine (/proc/*/cmdline) and is recorded by the deepspeed launcher's "
                      f"log, W&B and `ray job submit`: {advice}.  If it is already exposed, rotate it.  "
                      f"({ALLOW_ENV_VAR}=1 accepts it anyway, with a warning.)")


def options_from_env(paths: dict[str, str]) -> dict[str, Any]:
    """``FPO_STORAGE_OPTIONS`` (a JSON mapping, or ``[@]path`` of a JSON file) when one of ``paths`` is a URL; else
    ``{}`` (a local store takes no options, so the variable may stay set)."""
    text = os.environ.get(ENV_VAR, "").strip()
    if not text or not any(is_url(p) for p in paths.values() if p):
        return {}
    where = f"environment variable {ENV_VAR}"
    if text.startswith("{"):
        return _load_mapping_text(text, "storage_options", where)
    return load_options_file(text.removeprefix("@"), "storage_options", where)
