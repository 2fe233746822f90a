"""The user token file: round trips, precise load errors, and no token ever written or echoed."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from knox.model import User
from knox_server.tokens import TokenDB, TokenFileError, hash_token, new_token, write_token_file

HASH_A = hash_token("token-a-" + "x" * 40)
HASH_B = hash_token("token-b-" + "y" * 40)


def entry(name: str | None, digest: str | None, groups: str = "[]") -> str:
    lines = ["[[user]]"]
    if name is not None:
        lines.append(f'name = "{name}"')
    lines.append(f"groups = {groups}")
    if digest is not None:
        lines.append(f'token_sha256 = "{digest}"')
    return "\n".join(lines) + "\n"


def test_new_tokens_are_long_random_and_url_safe() -> None:
    tokens = {new_token() for _ in range(50)}
    assert len(tokens) == 50
    for token in tokens:
        assert len(token) >= 43
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_hash_token_is_hex_sha256_of_utf8() -> None:
    assert hash_token("abc") == hashlib.sha256(b"abc").hexdigest()
    assert hash_token("é") == hashlib.sha256("é".encode()).hexdigest()
    # A header may carry anything; hashing must not raise.
    assert len(hash_token("\udcff")) == 64


def test_written_file_loads_back_and_holds_no_token(tmp_path: Path) -> None:
    admin, alice = new_token(), new_token()
    path = tmp_path / "users.toml"
    write_token_file(
        path,
        [("admin", ["security-team", "ops"], admin), ('al"ice\\ é', [], alice)],
    )
    db = TokenDB.load(path)
    assert len(db) == 2
    assert db.lookup(admin) == User("admin", frozenset({"security-team", "ops"}))
    assert db.lookup(alice) == User('al"ice\\ é', frozenset())
    assert db.lookup(new_token()) is None
    assert db.lookup("") is None
    text = path.read_text(encoding="utf-8")
    assert admin not in text
    assert alice not in text
    assert hash_token(admin) in text


def test_written_file_is_0600_whatever_the_umask_and_replaces_atomically(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text("old")
    path.chmod(0o644)
    old_umask = os.umask(0)
    try:
        write_token_file(path, [("admin", [], new_token())])
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(TokenDB.load(path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml"]


def test_invalid_entries_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text("keep me")
    token = new_token()
    with pytest.raises(TokenFileError, match=r"user 2 \('a'\): same token as user 1 \('b'\)"):
        write_token_file(path, [("b", [], token), ("a", [], token)])
    with pytest.raises(TokenFileError, match=r"user 2 .*duplicate name, already used by user 1"):
        write_token_file(path, [("a", [], new_token()), ("a", [], new_token())])
    with pytest.raises(TokenFileError, match=r"user 1 \('a'\): token must not be empty"):
        write_token_file(path, [("a", [], "")])
    with pytest.raises(TokenFileError, match="user 1: name must not contain control characters"):
        write_token_file(path, [("a\nb", [], new_token())])
    with pytest.raises(TokenFileError, match=r"user 1 .*each group must not be empty"):
        write_token_file(path, [("a", [""], new_token())])
    assert path.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.toml"]


def test_empty_file_means_no_users() -> None:
    db = TokenDB.parse("# nobody yet\n")
    assert len(db) == 0
    assert db.lookup("anything") is None


def test_hash_case_does_not_matter() -> None:
    token = new_token()
    db = TokenDB.parse(entry("a", hash_token(token).upper()))
    assert db.lookup(token) == User("a")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (entry(None, HASH_A), "f.toml: user 1: missing 'name'"),
        (entry("a", None), "f.toml: user 1 ('a'): missing 'token_sha256'"),
        (entry("a", "zz" * 32), "f.toml: user 1 ('a'): token_sha256 must be 64 hexadecimal"),
        (entry("a", HASH_A[:-1]), "f.toml: user 1 ('a'): token_sha256 must be 64 hexadecimal"),
        (
            entry("a", HASH_A) + entry("a", HASH_B),
            "f.toml: user 2 ('a'): duplicate name, already used by user 1",
        ),
        (
            entry("a", HASH_A) + entry("b", HASH_A.upper()),
            "f.toml: user 2 ('b'): same token as user 1 ('a')",
        ),
        (entry("", HASH_A), "f.toml: user 1: name must not be empty"),
        (entry("a", HASH_A, groups='"ops"'), "f.toml: user 1 ('a'): groups must be an array"),
        (entry("a", HASH_A, groups="[1]"), "f.toml: user 1 ('a'): each group must be a string"),
        (entry("a", HASH_A) + "extra = 1\n", "f.toml: user 1 ('a'): unknown key 'extra'"),
        ("users = []\n", "f.toml: unknown top-level key 'users'"),
        ("user = 3\n", "f.toml: 'user' must be an array of tables"),
        ("user = [1]\n", "f.toml: user 1: must be a table"),
        ("[[user]\n", "f.toml: not valid TOML"),
        ("[[user]]\nname = 5\n", "f.toml: user 1: missing 'token_sha256'"),
    ],
)
def test_parse_errors_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(TokenFileError) as info:
        TokenDB.parse(text, source="f.toml")
    assert str(info.value).startswith(message)


def test_errors_and_repr_never_show_hashes() -> None:
    bad = HASH_A[:-2] + "zz"
    with pytest.raises(TokenFileError) as info:
        TokenDB.parse(entry("a", bad))
    assert bad not in str(info.value)
    with pytest.raises(TokenFileError) as info:
        TokenDB.parse(entry("a", HASH_A) + entry("b", HASH_A))
    assert HASH_A not in str(info.value)
    db = TokenDB.parse(entry("a", HASH_A))
    assert HASH_A not in repr(db)
    assert repr(db) == "TokenDB(<1 users>)"


def test_load_reports_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(TokenFileError, match=r"missing\.toml: cannot read: No such file"):
        TokenDB.load(missing)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(TokenFileError, match=r"binary\.toml: not valid UTF-8"):
        TokenDB.load(binary)
    broken = tmp_path / "broken.toml"
    broken.write_text(entry(None, HASH_A))
    with pytest.raises(TokenFileError, match=rf"^{broken}: user 1: missing 'name'"):
        TokenDB.load(broken)
