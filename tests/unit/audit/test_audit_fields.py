"""Pure parts of the audit writer and its neighbours: detail sanitizing, client address, GCRA arithmetic."""

from __future__ import annotations

from typing import Any

import pytest

from zkeb.core.audit import sanitize_details
from zkeb.core.ratelimit import MemoryBuckets, Quota
from zkeb.core.security import client_ip, request_is_tls, trusted_proxies


def test_secret_looking_detail_keys_are_dropped_and_ids_kept() -> None:
    details = {
        "api_key": "zkeb_secret",  # pragma: allowlist secret
        "apiKey": "zkeb_secret",  # pragma: allowlist secret
        "token": "eyJ",  # pragma: allowlist secret
        "signature": "AAAA",  # pragma: allowlist secret
        "password": "hunter2",  # pragma: allowlist secret
        "nested": {"client_secret": "s", "fine": 1},
        "key_id": "k-1",
        "token_id": "jti-1",
        "key_prefix": "zkeb_ab",
        "name": "laptop",
    }
    cleaned = sanitize_details(details)
    assert cleaned == {
        "nested": {"fine": 1},
        "key_id": "k-1",
        "token_id": "jti-1",
        "key_prefix": "zkeb_ab",
        "name": "laptop",
    }


def test_control_characters_in_details_are_escaped_and_bytes_summarized() -> None:
    cleaned = sanitize_details({"label": "a\nb\x00c\u202e", "blob": b"\x01\x02\x03"})
    assert cleaned == {"label": "a\\x0ab\\x00c\\u202e", "blob": "[3 bytes]"}


def test_details_without_a_json_form_are_refused() -> None:
    with pytest.raises(TypeError):
        sanitize_details({"value": object()})


def _scope(peer: str, headers: dict[str, str] | None = None, scheme: str = "http") -> Any:
    return {
        "type": "http",
        "client": (peer, 1234),
        "scheme": scheme,
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
    }


def test_forwarded_for_is_ignored_from_untrusted_peers() -> None:
    proxies = trusted_proxies(())
    assert client_ip(_scope("203.0.113.9", {"X-Forwarded-For": "198.51.100.1"}), proxies) == "203.0.113.9"


def test_forwarded_for_is_walked_from_the_right_through_trusted_proxies() -> None:
    proxies = trusted_proxies(("10.0.0.0/8",))
    scope = _scope("10.0.0.2", {"X-Forwarded-For": "1.1.1.1, 198.51.100.7, 10.0.0.5"})
    # The left-most entry is client-controlled; the first untrusted hop from the right is the client.
    assert client_ip(scope, proxies) == "198.51.100.7"
    assert client_ip(_scope("10.0.0.2", {"X-Forwarded-For": "not-an-ip, 10.0.0.9"}), proxies) == "10.0.0.9"
    assert client_ip(_scope("10.0.0.2"), proxies) == "10.0.0.2"


def test_tls_is_the_scheme_or_a_trusted_forwarded_proto() -> None:
    proxies = trusted_proxies(("10.0.0.0/8",))
    assert request_is_tls(_scope("203.0.113.9", scheme="https"), proxies)
    assert request_is_tls(_scope("10.0.0.2", {"X-Forwarded-Proto": "https"}), proxies)
    assert not request_is_tls(_scope("203.0.113.9", {"X-Forwarded-Proto": "https"}), proxies)


def test_gcra_allows_the_limit_as_a_burst_then_refuses_with_a_retry_time() -> None:
    buckets = MemoryBuckets()
    quota = Quota(limit=5, window=60)
    decisions = [buckets.charge("k", quota) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    refused = decisions[-1]
    assert 1 <= refused.retry_after_seconds <= 12
    assert refused.headers()["Retry-After"] == str(refused.retry_after_seconds)
    assert refused.headers()["RateLimit-Policy"] == "5;w=60"
    probe = buckets.charge("other", quota, commit=False)
    assert probe.allowed
    assert buckets.charge("other", quota).remaining == 4
