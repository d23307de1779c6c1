"""Checked numbers and booleans for every subcommand and for recipe / settings values.

A `Number` is both an argparse ``type=`` (a bad value fails at parse time; argparse names the option) and a
checker for values that arrive from a recipe, a dict or a config file (``check(name, value)``), so each option
states its allowed range once.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
from dataclasses import dataclass

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")


@dataclass(frozen=True)
class Number:
    """An int or a finite float within [minimum, maximum] (``open_minimum``: minimum itself excluded)."""

    kind: type
    minimum: float | None = None
    maximum: float | None = None
    open_minimum: bool = False

    def describe(self) -> str:
        noun = "an integer" if self.kind is int else "a number"
        bounds = []
        if self.minimum is not None:
            bounds.append(f"{'>' if self.open_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None:
            bounds.append(f"<= {self.maximum:g}")
        return f"{noun} {' and '.join(bounds)}".strip()

    def problem(self, value) -> str | None:
        """Why `value` is not allowed, or None."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return "not a number"
        if self.kind is int and not isinstance(value, numbers.Integral):
            return "not an integer"  # 1.5, and 8.0 too: a float where an int belongs is a mistake upstream
        if not math.isfinite(value):
            return "not finite"
        too_low = self.minimum is not None and (value <= self.minimum if self.open_minimum else value < self.minimum)
        too_high = self.maximum is not None and value > self.maximum
        return "out of range" if too_low or too_high else None

    def check(self, name: str, value):
        """`value` (an int for integer options) or ValueError naming `name` and the allowed range."""
        if self.problem(value) is not None:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return int(value) if self.kind is int else float(value)

    def __call__(self, text: str):
        """argparse type: parse the command-line string, then check it."""
        try:
            value = self.kind(text) if self.kind is float else int(str(text).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}") from None
        if self.problem(value) is not None:
            raise argparse.ArgumentTypeError(f"must be {self.describe()}, got {text!r}")
        return value


positive_int = Number(int, 1)
non_negative_int = Number(int, 0)
positive_float = Number(float, 0, open_minimum=True)
non_negative_float = Number(float, 0)
fraction = Number(float, 0, 1)


def int_list(item: Number):
    """argparse type for comma-separated integers, each checked by `item` ('' is an empty list)."""

    def parse(text: str) -> list[int]:
        parts = [part.strip() for part in str(text).split(",") if part.strip()]
        return [item(part) for part in parts]

    parse.__name__ = f"comma-separated list of {item.describe()}"
    return parse


def non_empty_int_list(item: Number):
    """Like `int_list`, but at least one entry."""
    parse_list = int_list(item)

    def parse(text: str) -> list[int]:
        values = parse_list(text)
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item.describe()}, got {text!r}")
        return values

    parse.__name__ = parse_list.__name__
    return parse


def layer_heads(text: str) -> dict[int, list[int]]:
    """argparse type for LAYER:HEAD pairs, comma-separated ('7:2,21:0,21:2' -> {7: [2], 21: [0, 2]})."""
    heads: dict[int, list[int]] = {}
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        layer, sep, head = part.partition(":")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected LAYER:HEAD pairs like 7:2,21:0, got {part!r} in {text!r}")
        heads.setdefault(non_negative_int(layer.strip()), []).append(non_negative_int(head.strip()))
    if not heads:
        raise argparse.ArgumentTypeError(f"expected LAYER:HEAD pairs like 7:2,21:0, got {text!r}")
    return heads


TOKEN_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "b": 1e9}


def parse_token_count(value: int | float | str) -> int:
    """'20M' -> 20_000_000; K, M, G (or B) are decimal (1e3, 1e6, 1e9); '1.5M', '2e6', '40_000' and 300 work too."""
    if isinstance(value, bool):
        raise ValueError(f"expected a token count like 20M, got {value!r}")
    if isinstance(value, (int, float)):
        count = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([kKmMgGbB]?)\s*", str(value).replace("_", ""))
        if not match:
            raise ValueError(f"expected a token count like 500K, 20M or 1G, got {value!r}")
        count = float(match.group(1)) * TOKEN_SUFFIXES[match.group(2).lower()]
    if count < 0 or count != count:
        raise ValueError(f"token count must be >= 0, got {value!r}")
    return int(round(count))


def token_count(text: str) -> int:
    """argparse type: a token count (`parse_token_count`) of at least one token."""
    try:
        count = parse_token_count(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 token, got {text!r}")
    return count


def parse_bool(name: str, value) -> bool:
    """A real bool from a bool, 0/1, or one of the words true/yes/on/1 and false/no/off/0 (any case).

    A recipe's quoted "no" is a non-empty string, which Python reads as true: this reads it as False and
    refuses anything ambiguous.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise ValueError(f"{name} must be true or false (or yes/no, on/off, 1/0), got {value!r}")
