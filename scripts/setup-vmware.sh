#!/usr/bin/env bash
# What the vCenter tests need beyond scripts/setup.sh: Debian's Go and govmomi (the
# simulator is built from them, offline, by hamal_workers/testbeds/vcenter.py), then the
# build itself, so that the first test does not wait for it.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/debian-packages.sh
need_debian_packages setup-vmware golang-go golang-github-vmware-govmomi-dev
binary=$(.venv/bin/python -m hamal_workers.testbeds.vcenter build)
echo "setup-vmware: ready (vCenter simulator $binary)"
