"""The files in ``systemd/``, checked by systemd's own tools where they are installed
(``systemd-analyze verify``, ``systemd-sysusers``, ``systemd-tmpfiles``, ``systemd-creds``), and
against what knoxd expects of them (socket names, credential name, stop bound), with the export
drop-in example applied as well as without it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from knoxd.cache.cache_key import CREDENTIAL_NAME, CacheKeySource, load_cache_key
from knoxd.cli import DEFAULT_CONFIG, DEFAULT_STOP_TIMEOUT
from knoxd.config import (
    DEFAULT_ADMIN_SOCKET,
    DEFAULT_EXPORT_DIR,
    DEFAULT_WORKLOAD_SOCKET,
    parse_config,
)

UNITS = Path(__file__).resolve().parent.parent / "systemd"
UNIT_FILES = sorted([*UNITS.glob("*.service"), *UNITS.glob("*.socket")])
EXPORT_DROP_IN = UNITS / "knoxd.service.d" / "export.conf.example"
# Where the README's install puts the commands; the tests use this environment's instead.
INSTALLED_BIN = "/usr/local/bin/"
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 60


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(tool) is None,
        reason=f"{tool} is not installed (CI installs it: apt-get install systemd)",
    )


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    """The settings of a unit file (or drop-in, by its path under ``systemd/``): section -> key ->
    values in order (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in (UNITS / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    (value,) = section[key]
    return value


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TIMEOUT, check=False, cwd=cwd
    )


def _install(directory: Path, *, export: bool) -> Path:
    """The units in ``directory`` (with the export drop-in if ``export``), their commands this
    environment's: verify checks that ExecStart= binaries exist."""
    directory.mkdir()
    for path in UNIT_FILES:
        text = path.read_text()
        (directory / path.name).write_text(text.replace(INSTALLED_BIN, f"{VENV_BIN}/"))
    if export:
        # systemd-analyze reads drop-ins from beside the unit files it is given.
        (directory / "knoxd.service.d").mkdir()
        (directory / "knoxd.service.d" / "export.conf").write_text(EXPORT_DROP_IN.read_text())
    return directory


@needs("systemd-analyze")
def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert {p.name for p in UNIT_FILES} == {
        "knoxd.service",
        "knoxd.socket",
        "knoxd-admin.socket",
        "knoxd-credentials.socket",
        "knoxd-cache-key.service",
        "knox-server.service",
    }
    for command in ("knoxd", "knox-server"):
        assert (VENV_BIN / command).exists()
    for export in (False, True):
        installed = _install(tmp_path / f"export-{export}", export=export)
        result = run(
            ["systemd-analyze", "verify", "--man=no", *(p.name for p in UNIT_FILES)],
            cwd=installed,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout + result.stderr == ""


def _exposure(directory: Path) -> dict[str, bool]:
    """Which of ``systemd-analyze security``'s restrictions knoxd.service has, by JSON field."""
    result = run(
        ["systemd-analyze", "security", "--offline=yes", "--json=short", "knoxd.service"],
        cwd=directory,
    )
    assert result.returncode == 0, result.stderr
    return {check["json_field"]: check["set"] for check in json.loads(result.stdout)}


@needs("systemd-analyze")
def test_the_export_drop_in_allows_chown_and_nothing_else_changes(tmp_path: Path) -> None:
    dropin = unit(str(EXPORT_DROP_IN.relative_to(UNITS)))["Service"]
    assert one(dropin, "ReadWritePaths") == str(DEFAULT_EXPORT_DIR)
    caps = one(dropin, "AmbientCapabilities")
    assert one(dropin, "CapabilityBoundingSet") == caps
    assert "CAP_CHOWN" in caps.split()
    plain = _exposure(_install(tmp_path / "plain", export=False))
    export = _exposure(_install(tmp_path / "export", export=True))
    chown_checks = {"SystemCallFilter_privileged", "CapabilityBoundingSet_CAP_CHOWN_FSETID_SETFCAP"}
    assert all(plain[field] for field in chown_checks)
    assert not any(export[field] for field in chown_checks)
    # Besides chown, the drop-in loosens only the ambient set.
    loosened = {field for field, kept in plain.items() if kept and not export[field]}
    assert loosened - chown_checks <= {"AmbientCapabilities"}
    listed = run(["systemd-analyze", "syscall-filter", "@chown"])
    assert "fchown" in listed.stdout.split()


def test_knoxd_service_is_what_knoxd_and_the_design_expect() -> None:
    service = unit("knoxd.service")["Service"]
    assert one(service, "Type") == "notify"
    assert one(service, "NotifyAccess") == "main"
    assert one(service, "Restart") == "on-failure"
    assert one(service, "UMask") == "0077"
    assert one(service, "StateDirectory") == "knoxd"
    argv = shlex.split(one(service, "ExecStart"))
    assert argv == [f"{INSTALLED_BIN}knoxd", "--config", str(DEFAULT_CONFIG)]
    assert one(service, "WatchdogSec") == "30s"
    # systemd's SIGKILL comes only after knoxd's own bound on its stop.
    assert float(one(service, "TimeoutStopSec").removesuffix("s")) > DEFAULT_STOP_TIMEOUT
    name, _, path = one(service, "LoadCredentialEncrypted").partition(":")
    assert name == CREDENTIAL_NAME
    assert path == f"/etc/credstore.encrypted/{CREDENTIAL_NAME}"
    assert f"#LoadCredential={CREDENTIAL_NAME}:" in (UNITS / "knoxd.service").read_text()
    assert one(service, "CapabilityBoundingSet") == ""
    assert one(service, "ProtectSystem") == "strict"
    # Settings that would hide the peers from knoxd's checks.
    for blinding in ("ProtectProc", "PrivatePIDs", "PrivateUsers", "ProcSubset"):
        assert blinding not in service
    assert one(service, "RestrictAddressFamilies").split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one(service, "Sockets").split() == [
        "knoxd.socket",
        "knoxd-admin.socket",
        "knoxd-credentials.socket",
    ]


def test_socket_units_name_the_sockets_knoxd_looks_for() -> None:
    workload = unit("knoxd.socket")["Socket"]
    admin = unit("knoxd-admin.socket")["Socket"]
    assert one(workload, "ListenStream") == str(DEFAULT_WORKLOAD_SOCKET)
    assert one(workload, "FileDescriptorName") == "workload"
    assert one(workload, "SocketMode") == "0666"
    assert one(admin, "ListenStream") == str(DEFAULT_ADMIN_SOCKET)
    assert one(admin, "FileDescriptorName") == "admin"
    assert (one(admin, "SocketMode"), one(admin, "SocketGroup")) == ("0660", "knox-admin")
    assert one(admin, "Service") == one(workload, "Service") == "knoxd.service"
    credentials = unit("knoxd-credentials.socket")["Socket"]
    assert one(credentials, "ListenStream") == "/run/knoxd/credentials.sock"
    assert one(credentials, "FileDescriptorName") == "credentials"
    assert (one(credentials, "SocketUser"), one(credentials, "SocketMode")) == ("root", "0600")
    assert one(credentials, "Service") == "knoxd.service"
    # Not the service's RuntimeDirectory=, which systemd removes whenever knoxd stops.
    assert "RuntimeDirectory" not in unit("knoxd.service")["Service"]


@needs("systemd-sysusers")
@needs("systemd-tmpfiles")
def test_sysusers_and_tmpfiles_make_the_users_and_socket_directories(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    made = run(["systemd-sysusers", f"--root={tmp_path}", str(UNITS / "sysusers.d" / "knox.conf")])
    assert made.returncode == 0, made.stderr
    users = {line.split(":")[0]: line for line in (tmp_path / "etc/passwd").read_text().split()}
    groups = {
        line.split(":")[0]: int(line.split(":")[2])
        for line in (tmp_path / "etc/group").read_text().split()
    }
    assert {"knoxd", "knox-server"} <= users.keys()
    assert "knox-admin" in groups
    tmpfiles = UNITS / "tmpfiles.d" / "knoxd.conf"
    created = run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(tmpfiles)])
    assert created.returncode == 0, created.stderr

    def facts(path: str) -> tuple[int, int, int]:
        st = (tmp_path / path).stat()
        return st.st_mode & 0o7777, st.st_uid, st.st_gid

    assert facts("run/knoxd") == (0o755, 0, 0)
    assert facts("run/knoxd-admin") == (0o750, 0, groups["knox-admin"])
    assert facts("etc/credstore.encrypted") == (0o700, 0, 0)


@needs("systemd-creds")
@needs("unshare")
def test_the_cache_key_unit_makes_a_sealed_key_that_knoxd_loads(tmp_path: Path) -> None:
    service = unit("knoxd-cache-key.service")
    condition = one(service["Unit"], "ConditionPathExists")
    store = Path(condition.removeprefix("!")).parent
    argv = shlex.split(one(service["Service"], "ExecStart"))
    command = [part.replace(str(store), str(tmp_path / "store")) for part in argv]
    (tmp_path / "store").mkdir(mode=0o700)
    (tmp_path / "host").mkdir(mode=0o700)
    # systemd-creds keeps its host key in /var/lib/systemd: give it a private one, in a mount
    # namespace of its own, so the machine's is neither read nor created.
    isolated = run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --bind "$0" /var/lib/systemd && umask 077 && exec "$@"',
            str(tmp_path / "host"),
            *command,
        ]
    )
    if isolated.returncode != 0 and "unshare failed" in isolated.stderr:
        pytest.skip(f"no mount namespace here: {isolated.stderr.strip()}")
    assert isolated.returncode == 0, isolated.stderr
    sealed = tmp_path / "store" / CREDENTIAL_NAME
    assert sealed.stat().st_mode & 0o077 == 0
    assert not (tmp_path / "store" / f"{CREDENTIAL_NAME}.new").exists()
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    opened = run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --bind "$0" /var/lib/systemd && exec "$@"',
            str(tmp_path / "host"),
            "systemd-creds",
            "decrypt",
            f"--name={CREDENTIAL_NAME}",
            str(sealed),
            str(credentials / CREDENTIAL_NAME),
        ]
    )
    assert opened.returncode == 0, opened.stderr
    # What knoxd then finds in $CREDENTIALS_DIRECTORY:
    key = load_cache_key(tmp_path / "state", {"CREDENTIALS_DIRECTORY": str(credentials)})
    assert key.source is CacheKeySource.CREDENTIAL
    assert not (tmp_path / "state").exists()


