# Shared by install_hamal.sh, update_sync_proxy.sh and uninstall_hamal.sh (sourced).
#
# HAMAL_ROOT      prefix of every path (default: none, i.e. /opt/hamal, /etc/hamal ...);
#                 the tests install under a temporary directory
# DOCKER_COMPOSE  the compose command (default: docker-compose; "docker compose" works)
# HAMAL_PYTHON    the Python that builds hamal-venv (default: python3, 3.11 or newer)

root="${HAMAL_ROOT:-}"
opt="$root/opt/hamal"
etc="$root/etc/hamal"
logs="$root/var/log/hamal"
lib="$root/var/lib/hamal"
compose_file="$opt/docker-compose-hamal.yaml"
python="${HAMAL_PYTHON:-python3}"
read -r -a compose <<<"${DOCKER_COMPOSE:-docker-compose}"

say() { echo "$(basename "$0"): $*"; }
die() { echo "$(basename "$0"): $*" >&2; exit 1; }

compose_run() {
    "${compose[@]}" -f "$compose_file" --env-file "$opt/.env" "$@"
}

# The version a source tree builds (its pyproject.toml).
source_version() {
    "$python" - "$1/pyproject.toml" <<'PY'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print(tomllib.load(f)["project"]["version"])
PY
}

# A venv of the source tree at $2, laid out as the operations guide shows it; non-zero when
# it cannot be built. Built where it will live: a venv's scripts name their interpreter by
# its path, so a venv moved after its build has broken commands.
build_venv() {
    local src="$1" dest="$2" version
    version="$(source_version "$src")"
    rm -rf "$dest"
    "$python" -m venv "$dest" || return 1
    if ! "$dest/bin/python" -m pip install -q --disable-pip-version-check "$src"; then
        say "cannot install $src into $dest"
        return 1
    fi
    mkdir -p "$dest/etc" "$dest/project_etc" "$dest/tools" "$dest/include"
    cp "$src/etc/hamal/hamal.conf" "$dest/etc/hamal.conf.reference"
    cp "$src/etc/hamal/redis.conf" "$dest/project_etc/redis.conf"
    cp "$src/docker-compose-hamal.yaml" "$dest/project_etc/docker-compose-hamal.yaml"
    cp "$src/deploy/common.sh" "$src/deploy/update_sync_proxy.sh" \
        "$src/deploy/uninstall_hamal.sh" "$src/deploy/check_health.sh" "$dest/tools/"
    cp "$src/deploy/hamal3-changelog.txt" "$dest/hamal3-changelog.txt"
    echo "$version" >"$dest/version"
}

# Put a venv's compose file and scripts where the guide has them, and its version in .env.
place_release() {
    local venv="$1" version
    version="$(cat "$venv/version")"
    install -m 0644 "$venv/project_etc/docker-compose-hamal.yaml" "$compose_file"
    install -m 0755 "$venv/tools/update_sync_proxy.sh" "$opt/update_sync_proxy.sh"
    install -m 0755 "$venv/tools/uninstall_hamal.sh" "$opt/uninstall_hamal.sh"
    set_env HAMAL_VERSION "$version"
}

# Set KEY=VALUE in /opt/hamal/.env (mode 0600: it holds the Redis password).
set_env() {
    local key="$1" value="$2" file="$opt/.env" tmp
    tmp="$(mktemp "$opt/.env.XXXXXX")"
    chmod 600 "$tmp"
    if [ -f "$file" ]; then
        grep -v "^$key=" "$file" >"$tmp" || true
    fi
    echo "$key=$value" >>"$tmp"
    mv "$tmp" "$file"
}
