"""The audit trail: record format, sinks, failure handling, and what a served app records."""

from __future__ import annotations

import base64
import io
import json
import os
import stat
from pathlib import Path

import httpx
import pytest
import structlog
import trio

from knox_server.audit import (
    DATA_PLACEHOLDER,
    MAX_PARAM_CHARS,
    AuditLog,
    AuditRecord,
    FileSink,
    StreamSink,
    format_record,
    new_request_id,
    rfc3339_nano,
)
from tests.pki import ssl_client_context
from tests.test_server_routes import MACHINE, PKI, WAIT, b64, make_pki, served_knox


@pytest.fixture(scope="module")
def pki() -> PKI:
    return make_pki()


def record(**overrides: object) -> AuditRecord:
    fields: dict[str, object] = {
        "ts": 1_700_000_000_123_456_789,
        "request_id": "abcdefghijABCDEFGHIJ",
        "route": "postkeys",
        "method": "POST",
        "path": "/v0/keys/",
        "code": 0,
        "status": 200,
    }
    fields.update(overrides)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def test_rfc3339_nano_is_go_style() -> None:
    assert rfc3339_nano(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert rfc3339_nano(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    assert rfc3339_nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"


def test_request_ids_are_20_random_alphanumerics() -> None:
    ids = {new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 20 and i.isascii() and i.isalnum() for i in ids)


def test_format_record_fields_and_scrubbing() -> None:
    line = format_record(
        record(
            key_id="db:pw",
            principal="web1",
            principals=(
                ("mtls", "machine", "web1"),
                ("spiffe-fallback", "service", "spiffe://d/s"),
            ),
            auth_type="mux[mtls=>machine,spiffe-fallback=>service]",
            client="127.0.0.1:5000",
            tls_version=0x0304,
            tls_cipher="TLS_AES_256_GCM_SHA384",
            client_cert=True,
            user_agent="Knox_Client/1",
            params={"id": "db:pw", "data": "c2VjcmV0", "acl": "x" * (MAX_PARAM_CHARS + 10)},
            message="Key db:pw already exists",
        )
    )
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert b"c2VjcmV0" not in line
    obj = json.loads(line)
    assert obj["time"] == "2023-11-14T22:13:20.123456789Z"
    assert obj["params"]["data"] == DATA_PLACEHOLDER
    assert obj["params"]["acl"] == "x" * MAX_PARAM_CHARS + f"...<{MAX_PARAM_CHARS + 10} chars>"
    assert obj["principals"] == [
        {"provider": "mtls", "type": "machine", "id": "web1"},
        {"provider": "spiffe-fallback", "type": "service", "id": "spiffe://d/s"},
    ]
    assert obj["tls"] == {
        "version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "client_cert": True,
    }
    assert (obj["code"], obj["status"], obj["route"], obj["key_id"]) == (
        0,
        200,
        "postkeys",
        "db:pw",
    )


def test_record_without_tls_or_principal() -> None:
    obj = json.loads(format_record(record(code=None, status=405, path="/v0/keys/\u2028x/")))
    assert obj["tls"] is None and obj["principal"] is None and obj["principals"] == []
    assert obj["code"] is None and obj["path"] == "/v0/keys/\u2028x/"


def test_file_sink_appends_one_line_per_record_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier":true}\n')
    path.chmod(0o600)
    first, second = AuditLog.to_file(path), AuditLog.to_file(path)  # two workers, one file
    try:
        for i in range(50):
            (first if i % 2 else second).emit(record(request_id=f"{i:020d}"))
    finally:
        first.close()
        second.close()
        first.close()  # idempotent
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier":true}'
    assert sorted(json.loads(line)["request_id"] for line in lines[1:]) == [
        f"{i:020d}" for i in range(50)
    ]
    fresh = tmp_path / "fresh.jsonl"
    AuditLog.to_file(fresh).close()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600


def test_stream_sink_writes_to_the_given_stream() -> None:
    out = io.StringIO()
    AuditLog(StreamSink(out)).emit(record())
    assert json.loads(out.getvalue())["request_id"] == "abcdefghijABCDEFGHIJ"


def test_stdout_is_the_default_sink(capsys: pytest.CaptureFixture[str]) -> None:
    AuditLog().emit(record())
    assert json.loads(capsys.readouterr().out)["route"] == "postkeys"


def test_failing_sink_never_raises_and_logs_once_per_burst() -> None:
    audit = AuditLog(FileSink.open("/dev/full"))
    try:
        with structlog.testing.capture_logs() as logs:
            for _ in range(5):
                audit.emit(record())
        assert [e["event"] for e in logs] == ["audit_write_failed"]
        assert audit.lost == 5
    finally:
        audit.close()


class _Switchable:
    """A real file sink that can be made to fail, to watch a burst end."""

    def __init__(self, path: Path) -> None:
        self.inner = FileSink.open(path)
        self.broken = False

    def write(self, line: bytes) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        self.inner.write(line)

    def close(self) -> None:
        self.inner.close()


def test_recovery_after_a_burst_reports_the_loss(tmp_path: Path) -> None:
    sink = _Switchable(tmp_path / "a.jsonl")
    audit = AuditLog(sink)
    with structlog.testing.capture_logs() as logs:
        sink.broken = True
        audit.emit(record())
        audit.emit(record())
        sink.broken = False
        audit.emit(record())
        sink.broken = True
        audit.emit(record())
    audit.close()
    assert [e["event"] for e in logs] == [
        "audit_write_failed",
        "audit_write_recovered",
        "audit_write_failed",
    ]
    assert logs[1]["lost_records"] == 2
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == 1


async def test_served_requests_are_audited_without_secrets(pki: PKI, tmp_path: Path) -> None:
    secret = b"correct horse battery staple"
    async with served_knox(pki, tmp_path) as knox:
        await knox.create("k", secret)
        await knox.grant("k", {"type": "Machine", "id": MACHINE, "access": "Write"})
        await knox.call(
            "machine", "POST", "/v0/keys/k/versions/", form={"data": b64(secret + b"2")}
        )
        await knox.call("machine", "GET", "/v0/keys/k/")
        await knox.call("alice", "GET", "/v0/keys/?k=NONE")
        await knox.call("anon", "GET", "/v0/keys/k/", authorization="0unot-a-token")
        await knox.call("alice", "GET", "/v0/keys/nope")
        await knox.call("anon", "PATCH", "/v0/keys/k/")
        records = knox.audit()
        text = knox.audit_path.read_text()
    assert [(r["route"], r["status"]) for r in records] == [
        ("postkeys", 200),
        ("putaccess", 200),
        ("postversion", 200),
        ("getkey", 200),
        ("getkeys", 200),
        ("getkey", 401),
        ("404", 404),
        ("405", 405),
    ]
    for needle in (
        secret,
        base64.b64encode(secret),
        base64.b64encode(secret + b"2"),
        b"not-a-token",
        *map(str.encode, pki.tokens.values()),
    ):
        assert needle.decode() not in text
    assert records[0]["params"] == {"id": "k", "data": DATA_PLACEHOLDER}
    assert records[2]["params"] == {"keyID": "k", "data": DATA_PLACEHOLDER}
    assert len({r["request_id"] for r in records}) == len(records)
    machine_get = records[3]
    assert machine_get["principal"] == MACHINE and machine_get["auth_type"] == "machine"
    assert machine_get["principals"] == [{"provider": "mtls", "type": "machine", "id": MACHINE}]
    assert machine_get["tls"]["client_cert"] is True and machine_get["tls"]["version"] in (
        "TLSv1.2",
        "TLSv1.3",
    )
    assert machine_get["key_id"] == "k" and machine_get["client"].startswith("127.0.0.1:")
    assert machine_get["user_agent"].startswith("python-httpx/")
    assert records[0]["tls"]["client_cert"] is False
    assert records[4]["query_ids"] == 1
    assert records[5]["message"] == "auth: unknown user token"


async def test_mux_principals_are_all_recorded(pki: PKI, tmp_path: Path) -> None:
    both = pki.ca.leaf(
        common_name="host and workload", dns=["h2.example.com"], uris=["spiffe://d/w"]
    )
    async with served_knox(pki, tmp_path) as knox:
        ctx = ssl_client_context(pki.ca, both, tmp_path)
        async with httpx.AsyncClient(verify=ctx, timeout=WAIT) as client:
            with trio.fail_after(WAIT):
                response = await client.get(
                    knox.url + "/v0/keys/", headers={"Authorization": "0th2.example.com"}
                )
        assert response.status_code == 200
        last = knox.audit()[-1]
    assert last["principal"] == "h2.example.com"
    assert last["auth_type"] == "mux[mtls=>machine,spiffe-fallback=>service]"
    assert [p["provider"] for p in last["principals"]] == ["mtls", "spiffe-fallback"]


def test_file_sink_reports_closed_and_unopenable(tmp_path: Path) -> None:
    sink = FileSink.open(tmp_path / "x.jsonl")
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink.write(b"{}\n")
    with pytest.raises(OSError):
        AuditLog.to_file(tmp_path / "missing-dir" / "x.jsonl")
    assert not os.path.exists(tmp_path / "missing-dir")
