"""Settings: parsing, validation errors that name the variable, the production guard, dev secrets."""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path

import pytest

from zkeb.settings import PayloadStoreSettings, Settings, SettingsError, normalize_database_url

PROD_SECRETS = {
    "ZKEB_MASTER_ENCRYPTION_KEY": "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=",
    "JWT_SECRET": "a-jwt-secret-for-production-settings-tests",  # pragma: allowlist secret
    "API_KEY_SALT": "an-api-key-salt-for-production-tests",  # pragma: allowlist secret
}


def test_defaults_follow_the_reference_design(tmp_path: Path) -> None:
    settings = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path)})
    assert settings.port == 3000
    assert settings.max_upload_size == 100_000_000
    assert settings.request_timeout_ms == 30000
    assert settings.db_pool_size == 10
    assert settings.redis_url is None
    assert settings.uses_embedded_database
    assert settings.auto_migrate is True
    assert settings.enable_rate_limiting is True
    assert settings.rate_limit_per_minute == 600


@pytest.mark.parametrize(
    ("value", "expected"), [("100MB", 100_000_000), ("64KiB", 65536), ("1 GiB", 1 << 30), ("512", 512)]
)
def test_max_upload_size_accepts_human_sizes(tmp_path: Path, value: str, expected: int) -> None:
    settings = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "MAX_UPLOAD_SIZE": value})
    assert settings.max_upload_size == expected


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_UPLOAD_SIZE", "lots"),
        ("MAX_UPLOAD_SIZE", "0"),  # started, advertised Tus-Max-Size: 0 and refused every backup
        ("PORT", "http"),
        ("PORT", "70000"),
        ("HOST", "localhost"),  # granian binds an address: a name was a traceback
        ("HOST", "999.1.1.1"),
        ("WEB_CONCURRENCY", "two"),  # was a traceback in `zkeb serve`
        ("WEB_CONCURRENCY", "0"),
        ("HEADER_READ_TIMEOUT", "inf"),  # was a traceback in every worker
        ("MAINTENANCE_INTERVAL", "nan"),  # silently switched maintenance off
        ("SHUTDOWN_GRACE_SECONDS", "-inf"),
        ("BODY_IDLE_TIMEOUT", "Infinity"),
        ("DB_POOL_SIZE", "0"),
        ("ENABLE_RATE_LIMITING", "maybe"),
        ("LOG_LEVEL", "chatty"),
        ("LOG_FORMAT", "xml"),  # was ignored without a word
        ("ZKEB_ENV", "staging"),
        ("DATABASE_URL", "mysql://root@db/zkeb"),
        ("SHUTDOWN_GRACE_SECONDS", "soon"),
        ("REQUEST_TIMEOUT", "1000"),  # was raised to 5 s without a word
        ("BODY_IDLE_TIMEOUT", "0.5"),
        ("BODY_MIN_RATE", "slow"),
        ("CORS_ORIGINS", "notaurl"),  # matched no browser's Origin: CORS silently off
        ("CORS_ORIGINS", "https://app.example.com/"),
        ("CORS_ORIGINS", "https://app.example.com,ftp://files.example.com"),
    ],
)
def test_invalid_values_are_refused_naming_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), name: value})


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgres://u:p@db.internal:5432/railway", "postgresql+asyncpg://u:p@db.internal:5432/railway"),
        ("postgresql://u:p@db:5432/app?sslmode=require", "postgresql+asyncpg://u:p@db:5432/app?ssl=require"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        (
            "postgresql://u@h/d?sslmode=disable&options=-c%20x&connect_timeout=3",
            "postgresql+asyncpg://u@h/d?ssl=disable&connect_timeout=3",
        ),
        ("postgresql://postgres:@/postgres?host=/tmp/pg", "postgresql+asyncpg://postgres:@/postgres?host=%2Ftmp%2Fpg"),
    ],
)
def test_platform_database_urls_map_to_asyncpg(url: str, expected: str) -> None:
    assert normalize_database_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres:{password}@127.0.0.1:notaport/db",
        "postgresql://postgres:{password}@127.0.0.1:70000/db",
        "postgresql://postgres:{password}@127.0.0.1:0/db",
        "postgresql://postgres:{password}@127.0.0.1/db?port=x",
        "postgresql://postgres:{password}@[::1/db",
    ],
)
def test_a_database_url_with_a_malformed_port_or_host_is_refused_without_echoing_it(tmp_path: Path, url: str) -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL") as raised:
        Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "DATABASE_URL": url.format(password="hunter2")})
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        "notaurl",
        "http://:{password}@cache:6379/0",
        "redis://:{password}@cache:notaport/0",
        "redis://:{password}@/0",
        "redis://:{password}@cache:6379/zero",
        "redis://:{password}@[::1/0",
        "unix://",
    ],
)
def test_a_malformed_redis_url_is_refused_without_echoing_it(tmp_path: Path, url: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_URL") as raised:
        Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "REDIS_URL": url.format(password="hunter2")})
    assert "hunter2" not in str(raised.value)


