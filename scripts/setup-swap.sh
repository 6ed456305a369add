#!/usr/bin/env bash
# setup-swap.sh: attach, detach and report the nbd-postcopy swap device. `setup-swap.sh --help` explains.
# The work is done in Python (nbd_postcopy/host/swap_cli.py and attachment.py); this only picks the
# Python and hands over, so that `nbd-postcopy swap` (the same code) and this script never differ.
set -euo pipefail

repo=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
if [ -n "${NBD_POSTCOPY_PYTHON:-}" ]; then
    python=$NBD_POSTCOPY_PYTHON
elif [ -x "$repo/.venv/bin/python" ]; then
    python=$repo/.venv/bin/python
else
    python=/usr/bin/python3
fi
# This checkout's code, whichever Python runs it (a venv may hold an editable install of another one).
case ":${PYTHONPATH:-}:" in
    *":$repo:"*) ;;
    *) export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" ;;
esac
exec "$python" -m nbd_postcopy.host.swap_cli --prog setup-swap.sh "$@"
