"""The keys of plugin/postcopy.py: parsed and checked one by one as nbdkit passes them in, so that a
bad value is reported at startup with the key's name, never at the first request."""

from __future__ import annotations

import os
import socket
import stat
import uuid as uuid_module
from dataclasses import dataclass, field

from ..common.linux import parse_cpu_list
from ..common.units import PAGE_SIZE, parse_size
from . import swapheader
from .device import DEFAULT_CACHE_DIR, DEFAULT_TIMEOUT
from .markers import KeyFileError, load_key
from ..common.metrics import parse_metrics_listen
from ..nbd.protocol import ProtocolError, check_instance_id
from ..nbd.uri import parse_nbd_uri

KEYS = {
    "source": "NBD URI of the migration source (nbd://HOST:PORT/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...)",
    "pages": "guest RAM size in 4 KiB pages (or give size=)",
    "size": "guest RAM size in bytes, a multiple of 4096; suffixes K, M, G, T (or give pages=)",
    "key": "file of at least 16 random bytes shared with the stager (head -c 32 /dev/urandom > KEYFILE)",
    "headroom": "spare slots beyond the guest (default max(pages/32, 4096))",
    "metrics": "HOST:PORT to serve Prometheus metrics on",
    "control": "Unix socket path for the control protocol (status, arm)",
    "cache-dir": f"directory on a disk filesystem for the unlinked page file (default {DEFAULT_CACHE_DIR}; not tmpfs, "
    "whose pages could be swapped out to this very device)",
    "timeout": f"seconds a read waits for an unavailable source before failing with EIO (default {DEFAULT_TIMEOUT:g})",
    "prefetch": "on|off: pull every remaining page in the background after arming (default on)",
    "armed": "yes|no: fetch from the source from the start instead of waiting for 'arm' (default no)",
    "label": "swap label, at most 16 bytes",
    "uuid": "swap UUID (default random)",
    "source-id": "instance id the source must report (nbd-postcopy serve --instance-id); default: learned on the "
    "first connection. Either way a reconnect to a server with another id is refused",
    "replay": "file of guest page numbers (a recorded working set, one a line) to prefetch first after arming",
    "warm": "on|off: while staging, bring the page file's pages for the mapped slots into memory, so that the "
    "prefetcher's writes after arming do not pay for fresh memory (default on)",
    "prefetch-cpus": "CPUs the prefetcher's thread runs on, in the kernel's list format (e.g. 1, or 2-3); default: "
    "any that nbdkit may use. On a host with few CPUs, one CPU keeps the prefetcher from taking the guest's "
    "(docs/DESIGN.md, \"Decisions\")",
    "demand-store": "on|off: keep a copy of each page fetched on demand in the page file, so that it is local from "
    "then on (default: off while the prefetcher runs, which fetches and stores the fault's neighbourhood next, that "
    "page included; on with prefetch=off). With both off, no page ever becomes local: the source must stay until "
    "completion has swapped every page in (docs/DESIGN.md, \"A demand fetch keeps no copy\")",
}
REQUIRED = ("source", "key")

_KEY_WIDTH = max(len(key) for key in KEYS) + 1
HELP = "\n".join(f"{key + '=':<{_KEY_WIDTH}} {text}" for key, text in KEYS.items())

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL


class ConfigError(ValueError):
    """A plugin key is missing, unknown or has a bad value."""


