"""The one way our tools write WebDataset shards: webdataset's ``TarWriter`` behind a shard that is written as
``NAME.tmp`` and renamed to ``NAME`` only once complete, and a rolling writer that numbers shards
``PREFIX-000000.tar ...`` and starts the next one at a sample or byte limit.

    with ShardWriter(out, "train", max_samples=5000) as writer:
        writer.write("000000001", {"png": png, "txt": caption})   # members by extension, bytes only
    writer.shards  # [{"name": "train-000000.tar", "samples": ..., "images": ..., "bytes": ...}, ...]

Why not webdataset's ``ShardWriter`` itself: it opens its first shard on construction (an empty run would leave an
empty shard), writes the final name directly (an interrupted run would leave a shard that looks complete) and
closes a shard only *after* it passed the byte limit; our tools rename finished shards, never start an empty one and
keep a shard under its byte limit unless one sample alone exceeds it.

Every member gets mtime 0, so equal inputs give byte-equal shards. Owner and mode are a ``TarStyle``: the shapes
and fashion tools keep webdataset's defaults, the others write root-owned 0644 members (changing either would
change every existing shard's bytes, and the manifests that record their sizes).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class TarStyle:
    """Owner and permission bits of every member (uid and gid are always 0)."""

    user: str
    group: str
    mode: int


PLAIN = TarStyle(user="", group="", mode=0o644)  # make_shards, precompute_latents
WEBDATASET = TarStyle(user="bigdata", group="bigdata", mode=0o444)  # webdataset's TarWriter defaults: shapes, fashion

TAR_BLOCK = 512
TAR_END = 2 * TAR_BLOCK  # the end-of-archive blocks


def tar_size(members: dict[str, bytes]) -> int:
    """Bytes that ``members`` add to a tar: one header block each plus the data padded to whole blocks (names
    that need a PAX header add more; the byte limit is a budget, not an exact size)."""
    return sum(TAR_BLOCK + TAR_BLOCK * math.ceil(len(v) / TAR_BLOCK) for v in members.values())


class TarShard:
    """One shard: ``out/name.tmp`` while open, renamed to ``out/name`` by ``close``."""

    def __init__(self, out: Path, name: str, style: TarStyle = PLAIN) -> None:
        import webdataset as wds

        self.path = Path(out) / name
        self._file = open(self.path.with_name(f"{name}.tmp"), "wb")  # our own handle: no URL parsing of the path
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user=style.user, group=style.group,
                                  mode=style.mode)
        self.samples = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Members ``key.<ext>`` in sorted extension order (webdataset's order)."""
        self._tar.write({"__key__": key, **members})
        self.samples += 1

    def close(self) -> int:
        """Finish the tar, rename it to its final name and return its size in bytes."""
        self._tar.close()
        self._file.close()
        os.replace(self.path.with_name(f"{self.path.name}.tmp"), self.path)
        return self.path.stat().st_size


@dataclass
class ShardWriter:
    """Numbered shards ``prefix-000000.tar ...`` in ``out``. A shard is opened by the first sample it gets and
    closed before the sample that would take it past ``max_samples`` or (by ``tar_size``) ``max_bytes``; a
    sample larger than ``max_bytes`` alone gets a shard of its own. ``shards`` lists the finished ones."""

    out: Path
    prefix: str
    max_samples: int
    max_bytes: int | None = None
    style: TarStyle = PLAIN
    shards: list[dict[str, Any]] = field(default_factory=list)
    _shard: TarShard | None = None
    _images: int = 0
    _bytes: int = 0

    @property
    def names(self) -> list[str]:
        """Names of the finished shards, in order."""
        return [s["name"] for s in self.shards]

    def write(self, key: str, members: dict[str, bytes], images: int = 0) -> None:
        size = tar_size(members)
        if self._shard is not None and (self._shard.samples >= self.max_samples or
                                        (self.max_bytes is not None and self._bytes + size > self.max_bytes)):
            self.close()
        if self._shard is None:
            self._shard = TarShard(self.out, f"{self.prefix}-{len(self.shards):06d}.tar", self.style)
            self._images, self._bytes = 0, TAR_END
        self._shard.write(key, members)
        self._images += images
        self._bytes += size

    def close(self) -> None:
        """Finish the open shard, if any (the writer stays usable: the next sample opens the next shard)."""
        if self._shard is None:
            return
        shard, self._shard = self._shard, None
        self.shards.append({"name": shard.path.name, "samples": shard.samples, "images": self._images,
                            "bytes": shard.close()})

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:  # an interrupted run keeps its last shard as .tmp: it must not look complete
            self.close()
