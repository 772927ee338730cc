"""Remote shards: fetched whole into a bounded local cache (``--shard_cache DIR --shard_cache_gb N``), read from there.

- **Schemes.** ``http://`` and ``https://`` with Python's ``urllib`` (no extra package); every other scheme
  (``s3://``, ``gs://``, ``hf://``, ...) through ``fsspec`` and its filesystem package (``s3fs``, ``gcsfs``), an
  optional dependency: a missing one is a one-line error saying what to install.
- **Whole files, atomically.** A shard is downloaded into a hidden temporary file beside its cache entry and renamed
  into place when complete (``rectrain.runtime.io``'s temporary names), so an entry that exists is whole; a failed
  download leaves nothing behind. Over HTTP, a transfer that breaks is retried (``RETRIES`` times, with a growing
  pause) from where it stopped with a ``Range`` request (from scratch if the server ignores it); a shard that stays
  unreachable is a ``ShardFetchError`` naming its URL.
- **One download per shard per machine.** DataLoader workers and ranks on one node share the cache folder; an
  ``flock`` on ``ENTRY.lock`` makes one of them download while the others wait for it.
- **Bounded.** After each download the least recently used entries (by access time, which reads refresh) are
  deleted until the cache holds at most ``--shard_cache_gb``. A process that still reads a deleted entry keeps it
  (an open file outlives its name on POSIX); the space is freed when it closes it. The sampler keeps the entries a
  run needs at once below the bound (``rectrain.data.samplers.WindowedBatchSampler``).
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from contextlib import contextmanager, suppress

from rectrain.errors import UserError
from rectrain.runtime.io import is_temporary, temporary_path, user_cache_dir

__all__ = ["RETRIES", "ShardFetchError", "ShardCache", "is_remote", "read_text", "default_cache_dir"]

RETRIES = 3  # attempts per shard after the first
RETRY_PAUSE_S = 0.5  # doubled after each failed attempt
CHUNK = 1 << 20  # bytes per read of a download
TIMEOUT_S = 60  # per network operation
OPEN_ATTEMPTS = 3  # fetches of one shard that another process may evict before this one opens it


class ShardFetchError(OSError):
    """A remote shard (or file) could not be fetched; the message names the URL and the last failure."""


def default_cache_dir() -> str:
    return os.path.join(user_cache_dir(), "shards")


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise UserError("remote shards other than http(s):// need fsspec: pip install fsspec (and s3fs for s3://, "
                        "gcsfs for gs://)") from None
    return fsspec


def _http(url: str) -> bool:
    return url.startswith(("http://", "https://"))


def _open_url(url: str, start: int = 0):
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-"} if start else {})
    return urllib.request.urlopen(request, timeout=TIMEOUT_S)


def read_text(location: str, missing_ok: bool = False) -> str | None:
    """A small text file (a shard list, classes.json) from a path or URL; None when absent and ``missing_ok``."""
    try:
        if not is_remote(location):
            path = location[len("file://"):] if location.startswith("file://") else location
            with open(path, encoding="utf-8") as f:
                return f.read()
        if _http(location):
            with _open_url(location) as r:
                return r.read().decode("utf-8")
        with _fsspec().open(location, "rt", encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        if missing_ok:
            return None
        raise UserError(f"{location}: no such file") from None
    except urllib.error.HTTPError as e:
        if missing_ok and e.code == 404:
            return None
        raise UserError(f"{location}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"cannot read {location}: {getattr(e, 'reason', None) or e}") from None


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_remote(location: str) -> bool:
    """A URL (``https://``, ``s3://``, ...), not a local path (``file://`` counts as local)."""
    return bool(_SCHEME.match(location)) and not location.startswith("file://")


class ShardCache:
    """``local_path(url)`` -> the path of a complete local copy of the shard at ``url`` (downloaded when needed)."""

    def __init__(self, folder: str | None = None, max_gb: float = 100.0, log=None):
        self.folder = os.path.abspath(folder or default_cache_dir())
        self.max_bytes = int(max_gb * 1e9)
        self.log = log
        self.downloads = 0  # by this process, for tests and logs

    def entry(self, url: str) -> str:
        """The cache path of ``url``: its base name, prefixed by a hash of the whole URL (two folders' shards may
        share base names)."""
        tag = hashlib.blake2b(url.encode(), digest_size=6).hexdigest()
        return os.path.join(self.folder, f"{tag}-{os.path.basename(url.split('?', 1)[0]) or 'shard'}")

    def local_path(self, url: str, nbytes: int | None = None) -> str:
        """The complete local copy of ``url``; ``nbytes``: the size the index recorded (a copy of another size is
        fetched again, and a download of another size is an error: the shard changed since it was indexed)."""
        path = self.entry(url)
        if self._complete(path, nbytes):
            return path
        os.makedirs(self.folder, exist_ok=True)
        with self._locked(path):
            if not self._complete(path, nbytes):  # another worker may have fetched it while we waited
                self._download(url, path, nbytes)
                self.evict(keep=path)
        return path

    def open(self, url: str, nbytes: int | None = None) -> int:
        """A read-only file descriptor on the complete local copy of ``url``. Another process may evict the entry
        between ``local_path`` and the open: it is fetched again (an open descriptor keeps the file however it is
        evicted later)."""
        for _ in range(OPEN_ATTEMPTS):
            path = self.local_path(url, nbytes)
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
        raise ShardFetchError(f"shard {url} was evicted from {self.folder} {OPEN_ATTEMPTS} times before it could be "
                              "opened: the run reads more shards at once than --shard_cache_gb holds; raise it")

    def _complete(self, path: str, nbytes: int | None) -> bool:
        try:
            st = os.stat(path)
            if nbytes is not None and st.st_size != nbytes:
                return False
            os.utime(path, (time.time(), st.st_mtime))  # an access: least recently used goes first
        except FileNotFoundError:  # absent, or evicted by another process this instant
            return False
        return True

    @contextmanager
    def _locked(self, path: str):
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock; the lock file stays (removing it would race another waiter)

    def _download(self, url: str, path: str, nbytes: int | None) -> None:
        tmp = temporary_path(path)
        try:
            last = None
            for attempt in range(RETRIES + 1):
                if attempt:
                    time.sleep(RETRY_PAUSE_S * 2 ** (attempt - 1))
                try:
                    self._fetch(url, tmp)
                    last = None
                    break
                except urllib.error.HTTPError as e:
                    last = f"HTTP {e.code} {e.reason}"
                    if e.code in (401, 403, 404, 410):  # not coming back by asking again
                        break
                except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short: try again
                    last = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
            if last is not None:
                raise ShardFetchError(f"cannot fetch shard {url} ({last}; {attempt + 1} attempt(s)); check the URL "
                                      "and the network, then rerun (nothing was left in the cache)")
            size = os.path.getsize(tmp)
            if nbytes is not None and size != nbytes:
                raise ShardFetchError(f"shard {url} has {size:,} bytes but its index says {nbytes:,}: it changed "
                                      "since it was indexed; delete the index to index it again")
            os.replace(tmp, path)
            with suppress(FileNotFoundError):  # used now: the download began long ago by eviction's clock
                os.utime(path)
            self.downloads += 1
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _fetch(self, url: str, tmp: str) -> None:
        """Download ``url`` into ``tmp``, continuing a partial ``tmp`` with a Range request over HTTP."""
        if not _http(url):
            with _fsspec().open(url, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)
            return
        have = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with _open_url(url, have) as r:
            resumed = have and r.status == 206  # a server that ignores Range sends it all again (200)
            expected = r.headers.get("Content-Length")
            got = 0
            with open(tmp, "ab" if resumed else "wb") as dst:
                while chunk := r.read(CHUNK):
                    dst.write(chunk)
                    got += len(chunk)
        if expected is not None and got != int(expected):
            raise ShardFetchError(f"the transfer stopped after {got:,} of {int(expected):,} bytes")

    def evict(self, keep: str | None = None) -> list[str]:
        """Delete the least recently used entries until the cache holds at most ``max_bytes``; the paths deleted."""
        entries = []
        for e in os.scandir(self.folder):
            if e.is_file() and not e.name.endswith(".lock") and not is_temporary(e.name) and e.path != keep:
                try:
                    st = e.stat()
                except FileNotFoundError:  # another process evicted it since the listing
                    continue
                entries.append((st.st_atime, st.st_size, e.path))
        total = sum(s for _, s, _ in entries)
        if keep:
            with suppress(FileNotFoundError):
                total += os.path.getsize(keep)
        removed = []
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            total -= size
            removed.append(path)
        return removed
