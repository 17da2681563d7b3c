"""The encrypted refresh-token file: round trip, never in clear, wrong keys refused."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from proxy.schemes.oauth2_state import (
    StateUnreadable,
    TokenStore,
    fingerprint,
    parse_keys,
)

KEY = bytes(range(32))
OTHER = bytes(range(1, 33))
TOKEN = "sbx-rt-the-newest-refresh-token"


def test_a_saved_token_comes_back_and_is_not_in_the_file_in_clear(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "oauth2.state"
    store = TokenStore(path, [KEY], "https://auth/token\nclient")
    assert store.load() is None  # no file yet
    store.save(TOKEN, fingerprint("configured"))
    loaded = store.load()
    assert loaded is not None
    assert (loaded.refresh_token, loaded.origin) == (TOKEN, fingerprint("configured"))
    raw = path.read_bytes()
    assert TOKEN.encode() not in raw and b"sbx-rt" not in raw
    assert TOKEN not in repr(loaded)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["oauth2.state"]  # no temporary left


def test_each_save_replaces_the_file_with_a_fresh_nonce(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "s", [KEY], "b")
    store.save("one-token", "o")
    first = (tmp_path / "s").read_bytes()
    store.save("one-token", "o")
    assert (tmp_path / "s").read_bytes() != first  # never the same nonce twice
    store.save("two-token", "o")
    loaded = store.load()
    assert loaded is not None and loaded.refresh_token == "two-token"


def test_a_wrong_key_or_another_integrations_file_does_not_decrypt(tmp_path: Path) -> None:
    path = tmp_path / "s"
    TokenStore(path, [KEY], "integration-a").save(TOKEN, "o")
    with pytest.raises(StateUnreadable, match=r"does not decrypt with auth\.state_key"):
        TokenStore(path, [OTHER], "integration-a").load()
    with pytest.raises(StateUnreadable, match="does not decrypt"):
        TokenStore(path, [KEY], "integration-b").load()


def test_key_rotation_the_first_key_encrypts_every_key_decrypts(tmp_path: Path) -> None:
    path = tmp_path / "s"
    TokenStore(path, [OTHER], "b").save(TOKEN, "o")
    rotated = TokenStore(path, [KEY, OTHER], "b")
    loaded = rotated.load()
    assert loaded is not None and loaded.refresh_token == TOKEN
    rotated.save(TOKEN, "o")
    assert TokenStore(path, [KEY], "b").load() is not None  # now under the new key


@pytest.mark.parametrize(
    "content", [b"", b"{}", b"luxsci-proxy oauth2 state v1\nshort", b"x" * 70000]
)
def test_a_damaged_file_is_unreadable_not_a_crash(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "s"
    path.write_bytes(content)
    with pytest.raises(StateUnreadable):
        TokenStore(path, [KEY], "b").load()


def test_keys_as_base64_urlsafe_or_hex_several_for_rotation() -> None:
    std = base64.b64encode(KEY).decode()
    url = base64.urlsafe_b64encode(OTHER).decode().rstrip("=")
    assert parse_keys(std) == [KEY]
    assert parse_keys(f"{std}, {url}\n{KEY.hex()}") == [KEY, OTHER, KEY]
    for bad in ("", "short", base64.b64encode(b"16 bytes only!!!").decode(), "zz" * 32):
        with pytest.raises(ValueError):
            parse_keys(bad)


def test_an_unwritable_folder_is_an_os_error_for_the_caller(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        with pytest.raises(OSError):
            TokenStore(folder / "s", [KEY], "b").save(TOKEN, "o")
    finally:
        folder.chmod(0o700)
