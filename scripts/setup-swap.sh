#!/usr/bin/env bash
# Attach, detach and report the postcopy swap device. Not built yet: see issue 4.
echo "setup-swap.sh: not implemented yet (attach/detach/status arrive with the staging work)" >&2
exit 2
