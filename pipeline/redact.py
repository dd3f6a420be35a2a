"""Redaction of secrets that slipped into configs, reports and logs.

Secrets belong in the environment (WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...). These
helpers catch the ones that reached a config anyway: values under secret-looking keys,
credentials and signatures in URLs, and the values of secret-looking environment variables.
The saved `config.yaml`, checkpoint metadata, W&B configs, report.md and summary.json all go
through them.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

# Config keys and URL query parameters that hold secrets (not `image_key`: a sample field name).
_SECRET_NAME = re.compile(r"(api_?key|token|secret|passw(or)?d|credential|signature|auth)", re.IGNORECASE)
# Environment variables that hold secrets: WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...
_SECRET_ENV = re.compile(r"(key|token|secret|passw(or)?d|credential)", re.IGNORECASE)
REDACTED = "<redacted>"


def _secret_env_values(env: Mapping[str, str]) -> dict[str, str]:
    # Short values ("1", "true") would redact innocent text; real keys and tokens are long.
    return {v: k for k, v in env.items() if _SECRET_ENV.search(k) and len(v) >= 8}


def _redact_url(text: str) -> str:
    try:
        parts = urlsplit(text)
    except ValueError:
        return text
    if not parts.scheme or not parts.netloc:
        return text
    netloc = parts.netloc
    if "@" in netloc:  # https://user:password@host/... -> https://<redacted>@host/...
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:  # presigned URLs: ?X-Amz-Signature=..., ?token=..., ?sig=...
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _SECRET_NAME.search(k) or k.lower() in ("sig", "key") else v)
                           for k, v in pairs], safe="<>")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s@`'\"]+@", re.IGNORECASE)
_URL_SECRET_PARAM = re.compile(r"([?&](?:[\w.-]*(?:token|secret|signature|credential|passw(?:or)?d|api_?key|auth)"
                               r"[\w.-]*|sig|key)=)[^&#\s`'\"<>)]+", re.IGNORECASE)


def redact_text(text: str, env: Mapping[str, str] | None = None) -> str:
    """`redact_secrets` for free text (report.md, summary.json): secret environment values, URL
    credentials and secret query parameters wherever they appear."""
    for secret, name in _secret_env_values(os.environ if env is None else env).items():
        text = text.replace(secret, f"<redacted:{name}>")
    text = _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", text)
    return _URL_SECRET_PARAM.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def redact_secrets(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of a config tree safe to hand to W&B: values under secret-looking keys, credentials
    and signatures in URLs, and the value of any secret-looking environment variable are replaced
    by `<redacted>`. Secrets belong in the environment; this catches the ones that slipped in."""
    secrets = _secret_env_values(os.environ if env is None else env)

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, key) for v in value]
        if isinstance(value, str):
            if key and _SECRET_NAME.search(key) and value:
                return REDACTED
            for secret, name in secrets.items():
                if secret in value:
                    value = value.replace(secret, f"<redacted:{name}>")
            return _redact_url(value) if "://" in value else value
        return value

    return walk(obj)
