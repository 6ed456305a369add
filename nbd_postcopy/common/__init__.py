"""Shared ground: Linux syscall wrappers, units, QMP, metrics helpers, progress bars."""
