"""Request bodies (proxy/http/body.py): the incremental trimmed hash, the spool directory,
unlinked spool files, and bodies read back from them."""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import spool_fds
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import SpoolUnavailable
from proxy.http.body import EMPTY, Body, Spool, TrimmedHash
from proxy.schemes.luxsci.signing import body_hash


def hash_in_pieces(body: bytes, cuts: list[int], hold: int) -> str:
    """TrimmedHash fed `body` cut at `cuts`, re-reading held runs from `body` itself."""

    def reread(offset: int, length: int) -> Iterator[bytes]:
        assert offset + length <= fed[0], "only bytes already fed are read back"
        for start in range(offset, offset + length, 3):  # in small pieces, as from a file
            yield body[start : min(start + 3, offset + length)]

    fed = [0]
    hasher = TrimmedHash(reread, hold=hold)
    edges = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    for start, end in itertools.pairwise(edges):
        fed[0] = end
        hasher.update(body[start:end])
    return hasher.hexdigest()


# Bodies made mostly of the four bytes that are trimmed, so runs of them land everywhere:
# at the start, the end, across cuts, inside.
BODIES = st.binary(max_size=300) | st.lists(
    st.sampled_from([b" ", b"\t", b"\r", b"\n", b"x", b"{}", b"\x00", b"\r\n\r\n"]),
    max_size=120,
).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(
    body=BODIES,
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=12),
    hold=st.integers(min_value=0, max_value=8) | st.just(64 * 1024),
)
def test_the_streamed_hash_is_the_signed_body_hash(body: bytes, cuts: list[int], hold: int) -> None:
    assert hash_in_pieces(body, cuts, hold) == body_hash(body)


@pytest.mark.parametrize(
    "body",
    [b"", b" ", b"\r\n\t ", b"  a  ", b"a" + b" " * 100 + b"b", b'\n{"a": 1}\n\n', b"a \x0b"],
)
def test_the_streamed_hash_on_fixed_bodies(body: bytes) -> None:
    # Byte by byte, with nothing held in memory: every run of whitespace is read back.
    assert hash_in_pieces(body, list(range(len(body))), hold=0) == body_hash(body)
    assert hash_in_pieces(body, [], hold=1 << 16) == body_hash(body)


def test_a_long_run_of_whitespace_is_not_held_in_memory() -> None:
    reads: list[tuple[int, int]] = []
    body = b"a" + b" " * 1000 + b"b"

    def reread(offset: int, length: int) -> Iterator[bytes]:
        reads.append((offset, length))
        yield body[offset : offset + length]

    hasher = TrimmedHash(reread, hold=100)
    for i in range(0, len(body), 10):
        hasher.update(body[i : i + 10])
        assert len(hasher._held) <= 100
    assert hasher.hexdigest() == body_hash(body)
    assert reads == [(1, 999)]  # the last space came in the same piece as the "b"


# -- the spool directory ---------------------------------------------------------------------


def test_prepare_makes_a_private_directory(tmp_path: Path) -> None:
    where = tmp_path / "a" / "spool"
    Spool(where, 10, 100).prepare()
    assert stat.S_IMODE(where.stat().st_mode) == 0o700


def test_prepare_refuses_a_directory_others_may_enter(tmp_path: Path) -> None:
    where = tmp_path / "spool"
    where.mkdir()
    os.chmod(where, 0o1777)  # /tmp, say: neither its files nor its mode are ours to change
    (where / "somebody-elses").write_bytes(b"x")
    with pytest.raises(ValueError, match="open to other users"):
        Spool(where, 10, 100).prepare()
    assert stat.S_IMODE(where.stat().st_mode) == 0o1777
    assert [p.name for p in where.iterdir()] == ["somebody-elses"]


def test_prepare_removes_the_spool_files_a_crash_left(tmp_path: Path) -> None:
    where = tmp_path / "spool"
    where.mkdir(mode=0o700)
    (where / "body-old1").write_bytes(b"x" * 100)
    (where / "body-old2").write_bytes(b"y")
    (where / "notes.txt").write_bytes(b"not a spool file")
    (where / "body-link").symlink_to(tmp_path / "elsewhere")
    (where / "body-directory").mkdir()
    assert Spool(where, 10, 100).prepare() == 2
    assert sorted(p.name for p in where.iterdir()) == ["body-directory", "body-link", "notes.txt"]


def test_prepare_refuses_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "spool").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match="not a directory"):
        Spool(tmp_path / "spool", 10, 100).prepare()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory away")
