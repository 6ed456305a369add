"""Units shared by every part: the page size."""

PAGE_SIZE = 4096  # bytes in a guest page, a swap slot, and a marker page
