#!/usr/bin/env bash
# Exit 0 when every service of docker-compose-hamal.yaml is "Up (healthy)", else 1, saying
# which is not. Waits up to HAMAL_HEALTH_TIMEOUT seconds (default 300) for them to be.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=common.sh
. "$here/common.sh"

timeout="${HAMAL_HEALTH_TIMEOUT:-300}"
deadline=$((SECONDS + timeout))
mapfile -t services < <(compose_run config --services)
while :; do
    status="$(compose_run ps 2>&1 || true)"
    bad=()
    for service in "${services[@]}"; do
        line="$(grep -E "(^|[ _-])${service}([ _-]|$)" <<<"$status" | head -n 1 || true)"
        case "$line" in
        *"(healthy)"*) ;;
        *) bad+=("$service: ${line:-not running}") ;;
        esac
    done
    if ((${#bad[@]} == 0)); then
        say "every service is healthy (${#services[@]})"
        exit 0
    fi
    if ((SECONDS >= deadline)); then
        printf '%s\n' "${bad[@]}" >&2
        die "not healthy after ${timeout} s"
    fi
    sleep 5
done
