"""Input checks shared by the store's writes: each raises InvalidInput naming the field, before anything is written."""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from rewardprism.bounds import MAX_ABS_WEIGHT
from rewardprism.store.errors import InvalidInput
from rewardprism.store.models import HeadSetRow

MAX_COUNT = 2**31 - 1  # integer columns are 32-bit on Postgres
# Nesting of stored JSON documents: far above any real metadata, far below what JSON encoders and response
# serializers (pydantic's stops at a few hundred levels) or Python's recursion limit can take.
MAX_JSON_DEPTH = 32


def text(value: object, what: str, max_chars: int, *, empty_ok: bool = True) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{what} must be a string, got {type(value).__name__}")
    if not empty_ok and not value.strip():
        raise InvalidInput(f"{what} must not be empty")
    if len(value) > max_chars:
        raise InvalidInput(f"{what} has {len(value)} characters, more than the limit of {max_chars}")
    if "\x00" in value or not value.isascii() and not _encodable(value):
        raise InvalidInput(f"{what} must be valid Unicode text without NUL characters")
    return value


def _encodable(value: str) -> bool:
    """False for text no database can store: lone surrogates (which a JSON escape can carry) do not encode."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def json_depth(value: object, what: str, max_depth: int = MAX_JSON_DEPTH) -> object:
    """Refuse `value` if its containers nest deeper than `max_depth`; iterative, so any depth is safe to check."""
    todo: list[tuple[object, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, Mapping | list | tuple):
            if depth > max_depth:
                raise InvalidInput(f"{what} nests deeper than the limit of {max_depth} levels")
            todo.extend((child, depth + 1) for child in (item.values() if isinstance(item, Mapping) else item))
    return value


def json_doc(value: object, what: str, max_bytes: int) -> dict[str, Any]:
    """A JSON object the store can keep and every reader can serialize again: bounded in depth and size."""
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
    json_depth(value, what)
    try:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        text = json.dumps(value, allow_nan=False, ensure_ascii=False)
        size = len(text.encode())
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} is not plain JSON: {exc}") from None
    if "\x00" in text:  # JSONB refuses NUL
        raise InvalidInput(f"{what} must not contain NUL characters")
    if size > max_bytes:
        raise InvalidInput(f"{what} takes {size} bytes as JSON, more than the limit of {max_bytes}")
    return dict(value)


def readable_json(value: object, what: str) -> tuple[dict[str, Any], str | None]:
    """A stored JSON object as readers may show it: itself, or `{}` and why not (a row written by an older
    version without the depth check must not break listings and exports)."""
    try:
        return dict(json_depth(value, what)), None  # type: ignore[call-overload]
    except (InvalidInput, TypeError, ValueError) as exc:
        return {}, f"not shown: {exc}"


def finite(value: object, what: str, bound: float = math.inf) -> float:
    """A finite float, at most `bound` in absolute value."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # numpy scalars are Real too
        raise InvalidInput(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInput(f"{what} must be finite, got {value}")
    if abs(value) > bound:
        raise InvalidInput(f"{what} must be from {-bound:g} to {bound:g}, got {value:g}")
    return float(value)


def weight(value: object, what: str) -> float:
    """A profile's weight or bias: finite and within the bound the API and scoring use."""
    return finite(value, what, MAX_ABS_WEIGHT)


def vector(values: Iterable[object], head_set: HeadSetRow | int, what: str = "weights") -> list[float]:
    """Weights (`weight`), one per head of `head_set` (or a count, while the head set is being registered)."""
    try:
        vector = [weight(v, f"{what}[{i}]") for i, v in enumerate(values)]
    except TypeError:
        raise InvalidInput(f"{what} must be a list of numbers") from None
    expected = head_set if isinstance(head_set, int) else head_set.num_heads
    if len(vector) != expected:
        of = "" if isinstance(head_set, int) else f" of head set {head_set.label}"
        raise InvalidInput(f"{what} has {len(vector)} values, but there are {expected} heads{of}")
    return vector


def choice(value: object, what: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidInput(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
    return str(value)

