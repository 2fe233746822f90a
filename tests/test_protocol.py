"""The knoxd socket protocol: framing, limits, messages, and the spliced get fast path."""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knox import protocol as p
from knox.model import InvalidKeyError, Key, KeyVersion, VersionStatus, version_hash

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SECRET = b"TOPSECRET-\x00\xff-DATA"
SECRET_TEXT = "TOPSECRET-text"


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def pack(obj: Any) -> bytes:
    return bytes(msgpack.packb(obj, use_bin_type=True))


def decode_one(data: bytes) -> dict[str, Any]:
    decoder = p.FrameDecoder()
    decoder.feed(data)
    msg = decoder.next_message()
    assert msg is not None
    decoder.feed(b"")
    assert decoder.next_message() is None
    return msg


def protocol_error(data: bytes) -> p.ProtocolError:
    decoder = p.FrameDecoder()
    decoder.feed(data)
    with pytest.raises(p.ProtocolError) as info:
        decoder.next_message()
    return info.value


def version(vid: int, status: VersionStatus, data: bytes = SECRET, ts: int = 1) -> KeyVersion:
    return KeyVersion(vid, data, status, ts)


def make_key(*versions: KeyVersion, key_id: str = "db:pw") -> Key:
    return Key(key_id, (), versions, version_hash(versions))


KEY = make_key(
    version(5, VersionStatus.ACTIVE, b"old", 10),
    version(9, VersionStatus.INACTIVE, b"gone", 5),
    version(7, VersionStatus.PRIMARY, SECRET, 20),
    version(3, VersionStatus.ACTIVE, b"older", 1),
)
# What a client sees of KEY: no ACL, Primary first, then the Actives in order, no Inactive.
CLIENT_KEY = Key(
    "db:pw",
    (),
    (
        version(7, VersionStatus.PRIMARY, SECRET, 20),
        version(5, VersionStatus.ACTIVE, b"old", 10),
        version(3, VersionStatus.ACTIVE, b"older", 1),
    ),
    KEY.hash,
)


# --- error codes --------------------------------------------------------------------------------

RETRY_TABLE = {
    "protocol": False,
    "version": False,
    "bad_request": False,
    "unauthorized": False,
    "forbidden": False,
    "not_found": False,
    "not_registered": False,
    "not_ready": True,
    "stale": True,
    "upstream_unavailable": True,
    "busy": True,
    "internal": True,
}


def test_error_codes_and_retry_flags_are_the_table() -> None:
    assert {code.value: code.retry for code in p.ErrorCode} == RETRY_TABLE


@pytest.mark.parametrize("code", list(p.ErrorCode))
def test_error_frame_carries_code_message_and_retry(code: p.ErrorCode) -> None:
    msg = decode_one(p.encode_frame(p.error(17, code, "what happened")))
    assert msg == {
        "id": 17,
        "ok": False,
        "error": {"code": code.value, "message": "what happened", "retry": RETRY_TABLE[code]},
    }
    assert p.parse_response(msg) == p.ErrorReply(17, code, "what happened", RETRY_TABLE[code])


def test_connection_error_frame_has_null_id() -> None:
    msg = decode_one(p.encode_frame(p.error(None, p.ErrorCode.PROTOCOL, "bad frame")))
    assert msg["id"] is None
    assert p.parse_response(msg) == p.ErrorReply(None, p.ErrorCode.PROTOCOL, "bad frame", False)


def test_overlong_error_message_is_cut_to_fit_a_frame() -> None:
    msg = decode_one(p.encode_frame(p.error(1, p.ErrorCode.INTERNAL, "é" * 5000)))
    text = msg["error"]["message"]
    assert text == "é" * (p.MAX_STR_LEN // 2)
    assert len(text.encode()) == p.MAX_STR_LEN


# --- hello --------------------------------------------------------------------------------------


def test_hello_round_trip() -> None:
    msg = decode_one(p.encode_frame(p.client_hello()))
    assert msg == {"op": "hello", "magic": "knoxd", "v": 1}
    assert p.parse_hello(msg) == p.Hello(1, "knoxd")


def test_hello_ignores_extra_fields() -> None:
    assert p.parse_hello({**p.client_hello(), "client": "knox-go/2"}) == p.Hello(1, "knoxd")


def test_hello_reply_round_trip() -> None:
    reply = p.hello_reply("knoxd/0.1.0", 1001, 1002, "web.service", "web")
    msg = decode_one(p.encode_frame(reply))
    assert msg == {
        "op": "hello",
        "magic": "knoxd",
        "v": 1,
        "server": "knoxd/0.1.0",
        "peer": {"uid": 1001, "gid": 1002, "unit": "web.service"},
        "identity": "web",
    }
    assert p.parse_hello_reply(msg) == p.HelloReply("knoxd/0.1.0", 1001, 1002, "web.service", "web")
    anonymous = p.parse_hello_reply(p.hello_reply("knoxd/0.1.0", 0, 0, None, None))
    assert anonymous == p.HelloReply("knoxd/0.1.0", 0, 0, None, None)


def test_hello_reply_may_be_an_error_frame() -> None:
    msg = p.error(None, p.ErrorCode.VERSION, "protocol version 2 is not spoken here")
    reply = p.parse_hello_reply(msg)
    assert isinstance(reply, p.ErrorReply)
    assert reply.code is p.ErrorCode.VERSION


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        ({"id": 1, "op": "get", "key": "a"}, "the first frame must be a hello, not op 'get'"),
        ({"magic": "knoxd", "v": 1}, "the first frame must be a hello, not a frame without an op"),
        ({"op": "hello", "v": 1}, "wrong magic"),
        ({"op": "hello", "magic": "KNOXD", "v": 1}, "wrong magic"),
        ({"op": "hello", "magic": "knoxd"}, "hello 'v' must be an int, not nil"),
        ({"op": "hello", "magic": "knoxd", "v": "1"}, "hello 'v' must be an int, not str"),
    ],
)
def test_bad_hello_is_a_protocol_error(msg: dict[str, Any], text: str) -> None:
    with pytest.raises(p.ProtocolError, match=text) as info:
        p.parse_hello(msg)
    assert info.value.code is p.ErrorCode.PROTOCOL


