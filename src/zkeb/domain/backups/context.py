"""What the backups domain needs from one running app: settings, the engine, the master keyring, payload stores."""

from __future__ import annotations

from dataclasses import dataclass

from litestar.datastructures import State
from sqlalchemy.ext.asyncio import AsyncEngine

from zkeb.domain.backups.crypto import PayloadCrypto
from zkeb.domain.backups.store.payloads import PayloadStores
from zkeb.lib.atrest import MasterKeyring, parse_master_key
from zkeb.settings import Settings, SettingsError

__all__ = ("STATE_KEY", "BackupsContext", "backups_context", "build_keyring")

STATE_KEY = "backups"


def build_keyring(settings: Settings) -> MasterKeyring:
    """The master keyring: `ZKEB_MASTER_ENCRYPTION_KEY_NEW` wraps new data keys while it is set (rotation).

    Raises:
        SettingsError: a master key is not a 32-byte key; the message names the variable, never the value.
    """
    try:
        current = parse_master_key(settings.secrets.master_key, name="ZKEB_MASTER_ENCRYPTION_KEY")
        new = (
            parse_master_key(settings.secrets.master_key_new, name="ZKEB_MASTER_ENCRYPTION_KEY_NEW")
            if settings.secrets.master_key_new
            else None
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    if new is None:
        return MasterKeyring(active=current)
    return MasterKeyring(active=new, others=(current,))


@dataclass(frozen=True, slots=True)
class BackupsContext:
    """Process-wide resources of the backups domain, kept in `app.state.backups`."""

    settings: Settings
    engine: AsyncEngine
    crypto: PayloadCrypto
    #: Where payload chunks go (`stores.default`) and are read from (`stores.for_kind(payload.store)`).
    stores: PayloadStores


def backups_context(state: State) -> BackupsContext:
    """The domain's context from the app state."""
    context: BackupsContext = state[STATE_KEY]
    return context
