"""Stage 3b: labels that are probably wrong, a review file a person decides in, and its decisions.

label_probabilities (out-of-sample class probabilities of every train/val image) -> label_issues
(confident learning; writes data/review/label_decisions.csv) -> a person writes decisions there ->
label_decisions (an observed source: label_review_sensor records a new version when a decision
changes) -> clean_images applies them. The file closes the loop outside the graph, which keeps no
cycle. Test images are never flagged, so nothing relabels or drops them without a person.
"""

import time

import dagster as dg
import numpy as np
import pandas as pd

from bc_pipeline.core.artifacts import ImageSet
from bc_pipeline.core.plots import captioned_grid, noise_matrix_figure
from bc_pipeline.dagster_utils import metadata as md
from bc_pipeline.dagster_utils.versions import SettingsConfig, setting, versioned, with_config
from bc_pipeline.defs.resources import PipelineStorage
from bc_pipeline.models.embeddings import cache_name, cached_embeddings
from bc_pipeline.quality import label_review
from bc_pipeline.quality.label_issues import LabelIssues, LabelIssueSettings, find_label_issues, find_label_issues_in_passes

REVIEWED_SPLITS = ("train", "val")
SHOWN = 24


class LabelIssueConfig(SettingsConfig):
    """How out-of-sample probabilities are made and issues ranked (quality.label_issues.LabelIssueSettings)."""

    settings_class = LabelIssueSettings
    folds: int = setting(LabelIssueSettings, "folds")
    hidden: int = setting(LabelIssueSettings, "hidden")
    penalty: float = setting(LabelIssueSettings, "penalty")
    passes: int = setting(LabelIssueSettings, "passes")
    ranked_by: str = setting(LabelIssueSettings, "ranked_by")
    flag_by: str = setting(LabelIssueSettings, "flag_by")
    auto_drop: int = setting(LabelIssueSettings, "auto_drop")
    seed: int = setting(LabelIssueSettings, "seed")


@dg.observable_source_asset(
    group_name="cleaning",
    description=(
        "The decisions a person wrote in data/review/label_decisions.csv (keep / relabel / drop). Its data "
        "version is a digest of the decided rows only: label_issues rewriting the undecided listing is no "
        "change, a new or edited decision is. label_review_sensor observes it every 30 s."
    ),
)
def label_decisions(context: dg.OpExecutionContext, storage: PipelineStorage) -> dg.ObserveResult:
    path = storage.label_review_file
    version = label_review.decisions_version(path)
    context.log.info(f"{path}: decisions version {version}")
    return dg.ObserveResult(data_version=dg.DataVersion(version), metadata={"path": dg.MetadataValue.path(str(path))})


