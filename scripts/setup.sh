#!/usr/bin/env bash
# Everything `make demo` and `make test` need on a fresh Debian/Ubuntu machine:
# system packages (as root, via apt-get) and the project's venv in .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
command -v cp >/dev/null 2>&1 || need_pkgs+=(coreutils)

if ((${#need_pkgs[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing ${need_pkgs[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
        # The package starts a system redis on 6379; the fleet runs its own on a free port.
    else
        echo "setup: missing system packages: ${need_pkgs[*]}" >&2
        echo "setup: install them first, e.g.: sudo apt-get install -y ${need_pkgs[*]}" >&2
        exit 1
    fi
fi

python3 - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"setup: Python 3.11 or newer is needed, this is {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'
echo "setup: .venv ready ($(.venv/bin/hamal --version))"