def test_hello_in_another_version_gets_code_version() -> None:
    with pytest.raises(p.ProtocolError, match="protocol version 2 is not spoken") as info:
        p.parse_hello({"op": "hello", "magic": "knoxd", "v": 2})
    assert info.value.code is p.ErrorCode.VERSION
    with pytest.raises(p.ProtocolError, match="speaks protocol version 3") as info:
        p.parse_hello_reply({**p.hello_reply("knoxd/9", 0, 0, None, None), "v": 3})
    assert info.value.code is p.ErrorCode.VERSION


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"op": "get"}, "not a knoxd hello"),
        ({"magic": "other"}, "not a knoxd hello"),
        ({"server": 1}, "hello 'server' must be a str, not int"),
        ({"peer": None}, "hello 'peer' must be a map, not nil"),
        ({"peer": {"uid": -1, "gid": 0, "unit": None}}, "hello 'peer.uid' must be in"),
        ({"peer": {"uid": 0, "gid": "0", "unit": None}}, "hello 'peer.gid' must be an int"),
        ({"peer": {"uid": 0, "gid": 0, "unit": 5}}, "hello 'peer.unit' must be a str"),
        ({"identity": b"web"}, "hello 'identity' must be a str, not bin"),
    ],
)
def test_malformed_hello_reply(change: dict[str, Any], text: str) -> None:
    msg = {**p.hello_reply("knoxd/1", 1, 1, None, "web"), **change}
    with pytest.raises(p.ProtocolError, match=text):
        p.parse_hello_reply(msg)


# --- requests -----------------------------------------------------------------------------------

REQUESTS: list[p.Request] = [
    p.Get(0, "db:pw"),
    p.Get(p.MAX_UINT32, "a_b:c", version=p.MAX_UINT64, wait_ms=p.MAX_WAIT_MS, identity="web"),
    p.Get(7, "k", version=0, wait_ms=0),
    p.Register(1, ("a", "b:c")),
    p.Register(2, ("a",), identity="web"),
    p.Unregister(3, ("a",)),
    p.Watch(4, ("a", "b")),
    p.Unwatch(5, ("b",), identity="host"),
    p.Ping(6),
    p.Ping(6, identity="web"),
]
ADMIN_REQUESTS: list[p.Request] = [
    p.Status(10),
    p.List(11),
    p.List(12, identity="web"),
    p.Refresh(13),
    p.Refresh(14, keys=("a", "b"), identity="web"),
    p.Register(15, ("a",), identity="web"),
    p.Unregister(16, ("a",), identity="web"),
    p.Get(17, "a"),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=repr)
def test_request_round_trip(request_: p.Request) -> None:
    msg = decode_one(p.encode_frame(p.request_obj(request_)))
    assert msg["id"] == request_.id
    assert msg["op"] == request_.op
    assert p.parse_request(msg) == request_


@pytest.mark.parametrize("request_", ADMIN_REQUESTS, ids=repr)
def test_admin_request_round_trip(request_: p.Request) -> None:
    msg = decode_one(p.encode_frame(p.request_obj(request_)))
    assert p.parse_request(msg, admin=True) == request_


def test_request_obj_leaves_absent_arguments_out() -> None:
    assert p.request_obj(p.Get(3, "db:pw")) == {"id": 3, "op": "get", "key": "db:pw"}
    assert p.request_obj(p.Refresh(4, keys=("a",))) == {"id": 4, "op": "refresh", "keys": ["a"]}


def test_nil_arguments_count_as_absent() -> None:
    msg = {"id": 1, "op": "get", "key": "a", "version": None, "wait_ms": None, "identity": None}
    assert p.parse_request(msg) == p.Get(1, "a")
    assert p.parse_request({"id": 2, "op": "refresh", "keys": None}, admin=True) == p.Refresh(2)


def test_repeated_keys_count_once_in_order() -> None:
    msg = {"id": 1, "op": "watch", "keys": ["b", "a", "b", "c", "a"]}
    assert p.parse_request(msg) == p.Watch(1, ("b", "a", "c"))


def test_maximum_number_of_keys_is_accepted() -> None:
    keys = [f"k{i}" for i in range(p.MAX_ARRAY_LEN)]
    request_ = p.parse_request({"id": 1, "op": "register", "keys": keys})
    assert isinstance(request_, p.Register)
    assert len(request_.keys) == p.MAX_ARRAY_LEN


