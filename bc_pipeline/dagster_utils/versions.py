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
- :class:`SettingsConfig` and :func:`setting`: every stage's Dagster ``Config`` is a class whose
  fields are declared one by one with their types, each taking its default, bounds and
  description from the library's settings dataclass (in the field's ``metadata``), so the
  library declares each setting once and an editor can follow any field to it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar

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


def setting(settings_class: type, name: str, **changes: Any) -> Any:
    """The pydantic field of config field ``name``: the default, bounds and description that
    ``settings_class`` (a frozen dataclass of the library) declares for its field of that name.

    A tuple default becomes a list (a config's sequences are lists); ``changes`` adds to or
    replaces the field's arguments. An unknown ``name`` fails when the module loads.
    """
    found = {field.name: field for field in dataclasses.fields(settings_class)}
    if name not in found:
        raise KeyError(f"{settings_class.__name__} has no setting {name!r}")
    field = found[name]
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    arguments = {key: field.metadata[key] for key in _FIELD_ARGUMENTS if key in field.metadata}
    return pydantic.Field(default=list(default) if isinstance(default, tuple) else default, **{**arguments, **changes})


def override(settings_class: type, name: str) -> Any:
    """An optional config field that overrides ``settings_class``'s field ``name`` (default None: keep it)."""
    found = {field.name: field for field in dataclasses.fields(settings_class)}
    description = found[name].metadata.get("description", name)
    bounds = {key: found[name].metadata[key] for key in ("ge", "gt", "le", "lt") if key in found[name].metadata}
    return pydantic.Field(default=None, description=f"Override: {description}", **bounds)


class SettingsConfig(dg.Config):
    """A stage's Dagster config that mirrors a settings dataclass of the library, field by field.

    Each field is declared here with its type and ``= setting(Settings, "name")``, so an editor
    follows ``config.epochs`` to its declaration and on to the dataclass that holds its default,
    bounds and description: the one place each setting is declared. :meth:`settings` returns that
    dataclass. ``bc_pipeline_tests/test_configs.py`` checks that no dataclass field is missing.
    """

    settings_class: ClassVar[type]
    internal: ClassVar[tuple[str, ...]] = ()  # dataclass fields a run cannot set (left at their defaults)

    @pydantic.model_validator(mode="after")
    def _library_accepts(self) -> SettingsConfig:
        """The library's own checks (``__post_init__`` of the dataclass) run when the config is validated."""
        self.settings()
        return self

    def settings(self) -> Any:
        """The library's settings dataclass with this config's values (lists become tuples)."""
        names = {field.name for field in dataclasses.fields(self.settings_class)}
        values = {key: value for key, value in self.model_dump().items() if key in names}
        return self.settings_class(**{key: tuple(v) if isinstance(v, list) else v for key, v in values.items()})
