#!/usr/bin/env bash
# RUN step of Dockerfile.worker and Dockerfile.beat: the project in a venv, the same path as
# on the host (/opt/hamal/hamal-venv), checked by importing what the role runs.
#
#   deploy/image/project.sh SOURCE VENV worker|beat
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/../../scripts/debian-packages.sh"
[ $# -eq 3 ] || { echo "usage: $0 SOURCE VENV worker|beat" >&2; exit 2; }
src=$1 venv=$2 role=$3

python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --no-cache-dir --disable-pip-version-check "$src"
case "$role" in
worker)
    VENV="$venv" link_debian_modules "image-$role" "rados.cpython-*.so" "rbd.cpython-*.so" \
        nbd.py "libnbdmod.cpython-*.so"
    # What the disk tasks load (the tasks themselves read hamal.conf, mounted at run time).
    "$venv/bin/python" -c 'import rados, rbd, nbd, celery, hamal_workers.platforms.openstack_ceph, hamal_workers.platforms.vmware, hamal_workers.engine.pipeline, hamal_workers.targets.s3store'
    ;;
beat) "$venv/bin/python" -c 'import redbeat, hamal_workers.beat, hamal_workers.metrics' ;;
*) echo "usage: $0 SOURCE VENV worker|beat" >&2; exit 2 ;;
esac
echo "image-$role: $("$venv/bin/hamal" --version) in $venv"
