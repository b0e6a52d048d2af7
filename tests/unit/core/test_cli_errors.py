"""The admin CLI's one-line errors: what an `OSError` is said to be depends on whether it names a file."""

from __future__ import annotations

import click
import pytest

from zkeb.cli import _friendly_errors


def _raising(error: BaseException) -> click.ClickException:
    @_friendly_errors
    def command() -> None:
        raise error

    with pytest.raises(click.ClickException) as raised:
        command()
    return raised.value


def test_a_file_system_error_names_the_file_not_the_database() -> None:
    error = _raising(PermissionError(13, "Permission denied", "/srv/zkeb/pgdata"))
    assert error.message == "Permission denied: /srv/zkeb/pgdata"


def test_a_connection_error_is_the_database_that_cannot_be_reached() -> None:
    error = _raising(ConnectionRefusedError(111, "Connection refused"))
    assert error.message == "cannot reach the database: Connection refused"


def test_a_database_that_never_answers_says_so() -> None:
    # asyncpg's connect timeout is a bare `TimeoutError` (an `OSError` with no text): the pre-deploy command of a
    # deployment whose database hung printed "cannot reach the database: " and nothing more (an operator review).
    error = _raising(TimeoutError())
    assert error.message == "cannot reach the database: it did not answer in time"
