"""Processes that end with the process that started them.

Why: ``bc_pipeline.run`` executes its runs in a child process, which starts the training worker;
if the parent is killed with kill -9 nothing can stop its children, and an orphaned worker would
go on training (and writing its checkpoint) beside the next run's. Each of them therefore watches
its parent and exits when it is gone: the run is then ended by the next ``bc_pipeline.run``
(``dagster_utils/runs.py``), and training resumes from the last checkpoint, which is written
through a rename so a kill never leaves half of one.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

EXIT_PARENT_GONE = 129


def process_alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():  # Linux: a zombie has exited; only its parent's wait is missing
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def exit_with_parent(interval: float = 1.0) -> threading.Thread | None:
    """Exit this process (code 129) within ``interval`` seconds of its parent's end.

    A process whose parent is init (a container's entry point, a daemon) has nothing to watch.
    """
    parent = os.getppid()
    if parent <= 1:
        return None

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os._exit(EXIT_PARENT_GONE)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def fresh_folder(root: Path) -> Path:
    """A new empty folder ``root/<pid>-<random>`` for this process; removes those of dead processes.

    Why: a folder shared by name would be emptied by one run while another writes into it; one per
    process is not, and the pid in its name tells which left-overs belong to no live process.
    """
    import shutil
    import uuid

    root.mkdir(parents=True, exist_ok=True)
    for old in root.iterdir():
        owner = old.name.split("-", 1)[0]
        if old.is_dir() and owner.isdigit() and process_alive(int(owner)):
            continue  # a live process's folder
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    path = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path