BAD_REQUESTS: list[tuple[dict[str, Any], int | None, str]] = [
    ({"op": "ping"}, None, "'id' is required"),
    ({"id": "1", "op": "ping"}, None, "'id' must be an int in 0..4294967295"),
    ({"id": -1, "op": "ping"}, None, "'id' must be an int in 0..4294967295"),
    ({"id": 2**32, "op": "ping"}, None, "'id' must be an int in 0..4294967295"),
    ({"id": True, "op": "ping"}, None, "'id' must be an int"),
    ({"id": 1.0, "op": "ping"}, None, "'id' must be an int"),
    ({"id": 1}, 1, "'op' is required"),
    ({"id": 1, "op": 3}, 1, "'op' must be a str, not int"),
    ({"id": 1, "op": "get_key"}, 1, "unknown op 'get_key'"),
    ({"id": 1, "op": "x" * 100}, 1, "unknown op 'xxxx"),
    ({"id": 1, "op": "hello", "magic": "knoxd", "v": 1}, 1, "hello only once"),
    ({"op": "hello", "magic": "knoxd", "v": 1}, None, "hello only once"),
    ({"id": 1, "op": "status"}, 1, "op 'status' is served on the admin socket only"),
    ({"id": 1, "op": "list"}, 1, "admin socket only"),
    ({"id": 1, "op": "refresh"}, 1, "admin socket only"),
    ({"id": 1, "op": "get", "key": "a", "wait": 5}, 1, "op 'get' takes no argument 'wait'"),
    ({"id": 1, "op": "ping", "v": 1}, 1, "op 'ping' takes no argument 'v'"),
    ({"id": 1, "op": "get"}, 1, "'key' is required"),
    ({"id": 1, "op": "get", "key": 5}, 1, "'key' must be a str, not int"),
    ({"id": 1, "op": "get", "key": b"a"}, 1, "'key' must be a str, not bin"),
    ({"id": 1, "op": "get", "key": ""}, 1, "'key' '' is not a key id"),
    ({"id": 1, "op": "get", "key": "db/pw"}, 1, "'key' 'db/pw' is not a key id"),
    ({"id": 1, "op": "get", "key": "a" * 513}, 1, "is not a key id"),
    ({"id": 1, "op": "get", "key": "a", "version": "7"}, 1, "'version' must be an int, not str"),
    ({"id": 1, "op": "get", "key": "a", "version": -1}, 1, "'version' must be in 0.."),
    ({"id": 1, "op": "get", "key": "a", "wait_ms": 30_001}, 1, "'wait_ms' must be in 0..30000"),
    ({"id": 1, "op": "get", "key": "a", "wait_ms": -1}, 1, "'wait_ms' must be in 0..30000"),
    ({"id": 1, "op": "get", "key": "a", "wait_ms": 1.5}, 1, "'wait_ms' must be an int, not float"),
    ({"id": 1, "op": "get", "key": "a", "wait_ms": False}, 1, "'wait_ms' must be an int, not bool"),
    ({"id": 1, "op": "get", "key": "a", "identity": 1}, 1, "'identity' must be a str, not int"),
    ({"id": 1, "op": "get", "key": "a", "identity": ""}, 1, "'identity' must not be empty"),
    ({"id": 9, "op": "register"}, 9, "'keys' is required"),
    ({"id": 9, "op": "register", "keys": "a"}, 9, "'keys' must be an array of key ids, not str"),
    ({"id": 9, "op": "watch", "keys": []}, 9, "'keys' must not be empty"),
    ({"id": 9, "op": "unwatch", "keys": ["a", 1]}, 9, "'keys\\[1\\]' must be a str, not int"),
    ({"id": 9, "op": "unregister", "keys": ["a", "b c"]}, 9, "'keys\\[1\\]' 'b c' is not a key"),
    (
        {"id": 9, "op": "register", "keys": [f"k{i}" for i in range(1025)]},
        9,
        "too many keys: 1025 \\(at most 1024\\)",
    ),
]


@pytest.mark.parametrize(("msg", "request_id", "text"), BAD_REQUESTS)
def test_bad_request(msg: dict[str, Any], request_id: int | None, text: str) -> None:
    with pytest.raises(p.BadRequest, match=text) as info:
        p.parse_request(msg)
    assert info.value.code is p.ErrorCode.BAD_REQUEST
    assert info.value.request_id == request_id
    assert info.value.message == str(info.value)


@pytest.mark.parametrize("op", ["register", "unregister"])
def test_admin_socket_requires_identity_for_registration(op: str) -> None:
    with pytest.raises(p.BadRequest, match="'identity' is required") as info:
        p.parse_request({"id": 4, "op": op, "keys": ["a"]}, admin=True)
    assert info.value.request_id == 4


def test_bad_request_from_a_decoded_frame_keeps_its_id() -> None:
    msg = decode_one(frame(pack({"id": 77, "op": "get", "key": "no spaces"})))
    with pytest.raises(p.BadRequest) as info:
        p.parse_request(msg)
    reply = p.error(info.value.request_id, info.value.code, info.value.message)
    assert decode_one(p.encode_frame(reply))["id"] == 77


# --- responses and events -----------------------------------------------------------------------


def test_ok_round_trip() -> None:
    msg = decode_one(p.encode_frame(p.ok(3, registered=["a", "b"])))
    assert msg == {"id": 3, "ok": True, "registered": ["a", "b"]}
    response = p.parse_response(msg)
    assert response == p.Ok(3, {"registered": ["a", "b"]})
    assert isinstance(response, p.Ok)
    assert p.keys_result(response, "registered") == ("a", "b")


def test_ping_response_has_no_results() -> None:
    assert p.parse_response(decode_one(p.encode_frame(p.ok(8)))) == p.Ok(8, {})


def test_ok_rejects_reserved_result_names() -> None:
    with pytest.raises(ValueError, match="not results"):
        p.ok(1, ok=False)
    with pytest.raises(ValueError, match="not results"):
        p.ok(1, id=2)


