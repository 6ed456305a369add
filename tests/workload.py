"""A test workload: a process with N MiB of anonymous memory that reads it on command.

    python tests/workload.py --mib 64 [--seed S | --fresh] [--distinct K] [--mergeable] [--hugepage]

It maps the memory (MAP_PRIVATE|MAP_ANONYMOUS), fills it from `--seed` (or leaves it untouched with
`--fresh`, like the RAM of a QEMU started with -incoming), prints one JSON line
{"pid", "address", "length"} and then answers one JSON line per command read from stdin:

    verify-image PATH   compare every byte of the range with the file -> {"mismatched_pages", "first_mismatches"}
    verify-seed         compare with the seeded contents             -> same
    fill SEED           overwrite the range with the contents of SEED (verify-seed then uses it) -> {"seed"}
    checksum            sha256 of the range                          -> {"sha256"}
    touch [STEP]        read one byte of every page (or of every STEP-th page) -> {"pages"}
    smaps               AnonHugePages / Swap / Rss / KSM of the mapping holding the range (kB) -> {...}
    exit                exit 0

All reads happen in this process, so a swapped-out page comes back through a real page fault.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import random
import subprocess
import sys

PAGE = 4096
CHUNK = 1 << 20


def seeded_contents(seed: int, length: int, distinct: int = 0) -> bytes:
    """The contents a workload with this seed holds: random, or `distinct` random pages repeated."""
    rng = random.Random(seed)
    if not distinct:  # in 1 MiB pieces: randbytes() of more than 256 MiB overflows
        return b"".join(rng.randbytes(min(CHUNK, length - i)) for i in range(0, length, CHUNK))
    pages = [rng.randbytes(PAGE) for _ in range(distinct)]
    return b"".join(pages[i % distinct] for i in range(length // PAGE))


def compare(memory: mmap.mmap, expected_chunks) -> dict:
    mismatched = []
    offset = 0
    for expected in expected_chunks:
        actual = memory[offset:offset + len(expected)]
        if actual != expected:
            for p in range(0, len(expected), PAGE):
                if actual[p:p + PAGE] != expected[p:p + PAGE]:
                    mismatched.append((offset + p) // PAGE)
        offset += len(expected)
    return {"mismatched_pages": len(mismatched), "first_mismatches": mismatched[:10]}


def file_chunks(path: str, length: int):
    with open(path, "rb") as f:
        for _ in range(0, length, CHUNK):
            yield f.read(CHUNK)


def smaps(address: int) -> dict:
    fields, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head.rstrip(":") in ("Rss", "Swap", "AnonHugePages", "KSM"):
                fields[head.rstrip(":")] = int(line.split()[1])
    return fields


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="leave the memory untouched")
    parser.add_argument("--distinct", type=int, default=0, help="repeat this many distinct random pages")
    parser.add_argument("--mergeable", action="store_true", help="madvise(MADV_MERGEABLE) for KSM")
    parser.add_argument("--hugepage", action="store_true", help="madvise(MADV_HUGEPAGE) for THP")
    args = parser.parse_args()

    length = args.mib << 20
    memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    if args.mergeable:
        memory.madvise(mmap.MADV_MERGEABLE)
    if args.hugepage:
        memory.madvise(mmap.MADV_HUGEPAGE)
    if not args.fresh:
        memory[:] = seeded_contents(args.seed, length, args.distinct)

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"pid": os.getpid(), "address": address, "length": length})
    for line in sys.stdin:
        command, _, argument = line.strip().partition(" ")
        if command == "verify-image":
            reply(compare(memory, file_chunks(argument, length)))
        elif command == "fill":
            args.seed = int(argument)
            memory[:] = seeded_contents(args.seed, length, args.distinct)
            reply({"seed": args.seed})
        elif command == "verify-seed":
            data = seeded_contents(args.seed, length, args.distinct)
            reply(compare(memory, (data[i:i + CHUNK] for i in range(0, length, CHUNK))))
        elif command == "checksum":
            reply({"sha256": hashlib.sha256(memory).hexdigest()})
        elif command == "touch":
            step = PAGE * int(argument or 1)
            total = sum(memory[i] for i in range(0, length, step))
            reply({"pages": len(range(0, length, step)), "sum": total})
        elif command == "smaps":
            reply(smaps(address))
        elif command == "exit":
            break
        else:
            reply({"error": f"unknown command {command!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())


class Workload:
    """Drives a workload process started through the `processes` fixture (see tests/conftest.py)."""

    def __init__(self, processes, mib: int, *options: str):
        self.proc = processes.start([sys.executable, __file__, "--mib", mib, *options],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        hello = json.loads(self.proc.stdout.readline() or "{}")
        if "pid" not in hello:
            raise RuntimeError(f"workload did not start (exit status {self.proc.poll()})")
        self.pid: int = hello["pid"]
        self.address: int = hello["address"]
        self.length: int = hello["length"]
        self.pages = self.length // PAGE

    def command(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"workload exited (status {self.proc.poll()}) on {line!r}")
        return json.loads(answer)

    def exit(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
            self.proc.wait(30)
