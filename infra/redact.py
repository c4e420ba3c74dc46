"""Secret-looking values kept out of everything we log or record: MLflow params and tags, manifests, the console.

A value is secret when the name it sits under looks secret (`...SECRET...`, `...TOKEN`, `...PASSWORD`), when it
is the value of such an environment variable of this process, or when it is the password of a URL
(`https://user:PASSWORD@host`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_NAME = re.compile(
    r"(secret|password|passwd|token|credential|access_key|api_key|private_key|session_key)", re.IGNORECASE
)
REDACTED = "***"
URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/:@\s]+:)(?P<password>[^/@\s]+)(?P<tail>@)", re.IGNORECASE)
MIN_SECRET_LENGTH = 4


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_env_values() -> list[str]:
    """Values of this process's secret-looking environment variables, longest first (so no prefix wins)."""
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str) -> str:
    """`text` with every secret environment value and URL password replaced by ***."""
    for value in secret_env_values():
        text = text.replace(value, REDACTED)
    return URL_PASSWORD.sub(lambda m: f"{m['head']}{REDACTED}{m['tail']}", text)


def redact(value: Any, name: str = "") -> Any:
    """A JSON-like value with secrets redacted: whole values under secret-looking keys, secret text anywhere."""
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v, name) for v in value]
    if value is not None and name and is_secret_name(name):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    return value


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message with secrets redacted, for handlers that reach a console or a file."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact_text(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
