"""Which 4 KiB pages of a buffer are all zero: the server sends them as holes, the page stores skip them."""

from __future__ import annotations

from ..common.units import PAGE_SIZE
from . import wire

_ZERO_BLOCK = bytes(64 * 1024)


def zero_runs(data) -> list[tuple[int, int, bool]]:
    """(start, end, all_zero) runs of `data` at 4 KiB granularity (a zero tail shorter than a page counts).

    Most data pages have a nonzero first word, so those words are gathered in one strided C-level copy
    and only the pages whose first word is zero are compared in full, a whole candidate run at a time.
    """
    n = len(data)
    if n <= PAGE_SIZE:  # a single page: its first word usually settles it
        if n >= 8 and wire.U64.unpack_from(data)[0]:
            return [(0, n, False)]
        return [(0, n, _all_zero(memoryview(data).cast("B"), 0, n))] if n else []
    view = memoryview(data).cast("B")
    full = n // PAGE_SIZE
    firsts = view[: full * PAGE_SIZE].cast("Q")[:: PAGE_SIZE // 8].tolist() if full else []
    if n % PAGE_SIZE:
        firsts.append(int(not _all_zero(view, full * PAGE_SIZE, n)))
    if all(firsts):
        return [(0, n, False)] if n else []
    runs: list[tuple[int, int, bool]] = []
    i, pages = 0, len(firsts)
    while i < pages:
        j = i + 1
        if firsts[i]:
            while j < pages and firsts[j]:
                j += 1
            _add_run(runs, i * PAGE_SIZE, min(j * PAGE_SIZE, n), False)
        else:
            while j < pages and not firsts[j]:
                j += 1
            start, end = i * PAGE_SIZE, min(j * PAGE_SIZE, n)
            if _all_zero(view, start, end):
                _add_run(runs, start, end, True)
            else:  # some candidate page holds data further in: decide page by page
                for page in range(start, end, PAGE_SIZE):
                    stop = min(page + PAGE_SIZE, n)
                    _add_run(runs, page, stop, _all_zero(view, page, stop))
        i = j
    return runs


def _all_zero(view: memoryview, start: int, end: int) -> bool:
    for pos in range(start, end, len(_ZERO_BLOCK)):
        piece = bytes(view[pos : min(pos + len(_ZERO_BLOCK), end)])
        if piece != _ZERO_BLOCK[: len(piece)]:
            return False
    return True


def _add_run(runs: list, start: int, end: int, zero: bool) -> None:
    if runs and runs[-1][2] == zero:
        runs[-1] = (runs[-1][0], end, zero)
    else:
        runs.append((start, end, zero))
