"""What the training worker tells the run while it trains: typed events, never lines to parse.

The worker sends each :class:`WorkerEvent` as a Dagster Pipes custom message
(:meth:`WorkerEvent.to_message`); the ``trained_model`` asset relays it, as it arrives, into the
run's event log as an engine event whose metadata are the event's fields
(``dagster_utils/progress.py``), and ``make run`` prints the line of each event it reads there.
The one place that turns an event into words is :meth:`WorkerEvent.text`, used by the worker's
console, the run log and the terminal alike.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

EventKind = Literal["ready", "resumed", "discarded", "epoch", "finished"]
KINDS: tuple[str, ...] = ("ready", "resumed", "discarded", "epoch", "finished")
EVENT_KEY = "bc_event"  # names the kind in a Pipes message and in the run log's event metadata


@dataclass(frozen=True)
class WorkerEvent:
    """One event of a training: its ``kind`` and plain values (numbers and strings).

    - ``ready``: seconds, backend, device (the worker has loaded its arrays and chosen its device);
    - ``resumed``: epoch, phase (training goes on from a checkpoint);
    - ``discarded``: directory, reason (a checkpoint that cannot be resumed was deleted);
    - ``epoch``: epoch, phase, loss, accuracy, val_loss, val_accuracy, lr, seconds (one epoch ended);
    - ``finished``: device, backend, train_seconds, epochs_run, best_epoch.
    """

    kind: EventKind
    values: Mapping[str, Any] = field(default_factory=dict)

    def text(self) -> str:
        """The line a person reads for this event."""
        v = self.values
        if self.kind == "ready":
            return f"worker ready in {v['seconds']:.1f}s: {v['backend']} on {v['device']}"
        if self.kind == "resumed":
            return f"resuming from the checkpoint after epoch {v['epoch']} (phase {v['phase']})"
        if self.kind == "discarded":
            return f"discarding the checkpoint in {v['directory']}: {v['reason']}"
        if self.kind == "epoch":
            return (f"epoch {v['epoch']} (phase {v['phase']}): loss {v.get('loss', float('nan')):.4f} "
                    f"acc {v.get('accuracy', float('nan')):.4f} | val_loss {v.get('val_loss', float('nan')):.4f} "
                    f"val_acc {v.get('val_accuracy', float('nan')):.4f} | lr {v['lr']:.2e} | {v['seconds']:.1f}s")  # fmt: skip
        return (f"finished: {v['epochs_run']} epochs (best {v['best_epoch']}) in {v['train_seconds']:.0f} s "
                f"on {v['device']} ({v['backend']})")  # fmt: skip

    def to_message(self) -> dict[str, Any]:
        """The Pipes custom message: the kind under :data:`EVENT_KEY`, then the values."""
        return {EVENT_KEY: self.kind, **{key: _plain(value) for key, value in self.values.items()}}

    @classmethod
    def from_message(cls, message: Any) -> WorkerEvent | None:
        """The event a message (or an event log entry's metadata) carries; None for anything else."""
        if not isinstance(message, Mapping) or message.get(EVENT_KEY) not in KINDS:
            return None
        return cls(message[EVENT_KEY], {key: value for key, value in message.items() if key != EVENT_KEY})


Emit = Callable[[WorkerEvent], None]


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars become Python numbers, other values stay as they are."""
    return value.item() if hasattr(value, "item") and not isinstance(value, (str, bytes)) else value