def test_cached_key_is_primary_then_actives_without_inactive() -> None:
    obj = p.cached_key_obj(KEY)
    assert obj == {
        "id": "db:pw",
        "hash": KEY.hash,
        "versions": [
            {"id": 7, "status": "Primary", "ts": 20, "data": SECRET},
            {"id": 5, "status": "Active", "ts": 10, "data": b"old"},
            {"id": 3, "status": "Active", "ts": 1, "data": b"older"},
        ],
    }
    # Secret data travels as msgpack bin, never str.
    assert b"\xc4" + bytes([len(SECRET)]) + SECRET in p.encode_cached_key(KEY)


def test_cached_key_needs_exactly_one_primary() -> None:
    no_primary = Key("a", (), (version(1, VersionStatus.ACTIVE),), "h")
    with pytest.raises(InvalidKeyError):
        p.cached_key_obj(no_primary)
    two = Key("a", (), (version(1, VersionStatus.PRIMARY), version(2, VersionStatus.PRIMARY)), "h")
    with pytest.raises(InvalidKeyError):
        p.encode_cached_key(two)


def test_get_response_round_trip() -> None:
    msg = decode_one(p.encode_frame(p.ok(4, key=p.cached_key_obj(KEY), age_ms=1500, stale=True)))
    response = p.parse_response(msg)
    assert isinstance(response, p.Ok)
    assert p.get_result(response) == p.GetResult(CLIENT_KEY, 1500, True)
    assert SECRET not in repr(response).encode()


def test_update_event_round_trip() -> None:
    msg = decode_one(p.encode_frame(p.update_event(KEY, 12, False)))
    assert msg["event"] == "update"
    assert "id" not in msg
    assert p.parse_response(msg) == p.UpdateEvent(CLIENT_KEY, 12, False)


@pytest.mark.parametrize("reason", list(p.RevokeReason))
def test_revoked_event_round_trip(reason: p.RevokeReason) -> None:
    msg = decode_one(p.encode_frame(p.revoked_event("db:pw", reason)))
    assert msg == {"event": "revoked", "key_id": "db:pw", "reason": reason.value}
    assert p.parse_response(msg) == p.RevokedEvent("db:pw", reason)


@pytest.mark.parametrize(
    ("msg", "text"),
    [
        ({"ok": True}, "response 'id' must be an int, not nil"),
        ({"id": -4, "ok": True}, "response 'id' must be in 0..4294967295"),
        ({"id": 1}, "must carry 'ok' \\(a bool\\) or 'event'"),
        ({"id": 1, "ok": 1}, "must carry 'ok'"),
        ({"id": 1, "ok": False}, "response 'error' must be a map, not nil"),
        ({"id": 1, "ok": False, "error": {"code": "nope", "message": "", "retry": False}}, "nope"),
        ({"id": 1, "ok": False, "error": {"code": "busy", "message": 3, "retry": True}}, "message"),
        ({"id": 1, "ok": False, "error": {"code": "busy", "message": "", "retry": 1}}, "retry"),
        ({"id": "1", "ok": False, "error": {"code": "busy", "message": "", "retry": True}}, "id"),
        ({"event": "created"}, "unknown event 'created'"),
        ({"event": 5}, "unknown event of type int"),
        ({"event": "revoked", "key_id": "a b", "reason": "deleted"}, "'key_id' 'a b' is not"),
        ({"event": "revoked", "key_id": "a", "reason": "expired"}, "'deleted' or 'forbidden'"),
        ({"event": "update", "age_ms": 1, "stale": False}, "event 'key' must be a map, not nil"),
        (
            {"event": "update", "key": p.cached_key_obj(KEY), "age_ms": -1, "stale": False},
            "event 'age_ms' must be in",
        ),
        (
            {"event": "update", "key": p.cached_key_obj(KEY), "age_ms": 1, "stale": None},
            "event 'stale' must be a bool, not nil",
        ),
    ],
)
def test_malformed_response(msg: dict[str, Any], text: str) -> None:
    with pytest.raises(p.ProtocolError, match=text):
        p.parse_response(msg)


def test_malformed_get_and_keys_results() -> None:
    good = p.cached_key_obj(KEY)
    with pytest.raises(p.ProtocolError, match="'age_ms' must be an int, not nil"):
        p.get_result(p.Ok(1, {"key": good, "stale": False}))
    with pytest.raises(p.ProtocolError, match="'stale' must be a bool"):
        p.get_result(p.Ok(1, {"key": good, "age_ms": 0, "stale": "no"}))
    with pytest.raises(p.ProtocolError, match="key must be a map, not nil"):
        p.get_result(p.Ok(1, {"age_ms": 0, "stale": False}))
    with pytest.raises(p.ProtocolError, match="'watching' must be an array, not nil"):
        p.keys_result(p.Ok(1, {}), "watching")
    with pytest.raises(p.ProtocolError, match="'watching\\[1\\]' must be a str"):
        p.keys_result(p.Ok(1, {"watching": ["a", 2]}), "watching")


def _cached(**changes: Any) -> dict[str, Any]:
    return {**p.cached_key_obj(KEY), **changes}


