"""Tracing configuration from `OTEL_*`, and the log formatters (fields, redaction, granian's dict config)."""

from __future__ import annotations

import json
import logging
import logging.config
import sys

import pytest

from zkeb.core.errors import request_id_var
from zkeb.core.logging import ConsoleFormatter, JsonFormatter, log_format, logging_dictconfig
from zkeb.core.telemetry import TracingConfig
from zkeb.lib.redaction import redact
from zkeb.settings import SettingsError

API_KEY = "zkeb_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v"  # pragma: allowlist secret
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJkZXZpY2UifQ.c2lnbmF0dXJlLWJ5dGVz"  # pragma: allowlist secret


@pytest.mark.parametrize(
    ("environ", "exporters", "protocol"),
    [
        ({}, (), "http/protobuf"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp",), "http/protobuf"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            ("otlp",),
            "grpc",
        ),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",), "http/protobuf"),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ("otlp", "console"), "http/protobuf"),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, (), "http/protobuf"),
        ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}, (), "http/protobuf"),
    ],
)
def test_tracing_is_configured_only_by_the_standard_variables(
    environ: dict[str, str], exporters: tuple[str, ...], protocol: str
) -> None:
    config = TracingConfig.from_env(environ)
    assert config.exporters == exporters
    assert config.enabled == bool(exporters)
    assert config.protocol == protocol


def test_grpc_protocol_without_the_grpc_extra_is_a_configuration_error_naming_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A None entry in sys.modules makes `import` fail as it does where the package is not installed.
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.grpc", None)
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    with pytest.raises(SettingsError, match=r"OTEL_EXPORTER_OTLP_PROTOCOL=grpc .*'grpc' extra"):
        TracingConfig.from_env(environ)
    # Console-only tracing never loads an OTLP exporter, so the protocol variable alone is not an error.
    assert TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}).enabled


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        # The SDK would fall back to sampling every request, with only a warning.
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "nope"}, "OTEL_TRACES_SAMPLER"),
        (
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_TRACES_SAMPLER": "traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "1/10",
            },
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        # Every worker would fail on it at start, in a crash loop.
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_PYTHON_EXCLUDED_URLS": "["}, "OTEL_PYTHON_EXCLUDED_URLS"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_PYTHON_LITESTAR_EXCLUDED_URLS": "a,("}, "LITESTAR_EXCLUDED_URLS"),
    ],
)
def test_unsupported_tracing_settings_are_refused_naming_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        TracingConfig.from_env(environ)


@pytest.mark.parametrize("name", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_an_otlp_http_endpoint_without_a_scheme_is_a_configuration_error(name: str) -> None:
    # An operator review: `127.0.0.1:4318` started with "tracing on", then every batch failed ("No connection
    # adapters were found") and no span arrived.
    with pytest.raises(SettingsError, match=rf"{name} must be an http:// or https:// URL"):
        TracingConfig.from_env({name: "127.0.0.1:4318"})
    assert TracingConfig.from_env({name: "https://collector.internal:4318"}).enabled
    # gRPC takes `host:port`; a console exporter reads no endpoint.
    assert TracingConfig.from_env({name: "127.0.0.1:4317", "OTEL_TRACES_EXPORTER": "console"}).enabled


def test_valid_sampler_and_exclusions_are_accepted_and_unchecked_while_tracing_is_off() -> None:
    sampled = {"OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    excluded = {"OTEL_PYTHON_EXCLUDED_URLS": "/api/health/,^/metrics$"}
    assert TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "console", **sampled, **excluded}).enabled
    assert TracingConfig.from_env({"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "traceidratio"}).enabled
    assert not TracingConfig.from_env({"OTEL_TRACES_SAMPLER": "nope", "OTEL_PYTHON_EXCLUDED_URLS": "["}).enabled


def _record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("zkeb.test", logging.WARNING, __file__, 1, message, args, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_time_level_logger_event_request_id_and_extra_fields() -> None:
    token = request_id_var.set("req-123")
    try:
        line = JsonFormatter().format(_record("stored %d chunks", 3, backup_id="b-1"))
    finally:
        request_id_var.reset(token)
    fields = json.loads(line)
    assert fields["level"] == "warning"
    assert fields["logger"] == "zkeb.test"
    assert fields["event"] == "stored 3 chunks"
    assert fields["request_id"] == "req-123"
    assert fields["backup_id"] == "b-1"
    assert fields["time"].endswith("Z")
    assert "\n" not in line


def test_console_lines_escape_control_characters_from_the_request() -> None:
    # A path like /%1b[2J reaches the access log decoded: written raw, it would clear or recolor the terminal.
    line = ConsoleFormatter(colors=False).format(_record("GET %s 404", "/\x1b[2J\x00x", route="/\x07"))
    assert not any(control in line for control in ("\x1b", "\x00", "\x07"))
    assert "GET /\\x1b[2J\\x00x 404" in line
    assert "route=/\\x07" in line
    # C1 controls too (\x9b is a one-byte CSI).
    assert "\\x9b" in ConsoleFormatter(colors=False).format(_record("GET /\x9b31m 404"))


@pytest.mark.parametrize("formatter", [JsonFormatter(), ConsoleFormatter(colors=False)])
def test_a_secret_next_to_a_control_character_is_masked_before_it_is_escaped(formatter: logging.Formatter) -> None:
    key = "zkeb_" + "k" * 43
    line = formatter.format(_record("Authorization: Bearer\t%s and\t%s", key, key, header=f"Bearer\t{key}"))
    assert key not in line
    assert "k" * 43 not in line


@pytest.mark.parametrize("formatter", [JsonFormatter(), ConsoleFormatter(colors=False)])
def test_credentials_that_slip_into_a_log_line_are_masked(formatter: logging.Formatter) -> None:
    line = formatter.format(_record("auth %s then %s", f"Bearer {API_KEY}", JWT, header=f"Authorization: Bearer {JWT}"))
    assert API_KEY not in line
    assert JWT not in line
    assert "[REDACTED]" in line


def test_redaction_leaves_metric_names_and_ids_alone() -> None:
    text = "zkeb_tus_sessions_open 0192f5e4-7a3b-7c1d-8e2f-3a4b5c6d7e8f zkeb_backup_bytes_uploaded_total"
    assert redact(text) == text


@pytest.mark.parametrize(
    "prose", ["a bearer credential is required", "a valid bearer credential is required", "Bearer authentication"]
)
def test_redaction_leaves_prose_about_bearer_credentials_alone(prose: str) -> None:
    assert redact(prose) == prose


@pytest.mark.parametrize("value", ["abc123defg", "s3cr3t-t0ken", "OnlyLettersButLongEnough"])
def test_redaction_masks_a_bearer_value(value: str) -> None:
    assert redact(f"Authorization: Bearer {value}") == "Authorization: [REDACTED]"


def test_log_format_defaults_to_console_in_development_and_json_elsewhere() -> None:
    assert log_format("development", {}) == "console"
    assert log_format("production", {}) == "json"
    assert log_format("production", {"LOG_FORMAT": "console"}) == "console"
    assert log_format("development", {"LOG_FORMAT": "JSON"}) == "json"


def test_granian_dict_config_routes_granian_loggers_through_the_json_handler() -> None:
    config = logging_dictconfig("INFO", "json")
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    try:
        logging.config.dictConfig(config)
        handlers = [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]
        assert len(handlers) == 1
        assert logging.getLogger("_granian").propagate
        assert not logging.getLogger("_granian").handlers
        assert logging.getLogger("granian.access").getEffectiveLevel() == logging.WARNING
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
