"""A real knoxd process delivers keys from a real server to consumers that are not Knox clients:
the ``LoadCredential=`` socket (:mod:`knoxd.credentials`) to units started by systemd, and the
Knox-compatible export (:mod:`knoxd.export`) to readers of ``/var/lib/knox``.

The upstream is the dev server in-process; the key is created and granted over HTTP. The
credential clients connect exactly as systemd does, from a real cgroup named like the unit (see
``systemd_clients.py``). Once knoxd binds its own sockets; once its sockets (``credentials``
among them) are handed over by name by an activating parent, and it holds only the capabilities of
``knoxd.service.d/export.conf.example``. (It stays uid 0 there: this interpreter lives in root's
home, which ``User=knoxd`` could not read. The export file goes to another owner, so knoxd's
uid owns it no more and every step that gives it away needs those capabilities, as under
``User=knoxd``.) Both need root and a writable cgroup v2 hierarchy, and are skipped otherwise.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from knox.http_client import KnoxHTTPClient, ssl_context_for
from knox.model import Access, AccessType, PrincipalType
from knox.wire import decode_key
from tests.knoxd_process import (
    NotifySocket,
    activated,
    dev_knoxd_config,
    knoxd_argv,
    knoxd_environ,
    knoxd_process,
)
from tests.polling import until
from tests.server_fixtures import DevServer, dev_server
from tests.systemd_clients import Units, short_dir, systemd_connect, unit_cgroups
from tests.test_systemd_units import EXPORT_DROP_IN, UNITS, one, unit

WAIT = 20
KEY = "app:db_password"
SECRET = b"s3cret-from-the-server"
UNIT = "web.service"
NOBODY = 65534
# linux/capability.h, for the capabilities the export drop-in may name.
CAPABILITY_BITS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3}


@dataclass
class Host:
    """A short directory other uids can traverse (socket paths are at most 108 bytes), and
    cgroups named like units for the credential clients."""

    top: Path
    units: Units


@pytest.fixture
def host() -> Iterator[Host]:
    with unit_cgroups() as units, short_dir("knoxd-dlv-") as top:
        yield Host(top, units)


@asynccontextmanager
async def server_with_key(directory: Path) -> AsyncIterator[DevServer]:
    """The dev server, holding ``KEY`` readable by this host (knoxd's identity ``host``)."""
    async with dev_server(directory) as dev:
        async with KnoxHTTPClient(
            dev.url, auth="0u" + dev.admin_token, ssl_context=ssl_context_for(dev.ca)
        ) as admin:
            host_reads = Access(PrincipalType.MACHINE, dev.hostname, AccessType.READ)
            await admin.create_key(KEY, SECRET, [host_reads])
        yield dev


def delivery_config(dev: DevServer, daemon: dict[str, Path]) -> Path:
    """The dev server's knoxd.toml with these ``[daemon]`` paths, one ``[[credential]]`` giving
    ``UNIT`` the key as ``db_password`` and one ``[[export]]`` of it (0440, uid and gid 65534)."""
    text = dev.knoxd_config.read_text()
    for name, path in daemon.items():
        line = f'{name} = "{path}"'
        text, found = re.subn(rf"(?m)^{name} = .*$", line, text)
        if not found:
            text = text.replace("[daemon]\n", f"[daemon]\n{line}\n", 1)
    text += (
        f'\n[[credential]]\nunit = "{UNIT}"\nname = "db_password"\nkey = "{KEY}"\n'
        'identity = "host"\n'
        f'\n[[export]]\nkey = "{KEY}"\nidentity = "host"\nowner = {NOBODY}\n'
        f'group = {NOBODY}\nmode = "0440"\n'
    )
    config = dev.knoxd_config.with_name("delivery.toml")
    config.write_text(text)
    return config


async def ask_as_systemd(path: Path, units: Units, unit_name: str, *, in_unit: str) -> bytes:
    """What a ``LoadCredential=db_password:PATH`` of ``unit_name`` reads, asked from the cgroup of
    ``in_unit``."""
    code, data = await systemd_connect(path, units, unit_name, "db_password", in_unit=in_unit)
    assert code == 0
    return data


async def exported(export_dir: Path) -> Path:
    """The key's export file, once it is there."""
    path = export_dir / "v0" / "keys" / KEY
    await until(path.exists)
    return path


def assert_knox_file(path: Path) -> None:
    st = path.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o440, NOBODY, NOBODY)
    key = decode_key(path.read_bytes())
    assert key.id == KEY
    assert key.primary.data == SECRET
    assert key.acl == ()


async def stop(knoxd: trio.Process, log: Path) -> None:
    knoxd.send_signal(signal.SIGTERM)
    with trio.fail_after(WAIT):
        assert await knoxd.wait() == 0, log.read_text()


