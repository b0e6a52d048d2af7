"""`zkeb-client`: the command line over the SDK (keygen, export-recovery, enroll, backup, restore, ls, verify, rm).

Settings come from flags or the environment (`ZKEB_SERVER`, `ZKEB_IDENTITY`, `ZKEB_TOKEN`, `ZKEB_PROJECT`,
`ZKEB_PASSPHRASE`). Exit status: 0 success, 1 the server refused or could not be reached, 2 bad usage or settings,
3 a backup failed verification, 4 a key-file problem. On failure stderr gets one line, ``zkeb-client: error: ...``.
With ``--json`` the last stdout line is one JSON object (``ls`` prints ``{"items": [...]}``).

Start-up is part of every command's time, so what only some commands need is imported where it is used: the SDK
and its HTTP stack by the commands that talk to a server, rich only when a progress bar is shown on a terminal.
"""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
import msgspec

from zkeb.client.errors import ConfigurationError, IntegrityError, KeyFileError, ZkebClientError
from zkeb.client.keys import KeyFile

if TYPE_CHECKING:
    from zkeb.client.models import LeftOut
    from zkeb.client.sdk import AsyncClient

__all__ = ("main",)

EXIT_FAILURE, EXIT_USAGE, EXIT_INTEGRITY, EXIT_KEYFILE = 1, 2, 3, 4
#: Ctrl-C (SIGINT) and SIGTERM, as a shell reports a command those signals killed: 128 + the signal's number.
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143
T = TypeVar("T")


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"zkeb-client: error: {' '.join(message.split())}", err=True)
    sys.exit(code)


def _exit_code(exc: ZkebClientError) -> int:
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(exc, KeyFileError):
        return EXIT_KEYFILE
    return EXIT_FAILURE


#: What Ctrl-C says for a command that leaves nothing to pick up again.
INTERRUPTED = "interrupted"
#: What it says for a backup, whose upload the same command continues from the server's offset.
INTERRUPTED_BACKUP = "interrupted; run the same command again to resume the upload"
#: What it says for a restore: nothing was written, and a restore (one download) starts over when run again.
INTERRUPTED_RESTORE = "interrupted; nothing was restored (run the command again to restore from the start)"


def _one_line_errors(interrupted: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Turn the client's exceptions (and Ctrl-C, saying `interrupted`) into one stderr line and the exit status."""

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> None:
            try:
                command(*args, **kwargs)
            except ZkebClientError as exc:
                _fail(str(exc), _exit_code(exc))
            except KeyboardInterrupt as exc:
                _fail(interrupted, EXIT_TERMINATED if isinstance(exc, _Terminated) else EXIT_INTERRUPTED)
            except click.Abort:  # Ctrl-C (or end of input) at a prompt: nothing had started yet
                _fail(INTERRUPTED, EXIT_INTERRUPTED)
            except OSError as exc:
                _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), EXIT_FAILURE)
            except Exception as exc:  # noqa: BLE001 - the contract is one stderr line, even for a bug of ours
                # An HTTP library's text may quote a request's headers (the credential): only its class is shown.
                text = "" if type(exc).__module__.split(".")[0] in {"httpx", "httpcore", "h11"} else f": {exc}"
                _fail(f"unexpected {type(exc).__name__}{text}", EXIT_FAILURE)

        return wrapper

    return decorate


#: What click (8.2 and later) raises for a group called with no arguments, so that it shows its help.
_NO_ARGS_IS_HELP: tuple[type[click.UsageError], ...] = tuple(
    error for error in [getattr(click.exceptions, "NoArgsIsHelpError", None)] if error is not None
)


class _OneLineGroup(click.Group):
    """The command group; a usage error (a bad option value, a missing argument) is one stderr line too, exit 2.

    click shows its own usage errors as four lines (usage, a hint, a blank line, the error): the contract is one.
    """

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; in standalone mode (the default) exit with its status."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            status = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as exc:
            if isinstance(exc, _NO_ARGS_IS_HELP):
                exc.show()  # a bare `zkeb-client` asks for its help, not an error line
                sys.exit(exc.exit_code)
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(f"{exc.format_message()}{where}", exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code)
        except click.Abort:
            _fail(INTERRUPTED, EXIT_INTERRUPTED)
        sys.exit(status if isinstance(status, int) else 0)


