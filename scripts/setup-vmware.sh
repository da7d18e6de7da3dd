#!/usr/bin/env bash
# What the vCenter tests and bench/vmware.py need beyond scripts/setup.sh: Debian's Go and
# govmomi (the simulator is built from them, offline, by hamal_workers/testbeds/vcenter.py),
# then the build itself, so that the first test does not wait for it; nbdkit, nbdcopy and
# the libnbd binding for the nbd transport.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/debian-packages.sh
need_debian_packages setup-vmware golang-go golang-github-vmware-govmomi-dev \
    nbdkit libnbd-bin python3-libnbd
link_debian_modules setup-vmware nbd.py "libnbdmod.cpython-*.so"
.venv/bin/python -c 'import nbd' || {
    echo "setup-vmware: the Debian libnbd binding does not load in .venv ($(.venv/bin/python -V)); it needs Python 3.11" >&2
    exit 1
}
binary=$(.venv/bin/python -m hamal_workers.testbeds.vcenter build)
echo "setup-vmware: ready (vCenter simulator $binary)"
