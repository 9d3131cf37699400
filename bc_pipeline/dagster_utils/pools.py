"""Pool slots claimed atomically, so the ``gpu`` pool's limit holds when two runs reach it at once.

Why: Dagster (1.13) claims a pool slot in two statements, a SELECT of a free slot and an UPDATE
of that slot's id. PostgreSQL locks the row between them (``FOR UPDATE SKIP LOCKED``); SQLite, the
instance ``make run`` uses, ignores the lock, so two runs that reach ``trained_model`` in the same
instant can both read slot 1 as free and both write it: both report the slot claimed and train at
once (seen in CI: ``make run`` typed in two terminals, two trainings side by side, one of them
reading the other's job spec). :func:`claim_slots_atomically` makes the UPDATE conditional on the
slot still being free, so the database serialises the two writes and the later one is told
"blocked" and waits, as the pool means. The fix is applied once, where the definitions are loaded
(``bc_pipeline/definitions.py``): every process that executes a run of this code location loads
them (``bc_pipeline.run``'s child, the run workers the daemon launches, the tests).
"""

from __future__ import annotations

from typing import Any

__all__ = ["claim_slots_atomically", "free_slot_id", "take_slot"]


def free_slot_id(conn: Any, concurrency_key: str) -> int | None:
    """The id of one unclaimed, live slot of ``concurrency_key`` (None: all taken)."""
    from dagster._core.storage.event_log.schema import ConcurrencySlotsTable
    from dagster._core.storage.sqlalchemy_compat import db_select

    table = ConcurrencySlotsTable
    rows = conn.execute(
        db_select([table.c.id]).select_from(table)
        .where((table.c.concurrency_key == concurrency_key) & table.c.step_key.is_(None) & (table.c.deleted == False))  # noqa: E712
        .with_for_update(skip_locked=True).limit(1)
    ).fetchall()  # all (one row): the statement ends here, so SQLite holds no read lock while we write  # fmt: skip
    return int(rows[0][0]) if rows and rows[0][0] else None


def take_slot(conn: Any, slot_id: int, run_id: str, step_key: str) -> bool:
    """Claim slot ``slot_id`` for the step, only if it is still free; whether it was."""
    from dagster._core.storage.event_log.schema import ConcurrencySlotsTable

    table = ConcurrencySlotsTable
    updated = conn.execute(
        table.update().values(run_id=run_id, step_key=step_key).where((table.c.id == slot_id) & table.c.step_key.is_(None))
    )
    return bool(updated.rowcount)


def _claim_concurrency_slot(self: Any, concurrency_key: str, run_id: str, step_key: str) -> Any:
    """Dagster's ``SqlEventLogStorage._claim_concurrency_slot`` with a conditional UPDATE (module docstring)."""
    from dagster._utils.concurrency import ConcurrencySlotStatus as Status

    with self.index_connection() as conn:
        slot_id = free_slot_id(conn, concurrency_key)
        if slot_id is None or not take_slot(conn, slot_id, run_id, step_key):
            return Status.BLOCKED
        return Status.CLAIMED


def claim_slots_atomically() -> None:
    """Replace the slot claim of Dagster's SQL event-log storages (SQLite and PostgreSQL); idempotent."""
    from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

    if not hasattr(SqlEventLogStorage, "_claim_concurrency_slot"):
        raise RuntimeError("dagster's SqlEventLogStorage has no _claim_concurrency_slot: review bc_pipeline/dagster_utils/pools.py")
    SqlEventLogStorage._claim_concurrency_slot = _claim_concurrency_slot