def _versions(*changes: dict[str, Any]) -> list[dict[str, Any]]:
    base = p.cached_key_obj(KEY)["versions"]
    return [{**v, **c} for v, c in zip(base, changes, strict=False)]


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        ([1], "key must be a map, not array"),
        (_cached(id=None), "key.id must be a str, not nil"),
        (_cached(id="no spaces"), "key.id 'no spaces' is not a key id"),
        (_cached(hash=b"ab"), "key.hash must be a str, not bin"),
        (_cached(versions=[]), "key.versions must be a non-empty array"),
        (_cached(versions={"id": 1}), "key.versions must be a non-empty array"),
        (_cached(versions=["x"]), "key.versions\\[0\\] must be a map, not str"),
        (_cached(versions=_versions({"status": "Active"})), "versions\\[0\\].status must be 'Pr"),
        (_cached(versions=_versions({}, {"status": "Primary"})), "\\[1\\].status must be 'Active'"),
        (_cached(versions=_versions({}, {"status": "Inactive"})), "\\[1\\].status must be 'Act"),
        (_cached(versions=_versions({}, {"status": 1})), "\\[1\\].status must be a str, not int"),
        (_cached(versions=_versions({"id": -1})), "key.versions\\[0\\].id must be in 0.."),
        (_cached(versions=_versions({"id": "7"})), "key.versions\\[0\\].id must be an int"),
        (_cached(versions=_versions({}, {"id": 7})), "\\[1\\].id repeats an earlier version's"),
        (_cached(versions=_versions({"ts": 2**63})), "key.versions\\[0\\].ts must be in"),
        (_cached(versions=_versions({"data": None})), "\\[0\\].data must be bin, not nil"),
        (_cached(versions=_versions({"data": SECRET_TEXT})), "\\[0\\].data must be bin, not str"),
    ],
)
def test_malformed_cached_key(obj: object, text: str) -> None:
    with pytest.raises(p.ProtocolError, match=text) as info:
        p.key_from_cached(obj)
    assert SECRET_TEXT not in str(info.value)


def test_cached_key_ignores_unknown_fields() -> None:
    obj = _cached(versions=_versions({"note": "x"}, {}, {}), extra=1)
    assert p.key_from_cached(obj) == CLIENT_KEY


# --- the get fast path --------------------------------------------------------------------------

BOUNDARY_UINTS = [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1]


@pytest.mark.parametrize("request_id", BOUNDARY_UINTS)
@pytest.mark.parametrize("age_ms", [*BOUNDARY_UINTS, 2**32, 2**64 - 1])
@pytest.mark.parametrize("stale", [False, True])
def test_spliced_get_ok_is_the_slow_path_byte_for_byte(
    request_id: int, age_ms: int, stale: bool
) -> None:
    fast = p.encode_get_ok(request_id, p.encode_cached_key(KEY), age_ms, stale)
    slow = p.encode_frame(p.ok(request_id, key=p.cached_key_obj(KEY), age_ms=age_ms, stale=stale))
    assert fast == slow
    response = p.parse_response(decode_one(fast))
    assert isinstance(response, p.Ok)
    assert p.get_result(response) == p.GetResult(CLIENT_KEY, age_ms, stale)


@pytest.mark.parametrize("age_ms", [0, 200, 70_000, 2**40])
@pytest.mark.parametrize("stale", [False, True])
def test_spliced_update_event_is_the_slow_path_byte_for_byte(age_ms: int, stale: bool) -> None:
    fast = p.encode_update_event(p.encode_cached_key(KEY), age_ms, stale)
    assert fast == p.encode_frame(p.update_event(KEY, age_ms, stale))
    assert p.parse_response(decode_one(fast)) == p.UpdateEvent(CLIENT_KEY, age_ms, stale)


@FAST
@given(
    request_id=st.integers(0, p.MAX_UINT32),
    age_ms=st.integers(0, p.MAX_UINT64),
    stale=st.booleans(),
    data=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    ts=st.integers(p.MIN_INT64, p.MAX_INT64),
)
def test_spliced_paths_equal_slow_paths(
    request_id: int, age_ms: int, stale: bool, data: list[bytes], ts: int
) -> None:
    statuses = [VersionStatus.PRIMARY] + [VersionStatus.ACTIVE] * (len(data) - 1)
    key = make_key(
        *(version(i + 1, s, d, ts) for i, (s, d) in enumerate(zip(statuses, data, strict=True)))
    )
    packed = p.encode_cached_key(key)
    slow_ok = p.ok(request_id, key=p.cached_key_obj(key), age_ms=age_ms, stale=stale)
    assert p.encode_get_ok(request_id, packed, age_ms, stale) == p.encode_frame(slow_ok)
    slow_event = p.update_event(key, age_ms, stale)
    assert p.encode_update_event(packed, age_ms, stale) == p.encode_frame(slow_event)


def test_spliced_paths_reject_numbers_msgpack_cannot_carry_unsigned() -> None:
    packed = p.encode_cached_key(KEY)
    with pytest.raises(ValueError, match="-5 is not in 0"):
        p.encode_get_ok(1, packed, -5, False)
    with pytest.raises(ValueError, match="is not in 0"):
        p.encode_get_ok(2**64, packed, 0, False)
    with pytest.raises(ValueError, match="-1 is not in 0"):
        p.encode_update_event(packed, -1, False)


def test_key_too_big_to_serve_is_refused_when_packed() -> None:
    big = p.MAX_BIN_LEN
    at_limit = make_key(version(1, VersionStatus.PRIMARY, b"x" * big))
    assert len(p.encode_cached_key(at_limit)) > big
    over = make_key(version(1, VersionStatus.PRIMARY, b"x" * (big + 1)))
    with pytest.raises(p.ProtocolError, match="bin of more than 262144 bytes"):
        p.encode_cached_key(over)
    too_many_bytes = make_key(
        version(1, VersionStatus.PRIMARY, b"x" * big),
        *(version(i, VersionStatus.ACTIVE, b"y" * big) for i in range(2, 5)),
    )
    with pytest.raises(p.ProtocolError, match=r"key 'db:pw' needs [0-9]+ bytes, more than a frame"):
        p.encode_cached_key(too_many_bytes)


# --- framing: round trips and chunking ----------------------------------------------------------

