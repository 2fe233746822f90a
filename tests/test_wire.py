"""knox.wire against the bytes the Go server emits, and against malformed input."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knox import wire
from knox.errors import Code, KeyNotFoundError, error_for_code
from knox.model import (
    Access,
    AccessType,
    Key,
    KeyVersion,
    PrincipalType,
    VersionStatus,
    version_hash,
)
from knox.wire import WireError

PRI, ACT, INA = VersionStatus.PRIMARY, VersionStatus.ACTIVE, VersionStatus.INACTIVE
HASH_1P = "7c9fa136d4413fa6173637e883b6998d32e1d675f88cddff9dcbcf331820f4b8"
HASH_1P_2A = "0c730b69905c5ef7a4ca5269f72365400bde2dd2c04eaf9bbb3d1c4a265a0131"

KEY_JSON = (
    '{"id":"test_key","acl":[],"versions":[{"id":1,"data":"c2VjcmV0","status":"Primary",'
    f'"ts":10}}],"hash":"{HASH_1P}"}}'
)
KEY = Key(
    id="test_key",
    acl=(),
    versions=(KeyVersion(id=1, data=b"secret", status=PRI, ts=10),),
    hash=HASH_1P,
)


def version_json(vid: int | str = 1, data: str = '"c2VjcmV0"', status: str = '"Primary"') -> str:
    return f'{{"id":{vid},"data":{data},"status":{status},"ts":10}}'


def key_json(
    *, versions: str | None = None, acl: str = "[]", key_id: str = '"k"', extra: str = ""
) -> str:
    versions = versions if versions is not None else f"[{version_json()}]"
    return f'{{"id":{key_id},"acl":{acl},"versions":{versions},"hash":"{HASH_1P}"{extra}}}'


def vkey(vid: int | str = 1, data: str = '"c2VjcmV0"', status: str = '"Primary"') -> str:
    """A key holding one version built by :func:`version_json`."""
    return key_json(versions=f"[{version_json(vid, data, status)}]")


# --- literal round trips --------------------------------------------------------------------


def test_key_round_trip_with_go_bytes() -> None:
    assert wire.decode_key(KEY_JSON) == KEY
    assert wire.decode_key(KEY_JSON.encode()) == KEY
    assert wire.encode_key(KEY) == KEY_JSON.encode()
    KEY.validate()


def test_full_key_round_trip() -> None:
    text = (
        '{"id":"tink:aead:svc","acl":[{"type":"User","id":"alice","access":"Admin"},'
        '{"type":"UserGroup","id":"security-team","access":"Admin"},'
        '{"type":"MachinePrefix","id":"web","access":"Read"},'
        '{"type":"ServicePrefix","id":"spiffe://d/a/","access":"Write"}],'
        '"versions":[{"id":1,"data":"AAEC/w==","status":"Primary","ts":1700000000000000000},'
        '{"id":2,"data":"","status":"Active","ts":-5}],'
        f'"hash":"{HASH_1P_2A}","path":"/var/lib/knox/v0/keys/tink:aead:svc",'
        '"tinkKeyset":"a2V5c2V0"}'
    )
    key = wire.decode_key(text)
    assert key.acl[0] == Access(PrincipalType.USER, "alice", AccessType.ADMIN)
    assert key.acl[3] == Access(PrincipalType.SERVICE_PREFIX, "spiffe://d/a/", AccessType.WRITE)
    assert key.versions[0].data == b"\x00\x01\x02\xff"
    assert key.versions[1] == KeyVersion(id=2, data=b"", status=ACT, ts=-5)
    assert key.path == "/var/lib/knox/v0/keys/tink:aead:svc"
    assert key.tink_keyset == "a2V5c2V0"
    assert wire.encode_key(key) == text.encode()
    key.validate()


def test_acl_null_decodes_as_empty() -> None:
    key = wire.decode_key(key_json(acl="null"))
    assert key.acl == ()
    assert wire.decode_acl("null") == ()
    assert b'"acl":[]' in wire.encode_key(key)


@pytest.mark.parametrize("data", ["null", '""'])
def test_absent_data_decodes_as_empty_bytes(data: str) -> None:
    key = wire.decode_key(vkey(data=data))
    assert key.versions[0].data == b""


def test_missing_data_and_ts_decode_as_zero_values() -> None:
    key = wire.decode_key(key_json(versions='[{"id":1,"status":"Primary"}]'))
    assert key.versions[0] == KeyVersion(id=1, data=b"", status=PRI, ts=0)


@pytest.mark.parametrize("vid", [0, 2**63 - 1, 2**64 - 1])
def test_large_version_ids_are_exact(vid: int) -> None:
    text = vkey(vid)
    key = wire.decode_key(text)
    assert key.versions[0].id == vid
    assert f'"id":{vid},'.encode() in wire.encode_key(key)
    assert wire.version_id_from_obj(json.loads(str(vid))) == vid


@pytest.mark.parametrize("vid", [-1, 2**64])
def test_out_of_range_version_ids_are_refused_on_encode(vid: int) -> None:
    key = Key(id="k", acl=(), versions=(KeyVersion(vid, b"", PRI, 0),), hash="")
    with pytest.raises(WireError, match="version id"):
        wire.encode_key(key)


def test_unknown_principal_type_decodes_and_is_refused_on_encode() -> None:
    acl_text = '[{"type":"Team","id":"x","access":"Read"}]'
    acl = wire.decode_acl(acl_text)
    assert acl == (Access(PrincipalType.UNKNOWN, "x", AccessType.READ),)
    key = wire.decode_key(key_json(acl=acl_text))
    with pytest.raises(WireError, match=r"^json: Invalid PrincipalType to convert$"):
        wire.encode_acl(acl)
    with pytest.raises(WireError, match=r"^json: Invalid PrincipalType to convert$"):
        wire.encode_key(key)


def test_access_and_acl_helpers() -> None:
    entry = Access(PrincipalType.MACHINE, "h1", AccessType.NONE)
    text = '{"type":"Machine","id":"h1","access":"None"}'
    assert wire.decode_access(text) == entry
    assert wire.dumps(wire.access_to_obj(entry)) == text.encode()
    assert wire.encode_acl((entry,)) == f"[{text}]".encode()
    assert wire.acl_from_obj(wire.acl_to_obj((entry,))) == (entry,)


def test_decode_status() -> None:
    assert wire.decode_status(json.loads('"Primary"')) is PRI
    assert wire.decode_status("Active") is ACT
    assert wire.decode_status("Inactive") is INA
    for bad in ["primary", "Primary ", "", None, 0, ["Active"]]:
        with pytest.raises(WireError, match=r"^json: Invalid VersionStatus to convert$"):
            wire.decode_status(bad)


# --- encoding details -----------------------------------------------------------------------


def test_html_characters_are_escaped_like_go() -> None:
    assert wire.dumps("<a>&b") == b'"\\u003ca\\u003e\\u0026b"'
    assert wire.dumps("\u2028\u2029") == b'"\\u2028\\u2029"'


def test_non_ascii_stays_utf8() -> None:
    assert wire.dumps("h\u00e9llo \u2603 \U0001f511") == '"h\u00e9llo \u2603 \U0001f511"'.encode()


def test_control_characters_escaped_like_go() -> None:
    # Go >= 1.22 writes \b and \f short; others as lowercase \u00XX.
    assert wire.dumps('\x00\x1f\n\r\t\b\f"\\') == b'"\\u0000\\u001f\\n\\r\\t\\b\\f\\"\\\\"'


def test_lone_surrogate_becomes_replacement_character() -> None:
    assert wire.dumps("a\ud800b") == '"a\ufffdb"'.encode()


def test_dumps_refuses_nan() -> None:
    with pytest.raises(ValueError):
        wire.dumps(float("nan"))


# --- envelopes ------------------------------------------------------------------------------


def test_ok_envelope_bytes() -> None:
    assert (
        wire.ok_envelope(None, host="h", ts=1)
        == b'{"status":"ok","code":0,"host":"h","ts":1,"message":"","data":null}\n'
    )
    assert (
        wire.ok_envelope(["a", "b"], host="h", ts=1)
        == b'{"status":"ok","code":0,"host":"h","ts":1,"message":"","data":["a","b"]}\n'
    )
    assert wire.ok_envelope(2**63 - 1, host="h", ts=1).endswith(b'"data":9223372036854775807}\n')


def test_key_envelope_bytes() -> None:
    expected = (
        '{"status":"ok","code":0,"host":"knox1","ts":1700000000123456789,"message":"",'
        f'"data":{KEY_JSON}}}\n'
    ).encode()
    assert wire.ok_envelope(wire.key_to_obj(KEY), host="knox1", ts=1700000000123456789) == expected
    raw = wire.envelope(
        status="ok",
        code=0,
        host="knox1",
        ts=1700000000123456789,
        message="",
        data_json=wire.encode_key(KEY),
    )
    assert raw == expected
    response = wire.decode_response(raw)
    assert response.ok
    assert wire.key_from_obj(response.data) == KEY


def test_error_envelope_bytes_and_decoding() -> None:
    raw = wire.error_envelope(4, "No such key <foo> & bar", host="h", ts=1)
    assert raw == (
        b'{"status":"error","code":4,"host":"h","ts":1,'
        b'"message":"No such key \\u003cfoo\\u003e \\u0026 bar","data":null}\n'
    )
    response = wire.decode_response(raw)
    assert response == wire.Response(
        status="error", code=4, host="h", ts=1, message="No such key <foo> & bar", data=None
    )
    assert not response.ok
    error = error_for_code(response.code, response.message)
    assert isinstance(error, KeyNotFoundError)
    assert error.code == Code.KEY_IDENTIFIER_DOES_NOT_EXIST


def test_decode_response_from_go_text() -> None:
    text = (
        '{"status":"ok","code":0,"host":"h\u00e9","ts":1700000000123456789,"message":"",'
        '"data":18446744073709551615}\n'
    )
    response = wire.decode_response(text.encode())
    assert response.host == "h\u00e9"
    assert response.ts == 1700000000123456789
    assert wire.version_id_from_obj(response.data) == 2**64 - 1


def test_key_ids_from_obj() -> None:
    response = wire.decode_response('{"status":"ok","code":0,"data":["a","b:c"]}')
    assert wire.key_ids_from_obj(response.data) == ["a", "b:c"]
    assert wire.key_ids_from_obj(None) == []
    with pytest.raises(WireError, match=r"^data\[1\]: expected a string$"):
        wire.key_ids_from_obj(["a", 1])
    with pytest.raises(WireError, match=r"^data: expected an array$"):
        wire.key_ids_from_obj("a")


@pytest.mark.parametrize("value", [-1, 2**64, True, 1.0, "1", None])
def test_version_id_from_obj_rejects(value: Any) -> None:
    with pytest.raises(WireError, match=r"^data: expected an integer"):
        wire.version_id_from_obj(value)


# --- malformed input ------------------------------------------------------------------------

V0 = "key.versions[0]"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "invalid JSON in key"),
        ("", "invalid JSON in key"),
        ("[]", "key: expected an object"),
        ("{}", "key: missing field 'versions'"),
        ('{"versions":[]}', "key: missing field 'id'"),
        (key_json(key_id="5"), "key.id: expected a string"),
        (key_json(versions="{}"), "key.versions: expected an array"),
        (key_json(versions="null"), "key.versions: expected an array"),
        (key_json(versions="[1]"), f"{V0}: expected an object"),
        (key_json(versions='[{"status":"Primary"}]'), f"{V0}: missing field 'id'"),
        (key_json(versions='[{"id":1}]'), f"{V0}: missing field 'status'"),
        (vkey(-1), f"{V0}.id: expected an integer"),
        (vkey(2**64), f"{V0}.id: expected an integer"),
        (vkey("true"), f"{V0}.id: expected an integer"),
        (vkey("1.0"), f"{V0}.id: expected an integer"),
        (vkey("1e3"), f"{V0}.id: expected an integer"),
        (vkey('"1"'), f"{V0}.id: expected an integer"),
        (vkey("NaN"), "invalid JSON in key"),
        (vkey("Infinity"), "invalid JSON in key"),
        (vkey(data='"!!!!"'), f"{V0}.data: invalid base64"),
        (vkey(data='"c2VjcmV"'), f"{V0}.data: invalid base64"),
        (
            vkey(data='"c2VjcmV0=="'),
            f"{V0}.data: invalid base64",
        ),
        (
            vkey(data='"c2Vj\\ncmV0"'),
            f"{V0}.data: invalid base64",
        ),
        (
            vkey(data='"c2VjcmV0\u00e9"'),
            f"{V0}.data: invalid base64",
        ),
        (vkey(data="5"), f"{V0}.data: expected a string"),
        (
            vkey(status='"primary"'),
            "json: Invalid VersionStatus to convert",
        ),
        (
            vkey(status="0"),
            "json: Invalid VersionStatus to convert",
        ),
        (
            key_json(versions=f'[{version_json()},{{"id":2,"status":"Active","ts":1.5}}]'),
            "key.versions[1].ts: expected an integer",
        ),
        (
            key_json(versions=f'[{{"id":2,"status":"Active","ts":{2**63}}}]'),
            f"{V0}.ts: expected an integer",
        ),
        ('{"id":"k","versions":[],"hash":null}', "key.hash: expected a string"),
        (key_json(acl="{}"), "key.acl: expected an array"),
        (key_json(acl='["User"]'), "key.acl[0]: expected an object"),
        (
            key_json(acl='[{"type":"User","id":"a","access":"Owner"}]'),
            "json: Invalid AccessType to convert",
        ),
        (
            key_json(acl='[{"type":"User","id":"a","access":3}]'),
            "json: Invalid AccessType to convert",
        ),
        (key_json(acl='[{"type":5,"id":"a","access":"Read"}]'), "key.acl[0].type: expected a"),
        (key_json(acl='[{"id":"a","access":"Read"}]'), "key.acl[0]: missing field 'type'"),
        (key_json(acl='[{"type":"User","access":"Read"}]'), "key.acl[0]: missing field 'id'"),
        (key_json(acl='[{"type":"User","id":"a"}]'), "key.acl[0]: missing field 'access'"),
        (
            key_json(acl='[{"type":"User","id":null,"access":"Read"}]'),
            "key.acl[0].id: expected a string",
        ),
        (key_json(extra=',"path":1'), "key.path: expected a string"),
        (key_json(extra=',"tinkKeyset":[]'), "key.tinkKeyset: expected a string"),
        ("[" * 100_000, "invalid JSON in key"),
        (b"\xff\xfe{}", "invalid JSON in key"),
    ],
)
def test_malformed_key_names_the_field(text: str | bytes, message: str) -> None:
    with pytest.raises(WireError) as info:
        wire.decode_key(text)
    assert str(info.value).startswith(message)
    assert info.value.code == Code.BAD_REQUEST_DATA


def test_invalid_base64_error_does_not_echo_the_data() -> None:
    with pytest.raises(WireError) as info:
        wire.decode_key(vkey(data='"c2VjcmV0X!!"'))
    assert "c2Vj" not in str(info.value)
    assert "c2Vj" not in repr(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x", "invalid JSON in response"),
        ("[]", "response: expected an object"),
        ('{"code":0}', "response: missing field 'status'"),
        ('{"status":"ok"}', "response: missing field 'code'"),
        ('{"status":1,"code":0}', "response.status: expected a string"),
        ('{"status":"ok","code":"0"}', "response.code: expected an integer"),
        ('{"status":"ok","code":-1}', "response.code: expected an integer"),
        ('{"status":"ok","code":false}', "response.code: expected an integer"),
        ('{"status":"ok","code":0,"host":1}', "response.host: expected a string"),
        ('{"status":"ok","code":0,"ts":"1"}', "response.ts: expected an integer"),
        ('{"status":"ok","code":0,"ts":9223372036854775808}', "response.ts: expected an integer"),
        ('{"status":"ok","code":0,"message":null}', "response.message: expected a string"),
        ('{"status":"ok","code":0,"data":NaN}', "invalid JSON in response"),
        ('{"status":"ok","code":0,"data":-Infinity}', "invalid JSON in response"),
        ('{"status":"ok","code":0,"data":1e400}', "invalid JSON in response"),
        ('{"status":"ok","code":0,"data":' + "9" * 5000 + "}", "invalid JSON in response"),
    ],
)
def test_malformed_response_names_the_field(text: str, message: str) -> None:
    with pytest.raises(WireError) as info:
        wire.decode_response(text)
    assert str(info.value).startswith(message)


# --- arbitrary input: a value or WireError, nothing else ------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=8,
)


def near(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Either a plausible value or an arbitrary JSON value, to reach the deeper checks."""
    return valid | json_values


