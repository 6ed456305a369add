"""`nbd-postcopy complete`: bring every still-swapped page of a staged range back into the process."""

from __future__ import annotations

import argparse
import sys

from ..common.command import CommandError, option_type
from ..common.units import PAGE_SIZE, parse_number
from .completion import CompletionError, complete_range
from .stage_cli import add_range_options

HELP = "pre-page every swapped-out page of a staged range back into the process"
DESCRIPTION = """\
Bring in every page of [ADDR, ADDR+BYTES) of process PID that is still swapped out: process_madvise(
MADV_WILLNEED) in chunks (chunks with no swapped page are skipped), then a read-touch that maps each page
back into the process. Pages on any swap device count. Ends when pagemap shows no swap entry left in the
range; it does not swapoff the device (scripts/setup-swap.sh detach does that, after calling this).

--rate-mib caps the pre-paging rate so the process's own page faults keep most of the device.
With --control, completion refuses an unarmed device (its reads would bring staging markers in) and
reports at the end whether the device says every page is local.

examples:
  nbd-postcopy complete --pid 4242 --address 0x7f0000000000 --length 256M
  nbd-postcopy complete --pid 4242 --address 0x7f0000000000 --length 256M --rate-mib 200 \\
      --control /run/nbd-postcopy/vm1/control.sock
"""


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_range_options(p)
    p.add_argument("--chunk-mib", type=float, default=1.0, metavar="MIB",
                   help="bytes per MADV_WILLNEED call, in MiB (default 1)")
    p.add_argument("--rate-mib", type=option_type(lambda text: parse_number(text, "MiB/s")), metavar="N", help="cap pre-paging at N MiB/s (default: no cap)")
    p.add_argument("--control", metavar="SOCK", help="the device's control socket: report its completion state")
    p.add_argument("--quiet", action="store_true", help="no progress output, only errors")


def run(args: argparse.Namespace) -> int:
    chunk_bytes = int(args.chunk_mib * (1 << 20)) // PAGE_SIZE * PAGE_SIZE
    rate = args.rate_mib * (1 << 20) if args.rate_mib else None
    if rate is not None and rate <= 0:
        raise CommandError("--rate-mib must be positive")
    try:
        report = complete_range(args.pid, args.address, args.length, chunk_bytes=chunk_bytes, rate_bytes=rate,
                                control=args.control, quiet=args.quiet)
    except CompletionError as exc:
        raise CommandError(str(exc)) from None
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
    return 0
