"""One streamed pass over a WebDataset tar: its samples (members grouped by key), and where it broke if it did.

A sample's key is the member path up to the first dot of its file name and the rest is its extension
(``a/0001.seg.png`` -> key ``a/0001``, extension ``seg.png``), as webdataset splits them. The tar is read
with :mod:`tarfile` in stream mode over any file object (an fsspec S3 file reads ahead in large blocks), so a
pass never seeks.
"""
from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import BinaryIO

__all__ = ["END_OF_ARCHIVE", "TarBreak", "TarSample", "read_members", "read_samples", "split_member"]

#: A well-formed tar ends with two zero blocks; a file whose last member is followed by fewer bytes was cut.
END_OF_ARCHIVE = 2 * tarfile.BLOCKSIZE


def split_member(name: str) -> tuple[str, str]:
    """(key, lower-cased extension) of a member name; the extension is empty when the file name has no dot."""
    folder, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


@dataclass
class TarSample:
    """The members of one key: extension -> bytes, extension -> member name; names that came again (ignored)."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)
    repeated: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class TarBreak:
    """Where a tar stopped being readable (cut short, or corrupt from there on).

    ``member`` is the member the break fell inside (``inside``: its header was read, its data is not whole) or
    the last whole member before it (the break fell in the next header or the end-of-archive blocks, so that
    member's sample may have lost members); None when no member could be read at all."""

    offset: int  # where the broken member, or the part after the last whole member, starts
    member: str | None
    inside: bool
    reason: str

    def describe(self) -> str:
        if self.member is None:
            return f"no member can be read ({self.reason})"
        where = "inside member" if self.inside else "after member"
        return f"the tar is cut or corrupt {where} {self.member!r} (byte {self.offset}): {self.reason}"


class _Counting:
    """A read-only file object that counts the bytes read through it (tarfile's stream mode reads ahead)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.read_bytes += len(data)
        return data

    def drain(self) -> int:
        while self.read(1 << 20):
            pass
        return self.read_bytes


def _wanted_member(info: tarfile.TarInfo) -> bool:
    return info.isfile() and not posixpath.basename(info.name).startswith(".")


def _stream(fileobj: BinaryIO, visit: Callable[[tarfile.TarInfo, bytes], bool]) -> TarBreak | None:
    """Walk the file members, calling ``visit(info, data)`` on each; ``visit`` returns False to stop early.

    Every member is read whole (the pass goes through its bytes anyway), so a cut is always pinned to the
    member it fell inside.

    Returns where the tar broke, or None when it ended well (or the walk stopped early)."""
    counting = _Counting(fileobj)
    current: tarfile.TarInfo | None = None  # the member being read
    last: tarfile.TarInfo | None = None  # the last member read whole
    tar: tarfile.TarFile | None = None
    try:
        tar = tarfile.open(fileobj=counting, mode="r|")
        for info in tar:
            if not _wanted_member(info):
                continue
            current = info
            if not visit(info, tar.extractfile(info).read()):
                return None
            last, current = info, None
    except (tarfile.TarError, EOFError) as e:  # not OSError: a failed read of the file is no broken tar
        reason = f"{type(e).__name__}: {e}"
        if current is not None:
            return TarBreak(current.offset, current.name, True, reason)
        return TarBreak(tar.offset if tar is not None else 0, last.name if last else None, False, reason)
    end = tar.offset
    size = counting.drain()
    if size - end < END_OF_ARCHIVE:
        return TarBreak(end, last.name if last else None, False,
                        f"the file ends {size - end} bytes later, inside a member header or the end-of-archive "
                        f"marker")
    return None


def read_samples(fileobj: BinaryIO, *, extensions: Collection[str] | None = None
                 ) -> tuple[list[TarSample], TarBreak | None]:
    """Every sample of the tar in member order, with the bytes of the members whose extension is in
    ``extensions`` (all when None). The sample of the member the tar broke inside or after is left out (the
    break names that member: the sample may be incomplete).
    A member name that repeats keeps its first copy, as :func:`read_members` does."""
    samples: dict[str, TarSample] = {}

    def visit(info: tarfile.TarInfo, data: bytes) -> bool:
        key, ext = split_member(info.name)
        if not ext:
            return True
        sample = samples.setdefault(key, TarSample(key))
        if ext in sample.names:
            sample.repeated.append(info.name)
        else:
            if extensions is None or ext in extensions:
                sample.files[ext] = data
            sample.names[ext] = info.name
        return True

    cut = _stream(fileobj, visit)
    if cut is not None and cut.member is not None:
        samples.pop(split_member(cut.member)[0], None)
    return [s for s in samples.values() if s.names], cut


def read_members(fileobj: BinaryIO, names: Collection[str]) -> tuple[dict[str, bytes], TarBreak | None]:
    """The bytes of the named members (the first copy of each), in one pass that stops once all are found."""
    wanted, found = set(names), {}

    def visit(info: tarfile.TarInfo, data: bytes) -> bool:
        if info.name in wanted and info.name not in found:
            found[info.name] = data
        return len(found) < len(wanted)

    return found, _stream(fileobj, visit)
