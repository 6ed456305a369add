"""The NBD library: wire structures, the sans-I/O protocol core, NBD URIs, and the client."""
