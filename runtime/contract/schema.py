"""The subset of JSON Schema a structured reply can be constrained to, parsed and checked.

Checked when a request arrives (:func:`mofa_omni.contract.tasks.validate_request`),
so a schema no backend can follow is refused before any model runs;
:mod:`mofa_omni.adapters.structured` then writes the reply field by field.

Supported: an ``object`` whose ``properties`` are all ``required``
(``additionalProperties`` false implied), each a ``string`` (with ``enum``, or with
``maxLength``), an ``integer`` (with ``minimum``/``maximum``) or a ``boolean``.
Anything else is a :class:`~mofa_omni.contract.errors.ContractError` naming the keyword.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mofa_omni.contract.errors import ContractError

DEFAULT_MAX_LENGTH = 64
_KNOWN_KEYWORDS = {"type", "properties", "required", "additionalProperties", "enum",
                   "maxLength", "minLength", "minimum", "maximum", "description", "title", "$schema"}


@dataclass(frozen=True, slots=True)
class Choice:
    values: tuple[str | bool, ...]


@dataclass(frozen=True, slots=True)
class Text:
    max_length: int = DEFAULT_MAX_LENGTH
    min_length: int = 0


@dataclass(frozen=True, slots=True)
class Integer:
    minimum: int = -(10**9)
    maximum: int = 10**9


Field = Choice | Text | Integer


@dataclass(frozen=True, slots=True)
class ObjectShape:
    """The fields of a supported schema, in the order the reply writes them."""

    fields: tuple[tuple[str, Field], ...]


def parse_schema(schema: dict | str) -> ObjectShape:
    """The supported subset of JSON Schema, or a ContractError naming what is not."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ContractError(f"json_schema is not JSON: {error}") from None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ContractError("json_schema: the top level must be {\"type\": \"object\", ...}")
    _check_keywords(schema, "json_schema")
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise ContractError("json_schema: an object needs at least one property")
    required = schema.get("required", list(properties))
    if set(required) != set(properties):
        raise ContractError("json_schema: every property must be required (optional properties "
                            f"are not supported): missing {sorted(set(properties) - set(required))}")
    if schema.get("additionalProperties", False) is not False:
        raise ContractError("json_schema: additionalProperties must be false")
    return ObjectShape(tuple((name, _parse_field(name, spec)) for name, spec in properties.items()))


def _check_keywords(spec: dict, where: str) -> None:
    unknown = sorted(set(spec) - _KNOWN_KEYWORDS)
    if unknown:
        raise ContractError(f"{where}: unsupported JSON Schema keyword(s) {', '.join(unknown)}")


def _parse_field(name: str, spec: dict) -> Field:
    where = f"json_schema property {name!r}"
    if not isinstance(spec, dict):
        raise ContractError(f"{where}: not a schema")
    _check_keywords(spec, where)
    kind = spec.get("type")
    if "enum" in spec:
        values = spec["enum"]
        if not values or not all(isinstance(v, str) for v in values):
            raise ContractError(f"{where}: enum must be a non-empty list of strings")
        return Choice(tuple(values))
    if kind == "string":
        max_length = spec.get("maxLength", DEFAULT_MAX_LENGTH)
        min_length = spec.get("minLength", 0)
        if not isinstance(max_length, int) or not isinstance(min_length, int) \
                or not 0 <= min_length <= max_length or max_length < 1:
            raise ContractError(f"{where}: need 0 <= minLength <= maxLength, maxLength >= 1")
        return Text(max_length, min_length)
    if kind == "integer":
        field = Integer(int(spec.get("minimum", Integer.minimum)),
                        int(spec.get("maximum", Integer.maximum)))
        if field.minimum > field.maximum:
            raise ContractError(f"{where}: minimum above maximum")
        return field
    if kind == "boolean":
        return Choice((True, False))
    raise ContractError(f"{where}: type {kind!r} is not supported (string, integer, boolean)")
