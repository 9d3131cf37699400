"""Code versions that also cover the config defaults a stage runs with when automation starts it.

Automated runs (declarative automation, schedules) use each stage's ``Config`` defaults, so a
changed default changes that stage's results exactly as a code change does. Folding a short
fingerprint of the defaults into ``code_version`` makes Dagster see it the same way: the stage
and what depends on it are marked changed and rerun, and nothing upstream is.

Contributors still bump the leading number by hand whenever a stage's logic changes its output.
"""

from __future__ import annotations

import hashlib
import json

import dagster as dg


def config_defaults(config_class: type[dg.Config]) -> dict:
    """The defaults of a Config class as plain JSON-able values."""
    return config_class().model_dump(mode="json")


def with_config(code_version: str, config_class: type[dg.Config]) -> str:
    """``"<code_version>.cfg-<8 hex>"``: the hand-bumped version plus a digest of the defaults."""
    text = json.dumps(config_defaults(config_class), sort_keys=True)
    return f"{code_version}.cfg-{hashlib.blake2b(text.encode(), digest_size=4).hexdigest()}"
