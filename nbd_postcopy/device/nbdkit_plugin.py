"""nbdkit plugin: the nbd-postcopy destination device, a swap area backed by the migration source.

    nbdkit [-U SOCK | -p PORT] python plugin/postcopy.py source=URI (pages=N | size=BYTES) key=KEYFILE
           [headroom=N] [metrics=HOST:PORT] [control=PATH] [cache-dir=DIR] [timeout=SECONDS]
           [prefetch=on|off] [warm=on|off] [armed=yes|no] [label=TEXT] [uuid=UUID] [replay=FILE]

Slot 0 of the export is a swap header (swapon works without mkswap); slots 1 .. pages + headroom hold
guest pages. Writes of keyed marker pages (from `nbd-postcopy stage`) map slots to guest pages; other
writes are kept as overlay data. After arming (`armed=yes`, or the `arm` command on the control socket),
a read of a mapped slot fetches the page from the source (and a background prefetcher pulls the rest);
before it, such a read returns the marker again. A read waits up to timeout= seconds (default 60) for an
unavailable source, then fails with EIO. nbdkit refuses to start if the source cannot be reached within
5 seconds (or timeout=, if shorter) or is smaller than the guest. Run `nbdkit python plugin/postcopy.py --dump-plugin` for the
keys. The logic lives in the nbd_postcopy package (device.py, prefetch.py, control.py); this file only
connects it to nbdkit.

This file ships inside the package (nbd_postcopy/device/nbdkit_plugin.py); plugin/postcopy.py in the checkout
is a symlink to it, and `nbd-postcopy plugin-path` prints where an installed copy is. Normal code never
imports it: it imports `nbdkit`, which exists only inside nbdkit's embedded Python.
"""

import errno
import logging
import os
import sys

# nbdkit's embedded Python does not put this script's directory on sys.path: import the package this file is
# part of (the directory above nbd_postcopy/, found through the plugin/postcopy.py symlink too).
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
if _PACKAGE_ROOT not in sys.path:
    sys.path.insert(0, _PACKAGE_ROOT)

import nbdkit  # noqa: E402

from nbd_postcopy.common.units import PAGE_SIZE  # noqa: E402
from nbd_postcopy.device import config as plugin_config  # noqa: E402
from nbd_postcopy.nbd.client import SourceClient, SourceIdentity  # noqa: E402
from nbd_postcopy.device.control import ControlServer  # noqa: E402
from nbd_postcopy.device.device import Device, DeviceIOError  # noqa: E402
from nbd_postcopy.device.markers import MarkerCodec  # noqa: E402
from nbd_postcopy.common.metrics import serve_metrics  # noqa: E402
from nbd_postcopy.device.prefetch import Prefetcher  # noqa: E402
from nbd_postcopy.device.workingset import WorkingSetRecorder, read_workingset  # noqa: E402

API_VERSION = 2
MAX_REQUEST = 32 * 1024 * 1024
# Python hands the GIL to a waiting thread only every switch interval (default 5 ms): keep it short so a
# demand read never waits long behind the prefetcher's or the source clients' threads.
GIL_SWITCH_INTERVAL = 0.0005
STARTUP_CONNECT_TIMEOUT = 5.0  # seconds (or timeout=, if shorter) to reach the source at startup
WAIT_LOCAL_SECONDS = 0.2  # how long the control command wait-local waits before it answers anyway

log = logging.getLogger("nbd_postcopy.plugin")

# One device for the whole process: every connection (nbdfuse opens 4) shares it.
_config = plugin_config.PluginConfig()
_device = None
_recorder = None  # the first demand-faulted guest pages (control command workingset)
_replay = []  # guest pages to prefetch first (replay=)
_prefetcher = None
_services = []  # started in after_fork, stopped in cleanup (in reverse order)


def thread_model():
    # Requests run in parallel; the device locks its state for short sections and fetches outside them.
    return nbdkit.THREAD_MODEL_PARALLEL


def dump_plugin():
    print("postcopy_keys=" + ",".join(plugin_config.KEYS))
    print("postcopy_required=" + ",".join(plugin_config.REQUIRED) + ",pages|size")
    for key, text in plugin_config.KEYS.items():
        print(f"postcopy_key_{key}={text}")


def _report_error(exc):
    # One clean line first: nbdkit follows it with the Python traceback.
    print(f"nbdkit: postcopy: error: {exc}", file=sys.stderr, flush=True)


