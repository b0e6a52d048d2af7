"""Credentials masked in text that leaves a request: logs, trace spans, audit events and error bodies.

What is recognized is the shape of ZKEB's own credentials, wherever a client put one (a header, the path, a body's
field name): API keys (`zkeb_...`), JWTs (device tokens) and `Bearer` values. Other secrets cannot be told from
ordinary text and are never written by the server itself.
"""

from __future__ import annotations

import re

__all__ = ("REDACTED", "holds_credential", "redact")

REDACTED = "[REDACTED]"

_CREDENTIAL_SHAPES = re.compile(
    r"(?<![A-Za-z0-9_])zkeb_[A-Za-z0-9_\-]{40,}"
    r"|eyJ[A-Za-z0-9_\-]{6,}\.[A-Za-z0-9_\-]{6,}\.[A-Za-z0-9_\-]{6,}"
    # A bearer value: long, or holding a digit or symbol, so that prose ("a bearer credential is required") stays.
    r"|(?i:bearer)\s+(?:[A-Za-z0-9._~+/=\-]{20,}|(?=[A-Za-z]*[0-9._~+/=\-])[A-Za-z0-9._~+/=\-]{8,})"
)


def redact(text: str) -> str:
    """`text` with API keys, JWTs and bearer credentials replaced by `[REDACTED]`."""
    return _CREDENTIAL_SHAPES.sub(REDACTED, text)


def holds_credential(text: str) -> bool:
    """Whether `text` holds something shaped like an API key, a JWT or a bearer credential."""
    return _CREDENTIAL_SHAPES.search(text) is not None
