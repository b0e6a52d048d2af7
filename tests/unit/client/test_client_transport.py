"""Retry timing: `Retry-After` (seconds or an HTTP date) wins, otherwise exponential backoff with jitter, capped."""

from __future__ import annotations

import http.server
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from zkeb.client import ApiError, ConfigurationError, RetryPolicy, TransferError
from zkeb.client.transport import Transport, _tls_verification, api_error, retry_after_seconds


def _response(status: int, headers: dict[str, str] | None = None, json: object = None) -> httpx.Response:
    return httpx.Response(status, headers=headers, json=json)


def test_retry_after_in_seconds_and_as_a_date_are_understood() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert retry_after_seconds(_response(429, {"Retry-After": "7"})) == 7.0
    assert 25 < (retry_after_seconds(_response(503, {"Retry-After": later})) or 0) <= 30
    assert retry_after_seconds(_response(503, {"Retry-After": "soon"})) is None
    assert retry_after_seconds(_response(503)) is None


def test_the_server_says_when_and_backoff_doubles_up_to_the_cap() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    assert policy.delay(0, 3.0) == 3.0
    assert 0.5 <= policy.delay(0, None) <= 1.0
    assert 2.0 <= policy.delay(2, None) <= 4.0
    assert 4.0 <= policy.delay(10, None) <= 8.0


def test_a_retry_after_beyond_the_backoff_cap_is_waited_in_full_up_to_ten_minutes() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    assert policy.delay(0, 120.0) == 120.0
    assert policy.delay(3, 600.0) == 600.0
    assert policy.delay(0, -5.0) == 0.0


def test_a_retry_after_over_the_maximum_fails_in_one_line_saying_when_to_try_again() -> None:
    before = datetime.now(UTC)
    with pytest.raises(TransferError) as caught:
        RetryPolicy().delay(0, 3600.0)
    message = str(caught.value)
    assert "\n" not in message
    assert "retry in 3600 s" in message
    assert "(600 s)" in message
    when = datetime.strptime(message.split("try again after ")[1], "%Y-%m-%d %H:%M:%S UTC").replace(tzinfo=UTC)
    assert before + timedelta(seconds=3599) <= when <= datetime.now(UTC) + timedelta(seconds=3601)
    with pytest.raises(TransferError, match="try again after a long while"):
        RetryPolicy().delay(0, 1e300)


def test_a_retry_after_that_is_not_a_finite_number_is_ignored() -> None:
    assert retry_after_seconds(_response(503, {"Retry-After": "inf"})) is None
    assert retry_after_seconds(_response(503, {"Retry-After": "nan"})) is None


def test_a_problem_body_becomes_an_api_error_with_its_fields() -> None:
    body = {"status": 404, "title": "Not Found", "detail": "backup not found", "request_id": "abc123"}
    error = api_error(_response(404, {"content-type": "application/problem+json"}, body))
    assert isinstance(error, ApiError)
    assert (error.status, error.title, error.detail, error.request_id) == (
        404,
        "Not Found",
        "backup not found",
        "abc123",
    )
    assert str(error) == "server answered 404 Not Found: backup not found (request abc123)"


@pytest.mark.parametrize("content", [b"", b"<html>bad gateway</html>"])
def test_a_non_problem_body_still_gives_a_one_line_error(content: bytes) -> None:
    error = api_error(httpx.Response(502, content=content, headers={"x-request-id": "r1"}))
    assert str(error) == "server answered 502 Bad Gateway (request r1)"


def test_a_plain_http_server_gets_a_tls_context_that_trusts_no_certificate_and_https_keeps_the_default() -> None:
    context = _tls_verification("http://127.0.0.1:8000")
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.cert_store_stats()["x509_ca"] == 0
    assert _tls_verification("https://backup.example") is True
    assert _tls_verification("HTTPS://Backup.Example:443/") is True  # the same server (RFC 3986: case-insensitive)


def test_an_api_key_is_stripped_of_a_line_end_and_one_with_a_space_inside_is_refused_without_showing_it() -> None:
    stripped = Transport("http://127.0.0.1:9", api_key="zkeb_topsecret \r\n")  # pragma: allowlist secret
    with pytest.raises(ConfigurationError) as refused:
        Transport("http://127.0.0.1:9", api_key="zkeb_top secret")  # pragma: allowlist secret

    assert stripped.api_key == "zkeb_topsecret"  # pragma: allowlist secret
    assert "--token" in str(refused.value)
    assert "secret" not in str(refused.value)


async def test_a_header_httpx_refuses_to_send_fails_at_once_without_quoting_it() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never answers: nothing gets that far
        transport = Transport(
            f"http://127.0.0.1:{listener.getsockname()[1]}", retry=RetryPolicy(attempts=6, base_delay=1.0)
        )
        started = time.monotonic()
        with pytest.raises(TransferError) as failed:
            await transport.request("GET", "/api/health", credential="none", headers={"X-Note": "top secret\r"})
        elapsed = time.monotonic() - started
        await transport.aclose()

    assert elapsed < 1.0, "a request httpx refuses to send was retried"
    assert "secret" not in str(failed.value)
    assert "header" in str(failed.value)


class _Foreign(http.server.BaseHTTPRequestHandler):
    """Another HTTP server: a web page for every request, or a redirect to https for paths under /moved."""

    def _answer(self) -> None:
        if self.path.startswith("/moved"):
            self.send_response(301)
            self.send_header("Location", "https://backups.example.com" + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"<html><body>It works!</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_OPTIONS = do_HEAD = _answer  # noqa: N815 - http.server dispatches on these names

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture
def foreign_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Foreign)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_a_server_that_is_not_zkeb_is_named_as_such_and_a_redirect_names_its_target(foreign_server: str) -> None:
    # A reviewer pointed the CLI at another web server: `unexpected DecodeError`, `unexpected KeyError:
    # 'tus-max-size'`, "server answered 200 OK", and "server answered 301 Moved Permanently" without the target.
    transport = Transport(foreign_server)
    try:
        with pytest.raises(ConfigurationError, match=r"does not answer as a ZKEB server \(200 OK, text/html"):
            await transport.request("OPTIONS", "/api/v1/uploads", credential="none", expect=(204,))
        with pytest.raises(ConfigurationError, match=r"redirects to https://backups.example.com/moved/api; use that"):
            await transport.request("GET", "/moved/api", credential="none")
    finally:
        await transport.aclose()


async def test_failures_no_retry_can_fix_fail_at_once_saying_why(foreign_server: str) -> None:
    # TLS to a plain-http port and a host name that does not exist were retried for about 11 s.
    policy = RetryPolicy(attempts=6, base_delay=1.0)
    cases = {
        foreign_server.replace("http://", "https://"): r"TLS with .* failed: .*is it plain http\?",
        "http://no-such-host.invalid": r"does not resolve",
    }
    for server, reason in cases.items():
        transport = Transport(server, retry=policy)
        started = time.monotonic()
        try:
            with pytest.raises(ConfigurationError, match=reason):
                await transport.request("GET", "/api/health", credential="none")
        finally:
            await transport.aclose()
        assert time.monotonic() - started < 1.0, f"{server} was retried"
