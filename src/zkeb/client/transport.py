"""HTTP to a ZKEB server over httpx: credentials, retries with backoff, and problem+json turned into `ApiError`.

Device commands authenticate with a device token the transport fetches itself (a fresh Ed25519 proof of possession)
and refreshes before it expires or when the server answers 401; org-admin work (enrolment) uses the API key.
Requests whose body can be sent again are retried on connection loss, 408, 429, 502, 503 and 504, waiting as
`Retry-After` says (or backing off exponentially with jitter when it says nothing); streamed bodies are resumed by
their callers. A 408 (the server cut off a body that stalled) is safe to answer by sending the same request again:
nothing of it was acted on, and an envelope whose first sending did commit answers 409 with its backup's id.
"""

from __future__ import annotations

import asyncio
import base64
import math
import random
import re
import socket
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
import msgspec

from zkeb.client.crypto import auth_message
from zkeb.client.errors import ApiError, ConfigurationError, TransferError
from zkeb.client.keys import KeyFile

__all__ = ("Credential", "RetryPolicy", "Transport", "api_error", "credential", "redact", "transport_failure")

#: Which credential a request carries: the device token, the API key, or none.
Credential = Literal["device", "api_key", "none"]

RETRYABLE_STATUS = frozenset({408, 429, 502, 503, 504})
#: Name-resolution answers that another try would repeat (a name server that did not answer is retried).
_NO_SUCH_HOST = frozenset(code for name in ("EAI_NONAME", "EAI_NODATA") if (code := getattr(socket, name, None)))
#: Connection failures that happen before a request goes out: the server cannot have acted on it.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_TOKEN_MARGIN_SECONDS = 60


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all, waits from ``base_delay`` doubling up to ``max_delay`` seconds.

    A `Retry-After` is honoured as the server sent it, up to ``max_retry_after`` seconds (10 minutes); a server
    asking for longer is not retried early: the call fails saying when to try again. A 429 is the server pacing the
    client, not a failure: it does not count against ``attempts``, and up to ``max_rate_limited`` of them in a row
    are waited out before the call fails.
    """

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 600.0
    max_rate_limited: int = 30

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``Retry-After`` wins when the server sent one).

        Raises:
            TransferError: If the server asks to wait longer than ``max_retry_after``.
        """
        if retry_after is not None:
            if retry_after > self.max_retry_after:
                try:
                    moment = f"{datetime.now(UTC) + timedelta(seconds=retry_after):%Y-%m-%d %H:%M:%S} UTC"
                except OverflowError:
                    moment = "a long while"
                raise TransferError(
                    f"the server asks to retry in {retry_after:.0f} s, longer than this client waits "
                    f"({self.max_retry_after:.0f} s); try again after {moment}"
                )
            return max(retry_after, 0.0)
        backoff = min(self.base_delay * 2.0**attempt, self.max_delay)
        return backoff / 2 + random.uniform(0, backoff / 2)  # noqa: S311 - jitter, not a secret


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The response's `Retry-After` in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(value)
        return float(moment.timestamp()) - time.time()
    except (TypeError, ValueError):
        return None


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it was raised from (cause, else context), each once."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def hopeless_failure(exc: httpx.TransportError, server: str) -> str | None:
    """Why sending again cannot help, for a connection failure no retry fixes (TLS, a host name that does not
    exist); None for one worth retrying (refused, reset, timed out, a name server that did not answer)."""
    for cause in _causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"the TLS certificate of {server} is not trusted ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            hint = " (is it plain http? then use an http:// URL)" if "WRONG_VERSION_NUMBER" in str(cause) else ""
            return f"TLS with {server} failed: {cause.reason or type(cause).__name__}{hint}"
        if isinstance(cause, socket.gaierror) and cause.errno in _NO_SUCH_HOST:
            return f"the host name of {server} does not resolve ({cause.strerror})"
    return None


def transport_failure(exc: httpx.TransportError) -> str:
    """A connection failure in one line that never quotes what was sent.

    httpx's `LocalProtocolError` (a request it refuses to send) quotes the offending header value, and a header may
    be the credential: that text is never shown.
    """
    if isinstance(exc, httpx.LocalProtocolError):
        return "the request could not be sent: one of its header values is not valid HTTP"
    return f"{type(exc).__name__} {exc}".strip()


def redact(server: str) -> str:
    """A server URL as a message may show it: its user name and password (what comes before an ``@``) as ``***``.

    Up to the last ``@``, so that one inside an unencoded password is covered too (and one in a path, harmlessly).
    """
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)?.*@", r"\1***@", server, flags=re.DOTALL)


