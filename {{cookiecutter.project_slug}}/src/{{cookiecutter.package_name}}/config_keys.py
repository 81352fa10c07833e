"""The keys of a config, read from its pydantic fields: name, type with bounds, default and
description. The training config names unknown keys with it, and config_docs.py builds
`--help` and the YAML comments from it.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="))


@dataclass(frozen=True)
class KeyDoc:
    """One key of a config: `train.learning_rate`, or `engines[].name` for the keys of
    a list's items. A section (a key that holds keys) has no type or default."""

    key: str
    description: str
    type: str = ""
    default: str | None = None
    section: bool = False


def key_docs(schema: type[BaseModel], prefix: str = "") -> list[KeyDoc]:
    """Every key a schema accepts, sections before their keys, in the schema's order."""
    docs = []
    for name, field in schema.model_fields.items():
        key, description = prefix + name, field.description or ""
        inner = _section_of(field.annotation)
        if inner is None:
            docs.append(KeyDoc(key, description, _type_of(field), _default_of(field)))
            continue
        docs.append(KeyDoc(key, description, section=True))
        listed = get_origin(field.annotation) is list
        docs += key_docs(inner, f"{key}[]." if listed else f"{key}.")
    return docs


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The schema a field nests: its own type, or the item type of a list of sections."""
    if get_origin(annotation) is list:
        annotation = get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _type_name(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(str(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    return str(getattr(annotation, "__name__", annotation))


def _type_of(field: FieldInfo) -> str:
    """The type as a user writes it, with its bounds: `int (>= 1)`, `float (> 0, <= 1)`."""
    bounds = [
        f"{sign} {getattr(item, name)}"
        for item in field.metadata
        for name, sign in BOUNDS
        if getattr(item, name, None) is not None
    ]
    name = _type_name(field.annotation)
    return f"{name} ({', '.join(bounds)})" if bounds else name


def _default_of(field: FieldInfo) -> str | None:
    """The default as YAML writes it; None when the key is required."""
    if field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000)
    return str(text).removesuffix("\n...\n").strip()
