"""knox_server's bulk change check, ``POST /v0/changes/`` (an extension of the v0 API)."""

from __future__ import annotations

import base64
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import trio

from knox_server.app import MAX_CHANGES_BODY_BYTES
from tests.server_fixtures import DevServer, dev_server


def _client(server: DevServer, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=server.url,
        verify=ssl.create_default_context(cafile=str(server.ca)),
        headers={"Authorization": "0u" + token},
        timeout=10,
    )


async def test_bulk_check_answers_like_the_query_form(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            dev_server(tmp_path / "srv") as server,
            _client(server, server.admin_token) as admin,
        ):
            for key_id in ("a:one", "a:two"):
                data = {"id": key_id, "data": base64.b64encode(b"x").decode()}
                assert (await admin.post("/v0/keys/", data=data)).json()["code"] == 0
            two = (await admin.get("/v0/keys/a:two/")).json()["data"]["hash"]
            pairs = {"a:one": "stale", "a:two": two, "a:absent": "x"}
            bulk = await admin.post("/v0/changes/", data=pairs)
            query = await admin.get("/v0/keys/", params=pairs)
            assert bulk.status_code == 200
            assert bulk.json()["data"] == query.json()["data"] == ["a:one"]

            empty = await admin.post("/v0/changes/")
            assert empty.json()["data"] == []  # never a listing of every key

            held = await admin.post(
                "/v0/changes/", data={"a:two": two}, headers={"Prefer": "wait=1"}
            )
            assert held.json()["data"] == []
            assert held.headers["preference-applied"] == "wait=1"

            # The dev user may read neither key: nothing is reported to it.
            async with _client(server, server.dev_token) as dev:
                assert (await dev.post("/v0/changes/", data=pairs)).json()["data"] == []


async def _just_over_the_limit() -> AsyncIterator[bytes]:
    # Streamed without a length, so the server reads it all before it refuses it.
    for _ in range(MAX_CHANGES_BODY_BYTES // 65536):
        yield b"a" * 65536
    yield b"a"


async def test_bulk_check_errors(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with (
            dev_server(tmp_path / "srv") as server,
            _client(server, server.admin_token) as admin,
        ):
            assert (await admin.get("/v0/changes/")).status_code == 405
            anonymous = await admin.post(
                "/v0/changes/", data={"a:one": "x"}, headers={"Authorization": ""}
            )
            assert (anonymous.status_code, anonymous.json()["code"]) == (401, 5)
            too_big = await admin.post("/v0/changes/", content=_just_over_the_limit())
            assert (too_big.status_code, too_big.json()["code"]) == (400, 11)
            not_ascii = await admin.post("/v0/changes/", content="é=1".encode())
            assert (not_ascii.status_code, not_ascii.json()["code"]) == (400, 11)