def test_prepare_refuses_a_directory_someone_else_owns(tmp_path: Path) -> None:
    where = tmp_path / "spool"
    where.mkdir(mode=0o700)
    os.chown(where, 12345, -1)
    with pytest.raises(ValueError, match="uid 12345"):
        Spool(where, 10, 100).prepare()


# -- spool files and bodies ------------------------------------------------------------------


def spooled(spool: Spool, *chunks: bytes) -> Body:
    writer = spool.writer()
    for chunk in chunks:
        writer.write(chunk)
    return writer.finish()


def test_a_spool_file_has_no_name_and_is_closed_with_its_body(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10, 100)
    spool.prepare()
    body = spooled(spool, b"  hello ", b"world  \r\n")
    assert list(tmp_path.iterdir()) == []  # nothing to leave behind after a crash
    assert len(spool_fds(tmp_path)) == 1
    assert body.spooled and body.in_memory is None
    assert body.size == 17
    assert body.digest == body_hash(b"  hello world  \r\n")
    assert b"".join(body.pieces(4)) == b"  hello world  \r\n"
    assert b"".join(body.pieces(4)) == b"  hello world  \r\n"  # again from the start
    assert body.read(2, 5) == b"hello"
    assert body.read(15, 100) == b"\r\n"
    body.close()
    body.close()
    assert spool_fds(tmp_path) == []


def test_without_o_tmpfile_the_file_is_unlinked_at_once(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10, 100)
    spool._tmpfile = False
    body = spooled(spool, b"data")
    assert list(tmp_path.iterdir()) == []
    assert b"".join(body.pieces()) == b"data"
    body.close()
    assert spool_fds(tmp_path) == []


def test_a_spliced_spooled_body_is_another_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10, 100)
    body = spooled(spool, b"0123456789" * 100)
    new = body.spliced(10, 20, b"<inserted>!")
    body.close()
    assert new.size == 1001
    assert new.read(0, 25) == b"0123456789<inserted>!0123"
    expected = b"0123456789" + b"<inserted>!" + b"0123456789" * 98
    assert b"".join(new.pieces(7)) == expected
    with new.mapped() as mapping:
        assert mapping[:10] == b"0123456789"
    new.close()
    assert spool_fds(tmp_path) == []


def test_bodies_in_memory_count_against_the_cap_until_closed() -> None:
    spool = Spool("/nonexistent", 10, 100)
    assert spool.take(60)
    body = spool.memory(b"x" * 60, 60)
    assert not spool.take(50)  # 60 + 50 > 100
    replaced = body.with_bytes(b"y" * 70)  # exists already: counted, never refused
    assert spool.buffered == 130
    body.close()
    body.close()
    assert spool.buffered == 70
    replaced.close()
    assert spool.buffered == 0
    assert replaced.read(0, 3) == b"yyy"
    assert list(replaced.pieces(32)) == [b"y" * 32, b"y" * 32, b"y" * 6]


def test_the_empty_body() -> None:
    assert EMPTY.size == 0 and EMPTY.in_memory == b"" and EMPTY.digest == ""
    assert list(EMPTY.pieces()) == []
    EMPTY.close()


def test_a_spool_that_cannot_write_is_a_503(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "missing", 10, 100)
    with pytest.raises(SpoolUnavailable) as caught:
        spool.writer()
    assert caught.value.status == 503 and caught.value.reason == "spool_unavailable"
    assert "ENOENT" in caught.value.message


def test_hashlib_agrees_on_a_large_spooled_body(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10, 100)
    data = os.urandom(3 * 1024 * 1024 + 5)
    body = spooled(spool, b"\n\n", data[: 1 << 20], data[1 << 20 :], b" \t")
    assert body.digest == hashlib.sha256(data.strip(b" \t\r\n")).hexdigest()
    assert (
        hashlib.sha256(b"".join(body.pieces())).digest()
        == hashlib.sha256(b"\n\n" + data + b" \t").digest()
    )
    body.close()


@settings(max_examples=60, deadline=None)
@given(
    body=BODIES | st.builds(lambda a, b: a + b" \r\n\t" * 20_000 + b, BODIES, BODIES),
    cuts=st.lists(st.integers(min_value=0, max_value=80_000), max_size=8),
)
def test_a_spooled_body_carries_the_signed_body_hash(
    body: bytes, cuts: list[int], tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Through a real file: runs of whitespace past what is held (64 KiB) are read back from it.
    spool = Spool(tmp_path_factory.getbasetemp(), 10, 100)
    edges = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    spooled_body = spooled(spool, *(body[a:b] for a, b in itertools.pairwise(edges)))
    try:
        assert spooled_body.digest == body_hash(body)
        assert b"".join(spooled_body.pieces()) == body
    finally:
        spooled_body.close()