accesses = st.fixed_dictionaries(
    {
        "type": near(st.sampled_from([t.value for t in PrincipalType] + ["Team"])),
        "id": near(st.text(max_size=8)),
        "access": near(st.sampled_from([a.value for a in AccessType])),
    }
)
versions = st.fixed_dictionaries(
    {
        "id": near(st.integers(-1, 2**64)),
        "status": near(st.sampled_from(["Primary", "Active", "Inactive", "Deleted"])),
    },
    optional={
        "data": near(st.sampled_from(["", "c2VjcmV0", "YQ==", "YQ", "====", "c2VjcmV0=="])),
        "ts": near(st.integers(-(2**63) - 1, 2**63)),
    },
)
keys = st.fixed_dictionaries(
    {
        "id": near(st.text(max_size=8)),
        "versions": near(st.lists(near(versions), max_size=3)),
        "hash": near(st.text(max_size=8)),
    },
    optional={
        "acl": near(st.lists(near(accesses), max_size=3)),
        "path": near(st.text(max_size=8)),
        "tinkKeyset": near(st.text(max_size=8)),
    },
)
responses = st.fixed_dictionaries(
    {
        "status": near(st.sampled_from(["ok", "error"])),
        "code": near(st.integers(-1, 2**31 + 1)),
    },
    optional={
        "host": near(st.text(max_size=8)),
        "ts": near(st.integers(-(2**63) - 1, 2**63)),
        "message": near(st.text(max_size=8)),
        "data": json_values,
    },
)


