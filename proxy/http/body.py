"""Request bodies: small ones in memory, large ones spooled to an unlinked file.

A body is read whole before it is sent (it is signed, and a retry sends it again),
so holding every body in memory would let a handful of uploads take the process to
gigabytes. `Spool` decides per request, as the bytes arrive:

- in memory while the body stays at or under `listen.spool_threshold` and the
  bodies of all requests held in memory together stay under `listen.max_buffered_bytes`
  (a request that would pass the global cap spools however small it is: never refused
  for it);
- otherwise in a file in `listen.spool_dir` that has no name: opened with O_TMPFILE
  (or unlinked at once where the file system cannot), so a crash leaves nothing on
  disk and nobody else can open it. Its trimmed SHA-256 (PROTOCOL.md body_hash) is
  computed as the bytes go in, so signing never reads it back; sending reads it from
  the start with pread (no shared file position: every retry starts at 0).

Small bodies, nearly all of them, cost what they did before: one bytes object, no
file, no hashing here (the pipeline hashes them as it always did).

A `Body` is closed by whoever holds it, in every outcome: that gives its bytes back to
the global cap, or closes the file (and so frees its disk space).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from proxy.errors import ProxyError, SpoolUnavailable

# What the API strips from both ends of a body before hashing it (PROTOCOL.md), as ints.
WHITESPACE = b" \t\r\n"
_WHITESPACE = frozenset(WHITESPACE)
# Spooled bodies are read back (sent, hashed, copied) in pieces this size.
PIECE = 256 * 1024
# The names spool files have for an instant where O_TMPFILE is not supported.
_PREFIX = "body-"
# Trailing whitespace a TrimmedHash keeps in memory; a longer run is read back from the file.
HOLD_LIMIT = 64 * 1024


def _spool_error(e: OSError) -> ProxyError:
    what = errno.errorcode.get(e.errno or 0, type(e).__name__)
    return SpoolUnavailable(
        f"the proxy could not store the request body ({what} in listen.spool_dir)", 5
    )


class TrimmedHash:
    """SHA-256 of a body with leading and trailing space/tab/CR/LF removed, fed as it
    arrives: leading whitespace is skipped, and trailing whitespace is held back until
    more non-space data shows it was not trailing after all.

    `reread(offset, length)` yields bytes already fed (the spool file): a run of
    whitespace longer than `hold` is not kept in memory but read back when it turns out
    to be inside the body, so no body can make the hash hold more than `hold` bytes.
    """

    __slots__ = ("_began", "_held", "_held_at", "_held_len", "_hold", "_reread", "_sha", "_size")

    def __init__(
        self, reread: Callable[[int, int], Iterable[bytes]], hold: int = HOLD_LIMIT
    ) -> None:
        self._sha = hashlib.sha256()
        self._reread = reread
        self._hold = hold
        self._size = 0  # bytes fed so far: the offset of the next one
        self._began = False  # a byte other than whitespace has been fed
        # The run of whitespace at the end of what was fed: where it starts, how long it
        # is, and its bytes while it is short enough to keep (else empty: in the file).
        self._held_at = 0
        self._held_len = 0
        self._held = bytearray()

    def update(self, chunk: bytes) -> None:
        if not chunk:
            return
        at = self._size
        self._size += len(chunk)
        if not self._began:
            stripped = chunk.lstrip(WHITESPACE)
            if not stripped:
                return
            at += len(chunk) - len(stripped)
            chunk = stripped
            self._began = True
        # The usual chunk ends in data: no copy, no scan.
        core = len(chunk) if chunk[-1] not in _WHITESPACE else len(chunk.rstrip(WHITESPACE))
        if core:
            self._release_held()
            self._sha.update(chunk if core == len(chunk) else memoryview(chunk)[:core])
        if core < len(chunk):
            self._keep(memoryview(chunk)[core:], at + core)

    def _keep(self, run: memoryview, at: int) -> None:
        if not self._held_len:
            self._held_at = at
        in_memory = len(self._held) == self._held_len
        self._held_len += len(run)
        if in_memory and self._held_len <= self._hold:
            self._held += run
        else:
            self._held.clear()  # the run is longer than we keep: it is in the file

    def _release_held(self) -> None:
        """The held run is inside the body after all: into the hash with it."""
        if not self._held_len:
            return
        if len(self._held) == self._held_len:
            self._sha.update(self._held)
        else:
            for piece in self._reread(self._held_at, self._held_len):
                self._sha.update(piece)
        self._held.clear()
        self._held_len = 0

    def hexdigest(self) -> str:
        """PROTOCOL.md's body_hash: "" when nothing at all was fed."""
        return self._sha.hexdigest() if self._size else ""


