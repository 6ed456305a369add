"""The destination device behind the nbdkit plugin: slot map, page store, fetches, prefetcher, markers,
swap header, control socket and metrics."""

from pathlib import Path

PLUGIN_FILE = "nbdkit_plugin.py"


def plugin_path() -> Path:
    """The absolute path of the nbdkit plugin file that ships in this package, for
    `nbdkit python PATH KEY=VALUE...` (plugin/postcopy.py in a checkout is a symlink to it)."""
    return Path(__file__).resolve().with_name(PLUGIN_FILE)
