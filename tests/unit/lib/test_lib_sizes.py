from __future__ import annotations

import pytest

from zkeb.lib.sizes import format_size, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("512", 512),
        ("512B", 512),
        ("512 b", 512),
        ("100MB", 100_000_000),
        ("100 MB", 100_000_000),
        ("100mb", 100_000_000),
        ("1K", 1000),
        ("1kb", 1000),
        ("2M", 2_000_000),
        ("3G", 3_000_000_000),
        ("3GB", 3_000_000_000),
        ("1TB", 1_000_000_000_000),
        ("1t", 1_000_000_000_000),
        ("64KiB", 65_536),
        ("64kib", 65_536),
        ("16 MiB", 16_777_216),
        ("1GiB", 1_073_741_824),
        ("2TiB", 2 * 1024**4),
        ("1.5MB", 1_500_000),
        ("1.5KiB", 1536),
        ("0.5GiB", 536_870_912),
        ("  10MB  ", 10_000_000),
        ("10\tMB", 10_000_000),
    ],
)
def test_parse_size_accepts_documented_forms(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_parse_size_rounds_fractional_bytes_down() -> None:
    assert parse_size("1.0009KB") == 1000
    assert parse_size("1.1KiB") == 1126


@pytest.mark.parametrize(
    "text",
    ["", "   ", "MB", "abc", "-1", "-1MB", "+5", "1e6", "1,5MB", "1..5MB", ".5MB", "5.MB", "10 XB", "10 MiBs", "1 2"],
)
def test_parse_size_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["0B", "0MB", "0.0", "0.0001KB", "00"])
def test_parse_size_allows_zero_only_as_plain_zero(text: str) -> None:
    with pytest.raises(ValueError, match="zero"):
        parse_size(text)


def test_parse_size_rejects_absurdly_long_input() -> None:
    with pytest.raises(ValueError, match="too long"):
        parse_size("9" * 100)


def test_parse_size_error_names_unknown_unit() -> None:
    with pytest.raises(ValueError, match="'PB'"):
        parse_size("1PB")


def test_parse_size_handles_non_ascii_digits_as_garbage() -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size("\u0661\u0660MB")  # Arabic-Indic digits pass str.isdigit() but are not sizes.


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (100 * 1024**2, "100.0 MiB"),
        (1024**2 - 1, "1.0 MiB"),
        (5 * 1024**3, "5.0 GiB"),
        (3 * 1024**4, "3.0 TiB"),
        (2 * 1024**5, "2.0 PiB"),
        (4096 * 1024**5, "4096.0 PiB"),
    ],
)
def test_format_size_uses_binary_units(size: int, expected: str) -> None:
    assert format_size(size) == expected


def test_format_size_rejects_negative() -> None:
    with pytest.raises(ValueError, match="negative"):
        format_size(-1)


@pytest.mark.parametrize("size", [1024, 64 * 1024, 100 * 1024**2, 1024**3])
def test_format_size_output_parses_back(size: int) -> None:
    assert parse_size(format_size(size).replace(" ", "")) == size
