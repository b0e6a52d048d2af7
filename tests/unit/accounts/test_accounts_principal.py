"""What each principal kind may act for: the rules the backups domain relies on."""

from __future__ import annotations

import hashlib
import uuid

import pytest

from zkeb.core.auth import Principal
from zkeb.core.errors import NotFoundError

ORG = uuid.uuid4()
PROJECT = uuid.uuid4()
OTHER_PROJECT = uuid.uuid4()
MINE = hashlib.sha256(b"mine").digest()
THEIRS = hashlib.sha256(b"theirs").digest()


def test_a_device_acts_only_for_its_own_device_id_hash() -> None:
    device = Principal(
        kind="device",
        organization_id=ORG,
        credential_id="jti",
        project_id=PROJECT,
        device_id=uuid.uuid4(),
        device_id_hash=MINE,
    )
    assert device.can_act_for_device(MINE)
    assert not device.can_act_for_device(THEIRS)


def test_a_project_key_acts_for_any_device_of_its_project_only() -> None:
    key = Principal(kind="project", organization_id=ORG, credential_id="k", project_id=PROJECT)
    assert key.can_act_for_device(MINE)
    assert key.can_act_for_device(THEIRS)
    key.require_project(PROJECT)
    with pytest.raises(NotFoundError):
        key.require_project(OTHER_PROJECT)


def test_an_org_admin_reaches_every_project_of_its_organization() -> None:
    admin = Principal(kind="org_admin", organization_id=ORG, credential_id="k")
    admin.require_project(PROJECT)
    admin.require_project(OTHER_PROJECT)
    assert admin.actor_type == "org_admin_key"
