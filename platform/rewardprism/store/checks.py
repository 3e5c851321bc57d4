"""Input checks shared by the store's writes: each raises InvalidInput naming the field, before anything is written."""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from rewardprism.store.errors import InvalidInput
from rewardprism.store.models import HeadSetRow

MAX_COUNT = 2**31 - 1  # integer columns are 32-bit on Postgres


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


def json_doc(value: object, what: str, max_bytes: int) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{what} must be a JSON object, got {type(value).__name__}")
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


def finite(value: object, what: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):  # numpy scalars are Real too
        raise InvalidInput(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInput(f"{what} must be finite, got {value}")
    return float(value)


def vector(values: Iterable[object], head_set: HeadSetRow | int, what: str = "weights") -> list[float]:
    """Finite floats, one per head of `head_set` (or a count, while the head set is being registered)."""
    try:
        vector = [finite(v, f"{what}[{i}]") for i, v in enumerate(values)]
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

