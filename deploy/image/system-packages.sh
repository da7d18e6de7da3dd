#!/usr/bin/env bash
# RUN step of Dockerfile.worker and Dockerfile.beat: the Debian packages of an image.
#
#   deploy/image/system-packages.sh worker|beat
#
# Both: Python 3.11 and venv, CA certificates (compose's `init: true` gives PID 1). The
# worker also: Ceph's rbd and rados bindings and client, libnbd's binding and nbdkit (the
# VMware nbd transport), built for Debian's Python 3.11, which is why the images are
# Debian bookworm. Packages already installed are left alone (the tests run this too).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/../../scripts/debian-packages.sh"

role="${1:-}"
common=(python3 python3-venv ca-certificates)
case "$role" in
worker) packages=("${common[@]}" ceph-common python3-rbd python3-rados libnbd-bin python3-libnbd nbdkit) ;;
beat) packages=("${common[@]}") ;;
*) echo "usage: $0 worker|beat" >&2; exit 2 ;;
esac
need_debian_packages "image-$role" "${packages[@]}"
echo "image-$role: system packages ready"