@settings(max_examples=120, deadline=None)
@given(near(keys))
def test_key_from_arbitrary_json(value: Any) -> None:
    try:
        key = wire.key_from_obj(value)
    except WireError:
        return
    assert isinstance(key, Key)
    try:
        encoded = wire.encode_key(key)
    except WireError:
        assert any(a.type is PrincipalType.UNKNOWN for a in key.acl)
        return
    assert wire.decode_key(encoded) == key


@settings(max_examples=80, deadline=None)
@given(near(accesses))
def test_access_from_arbitrary_json(value: Any) -> None:
    try:
        entry = wire.access_from_obj(value)
    except WireError:
        return
    assert isinstance(entry, Access)


@settings(max_examples=80, deadline=None)
@given(near(responses))
def test_response_from_arbitrary_json(value: Any) -> None:
    try:
        response = wire.decode_response(wire.dumps(value))
    except WireError:
        return
    assert isinstance(response, wire.Response)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_arbitrary_bytes_give_a_value_or_wire_error(raw: bytes | str) -> None:
    for decode in (wire.decode_key, wire.decode_response, wire.decode_access, wire.decode_acl):
        with contextlib.suppress(WireError):
            decode(raw)


key_ids = st.text(alphabet="abcXYZ019_:", min_size=1, max_size=16)
principal_ids = st.text(max_size=16)
version_values = st.builds(
    KeyVersion,
    id=st.integers(0, 2**64 - 1),
    data=st.binary(max_size=32),
    status=st.sampled_from(list(VersionStatus)),
    ts=st.integers(-(2**63), 2**63 - 1),
)
known_types = st.sampled_from([t for t in PrincipalType if t is not PrincipalType.UNKNOWN])


@settings(max_examples=80, deadline=None)
@given(
    key_ids,
    st.lists(st.builds(Access, known_types, principal_ids, st.sampled_from(list(AccessType)))),
    st.lists(version_values, max_size=4),
    st.text(alphabet="/abc", max_size=8),
)
def test_encode_decode_round_trip(
    key_id: str, acl: list[Access], version_list: list[KeyVersion], path: str
) -> None:
    key = Key(
        id=key_id,
        acl=tuple(acl),
        versions=tuple(version_list),
        hash=version_hash(version_list),
        path=path,
    )
    encoded = wire.encode_key(key)
    assert wire.decode_key(encoded) == key
    assert json.loads(encoded) == wire.key_to_obj(key)
