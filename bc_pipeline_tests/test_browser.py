"""End to end in a real browser: `dagster dev` on a freshly materialized instance, driven by Chromium.

The graph is materialized in-process (tiny settings, 6 real images per class) into a temporary
DAGSTER_HOME; then `dagster dev` serves that instance and headless Chromium (via Playwright, using
the system's /usr/bin/chromium, see scripts/install_system_package.sh) checks that the asset lineage
shows the assets and that the evaluation report's page shows its metrics and the confusion matrix.
Screenshots and the server log go to bc_pipeline_tests/output/browser/ (git-ignored).

Skips when Chromium or the playwright package is missing. ``BC_CHROMIUM`` names another Chromium.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
import yaml

from bc_pipeline.core.classes import CLASS_NAMES
from bc_pipeline.definitions import all_asset_checks, all_assets, build_resources
from bc_pipeline.defs.resources import ImageSource
from bc_pipeline_tests.conftest import pbc96_files

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "bc_pipeline_tests" / "output" / "browser"
# Without the background-networking flags Chromium keeps calling Google services, which on a
# closed network means a flood of failing connections.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Small enough to run in well under a minute on 2 CPU cores. With 6 images per class the default
# 80/10/10 split leaves no test images, hence 60/20/20.
RUN_CONFIG = {
    "ops": {
        "data_splits": {"config": {"train": 0.6, "val": 0.2, "test": 0.2}},
        "robustness_eval_sets": {"config": {"policies": ["light"]}},
        "corruption_benchmark_set": {"config": {"corruptions": ["gaussian_noise", "pixelate"], "severities": [3], "max_images": 16, "workers": 1}},
        "trained_model": {"config": {"epochs": 1, "image_size": 32, "batch_size": 16}},
        "evaluation_report": {"config": {"tta": False, "gradcam_per_class": 0, "robust_policy": "light"}},
    }
}
SERVER_START_SECONDS = 120
SHUTDOWN_SECONDS = 30
UI_TIMEOUT_MS = 60_000
# Runs `dagster dev` with SIGINT at its default: a SIGINT ignored by whoever started pytest
# (e.g. a background job of a non-interactive shell) would be inherited, and dagster dev maps
# SIGTERM to the SIGINT handler, so it could then only be stopped with SIGKILL.
_EXEC_WITH_DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
)


def _chromium() -> str:
    """The Chromium binary, or skip the test saying why there is none."""
    wanted = os.environ.get("BC_CHROMIUM")
    if wanted:
        if not (os.path.isfile(wanted) and os.access(wanted, os.X_OK)):
            pytest.skip(f"BC_CHROMIUM={wanted} is not an executable file")
        return wanted
    found = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else shutil.which("chromium")
    if not found:
        pytest.skip("chromium not found (/usr/bin/chromium, PATH): run scripts/install_system_package.sh chromium /usr/bin/chromium to install it")
    return found


def _dagster_cli() -> str:
    beside_python = Path(sys.executable).with_name("dagster")
    found = str(beside_python) if beside_python.exists() else shutil.which("dagster")
    if not found:
        pytest.fail("the dagster command is not installed next to this Python or on PATH")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _materialize_everything(source: Path, home: Path, data_dir: Path) -> dg.ExecuteInProcessResult:
    """Every materializable asset (custom_cnn partition where partitioned) and check, into ``home``."""
    for file, label in pbc96_files(per_class=6):
        folder = source / CLASS_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(file, folder / file.name)
    home.mkdir(parents=True)
    config = yaml.safe_load((REPO / "bc_pipeline" / "instance" / "dagster.yaml").read_text()) or {}
    # The project instance as shipped, except that the run queue launches nothing: the daemon
    # of `dagster dev` (automation sensor, schedules) may request runs on this fresh instance,
    # and they would fight the test for the CPU and change what the pages show. They stay queued.
    config.setdefault("concurrency", {}).setdefault("runs", {})["max_concurrent_runs"] = 0
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    instance = dg.DagsterInstance.from_config(str(home))
    materializable = [a for a in all_assets if isinstance(a, dg.AssetsDefinition) and a.is_materializable]
    return dg.materialize(
        [*all_assets, *all_asset_checks],
        resources=build_resources(str(data_dir), ImageSource(kind="folder", path=str(source), image_size=64)),
        selection=dg.AssetSelection.assets(*materializable),
        run_config=RUN_CONFIG,
        partition_key="custom_cnn",
        instance=instance,
    )


def _graphql(base: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{base}/graphql", data=json.dumps({"query": query}).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_until_served(base: str, server: subprocess.Popen, log: Path) -> None:
    """Until /server_info answers and the code location has loaded, or fail with the reason."""
    deadline = time.monotonic() + SERVER_START_SECONDS
    query = """{ workspaceOrError { ... on Workspace { locationEntries {
        name loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"dagster dev exited with code {server.returncode} while starting; log:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/server_info", timeout=5) as response:
                if response.status == 200:
                    entries = _graphql(base, query)["data"]["workspaceOrError"]["locationEntries"]
                    last = f"locations: {entries}"
                    errors = [e for e in entries if (e["locationOrLoadError"] or {}).get("__typename") == "PythonError"]
                    if errors:
                        pytest.fail(f"code location failed to load: {errors[0]['locationOrLoadError']['message']}")
                    loaded = [
                        e["loadStatus"] == "LOADED"
                        and (e["locationOrLoadError"] or {}).get("__typename") == "RepositoryLocation"
                        for e in entries
                    ]
                    if loaded and all(loaded):
                        return
        except (OSError, urllib.error.URLError, KeyError, TypeError, ValueError) as error:
            last = repr(error)
        time.sleep(1)
    pytest.fail(f"dagster dev not ready after {SERVER_START_SECONDS} s ({last}); log:\n{_tail(log)}")


def _group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of the process group ``pgid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _stop(server: subprocess.Popen) -> tuple[bool, str]:
    """Ctrl+C the whole process group (SIGINT), then SIGTERM, then SIGKILL as a last resort.

    Returns (whether SIGKILL was needed, what happened).
    """
    pgid, start = server.pid, time.monotonic()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        while time.monotonic() < deadline:
            server.poll()
            if server.returncode is not None and not _group_pids(pgid):
                return False, f"exited with code {server.returncode} {time.monotonic() - start:.1f} s after {sig.name}"
            time.sleep(0.25)
    left = _group_pids(pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait(timeout=10)
    return True, f"still running after SIGINT and SIGTERM ({len(left)} processes: {left}); killed with SIGKILL"


def _tail(log: Path, lines: int = 80) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"


def _metadata_row(page, key: str):
    """The row of the asset page's metadata table (Key, Timestamp, Value) whose Key is ``key``."""
    key_cell = page.locator("td:first-child", has_text=re.compile(rf"^\s*{re.escape(key)}\s*$"))
    row = page.locator("tr").filter(has=key_cell).first
    row.wait_for(timeout=UI_TIMEOUT_MS)
    return row


def _metadata_value(page, key: str) -> str:
    return _metadata_row(page, key).locator("td").last.inner_text().strip()


def _check_asset_graph(page, base: str) -> None:
    page.goto(f"{base}/asset-groups")
    page.get_by_text("Global asset lineage").first.wait_for(timeout=UI_TIMEOUT_MS)
    _dismiss_community_dialog(page)
    page.locator("text=evaluation").first.wait_for(timeout=UI_TIMEOUT_MS)  # the group, at least
    # More room for the graph (it zooms to fit when the groups expand): hide the navigation and
    # the asset-group tree beside the graph. Cosmetic only, so missing buttons are fine.
    hide_navigation = page.get_by_role("button", name="Hide navigation")
    hide_tree = page.locator("button:has([aria-label='panel_show_right'])")
    for button in (hide_navigation, hide_tree):
        if button.count():
            button.last.click()
    # With several groups the lineage opens with every group collapsed to a box: expand them.
    _expand_all_groups(page)
    names = ["raw_images", "clean_images", "data_splits", "trained_model", "evaluation_report", "model_leaderboard"]
    for name in names:
        page.get_by_text(name, exact=True).first.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    page.wait_for_timeout(1500)  # the graph zooms to fit after expanding
    page.screenshot(path=str(OUTPUT / "asset_graph.png"), full_page=True)
    text = page.inner_text("body")
    missing = [name for name in names if name not in text]
    assert not missing, f"asset graph lacks {missing}"


def _expand_all_groups(page) -> None:
    """Expanded groups show their assets. Alt+E toggles, so look first, then the key, then the menu."""
    target = page.get_by_text("evaluation_report", exact=True).first

    def via_menu():
        page.locator("button:has([aria-label='settings'])").last.click()  # the graph's settings menu
        item = page.get_by_role("menuitem").filter(has_text=re.compile("(Expand|Collapse) all groups")).first
        item.wait_for(timeout=5_000)
        if "Expand" in item.inner_text():
            item.click()
        else:  # already expanded
            page.keyboard.press("Escape")

    for action in (lambda: None, lambda: page.keyboard.press("Alt+e"), via_menu, via_menu):
        action()
        try:
            target.wait_for(state="visible", timeout=3_000)
            return
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try the next way
            continue
    raise AssertionError("could not expand the asset groups of the lineage graph to show evaluation_report")


def _check_evaluation_report(page, base: str, accuracy: float) -> None:
    page.goto(f"{base}/assets/evaluation_report?partition=custom_cnn")
    _dismiss_community_dialog(page)
    shown = _metadata_value(page, "accuracy")
    assert float(shown) == pytest.approx(accuracy, abs=1e-4), f"page shows accuracy {shown!r}, the run {accuracy}"
    assert _metadata_value(page, "test_images").isdigit()
    assert "custom_cnn" in page.inner_text("body"), "latest materialization's partition not shown"
    # Markdown metadata is a "[Show Markdown]" link in the table; it opens a dialog with the image.
    link = _metadata_row(page, "confusion_matrix").get_by_text("Show Markdown")
    link.wait_for(timeout=UI_TIMEOUT_MS)
    page.screenshot(path=str(OUTPUT / "evaluation_report_metadata.png"), full_page=True)
    link.click()
    dialog = page.locator("[role=dialog]").filter(has_text="confusion_matrix")
    image = dialog.locator("img[alt=confusion_matrix]")
    image.wait_for(state="visible", timeout=UI_TIMEOUT_MS)
    loaded = "img => img.complete && img.naturalWidth > 0"
    page.wait_for_function(loaded, arg=image.element_handle(), timeout=UI_TIMEOUT_MS)
    page.screenshot(path=str(OUTPUT / "evaluation_report.png"), full_page=True)
    source = image.get_attribute("src") or ""
    assert source.startswith("data:image/png;base64,"), source[:80]
    width = image.evaluate("img => img.naturalWidth")
    assert width >= 200, f"confusion matrix image is only {width} px wide"


def _dismiss_community_dialog(page) -> None:
    """The 'Join the Dagster community' dialog on localhost (normally suppressed by setNuxSeen)."""
    skip = page.get_by_role("button", name="Skip")
    if skip.count() and skip.first.is_visible():
        skip.first.click()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dagster_ui_shows_asset_graph_and_evaluation_report(tmp_path: Path):
    chromium = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install -e '.[dev]'")
    dagster = _dagster_cli()
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for old in OUTPUT.glob("*"):
        if old.is_file():
            old.unlink()

    source, home, data_dir = tmp_path / "source", tmp_path / "dagster_home", tmp_path / "data"
    result = _materialize_everything(source, home, data_dir)
    assert result.success
    events = result.get_asset_materialization_events()
    (report,) = [e for e in events if e.asset_key.to_user_string() == "evaluation_report"]
    accuracy = report.materialization.metadata["accuracy"].value

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = OUTPUT / "dagster_dev.log"
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "BC_DATA_DIR": str(data_dir),
        "BC_SOURCE": "folder",
        "BC_SOURCE_PATH": str(source),
        "BC_IMAGE_SIZE": "64",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [dagster, "dev", "-h", "127.0.0.1", "-p", str(port), "-w", str(REPO / "workspace.yaml")]
    with open(log, "wb") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-c", _EXEC_WITH_DEFAULT_SIGINT, *command],
            cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    failed, started = True, time.monotonic()
    try:
        _wait_until_served(base, server, log)
        print(f"\ndagster dev ready on {base} after {time.monotonic() - started:.1f} s")
        _graphql(base, "mutation { setNuxSeen }")  # no "Join the Dagster community" dialog
        console = []
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1920, "height": 1080})
                page.set_default_timeout(UI_TIMEOUT_MS)
                page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
                page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
                _check_asset_graph(page, base)
                _check_evaluation_report(page, base, accuracy)
            finally:
                (OUTPUT / "browser_console.log").write_text("\n".join(console) + "\n")
                browser.close()
        runs = _graphql(base, "{ runsOrError { ... on Runs { results { runId status tags { key value } } } } }")
        others = [r for r in runs["data"]["runsOrError"]["results"] if r["runId"] != result.run_id]
        print(f"runs the daemon requested meanwhile (kept queued): {[(r['runId'][:8], r['status']) for r in others]}")
        failed = False
    finally:
        killed, how = _stop(server)
        print(f"dagster dev {how}")
        if failed or killed:
            print(f"--- tail of {log} ---\n{_tail(log)}")
    if killed:
        pytest.fail(f"dagster dev did not shut down cleanly: {how}")
