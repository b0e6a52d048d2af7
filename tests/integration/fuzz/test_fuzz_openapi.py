"""Schemathesis against a live server: no 5xx and no response outside the document, for each kind of principal.

A real granian process on a real database and Redis, seeded over HTTP with an organization (its admin key), a
project with a project key, an enrolled device (a device token from a proof of possession), a committed backup and
an open tus upload. For the org admin, the project key and the device in turn:
- every operation gets a bounded number of generated requests, valid and invalid, half of them naming the seeded
  resources in their path (so they reach past 404);
- then schemathesis' stateful phase follows the document's links from created and listed resources to the
  operations that take their ids.
Each response must be no 5xx and conform to the document (status, media type, headers, body schema). Every failure is
collected, then reported together. Under CI the examples are the same every run (the "ci" Hypothesis profile).
"""

from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import msgspec
import pytest
import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import strategies as st
from hypothesis.stateful import initialize
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.generation.stateful.state_machine import StepInput, StepOutput
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from zkeb.lib.envelope import auth_message
from zkeb.settings import Settings

from support import Envelope, create_org, granian_server, make_settings, sign_backup

pytestmark = pytest.mark.timeout(240)

#: Generated requests per operation and principal, and stateful scenarios per principal (keeps the module ~2 min).
EXAMPLES_PER_OPERATION = 12
STATEFUL_SCENARIOS = 40
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


# A tus PATCH body is raw bytes: sent as schemathesis sends `application/octet-stream`.
schemathesis.serializer.alias("application/offset+octet-stream", "application/octet-stream")


@schemathesis.serializer("application/msgpack")
def _msgpack(_: schemathesis.SerializationContext, value: Any) -> bytes:
    """A msgpack envelope body (integers msgpack cannot hold are sent as their decimal text)."""
    return msgspec.msgpack.encode(_msgpack_safe(value))


def _msgpack_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _msgpack_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_msgpack_safe(item) for item in value]
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return str(value)
    return value


@dataclass
class Principal:
    """Who the fuzzer acts as, and the ids of what the seeding made for it."""

    name: str
    credential: str
    path_values: dict[str, str]
    #: A fresh envelope signed by the seeded device, when this principal may upload backups.
    new_envelope: Callable[[], Envelope] | None = None


