#!/usr/bin/env bash
# What the vCenter tests need beyond scripts/setup.sh: Debian's Go and govmomi (the
# simulator is built from them, offline, by hamal_workers/testbeds/vcenter.py), then the
# build itself, so that the first test does not wait for it.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(golang-go golang-github-vmware-govmomi-dev)
need=()
for pkg in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if ((${#need[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup-vmware: installing ${need[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "setup-vmware: missing packages: ${need[*]}" >&2
        echo "setup-vmware: install them first, e.g.: sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
        exit 1
    fi
fi
binary=$(.venv/bin/python -m hamal_workers.testbeds.vcenter build)
echo "setup-vmware: ready (vCenter simulator $binary)"