class CliSettings(msgspec.Struct):
    """The group's options, handed to each command."""

    server: str | None
    identity: Path | None
    token: str | None
    project: uuid.UUID | None
    passphrase: str | None

    def keys(self) -> KeyFile:
        """The key file, opened (asking for its passphrase on a terminal when it is sealed and none was given)."""
        if self.identity is None:
            raise ConfigurationError("no key file: pass --identity or set ZKEB_IDENTITY")
        try:
            data = self.identity.read_bytes()
            mode = self.identity.stat().st_mode & 0o777
        except FileNotFoundError:
            raise KeyFileError(f"{self.identity} does not exist (create it with `zkeb-client keygen`)") from None
        if os.name == "posix" and mode & 0o077:  # as ssh refuses a private key others can use
            raise KeyFileError(
                f"{self.identity} is open to other users (mode {mode:04o}): its keys open every backup; "
                f"restrict it with `chmod 600 {self.identity}`"
            )
        if self.passphrase is None and KeyFile.is_sealed(data) and sys.stdin.isatty():
            # Kept for the run: `enroll` rewrites the file and must seal it again with the same passphrase.
            self.passphrase = click.prompt("Key file passphrase", hide_input=True, err=True)
        return KeyFile.from_bytes(data, self.passphrase)

    def client(self, *, keys: bool = True) -> AsyncClient:
        """An SDK client from these settings; made outside the event loop, as it may prompt for the passphrase."""
        if not self.server:
            raise ConfigurationError("no server: pass --server or set ZKEB_SERVER")
        opened = self.keys() if keys else None
        from zkeb.client.sdk import AsyncClient  # noqa: PLC0415 - the HTTP stack, for the commands that use it

        return AsyncClient(self.server, keys=opened, api_key=self.token, project_id=self.project)


#: The group's settings, which each command accepts after its name too (`zkeb-client ls --server URL`).
_SETTINGS_AFTER_THE_COMMAND: tuple[tuple[str, dict[str, Any]], ...] = (
    ("server", {"metavar": "URL"}),
    ("identity", {"metavar": "FILE", "type": click.Path(dir_okay=False, path_type=Path)}),
    ("token", {"metavar": "KEY"}),
    ("project", {"metavar": "UUID"}),
    ("passphrase", {"metavar": "TEXT"}),
)