def _pread_pieces(fd: int, start: int, length: int, size: int = PIECE) -> Iterator[bytes]:
    end = start + length
    while start < end:
        piece = os.pread(fd, min(size, end - start), start)
        if not piece:
            raise ProxyError("a spooled request body is shorter than what was written")
        start += len(piece)
        yield piece


class Body:
    """One request body: `in_memory` holds it when it is in memory; otherwise it is in an
    unlinked spool file, read with `pieces`, `read` or `mapped`. `digest` is the trimmed
    SHA-256 when it was computed on the way in (spooled bodies), else None."""

    __slots__ = ("_fd", "_held", "_spool", "digest", "in_memory", "size")

    def __init__(
        self,
        in_memory: bytes | None,
        size: int,
        digest: str | None = None,
        *,
        fd: int = -1,
        spool: Spool | None = None,
        held: int = 0,
    ) -> None:
        self.in_memory = in_memory
        self.size = size
        self.digest = digest
        self._fd = fd
        self._spool = spool
        # Bytes of the global in-memory cap this body holds (given back on close).
        self._held = held

    @property
    def spooled(self) -> bool:
        return self.in_memory is None

    def pieces(self, size: int = PIECE) -> Iterator[bytes | memoryview]:
        """The body from its start, in pieces of at most `size` bytes (views of a body in
        memory, so nothing is copied)."""
        data = self.in_memory
        if data is not None:
            view = memoryview(data)
            return (view[i : i + size] for i in range(0, len(data), size))
        return _pread_pieces(self._checked_fd(), 0, self.size, size)

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer at the end of the body)."""
        length = max(0, min(length, self.size - offset))
        data = self.in_memory
        if data is not None:
            return data[offset : offset + length]
        return b"".join(_pread_pieces(self._checked_fd(), offset, length))

    @contextlib.contextmanager
    def mapped(self) -> Iterator[mmap.mmap]:
        """The spooled body as a read-only mapping, for a parser that needs random access.
        Its pages are the file's: the kernel may drop them, and they are gone from the
        process once the mapping is closed (on leaving the block)."""
        mapping = mmap.mmap(self._checked_fd(), self.size, access=mmap.ACCESS_READ)
        try:
            yield mapping
        finally:
            mapping.close()

    def with_bytes(self, data: bytes) -> Body:
        """A body in memory that replaces this one (counted against the same cap)."""
        return Body(data, len(data), spool=self._spool, held=self._hold_again(len(data)))

    def spliced(self, start: int, end: int, insert: bytes) -> Body:
        """A new body: this one with bytes [start, end) replaced by `insert`. A spooled
        body gives a spooled one, copied file to file by the kernel (no copy through
        the process); this one stays open, for its holder to close."""
        data = self.in_memory
        if data is not None:
            return self.with_bytes(
                b"".join((memoryview(data)[:start], insert, memoryview(data)[end:]))
            )
        spool = self._spool
        assert spool is not None, "a spooled body comes from a Spool"
        writer = spool.writer(hashed=False)
        try:
            writer.copy_from(self._checked_fd(), 0, start)
            writer.write(insert)
            writer.copy_from(self._fd, end, self.size - end)
        except BaseException:
            writer.abort()
            raise
        return writer.finish()

    def _hold_again(self, size: int) -> int:
        # The bytes exist already: counted against the cap, never refused for it.
        if self._spool is None:
            return 0
        self._spool.buffered += size
        return size

    def _checked_fd(self) -> int:
        if self._fd < 0:
            raise ValueError("the spooled body is closed")
        return self._fd

    def close(self) -> None:
        """Give the memory back to the global cap, or close the file (its space is freed:
        it has no name). Safe to call more than once."""
        if self._held:
            if self._spool is not None:
                self._spool.buffered -= self._held
            self._held = 0
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


# The body of every request that has none: nothing to give back, nothing to close.
EMPTY = Body(b"", 0, "")


class SpoolWriter:
    """A body on its way into an unlinked spool file, hashed as it goes (when `hashed`)."""

    __slots__ = ("_fd", "_hash", "_spool", "size")

    def __init__(self, spool: Spool, fd: int, hashed: bool) -> None:
        self._spool = spool
        self._fd = fd
        self.size = 0
        self._hash = TrimmedHash(self._reread) if hashed else None

    def _reread(self, offset: int, length: int) -> Iterator[bytes]:
        return _pread_pieces(self._fd, offset, length)

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                # Written at once: a regular file takes it into the page cache (a short
                # write only happens on an error such as a full disk, raised next time).
                done = os.pwrite(self._fd, view, self.size)
                view = view[done:]
                self.size += done
        except OSError as e:
            raise _spool_error(e) from e
        if self._hash is not None and data:
            self._hash.update(data if isinstance(data, bytes) else bytes(data))

    def copy_from(self, src: int, offset: int, length: int) -> None:
        """Bytes of another spool file, copied inside the kernel where it can."""
        try:
            end = offset + length
            while offset < end:
                try:
                    done = os.copy_file_range(src, self._fd, end - offset, offset, self.size)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    done = 0
                if done <= 0:  # not supported here (or nothing copied): through the process
                    for piece in _pread_pieces(src, offset, end - offset):
                        self.write(piece)
                    return
                offset += done
                self.size += done
        except OSError as e:
            raise _spool_error(e) from e

    def finish(self) -> Body:
        """The spooled body; the file now belongs to it."""
        digest = self._hash.hexdigest() if self._hash is not None else None
        fd, self._fd = self._fd, -1
        return Body(None, self.size, digest, fd=fd, spool=self._spool)

    def abort(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


class Spool:
    """Where request bodies go (module docstring). One per service: `buffered` is the
    global cap's ledger, the bytes of request bodies held in memory right now by all
    requests together; it is shared on purpose, and only the event loop's thread
    touches it."""

    def __init__(
        self, directory: str | os.PathLike[str], threshold: int, max_buffered: int
    ) -> None:
        self.directory = Path(directory)
        self.threshold = threshold
        self.max_buffered = max_buffered
        self.buffered = 0
        # O_TMPFILE until the file system says it cannot (then mkstemp + unlink).
        self._tmpfile = hasattr(os, "O_TMPFILE")

    def prepare(self) -> int:
        """Create the directory (0700) if need be, check that it is this user's own and
        private, and remove the spool files a crash left in it; returns how many went.

        Raises OSError or ValueError (with a message naming the problem) when the
        directory cannot be used. A directory someone else owns, or one others may enter,
        is refused rather than changed: it could be a shared one (/tmp, a home), whose
        files and mode are not the proxy's to touch."""
        path = self.directory
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = path.lstat()
        if not stat.S_ISDIR(info.st_mode):
            raise ValueError(f"{path} is not a directory (a symlink is not accepted)")
        if info.st_uid != os.geteuid():
            # Its owner could read the bodies, or swap the directory under us.
            raise ValueError(f"{path} belongs to uid {info.st_uid}, not to this user")
        if info.st_mode & 0o077:
            raise ValueError(
                f"{path} is open to other users (mode {stat.filemode(info.st_mode)}): "
                "chmod 700 it, or name a path that does not exist yet"
            )
        removed = 0
        # A spool file has a name for an instant at most (none with O_TMPFILE): one that
        # has a name was left by a crash in that instant. Only those are removed.
        for entry in os.scandir(path):
            if entry.name.startswith(_PREFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def take(self, size: int) -> bool:
        """Count `size` more bytes of body in memory, if the global cap allows."""
        if self.buffered + size > self.max_buffered:
            return False
        self.buffered += size
        return True

    def give(self, size: int) -> None:
        self.buffered -= size

    def memory(self, data: bytes, held: int) -> Body:
        """A body kept in memory, holding `held` bytes of the cap until it is closed."""
        return Body(data, len(data), spool=self, held=held)

    def writer(self, hashed: bool = True) -> SpoolWriter:
        try:
            return SpoolWriter(self, self._open(), hashed)
        except OSError as e:
            raise _spool_error(e) from e

    def _open(self) -> int:
        """A new file in the directory that has no name: nothing is left behind by a
        crash, and no other process can open it."""
        if self._tmpfile:
            try:
                return os.open(self.directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._tmpfile = False  # this file system cannot: fall back, and remember
        fd, name = tempfile.mkstemp(prefix=_PREFIX, dir=self.directory)
        os.unlink(name)
        return fd
