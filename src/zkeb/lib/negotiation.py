"""Proactive content negotiation on `Accept` (RFC 9110 §12.5.1), quality values included.

Each offered media type gets the quality of the most specific range that matches it (`type/subtype` over
`type/*` over `*/*`); `q=0` means "not acceptable", so `Accept: application/msgpack;q=0` refuses msgpack even
though it names it. The best offer is the one with the highest quality above zero; ties go to the range the
client names more specifically (`application/msgpack` over `*/*`), then to the range listed first, then to the
server's order of offers. Parameters other than `q` are ignored (none of our
representations has any), and a range with a malformed `q` is disregarded as if it were not listed.

Litestar's `Accept.best_match` sorts by quality but still matches a `q=0` range, hence this module.

`accepts_gzip` reads `Accept-Encoding` (RFC 9110 §12.5.3) the same way, for the one representation stored gzipped.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ("Negotiation", "accepts_gzip", "negotiate")

_QVALUE = re.compile(r"(0(\.[0-9]{0,3})?|1(\.0{0,3})?)")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


@dataclass(frozen=True, slots=True)
class _Range:
    maintype: str
    subtype: str
    quality: float
    position: int

    def specificity(self, media_type: str) -> int:
        """How specifically this range names `media_type` (3 exact, 2 `type/*`, 1 `*/*`), or 0 if it does not."""
        maintype, _, subtype = media_type.partition("/")
        if self.maintype == "*":
            return 1 if self.subtype == "*" else 0
        if self.maintype != maintype:
            return 0
        if self.subtype == "*":
            return 2
        return 3 if self.subtype == subtype else 0


@dataclass(frozen=True, slots=True)
class Negotiation:
    """The outcome: the chosen offer, or None; `refused` lists offers the client gave `q=0` explicitly."""

    chosen: str | None
    refused: frozenset[str]


def _parse(accept: str) -> list[_Range]:
    ranges: list[_Range] = []
    for position, element in enumerate(accept.split(",")):
        media_range, *parameters = (part.strip() for part in element.split(";"))
        maintype, slash, subtype = media_range.lower().partition("/")
        if not slash or not _TOKEN.fullmatch(maintype) or not _TOKEN.fullmatch(subtype):
            continue
        if maintype == "*" and subtype != "*":
            continue
        quality = _quality(parameters)
        if quality >= 0:
            ranges.append(_Range(maintype, subtype, quality, position))
    return ranges


def _quality(parameters: Sequence[str]) -> float:
    """The `q` among an element's parameters: 1 when absent, -1 when malformed (the element is then disregarded)."""
    quality = 1.0
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "q":
            value = value.strip()
            quality = float(value) if _QVALUE.fullmatch(value) else -1.0
    return quality


def negotiate(accept: str | None, offers: Sequence[str]) -> Negotiation:
    """The best of `offers` (lowercase `type/subtype`, the server's preference first) for an `Accept` value.

    No `Accept` header (None or blank) accepts anything: the first offer.
    """
    if accept is None or not accept.strip():
        return Negotiation(chosen=offers[0] if offers else None, refused=frozenset())
    ranges = _parse(accept)
    best: tuple[float, int, int, int] | None = None
    chosen: str | None = None
    refused: set[str] = set()
    for preference, offer in enumerate(offers):
        matching = [(r.specificity(offer), r) for r in ranges]
        matching = [(specificity, r) for specificity, r in matching if specificity]
        if not matching:
            continue
        specificity, decisive = max(matching, key=lambda item: (item[0], -item[1].position))
        if decisive.quality == 0:
            refused.add(offer)
            continue
        rank = (decisive.quality, specificity, -decisive.position, -preference)
        if best is None or rank > best:
            best, chosen = rank, offer
    return Negotiation(chosen=chosen, refused=frozenset(refused))


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an `Accept-Encoding` value takes `gzip`: named (or `x-gzip`) with q > 0, or, unnamed, `*` with q > 0.

    No header at all gets the identity coding: a client that says nothing of codings may decode none.
    """
    if accept_encoding is None:
        return False
    named: float | None = None
    wildcard: float | None = None
    for element in accept_encoding.split(","):
        coding, *parameters = (part.strip() for part in element.split(";"))
        quality = _quality(parameters)
        if quality < 0:
            continue
        coding = coding.lower()
        if coding in {"gzip", "x-gzip"}:
            named = quality if named is None else max(named, quality)
        elif coding == "*":
            wildcard = quality
    decisive = named if named is not None else wildcard
    return decisive is not None and decisive > 0
