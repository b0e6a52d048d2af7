"""Registers the backups domain: its controllers, the master keyring and the upload sweeper."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from zkeb.core.runtime import Runtime
from zkeb.domain.backups.context import STATE_KEY, BackupsContext, build_keyring
from zkeb.domain.backups.controllers import BackupController, ContainerController
from zkeb.domain.backups.storage import PayloadCrypto
from zkeb.domain.backups.tus import UploadController, UploadSweeper

__all__ = ("BackupsPlugin",)


class BackupsPlugin(InitPluginProtocol):
    """Backups, restore and tus uploads; the master keys are validated when the app is built."""

    def __init__(self, *, run_sweeper: bool = True) -> None:
        """`run_sweeper=False` leaves purging expired uploads to another process (or to a test)."""
        self.run_sweeper = run_sweeper

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the controllers and the domain's context; start and stop the sweeper with the app.

        Raises:
            SettingsError: `ZKEB_MASTER_ENCRYPTION_KEY` (or `_NEW`) is not a 32-byte key.
        """
        runtime: Runtime = app_config.state["runtime"]
        keyring = build_keyring(runtime.settings)
        context = BackupsContext(settings=runtime.settings, engine=runtime.engine, crypto=PayloadCrypto(keyring))
        sweeper = UploadSweeper(runtime.engine)
        app_config.state[STATE_KEY] = context
        app_config.state["backups_sweeper"] = sweeper
        app_config.route_handlers.extend([BackupController, ContainerController, UploadController])
        if self.run_sweeper:

            async def start_sweeper() -> None:
                sweeper.start()

            async def stop_sweeper() -> None:
                await sweeper.stop()

            app_config.on_startup.append(start_sweeper)
            app_config.on_shutdown.insert(0, stop_sweeper)
        return app_config
