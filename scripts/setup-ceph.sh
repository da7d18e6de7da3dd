#!/usr/bin/env bash
# What the Ceph tests and bench/ceph.py need beyond scripts/setup.sh: Debian's Ceph
# (monitor, OSD, the rbd/ceph commands) and its Python bindings made importable in .venv.
# The bindings exist only as Debian packages, built for Debian's Python 3.11: .venv gets a
# .pth naming a directory that holds links to just those modules, nothing else of
# /usr/lib/python3/dist-packages.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/debian-packages.sh
need_debian_packages setup-ceph ceph-mon ceph-osd ceph-common python3-rbd python3-rados

link_debian_modules setup-ceph "rados.cpython-*.so" "rbd.cpython-*.so"
.venv/bin/python -c 'import rados, rbd' || {
    echo "setup-ceph: the Debian rbd binding does not load in .venv ($(.venv/bin/python -V)); it needs Python 3.11" >&2
    exit 1
}
echo "setup-ceph: ready (ceph $(ceph --version | awk '{print $3}'), rbd binding in .venv)"
