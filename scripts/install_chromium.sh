#!/usr/bin/env bash
# Installs Debian's `chromium` (/usr/bin/chromium) for the browser test (bc_pipeline_tests/test_browser.py).
# Quiet when it is already there. When it cannot be installed (no apt-get, no permission, no
# network) it says why in one line and exits 0: the browser test then skips with a reason.
set -uo pipefail

if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
    exit 0
fi

say() { echo "install_chromium: $*" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
    say "chromium not installed: no apt-get on this machine (browser test will skip)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    say "chromium not installed: not root and no password-less sudo (browser test will skip)"
    exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! ${SUDO[@]+"${SUDO[@]}"} apt-get update >"$log" 2>&1; then
    say "chromium not installed: 'apt-get update' failed (no network?): $(grep -Ei 'err|fail' "$log" | tail -n 1)"
    exit 0
fi
if ! ${SUDO[@]+"${SUDO[@]}"} apt-get install -y --no-install-recommends chromium >"$log" 2>&1; then
    say "chromium not installed: 'apt-get install chromium' failed: $(tail -n 1 "$log")"
    exit 0
fi
if [ -x /usr/bin/chromium ]; then
    say "installed $(/usr/bin/chromium --version 2>/dev/null | tail -n 1)"
else
    say "chromium package installed but /usr/bin/chromium is missing (browser test will skip)"
fi
exit 0
