"""A process that times its own first touches of pages: the guest's side of a swap-in, for bench_device.py.

    python benchmarks/toucher.py --mib 128

It maps MIB of anonymous memory and leaves it untouched (like the RAM of a QEMU started with
-incoming), prints one JSON line {"pid", "address", "length"}, then answers one JSON line per command:

    time THINK_US PAGE,PAGE,...   read one byte of each page in turn, THINK_US µs apart; the time of each
                                  read in µs -> {"us": [...]} (a swapped-out page: a major fault each)
    exit
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time

PAGE = 4096


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, required=True)
    args = parser.parse_args()
    length = args.mib << 20
    memory = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))

    def reply(obj: dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"pid": os.getpid(), "address": address, "length": length})
    clock = time.perf_counter_ns
    for line in sys.stdin:
        command, *arguments = line.split()
        if command == "time":
            think = float(arguments[0]) / 1e6
            out = []
            for page in (int(p) for p in arguments[1].split(",")):
                started = clock()
                memory[page * PAGE]
                out.append((clock() - started) / 1000)
                if think:
                    time.sleep(think)
            reply({"us": out})
        elif command == "exit":
            break
        else:
            reply({"error": f"unknown command {command!r}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