@dg.asset(
    code_version=with_config("2", LabelIssueConfig),
    group_name="cleaning",
    kinds={"parquet", "keras"},
    description="Per train/val image, class probabilities from a probe that never saw it (k-fold on ImageNet embeddings, refitted without the first pass's issues).",
)
def label_probabilities(
    context: dg.AssetExecutionContext, config: LabelIssueConfig, clean_images: ImageSet, data_splits: pd.DataFrame,
    storage: PipelineStorage,
) -> dg.Output[pd.DataFrame]:  # fmt: skip
    settings = config.settings()
    rows = data_splits[data_splits["split"].isin(REVIEWED_SPLITS)].reset_index(drop=True)
    start = time.perf_counter()
    ids = rows["image_id"].astype(str).tolist()
    features, computed = cached_embeddings(clean_images.images[rows["index"].to_numpy()], ids, storage.cache_dir() / cache_name(), log=context.log.info)
    context.log.info(f"embedded {computed} images ({len(ids) - computed} from cache) in {time.perf_counter() - start:.1f}s")
    names = list(clean_images.class_names)
    probabilities, fold, _ = find_label_issues_in_passes(features, rows["label"].to_numpy(), rows["near_group"].to_numpy(),
                                                        settings, names, log=context.log.info)  # fmt: skip
    table = rows[["index", "image_id", "split", "label", "near_group"]].assign(fold=fold)
    table = pd.concat([table, pd.DataFrame(probabilities, columns=[f"p_{n}" for n in names])], axis=1)
    accuracy = float((probabilities.argmax(axis=1) == rows["label"].to_numpy()).mean())
    context.log.info(f"out-of-fold accuracy {accuracy:.4f} over {len(table)} images, {time.perf_counter() - start:.1f}s in all")
    metadata = {"num_images": len(table), "out_of_fold_accuracy": round(accuracy, 4), "embedded_now": computed,
                "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
    return versioned(table, metadata=metadata)


@dg.asset(
    code_version=with_config("2", LabelIssueConfig),
    group_name="cleaning",
    kinds={"parquet", "csv"},
    description="Train/val images whose label is probably wrong (confident learning, then a posterior check), ranked; written to the review file.",
)
def label_issues(
    context: dg.AssetExecutionContext, config: LabelIssueConfig, label_probabilities: pd.DataFrame,
    clean_images: ImageSet, storage: PipelineStorage,
) -> dg.Output[pd.DataFrame]:  # fmt: skip
    settings, names = config.settings(), list(clean_images.class_names)
    probabilities = label_probabilities[[f"p_{n}" for n in names]].to_numpy()
    found = find_label_issues(label_probabilities["label"].to_numpy(), probabilities, settings.ranked_by, names, settings.flag_by)
    rows = label_review.review_rows(found.issues, label_probabilities, names)
    path = storage.label_review_file
    previous = label_review.read_review(path) if path.is_file() else None
    review = label_review.merge_review(previous, rows, settings.auto_drop)
    label_review.write_review(path, review)
    context.log.info(f"{len(rows)} label issues in {len(label_probabilities)} train/val images (estimated share of wrong "
                     f"labels {found.noise.rate:.3f}, temperature {found.noise.temperature:.2f}); review file {path}")  # fmt: skip
    table = found.issues.assign(image_id=rows["image_id"].to_numpy(), split=rows["split"].to_numpy(),
                                given_name=rows["given"].to_numpy(), suggested_name=rows["suggested"].to_numpy())  # fmt: skip
    return versioned(table, metadata=_issue_metadata(found, table, clean_images, label_probabilities, review, storage))


def _issue_metadata(
    found: LabelIssues, table: pd.DataFrame, clean_images: ImageSet, candidates: pd.DataFrame, review: pd.DataFrame,
    storage: PipelineStorage,
) -> dict:  # fmt: skip
    """Counts, the noise matrix (table and heatmap) and the review grid of the top issues."""
    names = list(clean_images.class_names)
    matrix = pd.DataFrame(found.noise_matrix.round(4), index=names, columns=names).rename_axis("given").reset_index()
    top = table.head(SHOWN)
    images = clean_images.images[candidates["index"].to_numpy()[top["row"].to_numpy()]]
    captions = [f"#{r.rank} {r.given_name}\n-> {r.suggested_name} ({r.score:.2f})" for r in top.itertuples()]
    report = storage.report_dir("label_issues")
    decided = review[review["decision"] != ""]
    return {
        "num_issues": len(table),
        "issue_share": round(len(table) / max(len(candidates), 1), 4),
        "estimated_wrong_share": round(found.noise.rate, 4),
        "probability_temperature": round(found.noise.temperature, 3),
        "per_given_class": dg.MetadataValue.json({str(k): int(v) for k, v in table["given_name"].value_counts().items()}),
        "review_file": dg.MetadataValue.path(str(storage.label_review_file)),
        "decided_rows": len(decided),
        "thresholds": dg.MetadataValue.json({n: round(float(t), 4) for n, t in zip(names, found.thresholds)}),
        "noise_matrix": md.table(matrix),
        "top_issues": md.table(top[["rank", "image_id", "split", "given_name", "suggested_name", "score", "wrong_probability", "reason"]]),
        **md.image(noise_matrix_figure(found.noise_matrix, names, title="Estimated P(true | given label)"),
                   report / "noise_matrix.png", "noise_matrix_heatmap"),
        **md.image(captioned_grid(list(images), captions, title=f"Top {len(top)} label issues: given -> suggested (score)"),
                   report / "review_grid.png", "review_grid"),
    }  # fmt: skip
