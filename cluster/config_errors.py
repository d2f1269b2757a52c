"""``ConfigError`` and the one translation of pydantic's validation errors into messages that start with
the dotted path of the field (``decode.num_replicas: must be >= 1, got 0``)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from kv_transfer.config import BACKENDS


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range; the message names the field."""


# pydantic error type -> our wording; formatted with the error's ctx plus input and type (its type name)
_MESSAGES = {
    "extra_forbidden": "unknown field",
    "missing": "required field",
    "literal_error": "must be one of {expected}, got {input!r}",
    "union_tag_invalid": "must be one of {expected_tags}, got {tag!r}",
    "greater_than": "must be > {gt}, got {input!r}",
    "greater_than_equal": "must be >= {ge}, got {input!r}",
    "less_than": "must be < {lt}, got {input!r}",
    "less_than_equal": "must be <= {le}, got {input!r}",
    "finite_number": "must be a finite number, got {input!r}",
    "string_too_short": "must not be empty",
    "string_pattern_mismatch": "must match {pattern}, got {input!r}",
    "model_type": "must be a mapping, got {type}",
    "model_attributes_type": "must be a mapping, got {type}",
    "dict_type": "must be a mapping, got {type}",
    "int_type": "must be int, got {type} {input!r}",
    "float_type": "must be float, got {type} {input!r}",
    "string_type": "must be str, got {type} {input!r}",
    "bool_type": "must be bool, got {type} {input!r}",
}
# a validator's own message that already starts with the field it is about ("max_replicas: ...")
_NAMES_ITS_FIELD = re.compile(r"^[A-Za-z_][\w./]*: ")


def describe_validation_error(error: ValidationError) -> str:
    """Every error of ``error``, each ``dotted.path: what is wrong``, joined by ``; ``."""
    return "; ".join(_describe(detail) for detail in error.errors())


def _describe(detail: ErrorDetails) -> str:
    path = _dotted(detail["loc"])
    kind = detail["type"]
    if kind == "union_tag_invalid":
        path = f"{path}.backend" if path else "backend"
    if kind in _MESSAGES:
        values: dict[str, Any] = {**detail.get("ctx", {}), "input": detail["input"]}
        message = _MESSAGES[kind].format(type=type(detail["input"]).__name__, **values)
    else:
        message = detail["msg"].removeprefix("Value error, ")
    if not path:
        return message
    separator = "." if _NAMES_ITS_FIELD.match(message) and kind == "value_error" else ": "
    return f"{path}{separator}{message}"


def _dotted(loc: tuple[int | str, ...]) -> str:
    """``("kv_transfer", "nixl", "num_threads")`` -> ``kv_transfer.num_threads`` (union tags dropped)."""
    parts: list[str] = []
    for part in loc:
        if parts and parts[-1] == "kv_transfer" and part in BACKENDS:
            continue  # the discriminated union's tag, not a field
        parts.append(str(part))
    return ".".join(parts)