def credential(value: str | None, what: str) -> str | None:
    """An API key as given, without surrounding whitespace (a pasted line's end); None when empty.

    Raises:
        ConfigurationError: If what remains is not a valid header value (space or control characters inside);
            the message names ``what``, never the value.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    if not _HEADER_SAFE.fullmatch(value):
        raise ConfigurationError(f"{what} holds a space or control character, so it cannot be sent (value not shown)")
    return value


def api_error(response: httpx.Response) -> ApiError:
    """The `ApiError` for a non-success response, from its problem+json body when it has one."""
    title, detail = response.reason_phrase or "error", None
    request_id = response.headers.get("x-request-id")
    try:
        body = response.json()
    except (ValueError, httpx.ResponseNotRead):
        body = None
    backup_id = None
    if isinstance(body, dict):
        title = str(body.get("title") or title)
        detail = str(body["detail"]) if body.get("detail") is not None else None
        request_id = str(body.get("request_id") or request_id or "") or None
        if response.status_code == 409 and isinstance(body.get("backup_id"), str):
            try:
                backup_id = uuid.UUID(body["backup_id"])
            except ValueError:
                backup_id = None
    return ApiError(response.status_code, title, detail, request_id, backup_id)


class _Token(msgspec.Struct):
    access_token: str
    expires_in: int


def _tls_verification(server: str) -> ssl.SSLContext | bool:
    """httpx's default verification for an https server; for a plain-http one, a context that trusts no certificate.

    httpx builds its TLS context (loading the whole CA bundle, 50-150 ms of a CLI run) when the client is made, even
    if no request will use TLS. A plain-http server needs none; should a response still point to an https URL, the
    empty context fails verification (it still requires a certificate and checks the host name) instead of skipping
    it.
    """
    if _scheme(server) == "https":
        return True
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _scheme(url: str) -> str:
    """A URL's scheme in lower case (`HTTPS://Host` is `https://host`: RFC 3986), or "" when it is no URL."""
    try:
        return httpx.URL(url).scheme
    except httpx.InvalidURL:
        return ""


