#!/usr/bin/env bash
# RUN step of both Dockerfiles: the unprivileged user the services run as (uid and gid
# 10001; install_hamal.sh gives it /var/log/hamal and /var/lib/hamal on the host).
# PREFIX (tests): apply to the /etc files under that directory instead of the image's.
set -euo pipefail
prefix=()
[ -z "${PREFIX:-}" ] || prefix=(--prefix "$PREFIX")
etc="${PREFIX:-}/etc"
grep -q '^hamal:' "$etc/group" || groupadd "${prefix[@]}" --system --gid 10001 hamal
grep -q '^hamal:' "$etc/passwd" \
    || useradd "${prefix[@]}" --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/hamal --shell /usr/sbin/nologin hamal
echo "image: user hamal (10001)"