@pytest.mark.parametrize("url", ["redis://cache:6379/0", "rediss://:pw@cache", "unix:///run/redis.sock"])
def test_redis_urls_of_each_scheme_are_accepted(tmp_path: Path, url: str) -> None:
    assert Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "REDIS_URL": url}).redis_url == url


def test_unknown_sslmode_is_refused() -> None:
    with pytest.raises(SettingsError, match="sslmode"):
        normalize_database_url("postgres://u@h/d?sslmode=sometimes")


def test_production_refuses_to_start_without_each_required_variable(tmp_path: Path) -> None:
    base = {
        "ZKEB_ENV": "production",
        "ZKEB_DATA_DIR": str(tmp_path),
        "DATABASE_URL": "postgres://u@h/d",
        **PROD_SECRETS,
    }
    assert Settings.from_env(base).is_production
    for name in ("DATABASE_URL", *PROD_SECRETS):
        env = {k: v for k, v in base.items() if k != name}
        with pytest.raises(SettingsError, match=name):
            Settings.from_env(env)
    assert not (tmp_path / "dev-secrets.json").exists()


@pytest.mark.parametrize(
    ("name", "weak"),
    [
        ("JWT_SECRET", "x" * 31),
        ("JWT_SECRET_NEW", "short"),
        ("API_KEY_SALT", "y" * 15),
        ("API_KEY_SALT_NEW", "weak"),
        ("METRICS_TOKEN", "z" * 31),
    ],
)
def test_production_refuses_weak_secrets_without_echoing_them(tmp_path: Path, name: str, weak: str) -> None:
    base = {"ZKEB_ENV": "production", "ZKEB_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgres://u@h/d"}
    with pytest.raises(SettingsError, match=f"{name} must be at least") as excinfo:
        Settings.from_env({**base, **PROD_SECRETS, name: weak})
    assert weak not in str(excinfo.value)
    # Development generates its own; a short value there is the developer's choice.
    assert Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), **PROD_SECRETS, name: weak})


@pytest.mark.parametrize(
    ("name", "placeholder"),
    [
        ("ZKEB_MASTER_ENCRYPTION_KEY", "A" * 43 + "="),  # 32 zero bytes, base64
        ("ZKEB_MASTER_ENCRYPTION_KEY_NEW", "0" * 64),  # 32 zero bytes, hex
        ("JWT_SECRET", "changeme" * 5),
        ("API_KEY_SALT_NEW", "ab" * 20),
        ("METRICS_TOKEN", "x" * 40),
    ],
)
def test_production_refuses_placeholder_secrets_without_echoing_them(
    tmp_path: Path, name: str, placeholder: str
) -> None:
    base = {"ZKEB_ENV": "production", "ZKEB_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgres://u@h/d"}
    with pytest.raises(SettingsError, match=f"{name} is too regular to be a secret") as excinfo:
        Settings.from_env({**base, **PROD_SECRETS, name: placeholder})
    assert placeholder not in str(excinfo.value)
    # A random value of the documented kind passes (`openssl rand -base64 32`, or hex for the master key).
    assert Settings.from_env({**base, **PROD_SECRETS, name: base64.b64encode(os.urandom(32)).decode()})
    assert Settings.from_env({**base, **PROD_SECRETS, name: os.urandom(32).hex()})


def test_production_error_never_echoes_secret_values(tmp_path: Path) -> None:
    env = {"ZKEB_ENV": "production", "ZKEB_DATA_DIR": str(tmp_path), **PROD_SECRETS}
    with pytest.raises(SettingsError) as excinfo:
        Settings.from_env(env)
    for value in PROD_SECRETS.values():
        assert value not in str(excinfo.value)


def test_development_generates_dev_secrets_once_and_reuses_them(tmp_path: Path) -> None:
    first = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path)})
    path = tmp_path / "dev-secrets.json"
    assert first.secrets.generated_dev_secrets
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    stored = json.loads(path.read_text())
    assert stored["JWT_SECRET"] == first.secrets.jwt_secret
    second = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path)})
    assert second.secrets == first.secrets


def test_explicit_secrets_win_over_dev_secrets(tmp_path: Path) -> None:
    settings = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), **PROD_SECRETS})
    assert not settings.secrets.generated_dev_secrets
    assert settings.secrets.jwt_secret == PROD_SECRETS["JWT_SECRET"]
    assert not (tmp_path / "dev-secrets.json").exists()


def test_secrets_do_not_appear_in_repr(tmp_path: Path) -> None:
    settings = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), **PROD_SECRETS})
    text = repr(settings)
    for value in PROD_SECRETS.values():
        assert value not in text


def test_database_url_set_turns_auto_migrate_off_unless_asked(tmp_path: Path) -> None:
    env = {"ZKEB_DATA_DIR": str(tmp_path), "DATABASE_URL": "postgres://u@h/d"}
    assert Settings.from_env(env).auto_migrate is False
    assert Settings.from_env({**env, "ZKEB_AUTO_MIGRATE": "true"}).auto_migrate is True