STREAM_MESSAGES: list[dict[str, Any]] = [
    p.client_hello(),
    *(p.request_obj(r) for r in REQUESTS),
    p.ok(1, key=p.cached_key_obj(KEY), age_ms=3, stale=False),
    p.error(None, p.ErrorCode.BUSY, "slow down"),
    p.revoked_event("db:pw", p.RevokeReason.DELETED),
]
STREAM = b"".join(p.encode_frame(m) for m in STREAM_MESSAGES)
EXPECTED = [decode_one(p.encode_frame(m)) for m in STREAM_MESSAGES]


def drain(decoder: p.FrameDecoder) -> list[dict[str, Any]]:
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def test_decoder_fed_byte_by_byte() -> None:
    decoder = p.FrameDecoder()
    got: list[dict[str, Any]] = []
    for index in range(len(STREAM)):
        decoder.feed(STREAM[index : index + 1])
        got.extend(drain(decoder))
    decoder.feed(b"")
    assert decoder.next_message() is None
    assert got == EXPECTED


def test_decoder_takes_many_frames_in_one_feed() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(STREAM)
    assert drain(decoder) == EXPECTED


@FAST
@given(st.lists(st.integers(1, 200), max_size=60))
def test_decoder_any_chunking(cuts: list[int]) -> None:
    decoder = p.FrameDecoder()
    got: list[dict[str, Any]] = []
    position = 0
    for size in cuts:
        decoder.feed(STREAM[position : position + size])
        position += size
        got.extend(drain(decoder))
    decoder.feed(STREAM[position:])
    got.extend(drain(decoder))
    assert got == EXPECTED


def test_empty_stream_ends_cleanly() -> None:
    decoder = p.FrameDecoder()
    assert decoder.next_message() is None
    decoder.feed(b"")
    assert decoder.next_message() is None


def test_stream_ending_inside_a_header() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(b"\x00\x00")
    assert decoder.next_message() is None
    decoder.feed(b"")
    with pytest.raises(p.ProtocolError, match="ended inside a frame header"):
        decoder.next_message()


def test_stream_ending_inside_a_frame_still_yields_earlier_frames() -> None:
    first = p.encode_frame(p.request_obj(p.Ping(1)))
    second = p.encode_frame(p.request_obj(p.Ping(2)))
    decoder = p.FrameDecoder()
    decoder.feed(first + second[:-3])
    decoder.feed(b"")
    assert decoder.next_message() == {"id": 1, "op": "ping"}
    with pytest.raises(p.ProtocolError, match=f"ended inside a frame \\({len(second) - 7} of"):
        decoder.next_message()


def test_bytes_after_end_of_stream_are_a_caller_bug() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(b"")
    with pytest.raises(RuntimeError, match="after the end"):
        decoder.feed(b"\x00")


def test_decoder_stays_failed() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(struct.pack(">I", 0) + p.encode_frame(p.client_hello()))
    with pytest.raises(p.ProtocolError, match="frame length 0") as first:
        decoder.next_message()
    with pytest.raises(p.ProtocolError) as again:
        decoder.next_message()
    assert again.value is first.value
    with pytest.raises(p.ProtocolError):
        decoder.feed(p.encode_frame(p.client_hello()))


@pytest.mark.parametrize(
    ("length", "text"),
    [
        (0, "frame length 0: a frame holds at least one byte"),
        (p.MAX_FRAME + 1, "frame length 1048577 exceeds the limit of 1048576 bytes"),
        (2**32 - 1, "frame length 4294967295 exceeds the limit"),
    ],
)
def test_hostile_length_is_rejected_from_the_header_alone(length: int, text: str) -> None:
    decoder = p.FrameDecoder()
    decoder.feed(struct.pack(">I", length))
    # No body was sent: the header alone decides, nothing waits for (or buffers) the body.
    with pytest.raises(p.ProtocolError, match=text):
        decoder.next_message()


def test_largest_length_waits_for_its_body() -> None:
    decoder = p.FrameDecoder()
    decoder.feed(struct.pack(">I", p.MAX_FRAME))
    assert decoder.next_message() is None


def _body_of_exactly(size: int) -> dict[str, bytes]:
    """A map of bins whose msgpack encoding is exactly ``size`` bytes."""
    per_entry = 2 + 5  # fixstr key of one letter, bin32 header
    full = (size - 1) // (per_entry + p.MAX_BIN_LEN)
    obj = {chr(97 + i): b"x" * p.MAX_BIN_LEN for i in range(full)}
    obj["z"] = b"x" * (size - len(pack(obj)) - per_entry)
    assert len(pack(obj)) == size
    return obj


def test_largest_frame_passes_and_one_byte_more_fails() -> None:
    largest = _body_of_exactly(p.MAX_FRAME)
    encoded = p.encode_frame(largest)
    assert len(encoded) == 4 + p.MAX_FRAME
    assert decode_one(encoded) == largest
    with pytest.raises(p.ProtocolError, match="cannot send a frame of 1048577 bytes"):
        p.encode_frame(_body_of_exactly(p.MAX_FRAME + 1))


def test_decoder_buffer_is_bounded() -> None:
    decoder = p.FrameDecoder(max_buffer=64)
    decoder.feed(b"\x00\x00\x00\x3c" + b"\x80" * 60)
    with pytest.raises(p.ProtocolError, match="more than 64 bytes received and not yet read"):
        decoder.feed(b"\x00")


def test_default_buffer_holds_two_largest_frames() -> None:
    largest = p.encode_frame(_body_of_exactly(p.MAX_FRAME))
    decoder = p.FrameDecoder()
    decoder.feed(largest)
    decoder.feed(largest)
    assert len(drain(decoder)) == 2
    decoder.feed(largest + largest)
    with pytest.raises(p.ProtocolError, match="not yet read"):
        decoder.feed(b"\x00")


