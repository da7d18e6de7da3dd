#!/usr/bin/env bash
# Stop Hamal's services and remove /opt/hamal. /etc/hamal, /var/log/hamal and /var/lib/hamal
# (restore points of a local store, Redis's data) are kept unless --purge is given.
#
#   /opt/hamal/uninstall_hamal.sh [--purge]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/common.sh" ]; then . "$here/common.sh"; else . "$here/hamal-venv/tools/common.sh"; fi
purge=0
case "${1:-}" in
"") ;;
--purge) purge=1 ;;
*) die "usage: $0 [--purge]" ;;
esac
if [ -f "$compose_file" ]; then
    compose_run down || die "the services did not stop: nothing removed"
fi
# This script may live in the tree it removes: bash keeps reading it from the open file.
rm -rf "$opt"
say "removed $opt"
if ((purge)); then
    rm -rf "$etc" "$logs" "$lib"
    say "purged $etc, $logs and $lib"
else
    say "kept $etc, $logs and $lib (--purge removes them)"
fi
