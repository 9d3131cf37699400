"""One config style: every stage's Dagster config is a class an editor can read, whose fields take their
defaults, bounds and descriptions from the library's settings dataclass; and refactoring them left
every asset's code version where it was (a changed version would rerun stages whose behaviour did
not change)."""

from __future__ import annotations

import dataclasses
import inspect

import dagster as dg
import pytest

from bc_pipeline.dagster_utils.versions import SettingsConfig
from bc_pipeline.definitions import defs

# The code versions before issue 27's refactor, which changed no stage's behaviour: bump one only
# with the stage's logic (the leading number) or its config defaults (the digest follows by itself).
EXPECTED_CODE_VERSIONS = {
    "augmented_train_set": "2.cfg-eef43e7e",
    "balanced_train_set": "2.cfg-eb7f5bc8",
    "clean_images": "5",
    "corruption_benchmark_set": "1.cfg-51ae50b8",
    "corruption_report": "5.cfg-01a6e72c",
    "data_splits": "1.cfg-708bcb45",
    "domain_shift_report": "3",
    "domain_shift_set": "1.cfg-8aaf7703",
    "duplicate_groups": "1.cfg-bb2d7b3a",
    "evaluation_report": "4.cfg-b4b65a75",
    "external_sets": "1",
    "image_colour_stats": "1",
    "image_hashes": "1",
    "lab_adaptation": "2.cfg-6123c7eb",
    "label_issues": "2.cfg-62cf8328",
    "label_probabilities": "2.cfg-62cf8328",
    "model_leaderboard": "4.cfg-3cbcda71",
    "noise_templates": "4",
    "outlier_report": "2.cfg-f6da62ca",
    "raw_images": "3",
    "robustness_eval_sets": "1.cfg-ff115a62",
    "submission_package": "2.cfg-13f1ae94",
    "trained_model": "7.cfg-2961f95a",
}


def _config_classes() -> dict[str, type[dg.Config]]:
    """Each configurable asset's config class, from its function's signature."""
    found = {}
    graph = defs.resolve_asset_graph()
    for key in graph.materializable_asset_keys:
        function = defs.resolve_assets_def(key).op.compute_fn.decorated_fn
        parameter = inspect.signature(function).parameters.get("config")
        if parameter is not None:
            annotation = parameter.annotation
            found[key.to_user_string()] = function.__globals__[annotation] if isinstance(annotation, str) else annotation
    return found


def test_the_code_versions_are_pinned():
    graph = defs.resolve_asset_graph()
    assert {key.to_user_string(): graph.get(key).code_version for key in graph.materializable_asset_keys} == EXPECTED_CODE_VERSIONS


def test_every_config_is_a_class_declared_in_source():
    configs = _config_classes()
    assert len(configs) == 16
    for name, config_class in configs.items():
        source = inspect.getsource(config_class)  # a class statement, not a model generated at import
        assert source.startswith(f"class {config_class.__name__}("), name
        if config_class.__name__ != "SubmissionConfig":  # its one field is the asset's own choice
            assert issubclass(config_class, SettingsConfig), name


@pytest.mark.parametrize("name", sorted(set(_config_classes()) - {"submission_package"}))
def test_each_config_field_comes_from_the_librarys_settings(name):
    config_class = _config_classes()[name]
    settings_class = config_class.settings_class
    fields = config_class.model_fields
    declared = {field.name: field for field in dataclasses.fields(settings_class)}
    missing = set(declared) - set(fields) - set(config_class.internal)
    assert not missing, f"{config_class.__name__} lacks {sorted(missing)} of {settings_class.__name__}"
    for field_name in set(declared) - set(config_class.internal):
        field = declared[field_name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        config_field = fields[field_name]
        assert config_field.default == (list(default) if isinstance(default, tuple) else default), field_name
        assert config_field.description == field.metadata.get("description"), field_name
    assert config_class().settings() == settings_class()  # the defaults make the library's default settings


def test_the_librarys_checks_run_when_a_config_is_validated():
    from bc_pipeline.defs.assets.augmentation import AugmentConfig, RobustnessConfig
    from bc_pipeline.defs.assets.benchmark import CorruptionSuiteConfig
    from bc_pipeline.defs.assets.evaluation import LeaderboardConfig
    from bc_pipeline.defs.assets.splits import SplitConfig

    for make, message in (
        (lambda: SplitConfig(train=0.7), "summing to 1"),
        (lambda: AugmentConfig(mix=["light", "mosaic"]), "unknown augmentation preset 'mosaic'"),
        (lambda: RobustnessConfig(policies=["light", "light"]), "policies repeat a name"),
        (lambda: CorruptionSuiteConfig(severities=[6]), "severities must be in 1-5"),
        (lambda: LeaderboardConfig(rank_by="loss"), "rank_by must be one of"),
    ):
        with pytest.raises(ValueError, match=message):
            make()