# --- framing: limits and malformed bodies -------------------------------------------------------


def nested(depth: int, kind: str) -> dict[str, Any]:
    """A top-level map nested ``depth`` levels deep (the top map is level 1)."""
    inner: Any = {} if kind == "map" else []
    for _ in range(depth - 2):
        inner = {"a": inner} if kind == "map" else [inner]
    return {"a": inner}


LIMIT_CASES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("str", {"a": "x" * 4096}, {"a": "x" * 4097}, "string of 4097 bytes exceeds the limit of 4096"),
    ("utf8 str", {"a": "é" * 2048}, {"a": "é" * 2048 + "x"}, "string of 4097 bytes exceeds"),
    ("map key", {"k" * 4096: 1}, {"k" * 4097: 1}, "string of 4097 bytes exceeds"),
    (
        "bin",
        {"a": b"x" * 262_144},
        {"a": b"x" * 262_145},
        "bin of 262145 bytes exceeds the limit of 262144",
    ),
    (
        "array",
        {"a": [0] * 1024},
        {"a": [0] * 1025},
        "array of 1025 items exceeds the limit of 1024",
    ),
    (
        "map",
        {str(i): i for i in range(64)},
        {str(i): i for i in range(65)},
        "map of 65 entries exceeds the limit of 64",
    ),
    (
        "inner map",
        {"a": {str(i): i for i in range(64)}},
        {"a": {str(i): i for i in range(65)}},
        "map of 65 entries exceeds",
    ),
    ("map nesting", nested(8, "map"), nested(9, "map"), "nesting deeper than 8 levels"),
    ("array nesting", nested(8, "array"), nested(9, "array"), "nesting deeper than 8 levels"),
]


@pytest.mark.parametrize(
    ("at_limit", "over", "text"), [c[1:] for c in LIMIT_CASES], ids=[c[0] for c in LIMIT_CASES]
)
def test_limit_holds_exactly(at_limit: dict[str, Any], over: dict[str, Any], text: str) -> None:
    assert decode_one(frame(pack(at_limit))) == at_limit
    assert decode_one(p.encode_frame(at_limit)) == at_limit
    assert text in str(protocol_error(frame(pack(over))))
    # The sender refuses to build what the receiver would refuse.
    with pytest.raises(p.ProtocolError, match="cannot send"):
        p.encode_frame(over)


def test_hostile_headers_inside_the_body() -> None:
    # Container and string headers claiming 2**32-1 items or bytes.
    assert "array of 4294967295 items" in str(
        protocol_error(frame(b"\x81\xa1a\xdd\xff\xff\xff\xff"))
    )
    assert "map of 4294967295 entries" in str(protocol_error(frame(b"\xdf\xff\xff\xff\xff")))
    assert "truncated" in str(protocol_error(frame(b"\x81\xa1a\xdb\xff\xff\xff\xff")))


def test_very_deep_nesting() -> None:
    body = b"\x81\xa1a" + b"\x91" * 5000 + b"\x90"
    assert "nesting deeper than 8 levels" in str(protocol_error(frame(body)))


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (pack(msgpack.ExtType(5, b"xx")), "ext types are not allowed"),
        (pack({"a": msgpack.ExtType(5, b"xx")}), "ext types are not allowed"),
        (b"\x81\xa1a\xd6\xff\x00\x00\x00\x00", "ext types are not allowed"),
        (b"\x81\xa1a\xc7\x00\x05", "ext type 5 is not allowed"),
        (b"\x81\xa1a\xc7\x00\xff", "ext types are not allowed"),
    ],
)
def test_ext_types_are_rejected(body: bytes, text: str) -> None:
    assert text in str(protocol_error(frame(body)))


def test_timestamps_are_ext_types() -> None:
    body = bytes(msgpack.packb({"a": msgpack.Timestamp(1, 0)}))
    assert "ext types are not allowed" in str(protocol_error(frame(body)))


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (b"\x81\x01\x01", "int"),
        (b"\x81\xc4\x01a\x01", "bin"),
        (b"\x81\xc0\x01", "nil"),
        (b"\x81\xc3\x01", "bool"),
        (b"\x81\xca\x00\x00\x00\x00\x01", "float"),
        (b"\x81\x90\x01", "array"),
        (b"\x81\x80\x01", "map"),
        (b"\x81\xa1a\x81\xc4\x01b\x01", "bin"),
        (b"\x81\xa1a\x91\x81\x05\x01", "int"),
    ],
)
def test_map_keys_must_be_str(body: bytes, kind: str) -> None:
    assert str(protocol_error(frame(body))) == f"map keys must be str, not {kind}"


@pytest.mark.parametrize(
    ("body", "kind"),
    [
        (pack([1, 2]), "array"),
        (pack("hello"), "str"),
        (pack(7), "int"),
        (pack(None), "nil"),
        (pack(b"bin"), "bin"),
        (pack(1.5), "float"),
    ],
)
def test_frame_must_hold_a_map(body: bytes, kind: str) -> None:
    assert str(protocol_error(frame(body))) == f"a frame must hold a map, not {kind}"


