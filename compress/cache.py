"""The content-addressed stage cache.

key = sha256(input digest, stage name, canonical config JSON, stage version,
CACHE_VERSION). A stage writes into a private temporary directory under the
cache; only a finished directory with meta.json is renamed to <root>/<key>, so
a killed build leaves nothing that counts, and a file lock per key keeps two
builds from doing (or corrupting) the same work.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from compress.artifact import META_FILE, Artifact

log = logging.getLogger(__name__)

# Bump to invalidate every cached entry (e.g. when artifact layouts change).
CACHE_VERSION = 1


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def make_key(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in (*parts, CACHE_VERSION):
        h.update(canonical_json(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


class Cache:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.locks = self.root / "locks"
        for d in (self.root, self.tmp, self.locks):
            d.mkdir(parents=True, exist_ok=True)

    def entry(self, key: str) -> Path:
        return self.root / key

    def get(self, key: str) -> Path | None:
        """The finished entry for key, or None (a directory without meta.json does not exist)."""
        path = self.entry(key)
        return path if (path / META_FILE).is_file() else None

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with open(self.locks / f"{key}.lock", "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def produce(self, key: str, make: Callable[[Path], None]) -> tuple[Path, bool]:
        """Return (entry path, hit). On a miss, make(tmpdir) must write the entry
        including meta.json; the directory is renamed into place only after that."""
        found = self.get(key)
        if found:
            return found, True
        with self.lock(key):
            found = self.get(key)  # another build may have finished it while we waited
            if found:
                return found, True
            self._clear_stale(key)
            work = self.tmp / f"{key}.{os.getpid()}.{time.time_ns()}"
            work.mkdir()
            try:
                make(work)
                final = self._publish(key, work)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
            return final, False

    def _publish(self, key: str, work: Path) -> Path:
        if not (work / META_FILE).is_file():
            raise AssertionError(f"cache entry {key} was produced without {META_FILE}")
        _fsync_tree(work)
        final = self.entry(key)
        if final.exists():  # a leftover without meta.json: not an entry
            shutil.rmtree(final)
        os.rename(work, final)
        _fsync_dir(self.root)
        return final

    def publish(self, key: str, work: Path) -> Path:
        """Move a finished directory made outside produce() (a sharded teacher
        pass fills one from several processes) into place, under the key's lock;
        if another build published the key meanwhile, theirs stays and ours goes."""
        with self.lock(key):
            found = self.get(key)
            if found:
                shutil.rmtree(work, ignore_errors=True)
                return found
            return self._publish(key, work)

    def _clear_stale(self, key: str) -> None:
        # We hold the key's lock, so any temporary directory for this key is
        # from a build that was killed; it can go.
        for stale in self.tmp.glob(f"{key}.*"):
            shutil.rmtree(stale, ignore_errors=True)

    def artifact(self, key: str, make: Callable[[Path], Artifact]) -> tuple[Artifact, bool]:
        path, hit = self.produce(key, lambda work: make(work))
        return Artifact.load(path), hit

    def json(self, key: str, make: Callable[[], dict]) -> tuple[dict, bool]:
        """Cache a JSON result (eval, bench) the same way as an artifact."""
        def write(work: Path) -> None:
            (work / "result.json").write_text(json.dumps(make(), indent=2, sort_keys=True))
            (work / META_FILE).write_text(json.dumps({"kind": "result"}))

        path, hit = self.produce(key, write)
        return json.loads((path / "result.json").read_text()), hit


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