class Transport:
    """One server connection pool and its credentials."""

    def __init__(
        self,
        server: str,
        *,
        api_key: str | None = None,
        keys: KeyFile | None = None,
        project_id: uuid.UUID | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
    ) -> None:
        if _scheme(server) not in {"http", "https"}:
            raise ConfigurationError(f"server must be an http(s) URL, got {redact(server)!r}")
        self.server = server.rstrip("/")
        #: The server as messages name it: no user name or password.
        self.shown = redact(self.server)
        self.api_key = credential(api_key, "the API key (--token or ZKEB_TOKEN)")
        self.keys = keys
        self.project_id = project_id
        self.retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.server, timeout=httpx.Timeout(timeout, connect=10.0), verify=_tls_verification(self.server)
        )
        self._blocking: httpx.Client | None = None
        self._timeout = httpx.Timeout(timeout, connect=10.0)
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()

    async def aclose(self) -> None:
        """Close the connection pools."""
        await self._http.aclose()
        if self._blocking is not None:
            self._blocking.close()

    def url(self, path: str) -> str:
        """An absolute URL for a path on the server (a `Location` may already be absolute)."""
        return path if path.startswith(("http://", "https://")) else f"{self.server}{path}"

    async def _device_token(self, *, force: bool = False) -> str:
        async with self._token_lock:
            if not force and self._token is not None and time.monotonic() < self._token_expires:
                return self._token
            if self.keys is None or self.project_id is None:
                raise ConfigurationError("a device command needs the key file and the project (--identity, --project)")
            keys, project_id = self.keys, self.project_id

            def proof() -> dict[str, Any]:
                # Signed anew for each attempt: the server takes a proof once, and a lost answer may hide that it did.
                timestamp_ms = int(time.time() * 1000)
                message = auth_message(
                    project_id=project_id, device_id_hash=keys.device_id_hash, timestamp_ms=timestamp_ms
                )
                return {
                    "project_id": str(project_id),
                    "device_id_hash": keys.device_id_hash.hex(),
                    "timestamp_ms": timestamp_ms,
                    "signature": base64.b64encode(keys.signing_key.sign(message)).decode(),
                }

            response, _ = await self._send("POST", "/api/v1/auth/token", {}, json_per_attempt=proof)
            if response.status_code != 200:
                raise api_error(response)
            token = msgspec.json.decode(response.content, type=_Token)
            self._token = token.access_token
            self._token_expires = time.monotonic() + max(token.expires_in - _TOKEN_MARGIN_SECONDS, 1)
            return self._token

    async def _headers(
        self, credential: Credential, headers: Mapping[str, str] | None, *, refresh: bool
    ) -> dict[str, str]:
        result = dict(headers or {})
        if credential == "device":
            if self.keys is None and self.api_key is not None:
                result["Authorization"] = f"Bearer {self.api_key}"
            else:
                result["Authorization"] = f"Bearer {await self._device_token(force=refresh)}"
        elif credential == "api_key":
            if self.api_key is None:
                raise ConfigurationError("this command needs an API key (--token or ZKEB_TOKEN)")
            result["Authorization"] = f"Bearer {self.api_key}"
        return result

    async def _send(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        *,
        json_per_attempt: Callable[[], Any] | None = None,
        **kwargs: Any,
    ) -> tuple[httpx.Response, bool]:
        """Send a request with a replayable body, retrying connection loss and the `RETRYABLE_STATUS` answers.

        Args:
            json_per_attempt: Makes a new JSON body for each attempt (a single-use proof), in place of ``json=``.

        Returns:
            The final response, and whether an earlier attempt may have reached the server (its connection was lost
            after the request went out, so the server may have acted on it).
        """
        attempt = 0
        rate_limited = 0
        maybe_arrived = False
        while True:
            try:
                if json_per_attempt is not None:
                    kwargs["json"] = json_per_attempt()
                response = await self._http.request(method, self.url(path), headers=headers, **kwargs)
            except httpx.LocalProtocolError as exc:
                raise TransferError(transport_failure(exc)) from None  # sending it again cannot help
            except httpx.TransportError as exc:
                if (hopeless := hopeless_failure(exc, self.shown)) is not None:
                    raise ConfigurationError(hopeless) from None
                if attempt + 1 >= self.retry.attempts:
                    raise TransferError(f"cannot reach {self.shown}: {transport_failure(exc)}") from exc
                maybe_arrived |= not isinstance(exc, _NOT_SENT)
                await asyncio.sleep(self.retry.delay(attempt, None))
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    return response, maybe_arrived
                paced = response.status_code == 429
                if paced and rate_limited + 1 >= self.retry.max_rate_limited:
                    return response, maybe_arrived
                if not paced and attempt + 1 >= self.retry.attempts:
                    return response, maybe_arrived
                await asyncio.sleep(self.retry.delay(attempt, retry_after_seconds(response)))
                if paced:
                    rate_limited += 1
                    continue
            attempt += 1

    async def request(
        self,
        method: str,
        path: str,
        *,
        credential: Credential = "device",
        headers: Mapping[str, str] | None = None,
        expect: tuple[int, ...] = (200,),
        after_lost_answer: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> httpx.Response:
        """Send a request whose body is in memory (retried as the policy says) and check its status.

        Args:
            after_lost_answer: Statuses also accepted when an earlier attempt may have reached the server and only
                its answer was lost (a retried DELETE's 404: the first one did it).

        Raises:
            ApiError: If the final answer's status is not in ``expect``.
            TransferError: If the server stayed unreachable.
        """
        response, maybe_arrived = await self._send(
            method, path, await self._headers(credential, headers, refresh=False), **kwargs
        )
        if response.status_code == 401 and credential == "device" and self.keys is not None:
            response, again = await self._send(
                method, path, await self._headers(credential, headers, refresh=True), **kwargs
            )
            maybe_arrived |= again
        self._check_is_zkeb(response)
        if response.status_code not in expect and not (maybe_arrived and response.status_code in after_lost_answer):
            raise api_error(response)
        return response

    def _check_is_zkeb(self, response: httpx.Response) -> None:
        """Refuse an answer that cannot be ZKEB's: a redirect, or one without the `X-Request-Id` ZKEB always sends.

        A 5xx or a retryable status without it passes (a proxy or balancer in front of ZKEB answering for it: a 502,
        a 429 of its own): its status says more.

        Raises:
            ConfigurationError: Naming where the server redirects, or that it is no ZKEB server.
        """
        if response.is_redirect:
            location = response.headers.get("location", "")
            target = redact(str(response.url.join(location))) if location else "another address"
            raise ConfigurationError(f"{self.shown} redirects to {target}; use that URL as the server")
        if (
            "x-request-id" not in response.headers
            and response.status_code < 500
            and response.status_code not in RETRYABLE_STATUS
        ):
            kind = response.headers.get("content-type", "no content type").split(";")[0]
            raise ConfigurationError(
                f"{self.shown} does not answer as a ZKEB server ({response.status_code} {response.reason_phrase}, "
                f"{kind}, no X-Request-Id); check the server URL"
            )

    async def authorization(self, credential: Credential = "device") -> dict[str, str]:
        """The headers carrying ``credential``, for a request the caller sends itself (a streamed body)."""
        return await self._headers(credential, None, refresh=False)

    async def send_stream(self, request: httpx.Request) -> httpx.Response:
        """Send a request built with `build_request` and return it unread (one attempt: the caller resumes)."""
        return await self._http.send(request, stream=True)

    def build_request(self, method: str, path: str, **kwargs: Any) -> httpx.Request:
        """An httpx request for this server."""
        return self._http.build_request(method, self.url(path), **kwargs)

    def blocking_stream(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> AbstractContextManager[httpx.Response]:
        """A response read as it arrives, from a worker thread (one attempt: the caller resumes with `Range`).

        It goes through httpx's blocking client, made on first use with the same settings: a large body costs it a
        third of the CPU time it costs the asyncio client, whose per-read overhead bounds a download's rate.
        """
        if self._blocking is None:
            self._blocking = httpx.Client(timeout=self._timeout, verify=_tls_verification(self.server))
        return self._blocking.stream(method, self.url(path), headers=headers)
