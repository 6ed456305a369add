"""What every `nbd-postcopy` subcommand module shares."""

from __future__ import annotations

import argparse
from typing import Callable, TypeVar

T = TypeVar("T")


class CommandError(Exception):
    """A failure the user can act on: printed as one clear line, exit status 1, no traceback."""


def option_type(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type=` from a parser that raises ValueError: its message becomes the usage error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__  # argparse names the type in some messages
    return convert
