#!/usr/bin/env bash
# Installs a Debian package some tests need, e.g.
#   scripts/install_system_package.sh chromium /usr/bin/chromium "the browser test"
#   scripts/install_system_package.sh postgresql "/usr/lib/postgresql/*/bin/initdb" "the PostgreSQL tests"
# Quiet when the file that proves it (second argument, a glob) is already there. When it cannot be
# installed (no apt-get, no permission, no network) it says why in one line and exits 0: those
# tests then skip with a reason.
set -uo pipefail

package="$1" proof="$2" who="${3:-the tests that need it}"
say() { echo "install_system_package: $package: $*" >&2; }
present() { compgen -G "$proof" >/dev/null; }

if present; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    say "not installed: no apt-get on this machine ($who will skip)"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    say "not installed: not root and no password-less sudo ($who will skip)"
    exit 0
fi

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! ${SUDO[@]+"${SUDO[@]}"} apt-get update >"$log" 2>&1; then
    say "not installed: 'apt-get update' failed (no network?): $(grep -Ei 'err|fail' "$log" | tail -n 1)"
    exit 0
fi
if ! ${SUDO[@]+"${SUDO[@]}"} apt-get install -y --no-install-recommends "$package" >"$log" 2>&1; then
    say "not installed: 'apt-get install $package' failed: $(tail -n 1 "$log")"
    exit 0
fi
if present; then
    say "installed"
else
    say "package installed but $proof is missing ($who will skip)"
fi
exit 0
