"""Versions: data versions of outputs, code versions that cover config defaults, and config
schemas derived from the library's settings so that each setting is declared once.

- :func:`versioned`: an asset's output with a data version that digests its content. Unchanged
  content keeps its data version, so a rerun that produced the same result triggers nothing
  downstream.
- :func:`with_config`: automated runs (declarative automation, schedules) use each stage's
  ``Config`` defaults, so a changed default changes that stage's results exactly as a code change
  does. Folding a short fingerprint of the defaults into ``code_version`` makes Dagster see it the
  same way: the stage and what depends on it are marked changed and rerun, and nothing upstream is.
  Contributors still bump the leading number by hand whenever a stage's logic changes its output.
- :func:`config_from_dataclass`: a Dagster ``Config`` class whose fields, types, defaults, bounds
  and descriptions are those of a frozen settings dataclass of ``lib/`` or ``worker/`` (bounds and
  descriptions in each field's ``metadata``), so the library's schema is the only one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import typing
from collections.abc import Mapping
from typing import Any

import dagster as dg
import pydantic

from bc_pipeline.core.storage import fingerprint

# Field metadata keys that become pydantic Field arguments.
_FIELD_ARGUMENTS = ("description", "ge", "gt", "le", "lt")


def versioned(
    value: Any, *content: Any, digest: str | None = None, metadata: Mapping[str, Any] | None = None
) -> dg.Output:
    """``value`` as an output whose data version is a digest of ``content`` (default: ``value``).

    ``digest``: a content digest computed elsewhere (a model's weights, by the worker that trained it).
    """
    version = digest or (fingerprint(*content) if content else fingerprint(value))
    return dg.Output(value, data_version=dg.DataVersion(version), metadata=dict(metadata or {}))


def config_defaults(config_class: type[dg.Config]) -> dict:
    """The defaults of a Config class as plain JSON-able values."""
    return config_class().model_dump(mode="json")


def with_config(code_version: str, config_class: type[dg.Config]) -> str:
    """``"<code_version>.cfg-<8 hex>"``: the hand-bumped version plus a digest of the defaults."""
    text = json.dumps(config_defaults(config_class), sort_keys=True)
    return f"{code_version}.cfg-{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"


def config_from_dataclass(
    settings_class: type,
    *,
    name: str | None = None,
    base: type[dg.Config] = dg.Config,
    nested: Mapping[str, type[dg.Config]] | None = None,
    exclude: tuple[str, ...] = (),
    doc: str | None = None,
) -> type[dg.Config]:
    """A ``Config`` class mirroring ``settings_class``'s fields (see the module docstring).

    ``nested`` maps a field holding a tuple of settings dataclasses (``phases``) to the Config class
    of one item: the field becomes a list of those. ``base`` adds fields and methods of the asset's
    own (model overrides, say); ``exclude`` leaves fields out.
    """
    nested = dict(nested or {})
    hints = typing.get_type_hints(settings_class)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(settings_class):
        if field.name in exclude:
            continue
        arguments = {key: field.metadata[key] for key in _FIELD_ARGUMENTS if key in field.metadata}
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        hint = hints[field.name]
        if field.name in nested:
            hint, default = list[nested[field.name]], []
        elif typing.get_origin(hint) is tuple:  # a frozen dataclass's tuple is a config's list
            hint, default = list[typing.get_args(hint)[0]], list(default)
        fields[field.name] = (hint, pydantic.Field(default=default, **arguments))
    module = sys._getframe(1).f_globals["__name__"]  # the defining module, for Dagster's messages and the docs
    model = pydantic.create_model(name or settings_class.__name__ + "Config", __base__=base, __module__=module, **fields)
    model.__doc__ = doc or f"Dagster config of :class:`{settings_class.__module__}.{settings_class.__name__}` (its fields' docs say why)."
    return model


def overrides_of(settings_class: type, names: tuple[str, ...], *, name: str) -> type[dg.Config]:
    """A ``Config`` of optional overrides of some fields of ``settings_class`` (default ``None``: keep its value).

    Types, bounds and descriptions are the dataclass's; each description is marked "Override:".
    """
    hints = typing.get_type_hints(settings_class)
    found = {field.name: field for field in dataclasses.fields(settings_class)}
    fields: dict[str, Any] = {}
    for key in names:
        arguments = {k: found[key].metadata[k] for k in _FIELD_ARGUMENTS if k in found[key].metadata}
        arguments["description"] = "Override: " + arguments.get("description", key)
        # Dagster config has no optional Literal: an override of one is a string, checked where it is used.
        hint = str if typing.get_origin(hints[key]) is typing.Literal else hints[key]
        fields[key] = (hint | None, pydantic.Field(default=None, **arguments))
    return pydantic.create_model(name, __base__=dg.Config, __module__=sys._getframe(1).f_globals["__name__"], **fields)


def to_dataclass(config: dg.Config, settings_class: type, **nested: type) -> Any:
    """The ``settings_class`` instance a config of :func:`config_from_dataclass` describes.

    ``nested`` names the item dataclass of each nested list field (``phases=Phase``).
    """
    names = {field.name for field in dataclasses.fields(settings_class)}
    values = {key: value for key, value in config.model_dump().items() if key in names}
    for key, item_class in nested.items():
        values[key] = tuple(item_class(**item) for item in values.get(key, ()))
    return settings_class(**values)
