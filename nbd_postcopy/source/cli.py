"""`nbd-postcopy serve`: serve the frozen source RAM read-only over NBD."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
import uuid
from typing import NoReturn

from prometheus_client import CollectorRegistry

from ..common.command import CommandError, option_type
from ..common.linux import format_cpu_list, parse_cpu_list, pin_this_thread
from .gate import Gate, watch_qmp
from .metrics import ServerMetrics
from ..common.metrics import parse_metrics_listen, serve_metrics
from ..common.units import parse_address, parse_listen, parse_number, parse_size
from ..nbd.protocol import ProtocolError, check_instance_id
from .server import (
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    PageServer,
    run_server,
)
from .sources import FileSource, ProcessSource, SourceOpenError

log = logging.getLogger(__name__)

HELP = "serve the source VM's RAM read-only over NBD (the page server)"
DESCRIPTION = """\
Serve guest RAM read-only over NBD, from a file (e.g. a QEMU memory-backend-file on /dev/shm) or from
a range of another process's memory (/proc/PID/mem). Many clients, many requests in flight each.

The freeze gate keeps pages from leaving while the source can still change them:
  --gate open          serve at once (the default)
  --gate closed        hold every READ, BLOCK_STATUS and CACHE until the gate opens:
                       send SIGUSR1 to this process (kill -USR1 PID) to open it
  --gate qmp:SOCKET    like closed, and also open when the QEMU on that QMP socket stops its
                       guest (a STOP event, or status paused, postmigrate or finish-migrate;
                       give the server a -qmp socket of its own: QEMU serves one client per
                       QMP socket). Until that socket answers, the server says so and retries.
The gate never closes again once open. Its opening is logged.

TLS: --tls-cert/--tls-key enable NBD STARTTLS (--tls allow, the default then, also accepts plaintext;
--tls require refuses it with NBD_REP_ERR_TLS_REQD). With --tls-ca, clients must present a
certificate signed by that CA.

Identity: every server process reports an instance id to clients that ask for it (the meta context
x-nbd-postcopy:instance=ID in NBD_OPT_LIST_META_CONTEXT). The destination device learns it on its first
connection and refuses, on every reconnect, a server with another id: a different server on the same
address never hands the guest its pages. The id is random per process; a server restarted on purpose on
the SAME frozen RAM takes the old one with --instance-id (the log and nbdinfo show it).

Limits: at most --max-connections clients (default 64; more are closed at once); a client must finish
the handshake, and any request it starts, within --handshake-timeout seconds (default 10); a connection
without a request for --idle-timeout seconds is closed (default 3600; 0: never; clients reconnect). One
connection holds at most 16 MiB of unsent replies (or one reply, up to 32 MiB): a client that does not
read its replies gets no more answers until it does. So unsent replies never take more than
max-connections x 32 MiB in total. Each limit is counted in nbd_postcopy_server_connections_refused_total
and logged at most every 10 s.

CPUs: --cpus LIST keeps the server on those CPUs. Where it shares a host with the guest it feeds (a
migration on one host), one CPU the guest's vCPUs can spare leaves them the rest.

SIGINT or SIGTERM stops the server cleanly (listeners closed, Unix sockets removed, exit 0).

examples:
  nbd-postcopy serve --file /dev/shm/vm-ram --listen unix:/run/nbdpc.sock --export ram
  nbd-postcopy serve --pid 1234 --address 0x7f0000000000 --length 1G --listen tcp:0.0.0.0:10809 \\
      --gate qmp:/run/qemu-src.qmp --metrics-listen 127.0.0.1:9101
  nbdinfo 'nbd+unix:///ram?socket=/run/nbdpc.sock'
