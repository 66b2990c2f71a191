"""The command line's argument types and its one-line errors (no torch import: `--help` and `list` stay fast)."""

from __future__ import annotations

import argparse
import math


def comma_list(text):
    """'a, b,,c' -> ['a', 'b', 'c']; None for an empty or missing text."""
    return [s.strip() for s in text.split(",") if s.strip()] if text else None


class UsageError(Exception):
    """A bad argument found after parsing (e.g. --device cuda without CUDA): one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (`deepfense-losses bench: error: ...`), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(text: str) -> int:
    """'256' or '1e6' -> a whole number >= 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value.is_integer() and value >= 1):
        raise argparse.ArgumentTypeError(f"{text.strip()!r} is not a whole number of 1 or more")
    return int(value)


def count_list(text: str) -> list[int]:
    """'8,32,256' -> [8, 32, 256] (--B, --D, --C)."""
    if not comma_list(text):
        raise argparse.ArgumentTypeError("needs at least one value")
    return [count(s) for s in comma_list(text)]


def shapes(text: str) -> list[tuple]:
    """'256x192x2,128x192x5994' -> [(256, 192, 2), (128, 192, 5994)] (--shapes)."""
    found = []
    for item in comma_list(text) or ():
        parts = item.lower().replace("*", "x").split("x")
        try:
            if len(parts) != 3:
                raise argparse.ArgumentTypeError(item)
            found.append(tuple(count(p) for p in parts))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"shape {item!r} is not BxDxC with whole numbers of 1 or more "
                                             f"(e.g. 256x192x2)") from None
    if not found:
        raise argparse.ArgumentTypeError("needs at least one BxDxC shape")
    return found


def names(known):
    """A comma list whose every item is one of `known` (--losses, --dtypes)."""
    def parse(text):
        given = comma_list(text)
        bad = [n for n in given or () if n not in known]
        if bad or not given:
            raise argparse.ArgumentTypeError(f"{', '.join(bad) or repr(text)} is not one of {', '.join(known)}")
        return given
    return parse


def positive(kind):
    """A number of type `kind` above 0 (--threads, --reps, --time-limit, --sm-count)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number above 0")
        return value
    return parse