async def test_knoxd_serves_a_credential_and_writes_the_export_from_the_server(
    host: Host,
) -> None:
    async with server_with_key(host.top / "server") as dev:
        credentials = host.top / "run" / "credentials.sock"
        export_dir = host.top / "knox"
        config = delivery_config(
            dev,
            {
                "workload_socket": host.top / "w.sock",
                "admin_socket": host.top / "admin" / "a.sock",
                "credentials_socket": credentials,
                "export_dir": export_dir,
            },
        )
        log = host.top / "knoxd.log"
        async with NotifySocket(host.top / "notify") as systemd:
            env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path))
            async with knoxd_process(knoxd_argv(config), log, env) as knoxd:
                await systemd.ready(knoxd, log)
                # Root-only, and bound before READY.
                assert credentials.stat().st_mode & 0o777 == 0o600
                assert_knox_file(await exported(export_dir))
                got = await ask_as_systemd(credentials, host.units, UNIT, in_unit=UNIT)
                assert got == SECRET
                # The same request from another unit's process: the kernel says it is not web's.
                other = await ask_as_systemd(credentials, host.units, UNIT, in_unit="x.service")
                assert other == b""
                await stop(knoxd, log)
    text = log.read_text()
    assert '"credential served"' in text and '"credential request refused"' in text
    assert SECRET.decode() not in text


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
async def test_activated_knoxd_with_the_export_drop_in_serves_the_passed_credentials_socket(
    host: Host,
) -> None:
    service = unit(str(EXPORT_DROP_IN.relative_to(UNITS)))["Service"]
    caps = one(service, "AmbientCapabilities").split()
    names = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in caps)
    async with server_with_key(host.top / "server") as dev:
        # As the drop-in's tmpfiles.d line makes it.
        export_dir = host.top / "knox"
        export_dir.mkdir(mode=0o755)
        own = host.top / "own"
        config = delivery_config(
            dev,
            {
                "workload_socket": own / "w.sock",
                "admin_socket": own / "a.sock",
                "credentials_socket": own / "c.sock",
                "export_dir": export_dir,
            },
        )
        passed = host.top / "passed"
        passed.mkdir()
        paths = [passed / "c.sock", passed / "w.sock", passed / "a.sock"]
        # NoNewPrivileges= and exactly the drop-in's capabilities, as systemd runs the unit.
        setpriv = ["setpriv", f"--bounding-set=-all,{names}", "--no-new-privs"]
        argv = activated("credentials:workload:admin", paths, [*setpriv, *knoxd_argv(config)])
        log = host.top / "knoxd.log"
        async with NotifySocket(host.top / "notify") as systemd:
            env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path))
            async with knoxd_process(argv, log, env) as knoxd:
                await systemd.ready(knoxd, log)
                status = dict(
                    line.split(":\t", 1)
                    for line in Path(f"/proc/{knoxd.pid}/status").read_text().splitlines()
                    if ":\t" in line
                )
                bits = sum(1 << CAPABILITY_BITS[c] for c in caps)
                assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == bits
                assert_knox_file(await exported(export_dir))
                got = await ask_as_systemd(paths[0], host.units, UNIT, in_unit=UNIT)
                assert got == SECRET
                # knoxd served the passed sockets and bound none of its own.
                assert not own.exists()
                await stop(knoxd, log)
    assert SECRET.decode() not in log.read_text()


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (
            '[[export]]\nkey = "app:k"\nidentity = "host"\nowner = "no-such-user"\n',
            "export of app:k: no user 'no-such-user'",
        ),
        (
            '[[credential]]\nunit = "web.service"\nname = "db"\nkey = "app:k"\nidentity = "host"\n',
            "{sockets}/c.sock exists and is not a socket; not replacing it",
        ),
    ],
    ids=["export", "credentials socket"],
)
async def test_a_credentials_socket_or_export_that_cannot_start_fails_the_start(
    tmp_path: Path, extra: str, reason: str
) -> None:
    sockets = tmp_path / "s"
    config = dev_knoxd_config(tmp_path / "dev", sockets=sockets)
    text = config.read_text()
    if "[[credential]]" in extra:
        sockets.mkdir()
        (sockets / "c.sock").write_text("a file in the socket's place")
        text = text.replace("[daemon]\n", f'[daemon]\ncredentials_socket = "{sockets}/c.sock"\n')
    config.write_text(text + extra)
    reason = reason.format(sockets=sockets)
    log = tmp_path / "knoxd.log"
    async with NotifySocket(tmp_path / "notify") as systemd:
        env = knoxd_environ(NOTIFY_SOCKET=str(systemd.path))
        async with knoxd_process(knoxd_argv(config), log, env) as knoxd:
            status = await systemd.receive()
            with trio.fail_after(WAIT):
                assert await knoxd.wait() == 1
    assert status == [f"STATUS=cannot start: {reason}"]
    text = log.read_text()
    assert f"knoxd: cannot start: {reason}\n" in text
    assert "Traceback" not in text