def config(key, value):
    try:
        _config.set(key, value)
    except plugin_config.ConfigError as exc:
        _report_error(exc)
        raise


def config_complete():
    global _device, _recorder, _replay
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="nbdkit: postcopy: %(levelname)s: %(message)s")
    try:
        _config.check_complete()
        _device = Device(
            _config.pages,
            MarkerCodec(_config.key),
            headroom=_config.headroom,
            cache_dir=_config.cache_dir,
            timeout=_config.timeout,
            label=_config.label,
            swap_uuid=_config.uuid,
            warm=_config.warm,
            demand_store=_config.demand_store,
        )
        if _config.replay:
            _replay = read_workingset(_config.replay, _config.pages)
    except (plugin_config.ConfigError, ValueError, OSError) as exc:  # WorkingSetError is a ValueError
        _report_error(exc)
        raise
    _recorder = WorkingSetRecorder(_device.guest_of)
    _device.add_fault_listener(_recorder)
    log.info("device: %d guest pages, %d slots (%d bytes), source %s", _device.pages, _device.slots, _device.size, _config.source)


def after_fork():
    # Threads must start here: nbdkit forks after config_complete, and a fork keeps no threads.
    try:
        _start_services()
    except Exception as exc:
        _report_error(exc)
        raise


def _start_services():
    global _prefetcher
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    connect_timeout = min(STARTUP_CONNECT_TIMEOUT, _config.timeout)
    identity = SourceIdentity(_config.source_id, on_refused=_device.on_source_refused)
    demand = SourceClient(_config.source, name="demand", connect_timeout=connect_timeout,
                          on_state=_device.on_source_state, identity=identity, role="demand")
    _services.append(demand)
    if demand.size < _device.pages * PAGE_SIZE:
        raise RuntimeError(f"the source {_config.source} holds {demand.size} bytes, less than pages={_device.pages}")
    _device.demand_source = demand
    _device.source_connected = demand.connected
    if _config.prefetch:
        source = SourceClient(_config.source, name="prefetch", connect_timeout=connect_timeout, identity=identity,
                              role="prefetch")
        _prefetcher = Prefetcher(_device, source, timeout=_config.timeout, replay=_replay, cpus=_config.prefetch_cpus)
        _services.append(_prefetcher)
        _prefetcher.start()
    if _config.control:
        try:
            control = ControlServer(_config.control, {"status": _device.status, "arm": _arm,
                                                      "wait-local": _wait_local, "workingset": _workingset})
        except OSError as exc:
            raise RuntimeError(f"control={_config.control}: cannot listen: {exc.strerror or exc}") from None
        _services.append(control)
        control.start()
    if _config.metrics:
        try:
            serve_metrics(_config.metrics, _device.metrics.registry)
        except OSError as exc:
            raise RuntimeError(f"metrics={_config.metrics}: cannot listen: {exc.strerror or exc}") from None
    if _config.armed:
        _device.arm()


def _arm():
    _device.arm()
    return {"ok": True, "armed": True}


def _wait_local():
    _device.wait_complete(WAIT_LOCAL_SECONDS)
    return _device.status()


def _workingset():
    return {"recorded": _recorder.pages(), "limit": _recorder.limit, "replay": len(_replay),
            "replayed": _prefetcher.replayed if _prefetcher is not None else 0,
            "replay_done": _prefetcher is None or _prefetcher.replay_done.is_set()}


def cleanup():
    for service in reversed(_services):
        try:
            service.close()
        except Exception:
            log.exception("stopping %r failed", service)
    if _device is not None:
        _device.close()


def open(readonly):
    return {}


def get_size(h):
    return _device.size


def block_size(h):
    return (1, PAGE_SIZE, MAX_REQUEST)


def can_write(h):
    return True


def can_trim(h):
    return True


def can_flush(h):
    return True


def can_multi_conn(h):
    return True


def pread(h, buf, offset, flags):
    try:
        _device.read_into(buf, offset)
    except DeviceIOError:
        nbdkit.set_error(errno.EIO)
        raise


def pwrite(h, buf, offset, flags):
    try:
        _device.write(buf, offset)
    except DeviceIOError:
        nbdkit.set_error(errno.EIO)
        raise


def trim(h, count, offset, flags):
    _device.trim(offset, count)


def flush(h, flags):
    pass  # the page file is scratch space: a swap area does not outlive the process anyway
