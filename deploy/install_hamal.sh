#!/usr/bin/env bash
# Install Hamal from this release (the source tree this script is in), as the operations
# guide lays it out, and start its services:
#
#   /opt/hamal/docker-compose-hamal.yaml, hamal-venv/, update_sync_proxy.sh,
#   uninstall_hamal.sh, .env (HAMAL_REDIS_PASSWORD, HAMAL_FLOWER_PASSWORD, HAMAL_VERSION;
#   mode 0600)
#   /etc/hamal/hamal.conf, redis.conf     (written only when missing: yours are kept)
#   /var/log/hamal, /var/lib/hamal
#
# Idempotent: run again, it changes nothing that is in place (the venv is rebuilt only for
# another version). See deploy/common.sh for HAMAL_ROOT, DOCKER_COMPOSE, HAMAL_PYTHON.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"
src="$(cd "$here/.." && pwd)"
[ -f "$src/pyproject.toml" ] || die "$src is not a Hamal release (no pyproject.toml)"
version="$(source_version "$src")"

mkdir -p "$opt" "$etc" "$logs" "$lib" "$lib/redis"
# The services run as uid 10001 (deploy/image/user.sh): theirs to write, not the whole tree
# (a store under /var/lib/hamal may hold millions of files already owned right).
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$logs" "$lib"
fi
if [ "$(cat "$opt/hamal-venv/version" 2>/dev/null || true)" != "$version" ]; then
    say "building hamal-venv $version"
    rm -rf "$opt/hamal-venv.prev"
    [ ! -d "$opt/hamal-venv" ] || mv "$opt/hamal-venv" "$opt/hamal-venv.prev"
    if ! build_venv "$src" "$opt/hamal-venv"; then
        rm -rf "$opt/hamal-venv"
        [ ! -d "$opt/hamal-venv.prev" ] || mv "$opt/hamal-venv.prev" "$opt/hamal-venv"
        die "hamal-venv $version could not be built: nothing changed"
    fi
    rm -rf "$opt/hamal-venv.prev"
else
    say "hamal-venv $version is in place"
fi
new_secret() { "$python" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
grep -qs '^HAMAL_REDIS_PASSWORD=' "$opt/.env" || set_env HAMAL_REDIS_PASSWORD "$(new_secret)"
grep -qs '^HAMAL_FLOWER_PASSWORD=' "$opt/.env" || set_env HAMAL_FLOWER_PASSWORD "$(new_secret)"
place_release "$opt/hamal-venv"
for file in hamal.conf redis.conf; do
    if [ ! -f "$etc/$file" ]; then
        source="$opt/hamal-venv/etc/hamal.conf.reference"
        [ "$file" = redis.conf ] && source="$opt/hamal-venv/project_etc/redis.conf"
        install -m 0644 "$source" "$etc/$file"
        say "wrote $etc/$file"
    fi
done
"$opt/hamal-venv/bin/hamal" config check --config "$etc/hamal.conf" \
    || die "$etc/hamal.conf has problems (above): fix it, then run this again"
compose_run up -d
say "Hamal $version installed in $opt; services started (check: cd $opt && ${compose[*]} -f docker-compose-hamal.yaml ps)"
