"""Typed settings built once from the environment.

Every variable is named as in DESIGN.md and the reference deployment design. Errors name the
variable and never echo a secret's value.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import math
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from zkeb.lib.sizes import parse_size

__all__ = (
    "LISTEN_ADDRESS_RULE",
    "PayloadStoreSettings",
    "Settings",
    "SettingsError",
    "get_settings",
    "normalize_database_url",
)

logger = logging.getLogger("zkeb.settings")

REQUIRED_IN_PRODUCTION = ("DATABASE_URL", "ZKEB_MASTER_ENCRYPTION_KEY", "JWT_SECRET", "API_KEY_SALT")
DEV_SECRET_NAMES = ("ZKEB_MASTER_ENCRYPTION_KEY", "JWT_SECRET", "API_KEY_SALT")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: What `HOST` and `zkeb serve --host` must be: granian binds an address, it does not resolve a name.
LISTEN_ADDRESS_RULE = "must be an IP address to listen on, such as 0.0.0.0 (every interface) or 127.0.0.1"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
# libpq options asyncpg understands as connect() keywords; the rest of a platform URL's query is dropped.
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SSLMODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})


Environment = Literal["development", "production", "test"]


class SettingsError(ValueError):
    """A configuration value is missing or invalid; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Secrets:
    """The service's secrets, each with its optional rotation partner (`*_NEW`)."""

    master_key: str = field(repr=False)
    master_key_new: str | None = field(default=None, repr=False)
    jwt_secret: str = field(default="", repr=False)
    jwt_secret_new: str | None = field(default=None, repr=False)
    api_key_salt: str = field(default="", repr=False)
    api_key_salt_new: str | None = field(default=None, repr=False)
    generated_dev_secrets: bool = False


@dataclass(frozen=True, slots=True)
class PayloadStoreSettings:
    """Where new payloads' chunks go (`PAYLOAD_STORE`) and, for `s3`, the bucket (docs/storage.md).

    Credentials are not settings: botocore's standard chain finds them (`AWS_*` variables, profile, roles).
    """

    kind: Literal["postgres", "s3"] = "postgres"
    bucket: str = ""
    #: Key prefix inside the bucket, empty or ending with `/`.
    prefix: str = ""
    #: None for AWS; another S3-compatible store's endpoint otherwise.
    endpoint_url: str | None = None
    region: str = "us-east-1"

    @classmethod
    def bucket_from_env(cls, environ: Mapping[str, str] | None = None) -> PayloadStoreSettings:
        """The bucket the `S3_*` variables name, whatever `PAYLOAD_STORE` says (moving payloads between stores).

        Raises:
            SettingsError: as `from_reader` for `PAYLOAD_STORE=s3`.
        """
        env_map = os.environ if environ is None else environ
        return cls.from_reader(_EnvReader({**env_map, "PAYLOAD_STORE": "s3"}))

    @classmethod
    def from_reader(cls, reader: _EnvReader) -> PayloadStoreSettings:
        """Read `PAYLOAD_STORE` and the `S3_*` variables.

        Raises:
            SettingsError: an unknown store, `s3` without `S3_BUCKET`, a malformed bucket, prefix or endpoint.
        """
        kind = cast("Literal['postgres', 's3']", reader.choice("PAYLOAD_STORE", ("postgres", "s3"), "postgres"))
        if kind == "postgres":
            return cls()
        bucket = reader.optional("S3_BUCKET")
        if bucket is None:
            msg = "PAYLOAD_STORE=s3 requires S3_BUCKET to be set"
            raise SettingsError(msg)
        if not _BUCKET_NAME.fullmatch(bucket):
            msg = f"S3_BUCKET must be a bucket name (3-63 lowercase letters, digits, dots, hyphens; got {bucket!r})"
            raise SettingsError(msg)
        prefix = reader.text("S3_PREFIX", "")
        if prefix.startswith("/") or "//" in prefix:
            msg = f"S3_PREFIX must not start with / or contain // (got {prefix!r})"
            raise SettingsError(msg)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return cls(
            kind=kind,
            bucket=bucket,
            prefix=prefix,
            endpoint_url=reader.base_url("S3_ENDPOINT_URL"),
            region=reader.text("S3_REGION", "us-east-1"),
        )