@dataclass
class Outcome:
    """What a run saw: statuses per operation and every check that failed."""

    statuses: dict[str, Counter[int]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    #: Why the phase stopped before its budget, if it did.
    cut_short: str | None = None

    def record(self, label: str, status: int) -> None:
        self.statuses.setdefault(label, Counter())[status] += 1

    def reached(self) -> list[str]:
        """Operations that answered 2xx at least once."""
        return sorted(label for label, seen in self.statuses.items() if any(200 <= s < 300 for s in seen))

    def examples(self) -> int:
        return sum(sum(seen.values()) for seen in self.statuses.values())


def _auth(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def _created(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _seed(http: httpx.AsyncClient, settings: Settings) -> dict[str, Principal]:
    """An organization, a project with a key, a device with a token, a backup, a trashed one and an open upload."""
    _, admin = await create_org(settings, f"fuzz-{uuid.uuid4().hex[:6]}")
    project = _created(await http.post("/api/v1/projects", json={"name": "fuzzed"}, headers=_auth(admin)))
    project_id = uuid.UUID(project["id"])
    key = _created(await http.post(f"/api/v1/projects/{project_id}/api-keys", json={"name": "k"}, headers=_auth(admin)))
    private_key = Ed25519PrivateKey.generate()
    device_id_hash = hashlib.sha256(uuid.uuid4().bytes).digest()
    public = base64.b64encode(private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()
    device = _created(
        await http.post(
            f"/api/v1/projects/{project_id}/devices",
            json={"device_id_hash": device_id_hash.hex(), "public_key": public, "label": "phone"},
            headers=_auth(admin),
        )
    )
    now_ms = int(time.time() * 1000)
    proof = private_key.sign(auth_message(project_id=project_id, device_id_hash=device_id_hash, timestamp_ms=now_ms))
    token = await http.post(
        "/api/v1/auth/token",
        json={
            "project_id": str(project_id),
            "device_id_hash": device_id_hash.hex(),
            "timestamp_ms": now_ms,
            "signature": base64.b64encode(proof).decode(),
        },
    )
    assert token.status_code == 200, token.text
    envelope = sign_backup(private_key, project_id=project_id, device_id_hash=device_id_hash, payload=os.urandom(4096))
    backup = _created(await http.post("/api/v1/backups", json=envelope.json(), headers=_auth(key["key"])))
    trashed = sign_backup(private_key, project_id=project_id, device_id_hash=device_id_hash, payload=os.urandom(512))
    trashed_id = _created(await http.post("/api/v1/backups", json=trashed.json(), headers=_auth(key["key"])))["id"]
    assert (await http.delete(f"/api/v1/backups/{trashed_id}", headers=_auth(admin))).status_code == 204

    def new_envelope() -> Envelope:
        payload = os.urandom(1024)
        return sign_backup(private_key, project_id=project_id, device_id_hash=device_id_hash, payload=payload)

    open_upload = sign_backup(private_key, project_id=project_id, device_id_hash=device_id_hash, payload=b"x" * 64)
    upload = await http.post(
        "/api/v1/uploads",
        headers={
            **_auth(key["key"]),
            "Tus-Resumable": "1.0.0",
            "Upload-Length": "64",
            "Upload-Metadata": open_upload.tus_metadata(),
        },
    )
    assert upload.status_code == 201, upload.text
    values = {
        "project_id": str(project_id),
        "backup_id": backup["id"],
        "container_id": backup["container_id"],
        "upload_id": upload.headers["location"].rsplit("/", 1)[-1],
        "key_id": key["id"],
        "device_id": device["id"],
    }
    return {
        # The org admin restores from the trash (and reads no backup), so its backup is the trashed one.
        "org admin": Principal("org admin", admin, {**values, "backup_id": trashed_id}),
        "project key": Principal("project key", key["key"], values, new_envelope),
        "device": Principal("device", token.json()["access_token"], values, new_envelope),
    }


@pytest.fixture
def live_url(base_settings_env: dict[str, str], database_url: str, redis_url: str) -> Iterator[str]:
    env = {
        **base_settings_env,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        # The limiter stays on (its code runs) but must not turn the fuzzer's requests into 429s.
        "RATE_LIMIT_PER_MINUTE": "1000000",
        "TOKEN_RATE_LIMIT_PER_MINUTE": "1000000",
    }
    with granian_server(env) as url:
        yield url


def _check(
    outcome: Outcome, case: schemathesis.Case[Any], response: schemathesis.Response, headers: dict[str, str]
) -> None:
    label = f"{case.operation.method.upper()} {case.operation.path}"
    outcome.record(label, response.status_code)
    try:
        case.validate_response(response, checks=CHECKS, headers=headers)
    except (Failure, FailureGroup) as exc:
        failures = exc.exceptions if isinstance(exc, FailureGroup) else (exc,)
        for failure in failures:
            outcome.failures.append(f"{label} -> {response.status_code}: {failure.title}: {failure.message[:300]}")


def _run_examples(schema: Any, base_url: str, principal: Principal, outcome: Outcome) -> None:
    """Each operation: generated requests, valid and invalid, half of them on the seeded resources."""
    headers = _auth(principal.credential)
    operations = [result.ok() for result in schema.get_all_operations()]
    # Deletions last, so the seeded backup, upload, key and device serve every other operation first.
    operations.sort(key=lambda operation: operation.method.lower() == "delete")
    for operation in operations:
        seeded = {name: value for name, value in principal.path_values.items() if name in operation.path_parameters}
        modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
        strategies = [operation.as_strategy(generation_mode=mode) for mode in modes]
        if seeded:
            strategies += [operation.as_strategy(generation_mode=mode, path_parameters=seeded) for mode in modes]

        @hypothesis.given(case=st.one_of(strategies))
        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(hypothesis.HealthCheck),
            phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        )
        def run(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            _check(outcome, case, response, headers)

        run()


def _run_stateful(schema: Any, base_url: str, principal: Principal, outcome: Outcome) -> None:
    """Schemathesis' state machine: scenarios that follow the document's links.

    A fuzzer cannot sign the envelope that creates a backup or a tus upload, so for a principal that may upload,
    each scenario starts with a backup and an upload made from envelopes the seeded device signed; the links lead
    on from their `201`s.
    """
    headers = _auth(principal.credential)
    machine = schema.as_state_machine()
    new_envelope = principal.new_envelope

    class Links(machine):  # type: ignore[misc, valid-type]
        def get_call_kwargs(self, case: schemathesis.Case[Any]) -> dict[str, Any]:
            return {"base_url": base_url, "headers": headers, "timeout": 30}

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case[Any], *_: Any, **__: Any
        ) -> None:
            _check(outcome, case, response, headers)

    if new_envelope is not None:
        create, upload = schema["/api/v1/backups"]["POST"], schema["/api/v1/uploads"]["POST"]

        def first_step(machine: Links, case: schemathesis.Case[Any]) -> StepOutput:
            step = StepInput.initial(case)
            machine.recorder.record_case(case=step.case)  # later steps look their parent up here
            machine.control.record_step(step, machine.recorder)
            output: StepOutput = machine.step(step)
            return output

        @initialize(target=machine.bundles["POST /api/v1/backups -> 201"])
        def upload_signed_backup(self: Links) -> StepOutput:
            return first_step(self, create.Case(body=new_envelope().json(), media_type="application/json"))

        @initialize(target=machine.bundles["POST /api/v1/uploads -> 201"])
        def open_signed_upload(self: Links) -> StepOutput:
            envelope = new_envelope()
            tus = {
                "Tus-Resumable": "1.0.0",
                "Upload-Length": str(len(envelope.payload)),
                "Upload-Metadata": envelope.tus_metadata(),
            }
            return first_step(self, upload.Case(headers=tus))

        Links.upload_signed_backup = upload_signed_backup
        Links.open_signed_upload = open_signed_upload

    try:
        Links.run(
            settings=hypothesis.settings(
                max_examples=STATEFUL_SCENARIOS,
                stateful_step_count=6,
                deadline=None,
                suppress_health_check=list(hypothesis.HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
        )
    except hypothesis.errors.Flaky as exc:
        # Hypothesis replayed a scenario and the live server (whose state earlier scenarios changed) answered it
        # otherwise. Not a finding: schemathesis' own runner ends the phase the same way. What ran is recorded.
        outcome.cut_short = type(exc).__name__


def _summary(phase: str, principal: Principal, outcome: Outcome) -> str:
    return (
        f"{principal.name} {phase}: {outcome.examples()} requests over {len(outcome.statuses)} operations, "
        f"{len(outcome.reached())} answered 2xx ({', '.join(outcome.reached())}), {len(outcome.failures)} failures"
        + (f" (stopped early: {outcome.cut_short})" if outcome.cut_short else "")
    )


@pytest.mark.parametrize("who", ["org admin", "project key", "device"])
async def test_fuzzed_requests_get_no_5xx_and_responses_conform_to_the_document(
    who: str, live_url: str, base_settings_env: dict[str, str], database_url: str
) -> None:
    async with httpx.AsyncClient(base_url=live_url, timeout=30) as http:
        principals = await _seed(http, make_settings(base_settings_env, DATABASE_URL=database_url))
    principal = principals[who]
    schema = schemathesis.openapi.from_url(f"{live_url}/schema/openapi.json")
    examples, stateful = Outcome(), Outcome()
    _run_examples(schema, live_url, principal, examples)
    print(_summary("examples", principal, examples))  # the fuzz counts, shown with `pytest -s`
    _run_stateful(schema, live_url, principal, stateful)
    print(_summary("stateful", principal, stateful))
    failures = sorted(set(examples.failures + stateful.failures))
    assert not failures, "\n".join(failures)


def test_the_checks_catch_a_response_the_document_does_not_describe(live_url: str) -> None:
    # The document claims `/api/health/live` answers a body with a member it never sends: the run must say so.
    document = httpx.get(f"{live_url}/schema/openapi.json").json()
    live = document["paths"]["/api/health/live"]["get"]["responses"]["200"]
    live["content"]["application/json"]["schema"] = {"type": "object", "required": ["never_sent"]}
    operation = schemathesis.openapi.from_dict(document)["/api/health/live"]["GET"]
    case = operation.Case()
    outcome = Outcome()
    _check(outcome, case, case.call(base_url=live_url, timeout=30), {})
    assert outcome.statuses == {"GET /api/health/live": Counter({200: 1})}
    assert len(outcome.failures) == 1
    assert "never_sent" in outcome.failures[0]
