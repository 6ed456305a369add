"""nbd-postcopy: postcopy live migration through kernel swap over an NBD export."""

__version__ = "0.1.0"