def test_payloads_stay_in_postgres_unless_told_otherwise(tmp_path: Path) -> None:
    settings = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "S3_BUCKET": "ignored-without-s3"})
    assert settings.payload_store == PayloadStoreSettings()
    assert settings.payload_store.kind == "postgres"


def test_an_s3_payload_store_reads_the_standard_names(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "ZKEB_DATA_DIR": str(tmp_path),
            "PAYLOAD_STORE": "S3",
            "S3_BUCKET": "zkeb-payloads",
            "S3_PREFIX": "prod/zkeb",
            "S3_ENDPOINT_URL": "https://account.r2.cloudflarestorage.com/",
            "S3_REGION": "auto",
        }
    )
    assert settings.payload_store == PayloadStoreSettings(
        kind="s3",
        bucket="zkeb-payloads",
        prefix="prod/zkeb/",
        endpoint_url="https://account.r2.cloudflarestorage.com",
        region="auto",
    )


def test_an_s3_payload_store_on_aws_has_no_endpoint(tmp_path: Path) -> None:
    store = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "PAYLOAD_STORE": "s3", "S3_BUCKET": "b-1"}).payload_store
    assert (store.endpoint_url, store.region, store.prefix) == (None, "us-east-1", "")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"PAYLOAD_STORE": "gcs"}, "PAYLOAD_STORE must be one of postgres, s3 (got 'gcs')"),
        ({"PAYLOAD_STORE": "s3"}, "PAYLOAD_STORE=s3 requires S3_BUCKET to be set"),
        ({"PAYLOAD_STORE": "s3", "S3_BUCKET": "Bad_Bucket"}, "S3_BUCKET must be a bucket name"),
        ({"PAYLOAD_STORE": "s3", "S3_BUCKET": "ok-bucket", "S3_PREFIX": "/abs"}, "S3_PREFIX must not start with /"),
        (
            {"PAYLOAD_STORE": "s3", "S3_BUCKET": "ok-bucket", "S3_ENDPOINT_URL": "minio:9000"},
            "S3_ENDPOINT_URL must be an http:// or https:// base URL",
        ),
    ],
)
def test_invalid_payload_store_settings_are_refused_naming_the_variable(
    tmp_path: Path, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as refused:
        Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), **environ})
    assert str(refused.value).startswith(message)


def test_a_damaged_dev_secrets_file_is_one_configuration_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "dev-secrets.json").write_text("{not json")
    with pytest.raises(SettingsError, match=r"dev-secrets\.json is damaged"):
        Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path)})
    assert (tmp_path / "dev-secrets.json").read_text() == "{not json"  # left for the developer to restore


def test_a_data_dir_that_cannot_hold_the_dev_secrets_is_one_configuration_error(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    with pytest.raises(SettingsError, match="ZKEB_DATA_DIR"):
        Settings.from_env({"ZKEB_DATA_DIR": str(a_file / "data")})


def test_a_dev_secret_missing_from_the_file_is_added_and_the_others_kept(tmp_path: Path) -> None:
    first = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path)})
    path = tmp_path / "dev-secrets.json"
    stored = json.loads(path.read_text())
    dropped = next(name for name in stored if name != "ZKEB_MASTER_ENCRYPTION_KEY")
    del stored[dropped]
    path.write_text(json.dumps(stored))
    again = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path)})
    assert again.secrets.master_key == first.secrets.master_key
    assert dropped in json.loads(path.read_text())


class _RecordingEnvironment(dict[str, str]):
    """An environment that remembers every variable read from it."""

    def __init__(self, *args: object, **kwargs: str) -> None:
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.read.add(str(key))
        return super().__contains__(key)


def test_the_example_environment_names_every_variable_the_settings_read(tmp_path: Path) -> None:
    # An operator review: deploy/.env.example, which the runbook points to for "any tuning variable", lacked
    # TRUSTED_PROXIES and PUBLIC_URL (so behind a proxy every device shared one rate-limit budget), the payload store
    # and four more.
    environment = _RecordingEnvironment(ZKEB_DATA_DIR=str(tmp_path), PAYLOAD_STORE="s3", S3_BUCKET="backups")
    Settings.from_env(environment)
    example = (Path(__file__).parents[3] / "deploy" / ".env.example").read_text()
    named = {line.lstrip("# ").split("=", 1)[0] for line in example.splitlines() if "=" in line}
    assert len(environment.read) > 30
    assert environment.read - named == set()


def test_cors_origins_take_origins_and_the_wildcard(tmp_path: Path) -> None:
    origins = "https://app.example.com, http://localhost:5173,https://[::1]:8443"
    settings = Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "CORS_ORIGINS": origins})
    assert settings.cors_origins == ("https://app.example.com", "http://localhost:5173", "https://[::1]:8443")
    assert Settings.from_env({"ZKEB_DATA_DIR": str(tmp_path), "CORS_ORIGINS": "*"}).cors_origins == ("*",)