def _setting(name: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """The callback of a setting given after the command: it overrides the group's flag and the environment."""

    def override(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if name == "project":
            value = _uuid(ctx, param, value)
        if value is not None:
            setattr(ctx.find_object(CliSettings), name, value)
        return value

    return override


def _settings_after_the_command(command: Callable[..., None]) -> Callable[..., None]:
    """Accept the group's settings after the command's name as well as before it, as users write them."""
    for name, attrs in reversed(_SETTINGS_AFTER_THE_COMMAND):
        option = click.option(
            f"--{name}", expose_value=False, callback=_setting(name), help="As before the command.", **attrs
        )
        command = option(command)
    return command


class _Terminated(KeyboardInterrupt):
    """SIGTERM ended the command: reported as Ctrl-C is, with exit status 143 (128 + SIGTERM)."""


def _run(client: AsyncClient, work: Callable[[AsyncClient], Coroutine[Any, Any, T]]) -> T:
    """Run ``work`` with ``client`` in an event loop, closing the client after.

    The client (and so the key file, and its passphrase prompt) is made by the caller, before the loop: a prompt
    inside it would block the loop, whose Ctrl-C handler only cancels a task, so the first Ctrl-C would go unnoticed.
    """

    async def go() -> T:
        task = asyncio.current_task()
        if task is not None and os.name == "posix":  # an event loop takes signals on POSIX only
            # As Ctrl-C does: cancel the command, so that it cleans up (a restore's temporary files and folders).
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        async with client:
            return await work(client)

    try:
        return asyncio.run(go())
    except asyncio.CancelledError:
        raise _Terminated from None  # asyncio.run raises KeyboardInterrupt for Ctrl-C, CancelledError for SIGTERM


def _can_prompt() -> bool:
    """Whether a hidden prompt has a terminal: getpass (under click's) reads the controlling one, else stdin."""
    if sys.stdin.isatty():
        return True
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


@contextmanager
def _progress(description: str, enabled: bool) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar (bytes, rate, ETA) on stderr when it is a terminal; nothing when piped."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console  # noqa: PLC0415 - a tenth of the start-up, for a terminal only
    from rich.progress import (  # noqa: PLC0415
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    stderr = Console(stderr=True)
    if not stderr.is_terminal:
        yield None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=stderr, transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _report_left_out(left_out: list[LeftOut], verb: str) -> None:
    """One stderr line per directory entry that was not backed up or restored, and why."""
    for entry in left_out:
        click.echo(f"zkeb-client: {verb} {' '.join(entry.path.split())} ({entry.reason})", err=True)


def _emit(as_json: bool, obj: msgspec.Struct | dict[str, Any], text: str) -> None:
    click.echo(msgspec.json.encode(obj, enc_hook=str).decode() if as_json else text)


def _uuid(_ctx: click.Context, _param: click.Parameter, value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a UUID") from None


JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last stdout line.")
CONTAINER_HELP = "The container (a UUID you choose) grouping this app's backups."


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--server",
    envvar="ZKEB_SERVER",
    metavar="URL",
    help="Server base URL, e.g. http://127.0.0.1:3000. [env: ZKEB_SERVER]",
)
@click.option(
    "--identity",
    envvar="ZKEB_IDENTITY",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="This device's key file. [env: ZKEB_IDENTITY]",
)
@click.option(
    "--token",
    envvar="ZKEB_TOKEN",
    metavar="KEY",
    help="API key (zkeb_...): org admin for enroll, or a project key for ls/rm. Device commands fetch and refresh "
    "their own device token from the key file. [env: ZKEB_TOKEN]",
)
@click.option(
    "--project",
    envvar="ZKEB_PROJECT",
    callback=_uuid,
    metavar="UUID",
    help="Project id; after enroll the key file remembers it. [env: ZKEB_PROJECT]",
)
@click.option(
    "--passphrase",
    envvar="ZKEB_PASSPHRASE",
    metavar="TEXT",
    help="Passphrase sealing the key file (prompted for on a terminal when needed). [env: ZKEB_PASSPHRASE]",
)
@click.version_option(package_name="zkeb", prog_name="zkeb-client")
@click.pass_context
def cli(
    ctx: click.Context,
    *,
    server: str | None,
    identity: Path | None,
    token: str | None,
    project: uuid.UUID | None,
    passphrase: str | None,
) -> None:
    """Encrypt, sign and back up files to a ZKEB server, and restore them; the server never sees a key.

    \b
    First steps:
      zkeb-client --identity device.key keygen
      zkeb-client --identity device.key --server URL --token ORG_ADMIN_KEY --project UUID enroll --label laptop
      zkeb-client --identity device.key --server URL backup ./notes.txt --container UUID
      zkeb-client --identity device.key --server URL restore --latest --container UUID -o ./restored.txt

    Exit status: 0 success, 1 server refusal or network failure, 2 usage, 3 verification failure, 4 key file.
    """
    ctx.obj = CliSettings(server=server, identity=identity, token=token, project=project, passphrase=passphrase)


@cli.command()
@click.option("--seal/--no-seal", default=None, help="Seal with the passphrase (default: when one is given).")
@click.option("--from-recovery", is_flag=True, help="Rebuild the key file from a recovery form read on stdin.")
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED)
def keygen(settings: CliSettings, seal: bool | None, from_recovery: bool) -> None:
    """Create a device key file (Ed25519 identity + 256-bit backup key), mode 0600; never overwrites.

    With --passphrase (or ZKEB_PASSPHRASE, or --seal to be prompted) the secret is sealed with scrypt
    (N=2^17, r=8, p=1, 128 MiB per guess) and AES-256-GCM. Losing this file, and its recovery form,
    means losing every backup made with it: nobody, not the server's operator, can decrypt them.
    """
    if settings.identity is None:
        raise ConfigurationError("no key file: pass --identity or set ZKEB_IDENTITY")
    passphrase = settings.passphrase
    if seal and passphrase is None:
        if not _can_prompt():
            raise ConfigurationError("--seal needs a terminal for its prompt; use --passphrase or ZKEB_PASSPHRASE")
        passphrase = click.prompt("New passphrase", hide_input=True, confirmation_prompt=True, err=True)
    if seal is False:
        passphrase = None
    if passphrase == "":
        raise ConfigurationError(
            "an empty passphrase protects nothing; give one, or --no-seal for an unsealed key file"
        )
    keys = KeyFile.from_recovery_text(sys.stdin.read()) if from_recovery else KeyFile.generate()
    keys.write_new(settings.identity, passphrase)
    click.echo(f"device id hash: {keys.device_id_hash.hex()}")
    click.echo(
        f"wrote {settings.identity}{' (sealed with your passphrase)' if passphrase else ''}. Keep a copy offline "
        "(`zkeb-client export-recovery`): without this key file your backups cannot be restored by anyone.",
        err=True,
    )


@cli.command("export-recovery")
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED)
def export_recovery(settings: CliSettings) -> None:
    """Print the keys as a recovery form (base32 with a checksum) to keep offline, e.g. on paper.

    Anyone holding it can read and forge your backups. Rebuild a key file from it with
    `zkeb-client keygen --from-recovery < form.txt`, then `enroll` it again (the server knows the device: the file
    then remembers the project) or pass --project.
    """
    click.echo(settings.keys().recovery_text())


@cli.command()
@click.option("--label", required=True, help="A name for this device, shown to the project's admins.")
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED)
def enroll(settings: CliSettings, label: str) -> None:
    """Register this device's public key in the project (needs an org-admin key as --token).

    The key file then remembers the project, so later commands need no --project. A device the project already has
    with this key (enrolled before, or a key file rebuilt from its recovery form) is enrolled already: that is no error.
    """
    if settings.project is None:
        raise ConfigurationError("enroll needs the project: pass --project or set ZKEB_PROJECT")

    async def go(client: AsyncClient) -> Any:
        return await client.enroll(label)

    client = settings.client()
    keys, identity = client.keys, settings.identity
    assert keys is not None  # settings.client() opened them
    assert identity is not None
    sealed = KeyFile.is_sealed(identity.read_bytes())
    # The key file that remembers the project is written first, and put in place once the server enrolled the device:
    # a disk that cannot take it fails before the device is enrolled.
    with keys.with_project(settings.project).rewriting(identity, settings.passphrase if sealed else None):
        enrollment = _run(client, go)
    click.echo(f"enrolled device {enrollment.id} ({enrollment.device_id_hash}) in project {settings.project}")


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--container", required=True, callback=_uuid, metavar="UUID", help=CONTAINER_HELP)
@JSON_OPTION
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED_BACKUP)
def backup(settings: CliSettings, path: Path, container: uuid.UUID, as_json: bool) -> None:
    """Encrypt, sign and upload PATH (a file, or a directory as a tar stream).

    Small files go in one request, larger ones by tus; if interrupted, run the same command again and it
    continues from the server's offset (a file changed in between is detected and sent afresh). A directory's
    special files (FIFOs, sockets, devices) hold no data and are left out, each named on stderr.
    """

    async def go(client: AsyncClient) -> Any:
        with _progress(f"backup {path.name}", not as_json) as progress:
            return await client.backup_file(path, container, progress)

    result = _run(settings.client(), go)
    _report_left_out(result.left_out, "left out")
    note = f", resumed at byte {result.resumed_from}" if result.resumed_from else ""
    _emit(as_json, result, f"backed up {result.name} ({result.size} bytes{note}) as {result.id}")


