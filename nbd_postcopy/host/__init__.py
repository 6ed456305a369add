"""The destination host: attaching the device as swap, the supervisor, staging, completion, memcgs."""