@dataclass(frozen=True, slots=True)
class Settings:
    """Runtime configuration for one ZKEB process."""

    env: Environment
    port: int
    host: str
    log_level: str
    data_dir: Path
    database_url: str | None
    redis_url: str | None
    secrets: Secrets
    max_upload_size: int
    request_timeout_ms: int
    db_pool_size: int
    redis_max_retries: int
    enable_rate_limiting: bool
    enable_audit_logs: bool
    rate_limit_per_minute: int
    token_rate_limit_per_minute: int
    cors_origins: tuple[str, ...]
    metrics_port: int | None
    metrics_token: str | None = field(repr=False)
    shutdown_grace_seconds: float
    default_project_quota: int | None
    trash_retention_days: int
    auto_migrate: bool
    version: str
    commit: str
    build_date: str
    #: Proxies whose `X-Forwarded-For`/`X-Forwarded-Proto` are believed (`TRUSTED_PROXIES`, IPs or CIDRs).
    trusted_proxies: tuple[str, ...] = ()
    #: Seconds between in-process maintenance passes (`MAINTENANCE_INTERVAL`; 0 leaves maintenance to cron).
    maintenance_interval_seconds: float = 60.0
    #: The service's public base URL (`PUBLIC_URL`, e.g. `https://backups.example.com`), without a trailing slash:
    #: absolute URLs the service hands out (a tus upload's `Location`) start with it. None: taken from `Host`.
    public_url: str | None = None
    #: Most tus uploads a project may have open at once (`MAX_OPEN_UPLOADS`).
    max_open_uploads: int = 100
    #: Where payload chunks are stored (`PAYLOAD_STORE`, `S3_*`).
    payload_store: PayloadStoreSettings = field(default_factory=PayloadStoreSettings)
    #: Longest a request's head (request line and headers) may take to arrive (`HEADER_READ_TIMEOUT`, seconds): granian
    #: answers a slower one `408` and closes the connection.
    header_read_timeout_seconds: float = 30.0
    #: Longest a request body may wait without progress (`BODY_IDLE_TIMEOUT`, seconds; see `zkeb.core.connection`).
    body_idle_timeout_seconds: float = 30.0
    #: Least average rate a request body must keep over each `body_idle_timeout_seconds` of waiting (`BODY_MIN_RATE`,
    #: bytes per second): a body that trickles slower is cut off too.
    body_min_rate: int = 512
    #: Worker processes `zkeb serve` starts (`WEB_CONCURRENCY`; `--workers` wins).
    web_concurrency: int = 1

    @property
    def is_production(self) -> bool:
        """Whether the production guard applies."""
        return self.env == "production"

    @property
    def uses_embedded_database(self) -> bool:
        """Whether no `DATABASE_URL` was given, so an embedded PostgreSQL serves the data dir."""
        return self.database_url is None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build and validate settings from an environment mapping (default: `os.environ`).

        Raises:
            SettingsError: a variable is missing or invalid; the message names it.
        """
        env_map = os.environ if environ is None else environ
        reader = _EnvReader(env_map)
        env = cast("Environment", reader.choice("ZKEB_ENV", ("development", "production", "test"), "development"))
        data_dir = Path(reader.text("ZKEB_DATA_DIR", "./.zkeb")).expanduser().resolve()
        raw_db_url = reader.optional("DATABASE_URL")
        if env == "production":
            missing = [name for name in REQUIRED_IN_PRODUCTION if not reader.optional(name)]
            if missing:
                msg = f"ZKEB_ENV=production requires {', '.join(missing)} to be set"
                raise SettingsError(msg)
        secrets_ = _load_secrets(reader, data_dir, production=env == "production")
        quota = reader.optional("DEFAULT_PROJECT_QUOTA")
        metrics_port = reader.optional("METRICS_PORT")
        if reader.optional("LOG_FORMAT") is not None:  # checked here, applied by `zkeb.core.logging.log_format`
            reader.choice("LOG_FORMAT", ("json", "console"), "json")
        return cls(
            env=env,
            port=reader.integer("PORT", 3000, minimum=1, maximum=65535),
            host=reader.ip_address("HOST", "0.0.0.0"),  # noqa: S104 - a container's service must listen on all interfaces
            log_level=reader.choice("LOG_LEVEL", LOG_LEVELS, "INFO", upper=True),
            data_dir=data_dir,
            database_url=normalize_database_url(raw_db_url) if raw_db_url else None,
            redis_url=reader.redis_url("REDIS_URL"),
            secrets=secrets_,
            max_upload_size=reader.size("MAX_UPLOAD_SIZE", "100MB", minimum=1),  # 0: every backup refused
            # asyncpg's per-command timeout; shorter than 5 s would cut off legitimate chunk batches and migrations.
            request_timeout_ms=reader.integer("REQUEST_TIMEOUT", 30000, minimum=5000),
            db_pool_size=reader.integer("DB_POOL_SIZE", 10, minimum=1, maximum=500),
            redis_max_retries=reader.integer("REDIS_MAX_RETRIES", 3, minimum=0, maximum=100),
            enable_rate_limiting=reader.flag("ENABLE_RATE_LIMITING", default=True),
            enable_audit_logs=reader.flag("ENABLE_AUDIT_LOGS", default=True),
            rate_limit_per_minute=reader.integer("RATE_LIMIT_PER_MINUTE", 600, minimum=1),
            token_rate_limit_per_minute=reader.integer("TOKEN_RATE_LIMIT_PER_MINUTE", 30, minimum=1),
            cors_origins=reader.origins("CORS_ORIGINS"),
            metrics_port=reader.integer("METRICS_PORT", 0, minimum=1, maximum=65535) if metrics_port else None,
            metrics_token=reader.optional("METRICS_TOKEN"),
            shutdown_grace_seconds=reader.number("SHUTDOWN_GRACE_SECONDS", 30.0, minimum=0.0),
            default_project_quota=reader.size("DEFAULT_PROJECT_QUOTA", "0") if quota else None,
            trash_retention_days=reader.integer("TRASH_RETENTION_DAYS", 30, minimum=0),
            auto_migrate=reader.flag("ZKEB_AUTO_MIGRATE", default=raw_db_url is None),
            version=reader.text("ZKEB_VERSION", _package_version()),
            commit=reader.text("ZKEB_COMMIT", "unknown"),
            build_date=reader.text("ZKEB_BUILD_DATE", "unknown"),
            trusted_proxies=reader.networks("TRUSTED_PROXIES"),
            maintenance_interval_seconds=reader.number("MAINTENANCE_INTERVAL", 60.0, minimum=0.0),
            public_url=reader.base_url("PUBLIC_URL"),
            max_open_uploads=reader.integer("MAX_OPEN_UPLOADS", 100, minimum=1),
            payload_store=PayloadStoreSettings.from_reader(reader),
            header_read_timeout_seconds=reader.number("HEADER_READ_TIMEOUT", 30.0, minimum=1.0),
            body_idle_timeout_seconds=reader.number("BODY_IDLE_TIMEOUT", 30.0, minimum=1.0),
            body_min_rate=reader.size("BODY_MIN_RATE", "512"),
            web_concurrency=reader.integer("WEB_CONCURRENCY", 1, minimum=1),
        )


def normalize_database_url(url: str) -> str:
    """Map a platform-style PostgreSQL URL onto SQLAlchemy's asyncpg dialect.

    Accepts `postgres://`, `postgresql://` and `postgresql+asyncpg://`. libpq's `sslmode` becomes
    asyncpg's `ssl`; other libpq-only query options are dropped.

    Raises:
        SettingsError: the URL is not a PostgreSQL URL, or its host or port is malformed (the message never quotes
            the URL: it may hold a password).
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # an unclosed IPv6 bracket
        msg = "DATABASE_URL has a malformed host (write an IPv6 address in brackets: postgresql://user@[::1]/db)"
        raise SettingsError(msg) from None
    scheme = parts.scheme.lower()
    if scheme not in {"postgres", "postgresql", "postgresql+asyncpg"}:
        msg = "DATABASE_URL must be a postgres:// or postgresql:// URL"
        raise SettingsError(msg)
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        msg = "DATABASE_URL has an invalid port: it must be a number from 1 to 65535"
        raise SettingsError(msg)
    query: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in {"sslmode", "ssl"}:
            if value not in _SSLMODES:
                msg = f"DATABASE_URL has an unknown sslmode {value!r}"
                raise SettingsError(msg)
            query.append(("ssl", value))
        elif key in {"host", "port", "connect_timeout", "application_name"}:
            if key == "port" and not all(p.isdigit() and 0 < int(p) < 65536 for p in value.split(",")):
                msg = "DATABASE_URL has an invalid port: it must be a number from 1 to 65535"
                raise SettingsError(msg)
            query.append((key, value))
    if not parts.hostname and not any(k == "host" for k, _ in query):
        msg = "DATABASE_URL has no host"
        raise SettingsError(msg)
    return urlunsplit(("postgresql+asyncpg", parts.netloc, parts.path, urlencode(query), ""))