@cli.command()
@click.argument("backup_id", required=False, callback=_uuid, metavar="[ID]")
@click.option("--latest", is_flag=True, help="Restore the newest backup in --container instead of ID.")
@click.option("--container", callback=_uuid, metavar="UUID", help=CONTAINER_HELP)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(),  # a string: `restored/` (a folder to make) must keep its trailing slash
    help="Where to write it (inside, if a directory or written with a trailing /).",
)
@JSON_OPTION
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED_RESTORE)
def restore(
    settings: CliSettings,
    *,
    backup_id: uuid.UUID | None,
    latest: bool,
    container: uuid.UUID | None,
    output: str,
    as_json: bool,
) -> None:
    """Download, verify (signature, digest, tag, SHA-256), decrypt and write a backup atomically.

    Nothing is written at the destination unless every check passes; a directory backup is extracted
    refusing absolute paths and `..`; links leading out of it are skipped, each named on stderr.
    """
    if (backup_id is None) == (not latest):
        raise ConfigurationError("give a backup ID or --latest (with --container), not both")
    if latest and container is None:
        raise ConfigurationError("--latest needs --container")

    async def go(client: AsyncClient) -> Any:
        with _progress("restore", not as_json) as progress:
            return await client.restore_file(backup_id, output, container_id=container, progress=progress)

    result = _run(settings.client(), go)
    _report_left_out(result.left_out, "did not restore")
    _emit(as_json, result, f"restored {result.name} ({result.size} bytes) to {result.path}")