"""

def _export_name(text: str) -> str:
    if len(text.encode()) > 4096:
        raise argparse.ArgumentTypeError(f"export name of {len(text.encode())} bytes: NBD allows at most 4096")
    return text


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"want a positive whole number, got {text!r}")
    return int(text)


def _instance_id(text: str) -> str:
    try:
        check_instance_id(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _gate_spec(text: str) -> str:
    if text in ("open", "closed") or (text.startswith("qmp:") and len(text) > 4):
        return text
    raise argparse.ArgumentTypeError(f"bad --gate {text!r}: use open, closed or qmp:SOCKET")


def configure_parser(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source (either --file, or --pid with --address and --length)")
    src.add_argument("--file", metavar="PATH", help="file holding guest RAM (opened read-only)")
    src.add_argument("--pid", type=int, help="process whose memory to serve")
    src.add_argument("--address", type=str, metavar="ADDR", help="start address in that process (0x... or decimal)")
    src.add_argument("--length", type=option_type(parse_size), metavar="BYTES",
                     help="bytes to serve from ADDR (e.g. 1G)")
    p.add_argument("--listen", type=option_type(parse_listen), action="append", required=True,
                   metavar="unix:PATH|tcp:HOST:PORT", help="where to listen (repeatable)")
    p.add_argument("--export", default="", metavar="NAME", type=_export_name,
                   help='export name (the default export "" is accepted too)')
    p.add_argument("--gate", type=_gate_spec, default="open", metavar="open|closed|qmp:SOCKET",
                   help="freeze gate (see above); default open")
    p.add_argument("--instance-id", type=_instance_id, metavar="ID",
                   help="this server's identity reported to clients (default: random per process; reuse the old "
                        "one only for a server restarted on the same frozen RAM)")
    p.add_argument("--max-connections", type=_positive_int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help=f"clients served at once; more are closed at once (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--handshake-timeout", type=option_type(lambda text: parse_number(text, "seconds", zero_ok=True)), default=DEFAULT_HANDSHAKE_TIMEOUT, metavar="S",
                   help="seconds a client has for the handshake, and for each request it starts "
                        f"(default {DEFAULT_HANDSHAKE_TIMEOUT:g})")
    p.add_argument("--idle-timeout", type=option_type(lambda text: parse_number(text, "seconds", zero_ok=True)), default=DEFAULT_IDLE_TIMEOUT, metavar="S",
                   help=f"close a connection with no request for S seconds; 0: never (default {DEFAULT_IDLE_TIMEOUT:g})")
    p.add_argument("--cpus", type=option_type(parse_cpu_list), metavar="LIST",
                   help="run the server on these CPUs only, in the kernel's list format (e.g. 1, or 2-3): on a host "
                        "that also runs the destination guest, a CPU it can spare (default: any)")
    p.add_argument("--metrics-listen", type=option_type(parse_metrics_listen), metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP here")
    p.add_argument("--tls-cert", metavar="F", help="server certificate (PEM)")
    p.add_argument("--tls-key", metavar="F", help="server private key (PEM)")
    p.add_argument("--tls-ca", metavar="F", help="CA that client certificates must be signed by (PEM)")
    p.add_argument("--tls", choices=("off", "allow", "require"), metavar="off|allow|require",
                   help="allow or require STARTTLS (default: allow with a certificate, off without)")


def _open_source(args):
    if (args.file is None) == (args.pid is None):
        raise CommandError("give either --file PATH or --pid PID --address ADDR --length BYTES")
    try:
        if args.file is not None:
            if args.address is not None or args.length is not None:
                raise CommandError("--address and --length go with --pid, not --file")
            return FileSource(args.file)
        if args.address is None or args.length is None:
            raise CommandError("--pid needs --address ADDR and --length BYTES")
        try:
            address = parse_address(args.address)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        return ProcessSource(args.pid, address, args.length)
    except SourceOpenError as exc:
        raise CommandError(str(exc)) from None


def _tls_context(args) -> tuple[str, ssl.SSLContext | None]:
    mode = args.tls or ("allow" if args.tls_cert else "off")
    if mode == "off":
        return "none", None
    if not (args.tls_cert and args.tls_key):
        raise CommandError(f"--tls {mode} needs --tls-cert and --tls-key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_ca:
            context.load_verify_locations(args.tls_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise CommandError(f"cannot load TLS certificate/key/CA: {exc}") from None
    return mode, context


async def _serve(args, source) -> None:
    tls, context = _tls_context(args)
    metrics = ServerMetrics(CollectorRegistry())
    gate = Gate(args.gate == "open", on_open=lambda: metrics.gate_open.set(1))
    instance = args.instance_id or uuid.uuid4().hex
    server = PageServer(source, args.export, gate, metrics, tls=tls, tls_context=context, instance=instance,
                        max_connections=args.max_connections, handshake_timeout=args.handshake_timeout or 1e9,
                        idle_timeout=args.idle_timeout)
    if args.metrics_listen:
        try:
            serve_metrics(args.metrics_listen, metrics.registry)
        except (OSError, ValueError) as exc:
            raise CommandError(f"cannot serve metrics on {args.metrics_listen}: {exc}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, gate.open, "SIGUSR1")
    watcher = asyncio.ensure_future(watch_qmp(gate, args.gate[4:])) if args.gate.startswith("qmp:") else None
    try:
        await run_server(server, args.listen, stop)
    except OSError as exc:
        raise CommandError(exc.strerror or str(exc)) from None
    finally:
        if watcher is not None:
            watcher.cancel()
    log.info("stopped")


def run(args) -> int:
    if args.cpus:
        pin_this_thread(args.cpus)  # before any thread starts, so that every later one inherits it
        log.info("running on CPU %s", format_cpu_list(args.cpus))
    source = _open_source(args)
    try:
        asyncio.run(_serve(args, source))
    finally:
        source.close()
    _exit_at_once()


def _exit_at_once() -> NoReturn:
    """Exit 0 without the interpreter's teardown, once the server has shut down cleanly (listeners closed,
    Unix sockets removed, source closed). The teardown freed every module and object one by one: 60 ms
    on an idle machine and 166 ms at the end of a migration, where `migrate` waits for this process to
    exit before it counts the source as released (docs/DESIGN.md, "Decisions")."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
