"""The review file: the label issues a person decides on, and the decisions the cleaning applies.

A plain CSV (a spreadsheet opens it) with one row per flagged image, best-ranked first:
``image_id, split, given, suggested, score, rank, reason, decision, relabel_to, decided_by``.
``decision`` starts empty; a person writes ``keep`` (the label is right), ``relabel`` (to
``relabel_to``, or to ``suggested`` where that is empty) or ``drop`` (the image goes). Only decided
rows are data: the file's version (:func:`decisions_version`) is a digest of them alone, so the
pipeline rewriting the undecided listing is not a change, and writing a decision is.

Rewriting (:func:`merge_review`) keeps every decided row as it is, whether or not the image is
still flagged (a relabelled image stops being flagged; the decision must stay), and replaces the
undecided rows with the current issues. The optional ``auto_drop`` writes ``drop`` into the top
undecided rows itself (``decided_by`` says so), counting the automatic drops already there, so it
converges instead of eating further down the list on every run; a person may overwrite them.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from bc_pipeline.core.storage import save_via_temp

REVIEW_COLUMNS = ["image_id", "split", "given", "suggested", "score", "rank", "reason", "decision", "relabel_to", "decided_by"]
DECISIONS = ("keep", "relabel", "drop")
AUTO = "auto"
NO_FILE = "no-decisions"


class DecisionFileError(ValueError):
    """The review file cannot be applied; the message names the file, the rows and the problem."""


@dataclass(frozen=True)
class Decisions:
    """Validated decisions: image id -> class name for relabels, the ids to drop, the ids kept as labelled."""

    relabel: dict[str, str]
    drop: dict[str, str]  # image id -> who decided and why, for the removed table
    keep: frozenset[str]


def read_review(path: Path) -> pd.DataFrame:
    """The review file as strings (empty for blanks); a row with the wrong number of fields is an error naming it."""
    text = path.read_text(encoding="utf-8-sig")
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return pd.DataFrame(columns=REVIEW_COLUMNS)
    header = [h.strip() for h in rows[0]]
    missing = [c for c in ("image_id", "decision") if c not in header]
    if missing:
        raise DecisionFileError(f"{path}: the header lacks the column(s) {missing}; it has {header}")
    damaged = [n + 1 for n, row in enumerate(rows[1:], start=1) if row and len(row) != len(header)]
    if damaged:
        raise DecisionFileError(
            f"{path}: line(s) {_lines(damaged)} have another number of fields than the header's {len(header)} "
            "(a comma inside a field must be quoted)"
        )
    table = pd.DataFrame([row for row in rows[1:] if row], columns=header, dtype=str).fillna("")
    for column in REVIEW_COLUMNS:
        if column not in table:
            table[column] = ""
    table.index = np.flatnonzero([bool(row) for row in rows[1:]]) + 2  # the file's line numbers
    return table.apply(lambda column: column.str.strip())


def parse_decisions(table: pd.DataFrame, path: Path, known_ids: Sequence[str], class_names: Sequence[str]) -> Decisions:
    """Check every decided row and return what to apply; all problems are reported at once, by line."""
    decided = table[table["decision"] != ""]
    problems: list[str] = []
    decision = decided["decision"].str.lower()
    bad = decided.index[~decision.isin(DECISIONS)]
    problems += [f"line {n}: decision {decided.at[n, 'decision']!r} is not one of {', '.join(DECISIONS)}" for n in bad]
    known = set(map(str, known_ids))
    problems += [f"line {n}: unknown image id {decided.at[n, 'image_id']!r}" for n in decided.index if decided.at[n, "image_id"] not in known]
    target = decided["relabel_to"].where(decided["relabel_to"] != "", decided["suggested"])
    relabels = decided.index[decision == "relabel"]
    problems += [f"line {n}: relabel to unknown class {target[n]!r} (classes: {', '.join(class_names)})"
                 for n in relabels if target[n] not in class_names]  # fmt: skip
    repeated = decided["image_id"][decided["image_id"].duplicated(keep=False)]
    problems += [f"line {n}: image {repeated[n]!r} is decided on more than one line" for n in repeated.index]
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise DecisionFileError(f"{path}: {len(problems)} problem(s), nothing applied: {shown}")
    who = decided["decided_by"].where(decided["decided_by"] != "", "a reviewer")
    return Decisions(
        relabel={decided.at[n, "image_id"]: target[n] for n in relabels},
        drop={decided.at[n, "image_id"]: f"dropped by {who[n]} in the label review (line {n})" for n in decided.index[decision == "drop"]},
        keep=frozenset(decided["image_id"][decision == "keep"]),
    )  # fmt: skip


def load_decisions(path: Path, known_ids: Sequence[str], class_names: Sequence[str]) -> Decisions:
    """The decisions of the review file at ``path`` (none if it does not exist)."""
    if not path.is_file():
        return Decisions({}, {}, frozenset())
    return parse_decisions(read_review(path), path, known_ids, class_names)


def decisions_version(path: Path) -> str:
    """Digest of the decided rows (image id, decision, target): what the cleaning depends on.

    The undecided listing does not count (no decision at all: the version of no file). A file that cannot be read as a table is versioned by
    its bytes, so fixing it is a change too.
    """
    if not path.is_file():
        return NO_FILE
    try:
        table = read_review(path)
    except (DecisionFileError, UnicodeDecodeError):
        return "unreadable-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    decided = table[table["decision"] != ""]
    if decided.empty:
        return NO_FILE  # a listing nobody decided on yet is no data: the same as no file
    key = decided[["image_id", "decision", "relabel_to", "suggested"]].copy()
    key.loc[key["decision"].str.lower() != "relabel", ["relabel_to", "suggested"]] = ""
    rows = sorted("\t".join(r) for r in key.assign(decision=key["decision"].str.lower()).itertuples(index=False))
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def merge_review(previous: pd.DataFrame | None, current: pd.DataFrame, auto_drop: int = 0) -> pd.DataFrame:
    """The new review table: previous decided rows kept as they are, undecided rows replaced by ``current``.

    ``current``: the issues now, with REVIEW_COLUMNS' values as strings (decision empty).
    ``auto_drop``: write ``drop`` (decided_by ``auto``) into the best-ranked undecided rows until that
    many automatic drops stand.
    """
    kept = previous[previous["decision"] != ""][REVIEW_COLUMNS] if previous is not None and len(previous) else current.iloc[:0]
    fresh = current[~current["image_id"].isin(set(kept["image_id"]))][REVIEW_COLUMNS].copy()
    standing = int((kept["decided_by"] == AUTO).sum())
    extra = fresh.index[: max(0, auto_drop - standing)]
    fresh.loc[extra, "decision"] = "drop"
    fresh.loc[extra, "decided_by"] = AUTO
    return pd.concat([kept, fresh], ignore_index=True)


def write_review(path: Path, table: pd.DataFrame) -> None:
    """Write the review table as CSV through a temporary file (a killed run leaves the old file whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_via_temp(path, lambda target: table[REVIEW_COLUMNS].to_csv(target, index=False))


def _lines(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:20])) + (f" and {len(numbers) - 20} more" if len(numbers) > 20 else "")


