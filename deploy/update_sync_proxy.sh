#!/usr/bin/env bash
# Move the installed Hamal to the release at SOURCE (a source tree), keeping /etc/hamal and
# .env: build its venv beside the live one, swap, restart the services, and wait for every
# service to be healthy (HAMAL_HEALTH_TIMEOUT, default 300 s). If they are not, go back to
# the previous version and restart it, and exit 1.
#
#   /opt/hamal/update_sync_proxy.sh SOURCE
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [ -f "$here/common.sh" ]; then . "$here/common.sh"; else . "$here/hamal-venv/tools/common.sh"; fi
[ $# -eq 1 ] || die "usage: $0 SOURCE (the new release's source tree)"
src="$(cd "$1" && pwd)"
[ -f "$src/pyproject.toml" ] || die "$src is not a Hamal release (no pyproject.toml)"
[ -d "$opt/hamal-venv" ] || die "no Hamal installed in $opt: run install_hamal.sh"
old="$(cat "$opt/hamal-venv/version")"
new="$(source_version "$src")"

say "building hamal-venv $new (installed: $old)"
rm -rf "$opt/hamal-venv.prev"
mv "$opt/hamal-venv" "$opt/hamal-venv.prev"
if ! build_venv "$src" "$opt/hamal-venv" \
    || ! "$opt/hamal-venv/bin/hamal" config check --config "$etc/hamal.conf"; then
    rm -rf "$opt/hamal-venv"
    mv "$opt/hamal-venv.prev" "$opt/hamal-venv"
    die "version $new cannot be installed, or $etc/hamal.conf does not pass its check (above): nothing changed"
fi
place_release "$opt/hamal-venv"
compose_run up -d
if "$opt/hamal-venv/tools/check_health.sh"; then
    # The previous venv stays as hamal-venv.prev until the next update.
    say "updated from $old to $new"
    exit 0
fi
say "version $new is not healthy: rolling back to $old"
rm -rf "$opt/hamal-venv"
mv "$opt/hamal-venv.prev" "$opt/hamal-venv"
place_release "$opt/hamal-venv"
compose_run up -d
die "update to $new failed and was rolled back to $old"
