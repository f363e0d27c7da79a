"""Shell-style brace expansion of shard patterns (``shard-{00000..00999}.tar``), as WebDataset URLs use it.

The same rules as the ``braceexpand`` package that webdataset uses: comma lists ``{a,b}``, numeric ranges
``{0..9}`` with an optional step ``{0..100..10}``, zero padding when either end is written with leading
zeros (``{008..010}`` -> ``008 009 010``), single-letter ranges ``{a..e}``, nesting, and a group that is
neither (``{x}``) left as it is.
"""
from __future__ import annotations

import re

__all__ = ["expand_braces"]

_NUMBERS = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_LETTERS = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.(-?\d+))?$")


def expand_braces(pattern: str) -> list[str]:
    """Every string ``pattern`` stands for, in order (duplicates kept, as a shell does)."""
    return _expand(pattern, 0)


def _expand(s: str, pos: int) -> list[str]:
    start = s.find("{", pos)
    while start != -1:
        end = _closing(s, start)
        if end is None:
            return [s]
        alternatives = _alternatives(s[start + 1:end])
        if alternatives is not None:
            head, tail = s[:start], s[end + 1:]
            # Resume at `start`: an alternative may hold groups of its own; braces in `head` were literal.
            return [out for alt in alternatives for out in _expand(head + alt + tail, start)]
        start = s.find("{", start + 1)
    return [s]


def _closing(s: str, start: int) -> int | None:
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def _alternatives(body: str) -> list[str] | None:
    """The items a group's body stands for, or None when the group is literal."""
    parts, depth, last = [], 0, 0
    for i, char in enumerate(body):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(body[last:i])
            last = i + 1
    if parts:
        return [*parts, body[last:]]
    return _range(body)


def _range(body: str) -> list[str] | None:
    m = _NUMBERS.match(body)
    if m:
        first, last = int(m[1]), int(m[2])
        step = _step(m[3], first, last)
        padded = any(_zero_padded(x) for x in (m[1], m[2]))
        width = max(len(m[1]), len(m[2])) if padded else 0
        return [_pad(n, width) for n in range(first, last + (1 if step > 0 else -1), step)]
    m = _LETTERS.match(body)
    if m:
        first, last = ord(m[1]), ord(m[2])
        step = _step(m[3], first, last)
        return [chr(c) for c in range(first, last + (1 if step > 0 else -1), step)]
    return None


def _step(raw: str | None, first: int, last: int) -> int:
    step = abs(int(raw)) if raw else 1
    step = step or 1
    return step if last >= first else -step


def _zero_padded(number: str) -> bool:
    digits = number.lstrip("-")
    return len(digits) > 1 and digits.startswith("0")


def _pad(n: int, width: int) -> str:
    if n < 0:
        return "-" + str(-n).zfill(max(0, width - 1))
    return str(n).zfill(width)