def review_rows(issues: pd.DataFrame, candidates: pd.DataFrame, class_names: Sequence[str]) -> pd.DataFrame:
    """The issues as review-file rows (strings, decision empty).

    ``issues``: :func:`bc_pipeline.quality.label_issues.find_label_issues`' table, whose ``row``
    indexes ``candidates`` (columns image_id, split).
    """
    picked = candidates.iloc[issues["row"].to_numpy()]
    return pd.DataFrame({
        "image_id": picked["image_id"].astype(str).to_numpy(), "split": picked["split"].astype(str).to_numpy(),
        "given": [class_names[g] for g in issues["given"]], "suggested": [class_names[s] for s in issues["suggested"]],
        "score": [f"{v:.4f}" for v in issues["score"]], "rank": issues["rank"].astype(str).to_numpy(),
        "reason": issues["reason"].to_numpy(), "decision": "", "relabel_to": "", "decided_by": "",
    })  # fmt: skip


def apply_decisions(manifest: pd.DataFrame, decisions: Decisions, class_names: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(manifest with relabels applied, rows dropped (index, image_id, label, kind, reason), the relabels made).

    ``manifest`` has image_id, label and class_name; its index is kept on what stays.
    """
    ids = manifest["image_id"].astype(str)
    dropped = manifest[ids.isin(set(decisions.drop))]
    removed = pd.DataFrame({
        "image_id": dropped["image_id"].astype(str).to_numpy(), "label": dropped["label"].to_numpy(),
        "kind": "label review", "reason": [decisions.drop[i] for i in dropped["image_id"].astype(str)],
    }, index=dropped.index)  # fmt: skip
    kept = manifest[~ids.isin(set(decisions.drop))].copy()
    target = kept["image_id"].astype(str).map(decisions.relabel)
    change = target.notna() & (target != kept["class_name"])
    relabelled = pd.DataFrame({
        "image_id": kept.loc[change, "image_id"].astype(str), "from": kept.loc[change, "class_name"], "to": target[change],
    })  # fmt: skip
    if change.any():
        kept.loc[change, "label"] = [class_names.index(t) for t in target[change]]
        kept.loc[change, "class_name"] = target[change]
    return kept, removed, relabelled.reset_index(drop=True)
