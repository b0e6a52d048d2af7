"""Aggregation of unauthenticated audit events: the first occurrence of a subject in a window is recorded."""

from __future__ import annotations

import uuid

from zkeb.core import auditthrottle


async def test_only_the_first_occurrence_of_a_subject_in_a_window_is_recorded() -> None:
    subject, other = f"test:{uuid.uuid4()}", f"test:{uuid.uuid4()}"
    admissions = [await auditthrottle.admit(None, subject) for _ in range(5)]
    assert [a.record for a in admissions] == [True, False, False, False, False]
    assert (await auditthrottle.admit(None, other)).record is True
