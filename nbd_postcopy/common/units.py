"""Units shared by every part: the page size, and byte counts for people."""

PAGE_SIZE = 4096  # bytes in a guest page, a swap slot, and a marker page


def human_bytes(count: float) -> str:
    """A byte count for people: '512 B', '68.0 MiB', '1.0 GiB' (binary units, one decimal)."""
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    value, unit = float(count), 0
    while value >= 1024 and unit < len(units) - 1:
        value /= 1024
        unit += 1
    return f"{int(value)} B" if unit == 0 else f"{value:.1f} {units[unit]}"