@dataclass
class PluginConfig:
    source: str = ""
    pages: int = 0
    key: bytes = b""
    headroom: int | None = None
    metrics: str | None = None
    control: str | None = None
    cache_dir: str = DEFAULT_CACHE_DIR
    timeout: float = DEFAULT_TIMEOUT
    prefetch: bool = True
    warm: bool = True
    demand_store: bool | None = None  # None: the opposite of prefetch (check_complete)
    armed: bool = False
    label: str = ""
    uuid: uuid_module.UUID | None = None
    source_id: str | None = None
    replay: str | None = None
    prefetch_cpus: frozenset[int] | None = None
    seen: set[str] = field(default_factory=set)

    def set(self, key: str, value: str) -> None:
        """Parse one `key=value` from the nbdkit command line."""
        if key not in KEYS:
            raise ConfigError(f"unknown key {key!r}; valid keys: {', '.join(KEYS)}")
        if key in self.seen:
            raise ConfigError(f"{key}= given twice")
        if key in ("pages", "size") and self.seen & {"pages", "size"}:
            raise ConfigError("give either pages= or size=, not both")
        try:
            self._set(key, value)
        except (ValueError, KeyFileError) as exc:
            raise ConfigError(f"{key}={value}: {exc}") from exc
        self.seen.add(key)

    def _set(self, key: str, value: str) -> None:
        if key == "source":
            parse_nbd_uri(value)
            self.source = value
        elif key == "pages":
            self.pages = _positive_int(value)
        elif key == "size":
            size = parse_size(value)
            if size % PAGE_SIZE or size == 0:
                raise ValueError(f"must be a positive multiple of {PAGE_SIZE}")
            self.pages = size // PAGE_SIZE
        elif key == "key":
            self.key = load_key(value)
        elif key == "headroom":
            self.headroom = _non_negative_int(value)
        elif key == "metrics":
            address = parse_metrics_listen(value)
            _check_can_listen(address.host, address.port)
            self.metrics = value
        elif key == "control":
            directory = os.path.dirname(os.path.abspath(value))
            if not os.path.isdir(directory):
                raise ValueError(f"directory {directory} does not exist")
            if len(os.fsencode(value)) > MAX_SOCKET_PATH:
                raise ValueError(f"path longer than {MAX_SOCKET_PATH} bytes, the limit of a Unix socket")
            if os.path.lexists(value) and not stat.S_ISSOCK(os.lstat(value).st_mode):
                raise ValueError("exists and is not a socket (it would be replaced)")
            self.control = value
        elif key == "cache-dir":
            if not os.path.isdir(value) or not os.access(value, os.W_OK):
                raise ValueError("not a writable directory")
            self.cache_dir = value
        elif key == "timeout":
            self.timeout = float(value)
            if not self.timeout > 0:
                raise ValueError("must be a positive number of seconds")
        elif key == "prefetch":
            self.prefetch = _choice(value, on=True, off=False)
        elif key == "prefetch-cpus":
            self.prefetch_cpus = parse_cpu_list(value)
        elif key == "warm":
            self.warm = _choice(value, on=True, off=False)
        elif key == "demand-store":
            self.demand_store = _choice(value, on=True, off=False)
        elif key == "armed":
            self.armed = _choice(value, yes=True, no=False)
        elif key == "label":
            if len(value.encode()) > swapheader.LABEL_BYTES:
                raise ValueError(f"longer than {swapheader.LABEL_BYTES} bytes")
            self.label = value
        elif key == "uuid":
            self.uuid = uuid_module.UUID(value)
        elif key == "replay":
            if not os.path.isfile(value) or not os.access(value, os.R_OK):
                raise ValueError("not a readable file")
            self.replay = value
        elif key == "source-id":
            try:
                check_instance_id(value)
            except ProtocolError as exc:
                raise ValueError(str(exc)) from None
            self.source_id = value

    def check_complete(self) -> None:
        missing = [key for key in REQUIRED if key not in self.seen]
        if "pages" not in self.seen and "size" not in self.seen:
            missing.append("pages (or size)")
        if missing:
            raise ConfigError(f"missing required key(s): {', '.join(missing)}")
        if self.replay and not self.prefetch:
            raise ConfigError("replay= needs the prefetcher, which prefetch=off turns off")
        if self.prefetch_cpus and not self.prefetch:
            raise ConfigError("prefetch-cpus= needs the prefetcher, which prefetch=off turns off")
        if self.demand_store is None:
            self.demand_store = not self.prefetch


def _check_can_listen(host: str, port: int) -> None:
    """Fail now, with the key's name, if the metrics address cannot be bound: after nbdkit forks, an error
    would only stop the plugin with a traceback (the server binds it again then)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise ValueError("must be positive")
    return value


def _non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise ValueError("not a non-negative integer")
    return int(text)


def _choice(text: str, **choices: bool) -> bool:
    if text not in choices:
        raise ValueError(f"must be one of {', '.join(choices)}")
    return choices[text]