def test_knox_server_service_runs_the_serve_command_with_its_own_state() -> None:
    service = unit("knox-server.service")["Service"]
    argv = shlex.split(one(service, "ExecStart"))
    assert argv == [
        f"{INSTALLED_BIN}knox-server",
        "serve",
        "--config",
        "/etc/knox-server/server.toml",
    ]
    assert (one(service, "StateDirectory"), one(service, "LogsDirectory")) == (
        "knox-server",
        "knox-server",
    )
    assert one(service, "User") == "knox-server"


def test_the_readme_install_section_uses_these_files_and_a_valid_knoxd_toml() -> None:
    readme = (UNITS.parent / "README.md").read_text()
    section = readme[readme.index("## Install on a systemd host") :]
    for path in re.findall(r"(?<![/\w])systemd/[\w./*-]+", section):
        assert list(UNITS.parent.glob(path)), path
    match = re.search(r"<<'TOML'\n(.*?)\nTOML\n", section, re.DOTALL)
    assert match is not None
    config = parse_config(match.group(1))
    assert config.daemon.workload_socket == DEFAULT_WORKLOAD_SOCKET
    assert config.daemon.admin_socket == DEFAULT_ADMIN_SOCKET
    assert config.daemon.state_dir == Path("/var/lib/") / one(
        unit("knoxd.service")["Service"], "StateDirectory"
    )
    assert config.daemon.admin_group == one(unit("knoxd-admin.socket")["Socket"], "SocketGroup")
