"""argparse value types shared by the command-line tools: each error names the value."""
from __future__ import annotations

import argparse


def int_at_least(low: int, what: str = ""):
    """An argparse type: an int >= low; `what` is appended to the error (e.g. a hint)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}{what}, got {value}")
        return value
    parse.__name__ = f"int>={low}"
    return parse