@cli.command("ls")
@click.option("--container", callback=_uuid, metavar="UUID", help="Only this container's backups.")
@JSON_OPTION
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED)
def list_backups(settings: CliSettings, container: uuid.UUID | None, as_json: bool) -> None:
    """List backups, newest first (names shown for those this key file can open)."""

    async def go(client: AsyncClient) -> Any:
        return await client.list(container)

    records = _run(settings.client(keys=settings.identity is not None), go)
    if as_json:
        _emit(True, {"items": records}, "")
        return
    for record in records:
        described = f"{record.name} ({record.kind}, {record.size} bytes)" if record.name else "(another device's)"
        click.echo(f"{record.id}  {record.created_at:%Y-%m-%d %H:%M:%S}  {record.container_id}  {described}")


@cli.command()
@click.argument("backup_id", callback=_uuid, metavar="ID")
@JSON_OPTION
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED)
def verify(settings: CliSettings, backup_id: uuid.UUID, as_json: bool) -> None:
    """Download a backup and check its signature, digest and decryption; writes nothing."""

    async def go(client: AsyncClient) -> Any:
        with _progress("verify", not as_json) as progress:
            return await client.verify(backup_id, progress)

    result = _run(settings.client(), go)
    _emit(as_json, result, f"backup {result.id} verified: {result.name} ({result.size} bytes)")


@cli.command("rm")
@click.argument("backup_id", callback=_uuid, metavar="ID")
@JSON_OPTION
@_settings_after_the_command
@click.pass_obj
@_one_line_errors(INTERRUPTED)
def remove(settings: CliSettings, backup_id: uuid.UUID, as_json: bool) -> None:
    """Move a backup to the project's trash (an org admin can restore or purge it)."""

    async def go(client: AsyncClient) -> None:
        await client.delete(backup_id)

    _run(settings.client(keys=settings.identity is not None), go)
    _emit(as_json, {"id": str(backup_id), "deleted": True}, f"moved {backup_id} to the trash")


def main() -> None:
    """Console-script entry point."""
    # httpx imports its own command line (click, rich and pygments, about a third of our start-up) whenever those are
    # installed, and falls back to a stub `httpx.main` when that import fails. This process never runs httpx's CLI,
    # so it takes the fallback: a None entry in sys.modules makes that one import fail (nothing else changes).
    sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
    cli(prog_name="zkeb-client")