class _EnvReader:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self._env = environ

    def optional(self, name: str) -> str | None:
        value = self._env.get(name)
        if value is None:
            return None
        return value.strip() or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def choice(self, name: str, allowed: tuple[str, ...], default: str, *, upper: bool = False) -> str:
        value = self.text(name, default)
        value = value.upper() if upper else value.lower()
        if value not in allowed:
            msg = f"{name} must be one of {', '.join(allowed)} (got {value!r})"
            raise SettingsError(msg)
        return value

    def integer(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            msg = f"{name} must be an integer (got {raw!r})"
            raise SettingsError(msg) from None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            msg = f"{name} must be {bounds} (got {value})"
            raise SettingsError(msg)
        return value

    def number(self, name: str, default: float, *, minimum: float) -> float:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            msg = f"{name} must be a number (got {raw!r})"
            raise SettingsError(msg) from None
        if not math.isfinite(value):  # float() takes nan and inf: nan compares false with any bound
            msg = f"{name} must be a finite number (got {raw!r})"
            raise SettingsError(msg)
        if value < minimum:
            msg = f"{name} must be at least {minimum} (got {value})"
            raise SettingsError(msg)
        return value

    def flag(self, name: str, *, default: bool) -> bool:
        raw = self.optional(name)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        msg = f"{name} must be true or false (got {raw!r})"
        raise SettingsError(msg)

    def base_url(self, name: str) -> str | None:
        raw = self.optional(name)
        if raw is None:
            return None
        parts = urlsplit(raw)
        if parts.scheme not in {"http", "https"} or not parts.hostname or parts.query or parts.fragment:
            msg = f"{name} must be an http:// or https:// base URL without query or fragment (got {raw!r})"
            raise SettingsError(msg)
        return raw.rstrip("/")

    def origins(self, name: str) -> tuple[str, ...]:
        """Comma-separated browser origins (`https://app.example.com`, `http://localhost:5173`) or `*`.

        An origin is a scheme, a host and a port only: a browser's `Origin` never has a path, so `notaurl` or
        `https://app.example.com/` would match nothing and silently switch CORS off for that app.
        """
        values = tuple(o.strip() for o in self.text(name, "").split(",") if o.strip())
        for value in values:
            parts = urlsplit(value)
            if value != "*" and (
                parts.scheme not in {"http", "https"}
                or not parts.hostname
                or parts.path
                or parts.query
                or parts.fragment
                or parts.username is not None
            ):
                msg = f"{name} must list origins such as https://app.example.com, without a path (got {value!r})"
                raise SettingsError(msg)
        return values

    def ip_address(self, name: str, default: str) -> str:
        raw = self.text(name, default)
        try:
            ipaddress.ip_address(raw)
        except ValueError:
            msg = f"{name} {LISTEN_ADDRESS_RULE} (got {raw!r})"
            raise SettingsError(msg) from None
        return raw

    def redis_url(self, name: str) -> str | None:
        """A `redis://`, `rediss://` (host, optional port) or `unix://` (socket path) URL; never quoted (a password)."""
        raw = self.optional(name)
        if raw is None:
            return None
        try:
            parts = urlsplit(raw)
            if parts.scheme == "unix":
                usable = bool(parts.path)
            else:
                database = parts.path.lstrip("/")
                usable = parts.scheme in {"redis", "rediss"} and bool(parts.hostname) and parts.port != 0
                usable = usable and (not database or database.isdigit())
        except ValueError:  # a non-numeric port, an unclosed IPv6 bracket
            usable = False
        if not usable:
            msg = f"{name} must be a redis://host[:port][/db], rediss://... or unix:///path/to/socket URL"
            raise SettingsError(msg)
        return raw

    def networks(self, name: str) -> tuple[str, ...]:
        items = tuple(item.strip() for item in self.text(name, "").split(",") if item.strip())
        for item in items:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                msg = f"{name} must be a comma-separated list of IP addresses or CIDR networks (got {item!r})"
                raise SettingsError(msg) from None
        return items

    def size(self, name: str, default: str, *, minimum: int = 0) -> int:
        raw = self.text(name, default)
        try:
            value = parse_size(raw)
        except ValueError as exc:
            msg = f"{name} must be a size such as 100MB or 64KiB (got {raw!r}): {exc}"
            raise SettingsError(msg) from None
        if value < minimum:
            msg = f"{name} must be at least {minimum} bytes (got {raw!r})"
            raise SettingsError(msg)
        return value


def _load_secrets(reader: _EnvReader, data_dir: Path, *, production: bool) -> Secrets:
    values = {name: reader.optional(name) for name in DEV_SECRET_NAMES}
    generated = False
    if not production and not all(values.values()):
        stored = _dev_secrets(data_dir)
        generated = True
        values = {name: value or stored[name] for name, value in values.items()}
    if production:
        _refuse_weak_secrets(reader)
    return Secrets(
        master_key=values["ZKEB_MASTER_ENCRYPTION_KEY"] or "",
        master_key_new=reader.optional("ZKEB_MASTER_ENCRYPTION_KEY_NEW"),
        jwt_secret=values["JWT_SECRET"] or "",
        jwt_secret_new=reader.optional("JWT_SECRET_NEW"),
        api_key_salt=values["API_KEY_SALT"] or "",
        api_key_salt_new=reader.optional("API_KEY_SALT_NEW"),
        generated_dev_secrets=generated,
    )


#: Shortest production value of each secret, in characters: RFC 7518 §3.2 asks HS256 keys for 256 bits, and the
#: documented `openssl rand -base64 32` gives 44 characters. `METRICS_TOKEN` is a bearer token that `/metrics`
#: compares, unthrottled (scrapers come often), so it must be too long to guess as well.
_MINIMUM_SECRET_LENGTHS = {
    "JWT_SECRET": 32,
    "JWT_SECRET_NEW": 32,
    "API_KEY_SALT": 16,
    "API_KEY_SALT_NEW": 16,
    "METRICS_TOKEN": 32,
}


#: Fewest different characters a production secret may have. A random value has many (`openssl rand -base64 32`:
#: about 30 of its 44); a placeholder has few (an all-zero master key is `AAAA...A=`, 2; `changeme` repeated, 6).
_MINIMUM_DISTINCT_CHARACTERS = 8


def _refuse_weak_secrets(reader: _EnvReader) -> None:
    """In production, refuse secrets short enough to guess (a one-byte JWT secret lets anyone mint tokens) or too
    regular to be random (an all-zero master key, a repeated placeholder)."""
    for name, minimum in _MINIMUM_SECRET_LENGTHS.items():
        value = reader.optional(name)
        if value is not None and len(value) < minimum:
            msg = f"{name} must be at least {minimum} characters in production (e.g. `openssl rand -base64 32`)"
            raise SettingsError(msg)
    for name in ("ZKEB_MASTER_ENCRYPTION_KEY", "ZKEB_MASTER_ENCRYPTION_KEY_NEW", *_MINIMUM_SECRET_LENGTHS):
        value = reader.optional(name)
        if value is not None and len(set(value.strip())) < _MINIMUM_DISTINCT_CHARACTERS:
            msg = (
                f"{name} is too regular to be a secret (fewer than {_MINIMUM_DISTINCT_CHARACTERS} different "
                "characters): generate one with `openssl rand -base64 32`"
            )
            raise SettingsError(msg)


def _dev_secrets(data_dir: Path) -> dict[str, str]:
    """Load, or create once, development secrets persisted in the data dir (mode 0600).

    A secret missing from the file is added; those present are kept (the master key among them: replacing it would
    make everything stored with it unreadable).

    Raises:
        SettingsError: the file is damaged, or the data directory cannot hold it.
    """
    path = data_dir / "dev-secrets.json"
    stored: dict[str, str] = {}
    if path.exists():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _damaged_dev_secrets(path, type(exc).__name__) from None
        if not isinstance(loaded, dict):
            raise _damaged_dev_secrets(path, "not a JSON object")
        stored = {name: value for name, value in loaded.items() if isinstance(value, str) and value}
        if all(stored.get(name) for name in DEV_SECRET_NAMES):
            return stored
    stored |= {
        name: base64.b64encode(secrets.token_bytes(32)).decode() for name in DEV_SECRET_NAMES if name not in stored
    }
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(stored, fh)
    except OSError as exc:
        msg = f"ZKEB_DATA_DIR ({data_dir}) cannot hold the development secrets: {exc.strerror or exc}"
        raise SettingsError(msg) from None
    logger.warning(
        "DEVELOPMENT SECRETS GENERATED in %s: never use them in production (set ZKEB_ENV=production and real secrets)",
        path,
    )
    return stored


def _damaged_dev_secrets(path: Path, why: str) -> SettingsError:
    return SettingsError(
        f"{path} is damaged ({why}): restore it, or remove it to generate new development secrets (what was stored "
        "with the old ones cannot be read again)"
    )


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("zkeb")
    except PackageNotFoundError:
        return "0.0.0"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, built once from `os.environ`."""
    return Settings.from_env()
