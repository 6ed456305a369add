"""The NBD library: wire structures, the sans-I/O protocol core (shared part, server, client), zero-page
runs, NBD URIs, and the client."""
