"""The request method as telemetry records it: a known method as it is, any other as `_OTHER`.

A client may send any token as its method; metric labels and span names built from it would let anyone mint new
series and names at will. OpenTelemetry's HTTP conventions name the methods of RFC 9110 and PATCH (RFC 5789) and
record every other one as `_OTHER`, with the original in `http.request.method_original`.
"""

from __future__ import annotations

__all__ = ("KNOWN_METHODS", "OTHER_METHOD", "method_label")

KNOWN_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
OTHER_METHOD = "_OTHER"


def method_label(method: str) -> str:
    """`method` if it is a known one (methods are case-sensitive), else `_OTHER`."""
    return method if method in KNOWN_METHODS else OTHER_METHOD
