#!/usr/bin/env bash
# What the Flower test needs beyond scripts/setup.sh: Debian's Chromium, which it drives
# headless to log in to Flower and read its pages as an operator's browser would.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/debian-packages.sh
need_debian_packages setup-flower chromium
echo "setup-flower: ready ($(chromium --version 2>/dev/null | head -n 1))"
