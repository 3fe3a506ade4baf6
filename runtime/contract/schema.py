"""The subset of JSON Schema a structured reply can be constrained to, parsed and checked.

Checked when a request arrives (:func:`mofa_omni.contract.tasks.validate_request`),
so a schema no backend can follow is refused before any model runs;
:mod:`mofa_omni.adapters.structured` then writes the reply field by field.

Supported: an ``object`` (``additionalProperties`` false implied) whose properties are
each a ``string`` (with ``enum``, or with ``minLength``/``maxLength``), an ``integer`` or a
``number`` (with ``minimum``/``maximum``) or a ``boolean``. The ``required`` properties are
written, in the order ``properties`` lists them; optional ones are left out (the reader's
default applies); without ``required`` every property is written. Annotations
(``title``, ``description``, ``default``, ``examples``) are read past. Anything else is a
:class:`~mofa_omni.contract.errors.ContractError` naming the keyword.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from mofa_omni.contract.errors import ContractError

DEFAULT_MAX_LENGTH = 64
_KNOWN_KEYWORDS = {"type", "properties", "required", "additionalProperties", "enum",
                   "maxLength", "minLength", "minimum", "maximum", "description", "title", "$schema",
                   "default", "examples"}


@dataclass(frozen=True, slots=True)
class Choice:
    values: tuple[str | bool, ...]


@dataclass(frozen=True, slots=True)
class Text:
    max_length: int = DEFAULT_MAX_LENGTH
    min_length: int = 0


INTEGER_RANGE = (-(10**9), 10**9)  # an integer's or a number's bounds when it gives none
NUMBER_RANGE = (-1e9, 1e9)


@dataclass(frozen=True, slots=True)
class Integer:
    minimum: int = INTEGER_RANGE[0]
    maximum: int = INTEGER_RANGE[1]


@dataclass(frozen=True, slots=True)
class Number:
    minimum: float = NUMBER_RANGE[0]
    maximum: float = NUMBER_RANGE[1]


Field = Choice | Text | Integer | Number


@dataclass(frozen=True, slots=True)
class ObjectShape:
    """The fields of a supported schema, in the order the reply writes them."""

    fields: tuple[tuple[str, Field], ...]


def parse_schema(schema: dict | str, where: str = "json_schema", *,
                 tool: bool = False) -> ObjectShape:
    """The supported subset of JSON Schema, or a ContractError naming what is not (and
    ``where`` it is). A ``tool``'s parameters may be an object without properties."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise ContractError(f"{where} is not JSON: {error}") from None
    if not isinstance(schema, dict) or schema.get("type") != "object":
        raise ContractError(f"{where}: the top level must be {{\"type\": \"object\", ...}}")
    _check_keywords(schema, where)
    properties = schema.get("properties", {} if tool else None)
    if not isinstance(properties, dict) or not (properties or tool):
        raise ContractError(f"{where}: an object needs at least one property")
    required = schema.get("required", list(properties))
    if not isinstance(required, list) or not set(required) <= set(properties):
        raise ContractError(f"{where}: required must list some of the properties "
                            f"({', '.join(properties)}), got {required!r}")
    if not required and not tool:
        raise ContractError(f"{where}: no property is required, so the reply would be empty")
    if schema.get("additionalProperties", False) is not False:
        raise ContractError(f"{where}: additionalProperties must be false")
    return ObjectShape(tuple((name, _parse_field(name, spec, where))
                             for name, spec in properties.items() if name in required))


def _check_keywords(spec: dict, where: str) -> None:
    unknown = sorted(set(spec) - _KNOWN_KEYWORDS)
    if unknown:
        raise ContractError(f"{where}: unsupported JSON Schema keyword(s) {', '.join(unknown)}")


def _parse_field(name: str, spec: dict, schema: str) -> Field:
    where = f"{schema} property {name!r}"
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
        field = Integer(int(spec.get("minimum", INTEGER_RANGE[0])),
                        int(spec.get("maximum", INTEGER_RANGE[1])))
        if field.minimum > field.maximum:
            raise ContractError(f"{where}: minimum above maximum")
        return field
    if kind == "number":
        number = Number(float(spec.get("minimum", NUMBER_RANGE[0])),
                        float(spec.get("maximum", NUMBER_RANGE[1])))
        if number.minimum > number.maximum:
            raise ContractError(f"{where}: minimum above maximum")
        return number
    if kind == "boolean":
        return Choice((True, False))
    raise ContractError(f"{where}: type {kind!r} is not supported (string, integer, number, "
                        "boolean)")
