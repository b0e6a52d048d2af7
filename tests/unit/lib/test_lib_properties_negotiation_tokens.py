"""Properties of `Accept` negotiation and device tokens: choices stay among the offers, only documented errors."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import jwt
from hypothesis import given, settings
from hypothesis import strategies as st

from zkeb.lib.devicetokens import (
    AUDIENCE,
    ISSUER,
    MAX_TOKEN_LIFETIME,
    ExpiredDeviceTokenError,
    InvalidDeviceTokenError,
    issue_device_token,
    secret_key_id,
    verify_device_token,
)
from zkeb.lib.negotiation import negotiate

# No per-example deadline: the suite shares a busy machine, and a slow example is not a wrong one.
bounded = settings(deadline=None, max_examples=150)

OFFERS = ("application/json", "application/msgpack")
SECRET = "property-secret-" + "0123456789abcdef" * 4  # pragma: allowlist secret (a test key, long enough for HS512)
media_ranges = st.sampled_from(
    ["application/json", "application/msgpack", "application/*", "*/*", "text/html", "*/json", "bad"]
)
qualities = st.sampled_from(["", ";q=0", ";q=0.0", ";q=1", ";q=0.5", ";q=0.001", ";q=2", ";q=abc", ";Q=0", "; q = 0.3"])
accept_headers = st.lists(st.tuples(media_ranges, qualities).map("".join), max_size=6).map(", ".join)


@bounded
@given(accept=st.one_of(accept_headers, st.text(max_size=60)))
def test_negotiation_chooses_an_offer_not_refused(accept: str) -> None:
    outcome = negotiate(accept, OFFERS)
    assert outcome.chosen is None or outcome.chosen in OFFERS
    assert outcome.refused <= set(OFFERS)
    assert outcome.chosen not in outcome.refused


@bounded
@given(accept=accept_headers, offer=st.sampled_from(OFFERS))
def test_negotiation_never_chooses_an_offer_named_with_q0(accept: str, offer: str) -> None:
    outcome = negotiate(f"{offer};q=0, {accept}" if accept else f"{offer};q=0", OFFERS)
    assert outcome.chosen != offer
    assert offer in outcome.refused


@bounded
@given(accept=st.sampled_from(["", "  ", "\t"]))
def test_negotiation_without_preference_takes_the_first_offer(accept: str) -> None:
    assert negotiate(accept, OFFERS).chosen == OFFERS[0]
    assert negotiate(None, OFFERS).chosen == OFFERS[0]


@st.composite
def token_claims(draw: st.DrawFn) -> dict[str, object]:
    return {
        "device_id": draw(st.uuids()),
        "organization_id": draw(st.uuids()),
        "project_id": draw(st.uuids()),
        "device_id_hash": draw(st.binary(min_size=32, max_size=32)),
        # At least a minute: `exp` is whole seconds, so a 1 s token could expire before a busy machine verified it.
        "lifetime": timedelta(seconds=draw(st.integers(min_value=60, max_value=3600))),
    }


@bounded
@given(claims=token_claims())
def test_device_token_round_trips(claims: dict[str, object]) -> None:
    token, seconds = issue_device_token(SECRET, **claims)  # type: ignore[arg-type]
    verified = verify_device_token(token, (SECRET,))
    lifetime = claims["lifetime"]
    assert isinstance(lifetime, timedelta)
    assert seconds == min(lifetime, MAX_TOKEN_LIFETIME).total_seconds()
    assert verified.device_id == claims["device_id"]
    assert verified.project_id == claims["project_id"]
    assert verified.organization_id == claims["organization_id"]
    assert verified.device_id_hash == claims["device_id_hash"]


@bounded
@given(claims=token_claims(), data=st.data())
def test_device_token_with_any_changed_character_is_refused(claims: dict[str, object], data: st.DataObject) -> None:
    token, _ = issue_device_token(SECRET, **claims)  # type: ignore[arg-type]
    position = data.draw(st.integers(min_value=0, max_value=len(token) - 1))
    replacement = data.draw(st.sampled_from("AQgw_-.xyz0=").filter(lambda c: c != token[position]))
    tampered = token[:position] + replacement + token[position + 1 :]
    try:
        verified = verify_device_token(tampered, (SECRET,))
    except InvalidDeviceTokenError:
        return
    # base64url's last character may carry unused bits: the same claims may still decode; nothing else may.
    assert verified.device_id == claims["device_id"]
    assert verified.device_id_hash == claims["device_id_hash"]


@bounded
@given(
    token=st.one_of(st.text(max_size=200), st.text(alphabet=st.sampled_from("eyJhbGciOiJ.-_0123456789"), max_size=200))
)
def test_device_token_verification_raises_only_invalid_token(token: str) -> None:
    try:
        verify_device_token(token, (SECRET,))
    except InvalidDeviceTokenError:
        return
    raise AssertionError("an arbitrary string verified")


@bounded
@given(claims=token_claims(), past=st.integers(min_value=1, max_value=10**6))
def test_expired_device_token_is_refused_as_expired(claims: dict[str, object], past: int) -> None:
    lifetime = claims["lifetime"]
    assert isinstance(lifetime, timedelta)
    issued = datetime.now(UTC) - min(lifetime, MAX_TOKEN_LIFETIME) - timedelta(seconds=past + 1)
    token, _ = issue_device_token(SECRET, now=issued, **claims)  # type: ignore[arg-type]
    try:
        verify_device_token(token, (SECRET,))
    except ExpiredDeviceTokenError:
        return
    raise AssertionError("an expired token verified")


@bounded
@given(
    claims=token_claims(),
    algorithm=st.sampled_from(["none", "HS384", "HS512"]),
    audience=st.sampled_from([AUDIENCE, "other"]),
)
def test_device_token_with_another_algorithm_is_refused(
    claims: dict[str, object], algorithm: str, audience: str
) -> None:
    now = datetime.now(UTC)
    body = {
        "iss": ISSUER,
        "aud": audience,
        "sub": str(claims["device_id"]),
        "org": str(claims["organization_id"]),
        "prj": str(claims["project_id"]),
        "dih": bytes(32).hex(),
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": uuid.uuid4().hex,
    }
    token = jwt.encode(
        body, "" if algorithm == "none" else SECRET, algorithm=algorithm, headers={"kid": secret_key_id(SECRET)}
    )
    try:
        verify_device_token(token, (SECRET,))
    except InvalidDeviceTokenError:
        return
    raise AssertionError(f"a token signed with {algorithm} verified")
