"""The master keyring: sealing, every AAD binding, tampering, rotation, and the key file."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from knox.errors import InternalError
from knox_server.crypto import (
    KeyFileError,
    MasterKeyring,
    SealedDataError,
    add_key_to_file,
)

K0 = bytes(range(32))
K1 = bytes(range(100, 132))
SECRET = b"hunter2-the-secret"
KEY_ID = "db:password"
VID = 0x7ABCDEF012345678
TS = 1_700_000_000_123_456_789


def ring(*ids: int) -> MasterKeyring:
    material = {0: K0, 1: K1, 7: bytes(32), 255: b"\xff" * 32}
    return MasterKeyring({i: material[i] for i in ids})


def test_round_trip_and_envelope_layout() -> None:
    r = ring(0)
    sealed = r.seal(KEY_ID, VID, TS, SECRET)
    assert sealed[0] == 0x01
    assert sealed[1] == 0
    assert len(sealed) == 2 + 12 + len(SECRET) + 16
    assert SECRET not in sealed
    assert r.open(KEY_ID, VID, TS, sealed) == SECRET
    assert r.seal(KEY_ID, VID, TS, b"") != r.seal(KEY_ID, VID, TS, b"")  # fresh nonce
    assert r.open(KEY_ID, VID, TS, r.seal(KEY_ID, VID, TS, b"")) == b""


def test_extreme_ids_and_times_round_trip() -> None:
    r = ring(0)
    for vid, ts in [(0, 0), (2**64 - 1, -(2**63)), (1, 2**63 - 1)]:
        assert r.open("k", vid, ts, r.seal("k", vid, ts, SECRET)) == SECRET
    with pytest.raises(ValueError):
        r.seal("k", 2**64, 0, SECRET)
    with pytest.raises(SealedDataError):
        r.open("k", -1, 0, r.seal("k", 0, 0, SECRET))


@pytest.mark.parametrize(
    ("key_id", "version_id", "ts"),
    [
        ("db:password2", VID, TS),
        ("db:passwor", VID, TS),
        (KEY_ID, VID + 1, TS),
        (KEY_ID, VID, TS + 1),
        (KEY_ID, VID, -TS),
    ],
)
def test_aad_binds_key_version_and_time(key_id: str, version_id: int, ts: int) -> None:
    r = ring(0)
    sealed = r.seal(KEY_ID, VID, TS, SECRET)
    with pytest.raises(SealedDataError) as info:
        r.open(key_id, version_id, ts, sealed)
    assert isinstance(info.value, InternalError)


def test_aad_binds_master_key_id() -> None:
    # Both ids map to the same key material, so only the AAD can tell the relabelling.
    r = MasterKeyring({0: K0, 1: K0})
    sealed = r.seal(KEY_ID, VID, TS, SECRET)
    assert sealed[1] == 1
    relabelled = sealed[:1] + b"\x00" + sealed[2:]
    with pytest.raises(SealedDataError):
        r.open(KEY_ID, VID, TS, relabelled)


def test_every_tampered_byte_is_detected() -> None:
    r = ring(0)
    sealed = r.seal(KEY_ID, VID, TS, SECRET)
    for i in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[i] ^= 0x01
        with pytest.raises(SealedDataError) as info:
            r.open(KEY_ID, VID, TS, bytes(tampered))
        assert "hunter2" not in str(info.value)


def test_truncated_and_extended_envelopes_fail() -> None:
    r = ring(0)
    sealed = r.seal(KEY_ID, VID, TS, SECRET)
    for n in range(len(sealed)):
        with pytest.raises(SealedDataError):
            r.open(KEY_ID, VID, TS, sealed[:n])
    with pytest.raises(SealedDataError):
        r.open(KEY_ID, VID, TS, sealed + b"\x00")


def test_unknown_master_key_and_format() -> None:
    sealed = ring(1).seal(KEY_ID, VID, TS, SECRET)
    with pytest.raises(SealedDataError, match="master key 1 is not in the keyring"):
        ring(0).open(KEY_ID, VID, TS, sealed)
    with pytest.raises(SealedDataError, match="unknown format 2"):
        ring(1).open(KEY_ID, VID, TS, b"\x02" + sealed[1:])


def test_rotation_newest_seals_any_opens() -> None:
    old = ring(0)
    sealed_old = old.seal(KEY_ID, VID, TS, SECRET)
    new = ring(0, 1, 7)
    assert new.current_id == 7
    assert new.ids == (0, 1, 7)
    assert new.open(KEY_ID, VID, TS, sealed_old) == SECRET
    assert MasterKeyring.sealed_key_id(sealed_old) == 0
    assert new.needs_rewrap(sealed_old)
    assert not old.needs_rewrap(sealed_old)
    sealed_new = new.seal(KEY_ID, VID, TS, SECRET)
    assert MasterKeyring.sealed_key_id(sealed_new) == 7
    assert not new.needs_rewrap(sealed_new)
    with pytest.raises(SealedDataError):
        new.needs_rewrap(b"short")


def test_repr_hides_key_material() -> None:
    r = ring(0, 255)
    text = repr(r) + str(r)
    assert text == "MasterKeyring(ids=[0, 255], current_id=255)" * 2
    for material in (K0, b"\xff" * 32):
        assert base64.b64encode(material).decode() not in text


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({}, "at least one key"),
        ({256: K0}, "outside 0-255"),
        ({-1: K0}, "outside 0-255"),
        ({0: K0[:16]}, "not 32 bytes"),
    ],
)
def test_constructor_validates(keys: dict[int, bytes], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MasterKeyring(keys)


# --- key file ------------------------------------------------------------------------------


def b64(material: bytes) -> str:
    return base64.b64encode(material).decode()


def write_key_file(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_generate_load_and_add(tmp_path: Path) -> None:
    path = tmp_path / "master.keys"
    generated = MasterKeyring.generate_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["master.keys"]
    loaded = MasterKeyring.load(path)
    assert loaded.ids == (0,)
    sealed = generated.seal(KEY_ID, VID, TS, SECRET)
    assert loaded.open(KEY_ID, VID, TS, sealed) == SECRET

    assert add_key_to_file(path) == 1
    assert add_key_to_file(path) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rotated = MasterKeyring.load(path)
    assert rotated.ids == (0, 1, 2)
    assert rotated.current_id == 2
    assert rotated.open(KEY_ID, VID, TS, sealed) == SECRET
    assert path.read_text().startswith("# knox_server master keys")
    assert [p.name for p in tmp_path.iterdir()] == ["master.keys"]


def test_generate_never_overwrites(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "master.keys", f"3:{b64(K1)}\n")
    with pytest.raises(KeyFileError, match="already exists"):
        MasterKeyring.generate_file(path)
    assert MasterKeyring.load(path).ids == (3,)
    assert [p.name for p in tmp_path.iterdir()] == ["master.keys"]


def test_add_key_keeps_comments_and_handles_missing_newline(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "k", f"# prod ring\n\n5:{b64(K0)}")
    assert add_key_to_file(path) == 6
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# prod ring", "", f"5:{b64(K0)}"]
    assert lines[3].startswith("6:")
    assert MasterKeyring.load(path).ids == (5, 6)


def test_add_key_after_255_is_refused(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "k", f"255:{b64(K0)}\n")
    with pytest.raises(KeyFileError, match="255, the last"):
        add_key_to_file(path)


def test_load_accepts_comments_blank_lines_and_spaces(tmp_path: Path) -> None:
    text = f"# ring\n\n  0:{b64(K0)}  \r\n# old\n1 : {b64(K1)}\n"
    r = MasterKeyring.load(write_key_file(tmp_path / "k", text))
    assert r.ids == (0, 1)
    assert r.open("k", 1, 2, MasterKeyring({1: K1}).seal("k", 1, 2, SECRET)) == SECRET


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"0{b64(K0)}\n", "line 1: expected '<id>:<base64 key>'"),
        (f"# c\n256:{b64(K0)}\n", "line 2: key id must be an integer from 0 to 255"),
        (f"-1:{b64(K0)}\n", "line 1: key id must be an integer"),
        (f"x:{b64(K0)}\n", "line 1: key id must be an integer"),
        (f"0:{b64(K0)}\n0:{b64(K1)}\n", "line 2: duplicate key id 0"),
        (f"0:{b64(K0)[:-2]}!!\n", "line 1: key is not valid base64"),
        (f"0:{b64(K0)[:-1]}\n", "line 1: key is not valid base64"),
        (f"0:{b64(K0)[:-4]}\n", "line 1: key is 30 bytes, expected 32"),
        (f"0:{b64(K0[:16])}\n", "line 1: key is 16 bytes, expected 32"),
        (f"0:{b64(K0 + b'xx')}\n", "line 1: key is 34 bytes, expected 32"),
        ("# nothing\n\n", "holds no key"),
        ("", "holds no key"),
        ("0:\u00e9\n", "not ASCII text"),
    ],
)
def test_load_rejects_bad_files_without_leaking_keys(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write_key_file(tmp_path / "k", text)
    with pytest.raises(KeyFileError, match=message) as info:
        MasterKeyring.load(path)
    assert str(path) in str(info.value)
    for material in (K0, K1):
        assert b64(material)[:8] not in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = write_key_file(tmp_path / "k", f"0:{b64(K0)}\n", mode)
    with pytest.raises(KeyFileError, match=f"mode {mode:04o}") as info:
        MasterKeyring.load(path)
    assert b64(K0)[:8] not in str(info.value)
    with pytest.raises(KeyFileError, match="mode"):
        add_key_to_file(path)


def test_load_checks_the_file_itself(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="cannot open"):
        MasterKeyring.load(tmp_path / "missing")
    with pytest.raises(KeyFileError, match="not a regular file"):
        MasterKeyring.load(tmp_path)
    real = write_key_file(tmp_path / "real", f"0:{b64(K0)}\n")
    link = tmp_path / "link"
    os.symlink(real, link)
    assert MasterKeyring.load(link).ids == (0,)  # as Kubernetes secret volumes lay files out
    real.chmod(0o644)
    with pytest.raises(KeyFileError, match="mode 0644"):
        MasterKeyring.load(link)


def test_load_refuses_huge_file(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "k", "#" * 70_000 + "\n")
    with pytest.raises(KeyFileError, match="larger than"):
        MasterKeyring.load(path)
