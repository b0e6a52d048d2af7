"""Registers the backups domain: its controllers, the master keyring and the maintenance runner."""

from __future__ import annotations

from litestar.config.app import AppConfig
from litestar.plugins import InitPluginProtocol

from zkeb.core.runtime import Runtime
from zkeb.domain.backups.context import STATE_KEY, BackupsContext, build_keyring
from zkeb.domain.backups.controllers.backups import BackupController, ContainerController
from zkeb.domain.backups.controllers.project_storage import ProjectStorageController
from zkeb.domain.backups.controllers.uploads import UploadController
from zkeb.domain.backups.crypto import PayloadCrypto
from zkeb.domain.backups.deps import dependencies
from zkeb.domain.backups.jobs.key_rotation import StoredKeysCheck
from zkeb.domain.backups.jobs.maintenance import MaintenanceRunner
from zkeb.domain.backups.metrics import open_upload_sessions_sampler
from zkeb.domain.backups.openapi import add_backups_openapi
from zkeb.domain.backups.store.payloads import PayloadStores
from zkeb.domain.backups.store.s3 import S3ChunkStore, S3PayloadStore
from zkeb.settings import Settings

__all__ = ("BackupsPlugin",)

MAINTENANCE_STATE_KEY = "backups_maintenance"


def payload_stores(settings: Settings) -> tuple[PayloadStores, S3ChunkStore | None]:
    """The payload stores `settings` configure, and the S3 client to open at start-up when there is one."""
    if settings.payload_store.kind != "s3":
        return PayloadStores("postgres"), None
    objects = S3ChunkStore(settings.payload_store)
    return PayloadStores("s3", s3=S3PayloadStore(objects)), objects


class BackupsPlugin(InitPluginProtocol):
    """Backups, restore, tus uploads and the lifecycle; the master keys are validated when the app is built."""

    def __init__(self, *, run_maintenance: bool = True) -> None:
        """`run_maintenance=False` leaves sweeping to another process (`zkeb maintenance run`) or to a test.

        `MAINTENANCE_INTERVAL=0` does the same from the environment.
        """
        self.run_maintenance = run_maintenance

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        """Add the controllers, their service providers and the domain's context; run maintenance with the app.

        Raises:
            SettingsError: `ZKEB_MASTER_ENCRYPTION_KEY` (or `_NEW`) is not a 32-byte key.
        """
        runtime: Runtime = app_config.state["runtime"]
        keyring = build_keyring(runtime.settings)
        stores, opened = payload_stores(runtime.settings)
        context = BackupsContext(
            settings=runtime.settings, engine=runtime.engine, crypto=PayloadCrypto(keyring), stores=stores
        )
        runner = MaintenanceRunner(runtime.engine, runtime.settings, objects=opened)
        app_config.state[STATE_KEY] = context
        app_config.state[MAINTENANCE_STATE_KEY] = runner
        app_config.route_handlers.extend(
            [BackupController, ContainerController, ProjectStorageController, UploadController]
        )
        app_config.dependencies.update(dependencies())
        stored_keys = StoredKeysCheck(runtime.engine, keyring)
        runtime.readiness_checks.append(stored_keys)
        runtime.openapi_additions.append(add_backups_openapi)
        runtime.metric_samplers.append(open_upload_sessions_sampler(runtime.engine))
        runtime.readiness_checks.append(stores.check)
        if opened is not None:
            # The object store's client (and its connection pool) lives as long as the app: first up, last down.
            app_config.on_startup.insert(0, opened.__aenter__)
            app_config.on_shutdown.append(opened.close)

        async def start_stored_keys_check() -> None:
            stored_keys.start()

        app_config.on_startup.append(start_stored_keys_check)
        app_config.on_shutdown.insert(0, stored_keys.stop)
        if self.run_maintenance:

            async def start_maintenance() -> None:
                runner.start()

            async def stop_maintenance() -> None:
                await runner.stop()

            app_config.on_startup.append(start_maintenance)
            app_config.on_shutdown.insert(0, stop_maintenance)
        return app_config
