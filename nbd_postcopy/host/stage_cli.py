"""`nbd-postcopy stage`: make a process's anonymous range swapped out to the postcopy device."""

from __future__ import annotations

import argparse
import sys

from ..common.command import CommandError, option_type
from ..common.units import parse_address, parse_size
from ..device.markers import KeyFileError, MarkerCodec
from .staging import StagingError, record_target, stage_range

HELP = "stage a process's anonymous memory range onto the postcopy swap device"
DESCRIPTION = """\
Make [ADDR, ADDR+BYTES) of process PID "swapped out to the postcopy device": write a keyed marker into
every page (the device learns which swap slot holds which guest page from them), page the range out with
process_madvise(MADV_PAGEOUT), purge the swap cache through a dedicated memcg, then verify that every page
is a swap entry on DEV, none is resident and none is in the swap cache.

The range's old contents are destroyed: stage fresh destination RAM. DEV must be an active swap device
with the highest priority, with free slots for the range plus headroom, and zswap must be off. If staging
fails after writing markers, the range is zeroed so no marker can be read as data. When DEV was attached
by scripts/setup-swap.sh, the target is recorded in its state directory (STATE/target), so that
'setup-swap.sh detach NAME' knows what to complete.

examples:
  head -c 32 /dev/urandom > /run/vm1.key
  scripts/setup-swap.sh attach --name vm1 -- source=nbd://SRC:10809/ram pages=65536 key=/run/vm1.key
  nbd-postcopy stage --pid 4242 --address 0x7f0000000000 --length 268435456 \\
      --key /run/vm1.key --device /dev/loop3 --control /run/nbd-postcopy/vm1/control.sock
  nbd-postcopy stage --pid 4242 --address 0x7f0000000000 --length 256M --key KEY --device /dev/loop3 --quiet
"""

def add_range_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pid", type=int, required=True, help="the target process")
    p.add_argument("--address", type=option_type(parse_address), required=True, metavar="ADDR",
                   help="start of the range (page aligned, 0xHEX or decimal)")
    p.add_argument("--length", type=option_type(parse_size), required=True, metavar="BYTES",
                   help="length of the range (page aligned; K/M/G suffixes allowed)")


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_range_options(p)
    p.add_argument("--key", required=True, metavar="KEYFILE", help="the per-migration secret shared with the device")
    p.add_argument("--device", required=True, metavar="DEV", help="the postcopy swap device (as in /proc/swaps)")
    p.add_argument("--control", metavar="SOCK", help="the device's control socket: cross-check its slot map")
    p.add_argument("--memcg", default="auto", metavar="auto|none|NAME",
                   help="memcg to stage in: 'auto' (default) makes a temporary child of the target's memcg and "
                        "puts the target back afterwards (on cgroup v2, where the target's cgroup cannot have a "
                        "memory-controlled child, as in a systemd service, it stages in place, like 'none'); "
                        "'none' leaves the target in its memcg and takes the staged pages out of the swap cache "
                        "with bounded reclaim (cgroup v2) or one by one (v1: only while swap is less than half "
                        "full); NAME (a path below the memory cgroup root) is made if missing and the "
                        "target stays there")
    p.add_argument("--quiet", action="store_true", help="no progress output, only errors")


def run(args: argparse.Namespace) -> int:
    try:
        codec = MarkerCodec.from_file(args.key)
    except KeyFileError as exc:
        raise CommandError(str(exc)) from None
    try:
        report = stage_range(args.pid, args.address, args.length, codec, args.device, control=args.control,
                             memcg_name=args.memcg, quiet=args.quiet)
    except StagingError as exc:
        raise CommandError(str(exc)) from None
    target = record_target(args.device, args.pid, args.address, args.length)
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
        if target:
            print(f"recorded the target in {target} for setup-swap.sh detach", file=sys.stderr)
    return 0
