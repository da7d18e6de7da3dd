# Sourced by the setup scripts: `need_debian_packages WHO PKG...` installs the packages
# that are missing with apt-get when run as root, and otherwise says what to install.
need_debian_packages() {
    local who=$1
    shift
    local need=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
    done
    ((${#need[@]})) || return 0
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "$who: installing ${need[*]} with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    else
        echo "$who: missing packages: ${need[*]}" >&2
        echo "$who: install them first, e.g.: sudo apt-get install -y --no-install-recommends ${need[*]}" >&2
        exit 1
    fi
}

# `link_debian_modules WHO FILE...`: Debian's Python bindings (files of
# /usr/lib/python3/dist-packages, globs allowed) made importable in the venv ($VENV, default
# .venv) through a .pth naming a directory of links to just those files, nothing else of
# dist-packages. They are built for Debian's Python 3.11. Idempotent; each setup script
# adds its own.
link_debian_modules() {
    local who=$1
    shift
    local venv=${VENV:-.venv} site links
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
    links=$venv/debian-bindings
    mkdir -p "$links"
    for pattern in "$@"; do
        local found=(/usr/lib/python3/dist-packages/$pattern)
        [ -e "${found[0]}" ] || { echo "$who: no $pattern in /usr/lib/python3/dist-packages" >&2; exit 1; }
        ln -sf "${found[@]}" "$links/"
    done
    realpath "$links" > "$site/hamal-debian-bindings.pth"
}