@pytest.mark.parametrize(
    ("body", "text"),
    [
        (pack({"a": "bcd"})[:-1], "truncated msgpack: the frame ends inside the map"),
        (b"\x82\xa1a\x01", "truncated msgpack: the frame ends inside the map"),
        (b"\x81\xa1a\xc5\x00\x10abc", "truncated msgpack: the frame ends inside the map"),
        (pack({"a": 1}) + b"\x01\x02\x03", "3 bytes of trailing data after the map"),
        (pack({"a": 1}) + pack({"b": 2}), "4 bytes of trailing data after the map"),
        (b"\x81\xa1a\xa2\xff\xfe", "a str is not valid UTF-8"),
        (b"\x81\xa2\xc3\x28\x01", "a str is not valid UTF-8"),
        (b"\x81\xa1a\xc1", "malformed msgpack: invalid type byte"),
        (b"\xc1", "malformed msgpack: invalid type byte"),
    ],
)
def test_malformed_bodies(body: bytes, text: str) -> None:
    assert str(protocol_error(frame(body))) == text


@pytest.mark.parametrize(
    ("obj", "text"),
    [
        ({"a": object()}, "cannot send a value of type object"),
        ({"a": {1: 2}}, "cannot send a map key of type int"),
        ({"a": 2**64}, "cannot send an integer outside the msgpack range"),
        ({"a": -(2**63) - 1}, "cannot send an integer outside the msgpack range"),
        ({"a": memoryview(b"x")}, "cannot send a value of type memoryview"),
    ],
)
def test_encode_frame_refuses_what_cannot_be_sent(obj: dict[str, Any], text: str) -> None:
    with pytest.raises(p.ProtocolError, match=text):
        p.encode_frame(obj)


def test_encode_frame_accepts_any_mapping_and_tuples() -> None:
    from types import MappingProxyType

    msg = decode_one(p.encode_frame(MappingProxyType({"a": (1, 2), "b": bytearray(b"x")})))
    assert msg == {"a": [1, 2], "b": b"x"}


# --- fuzzing ------------------------------------------------------------------------------------


def consume(data: bytes, cut: int) -> list[dict[str, Any]]:
    """Feed ``data`` in two pieces and read everything; any failure must be a ProtocolError."""
    decoder = p.FrameDecoder()
    out = []
    try:
        for piece in (data[:cut], data[cut:]):
            if piece:  # an empty feed would end the stream
                decoder.feed(piece)
                out.extend(drain(decoder))
        decoder.feed(b"")
        out.extend(drain(decoder))
    except p.ProtocolError:
        pass
    for msg in out:
        assert type(msg) is dict
        assert all(type(k) is str for k in msg)
    return out


@FAST
@given(st.binary(max_size=400), st.integers(0, 400))
def test_fuzz_raw_bytes(data: bytes, cut: int) -> None:
    consume(data, cut)


@FAST
@given(st.lists(st.binary(min_size=1, max_size=120), max_size=4), st.integers(0, 500))
def test_fuzz_well_framed_garbage(bodies: list[bytes], cut: int) -> None:
    for msg in consume(b"".join(frame(b) for b in bodies), cut):
        _exercise_parsers(msg)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


def _exercise_parsers(msg: dict[str, Any]) -> None:
    """Every parser answers a decoded message with a value or its own exception only."""
    for parse in (p.parse_hello, p.parse_response, p.parse_hello_reply):
        with contextlib.suppress(p.ProtocolError):
            parse(msg)
    for admin in (False, True):
        with contextlib.suppress(p.BadRequest):
            p.parse_request(msg, admin=admin)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=8), msgpack_values, max_size=6))
def test_fuzz_structured_maps(obj: dict[str, Any]) -> None:
    try:
        encoded = p.encode_frame(obj)
    except p.ProtocolError:
        return
    assert decode_one(encoded) == obj
    _exercise_parsers(obj)


@FAST
@given(
    st.fixed_dictionaries(
        {"id": st.integers(0, 5) | st.none() | st.text(max_size=2)},
        optional={
            "op": st.sampled_from(["get", "register", "watch", "status", "refresh", "x"]),
            "key": st.text(max_size=5) | st.integers(),
            "keys": st.lists(st.text(max_size=4), max_size=3) | st.none(),
            "version": st.integers(-2, 2**64) | st.none(),
            "wait_ms": st.integers(-2, 40_000) | st.none(),
            "identity": st.text(max_size=3) | st.none(),
        },
    )
)
def test_fuzz_requests(msg: dict[str, Any]) -> None:
    for admin in (False, True):
        try:
            request_ = p.parse_request(msg, admin=admin)
        except p.BadRequest as exc:
            assert exc.code is p.ErrorCode.BAD_REQUEST
            continue
        assert p.parse_request(p.request_obj(request_), admin=admin) == request_


# --- secrets stay out of errors -----------------------------------------------------------------


def secret_bearing_bodies() -> list[bytes]:
    text = SECRET_TEXT * 300  # over the str limit
    return [
        pack({"data": SECRET * 20_000}),  # bin over the limit
        pack({"data": text}),
        b"\x81\xa4data\xb4" + SECRET[:20],  # invalid UTF-8 in a str holding the secret
        pack({"data": SECRET}) + SECRET,  # trailing
        pack({"data": msgpack.ExtType(3, SECRET)}),
        pack({SECRET: 1}),  # bin key
        pack([SECRET]),  # not a map
        pack({"data": SECRET})[:-3],  # truncated
    ]


@pytest.mark.parametrize("body", secret_bearing_bodies())
def test_secret_data_never_appears_in_protocol_errors(body: bytes) -> None:
    exc = protocol_error(frame(body))
    for shown in (str(exc), repr(exc)):
        assert "TOPSECRET" not in shown
        assert SECRET.hex() not in shown


def test_secret_data_never_appears_in_encode_errors() -> None:
    for obj in ({"data": SECRET * 20_000}, {"data": SECRET_TEXT * 300}):
        with pytest.raises(p.ProtocolError) as info:
            p.encode_frame(obj)
        assert "TOPSECRET" not in str(info.value)
