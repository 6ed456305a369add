"""The destination device behind the nbdkit plugin: slot map, page store, fetches, prefetcher, markers,
swap header, control socket and metrics."""
