#!/usr/bin/env bash
# Install nbd-postcopy and everything it needs on Debian 12, then optionally run the demo or the tests.
#
#   scripts/install.sh            install only
#   scripts/install.sh demo       install, then run `nbd-postcopy demo`
#   scripts/install.sh test [ARGS]  install, then run the test suite (ARGS go to pytest)
#
# Safe to re-run: it installs only what is missing and rewrites its own links.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$repo/.venv"

APT_PACKAGES=(
    nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd fuse3 nbd-client
    qemu-system-x86 qemu-utils busybox-static cpio gcc libc6-dev
    prometheus
    python3-venv python3-construct python3-prometheus-client python3-pyroute2 python3-pytest python3-yaml
    python3-matplotlib
)

say() { printf 'install: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    say "run me as root (apt-get, swap, loop and FUSE need it): sudo $0 $*"
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The CLI runs from a venv on Debian's Python that also sees Debian's packages (libnbd, construct, ...).
if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv"
    /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
"$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo"
# atheris (libFuzzer for Python) runs the fuzz targets in fuzz/; without it tests/test_fuzz.py skips.
"$venv/bin/python" -m pip install -q --disable-pip-version-check atheris \
    || say "atheris did not install: the fuzzing tests (tests/test_fuzz.py) will be skipped"
ln -sf "$venv/bin/nbd-postcopy" /usr/local/bin/nbd-postcopy

# nbdkit's embedded Python is Debian's /usr/bin/python3: point it at this checkout too.
site=$(/usr/bin/python3 -c 'import site; print(site.getsitepackages()[0])')
mkdir -p "$site"
printf '%s\n' "$repo" > "$site/nbd-postcopy.pth"

/usr/bin/python3 -c 'import nbd_postcopy, construct, prometheus_client' \
    || { say "nbdkit's Python (/usr/bin/python3) cannot import nbd_postcopy and its dependencies"; exit 1; }
"$venv/bin/python" -c 'import nbd_postcopy, construct, prometheus_client, pyroute2, nbd, qemu.qmp' \
    || { say "the nbd-postcopy venv cannot import its dependencies"; exit 1; }
plugin=$("$venv/bin/nbd-postcopy" plugin-path)
nbdkit python "$plugin" --dump-plugin >/dev/null \
    || { say "nbdkit cannot load the plugin $plugin"; exit 1; }
say "ready: $(nbd-postcopy --version)"

case "${1:-}" in
    "") ;;
    demo) shift; exec nbd-postcopy demo "$@" ;;
    test) shift; exec "$repo/scripts/run-tests.sh" "$@" ;;
    *) say "unknown action '$1' (want: demo, test)"; exit 2 ;;
esac
