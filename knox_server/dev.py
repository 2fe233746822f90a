"""``knox-server dev``: a complete development setup in one directory.

On first run the state directory receives a CA, a server certificate for localhost/127.0.0.1, a
machine certificate for this host's hostname, a SPIFFE workload certificate
(``spiffe://dev.knox/demo``), a user token file (users ``admin`` in group ``security-team``, which
every new key grants Admin, and ``dev`` with no groups) with the plaintext tokens in
``admin.token`` and ``dev.token``, a master key file and an SQLite database. Later runs reuse them.
Once the server listens, ``knoxd.toml`` (a daemon config for this PKI, peers = the calling uid) and
``dev.json`` (every path, absolute) are written for the current URL. The daemon's admin group is
the caller's primary group, so ``knoxctl status`` works without root.
"""

from __future__ import annotations

import grp
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knox.model import Access, AccessType, PrincipalType
from knox_server.config import ServerConfig
from knox_server.crypto import MasterKeyring
from knox_server.devpki import DevPKI, create_dev_pki
from knox_server.tokens import new_token, write_token_file

__all__ = ["DEV_SPIFFE_ID", "DevState", "prepare_dev_state", "write_dev_outputs"]

DEV_SPIFFE_ID = "spiffe://dev.knox/demo"


@dataclass(frozen=True, slots=True)
class DevState:
    directory: Path
    pki: DevPKI
    hostname: str
    token_file: Path
    master_key_file: Path
    database: Path

    def token_path(self, user: str) -> Path:
        return self.directory / f"{user}.token"

    def server_config(self, listen: str, *, knox_compat: bool) -> ServerConfig:
        return ServerConfig(
            listen=(listen,),
            cert=self.pki.server[0],
            key=self.pki.server[1],
            client_ca=self.pki.ca,
            host=socket.gethostname(),
            knox_compat=knox_compat,
            max_body_bytes=64 * 1024,
            storage_url=f"sqlite:///{self.database}",
            master_key_file=self.master_key_file,
            token_file=self.token_file,
            default_acl=(Access(PrincipalType.USER_GROUP, "security-team", AccessType.ADMIN),),
            audit_file=self.directory / "audit.jsonl",
        )


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def prepare_dev_state(directory: Path) -> DevState:
    """Create whatever is missing in ``directory`` (mode 0700) and return the layout."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    hostname = socket.gethostname()
    pki_dir = directory / "pki"
    state = DevState(
        directory=directory,
        pki=DevPKI.at(pki_dir),
        hostname=hostname,
        token_file=directory / "tokens.toml",
        master_key_file=directory / "master.keys",
        database=directory / "knox.db",
    )
    if not state.pki.service[1].exists():
        create_dev_pki(pki_dir, hostname=hostname, spiffe_id=DEV_SPIFFE_ID)
    if not state.token_file.exists():
        users = [("admin", ("security-team",)), ("dev", ())]
        tokens = {name: new_token() for name, _ in users}
        for name, token in tokens.items():
            _write_private(state.token_path(name), token + "\n")
        write_token_file(state.token_file, [(n, g, tokens[n]) for n, g in users])
    if not state.master_key_file.exists():
        MasterKeyring.generate_file(state.master_key_file)
    return state


def _knoxd_toml(state: DevState, url: str) -> str:
    uid = os.getuid()
    group = grp.getgrgid(os.getgid()).gr_name
    d = state.directory
    return f"""# knoxd configuration for the dev server at {url}; written by `knox-server dev`.
[daemon]
state_dir = "{d / "knoxd"}"
workload_socket = "{d / "knoxd.sock"}"
admin_socket = "{d / "admin" / "admin.sock"}"
admin_group = "{group}"
refresh_seconds = 60
revalidate_seconds = 600

[upstream]
urls = ["{url}"]
ca = "{state.pki.ca}"

[[identity]]
name = "host"
kind = "machine"
cert = "{state.pki.host[0]}"
key = "{state.pki.host[1]}"
hostname = "{state.hostname}"
keys = []
[identity.peers]
uid = [{uid}]

[[identity]]
name = "demo"
kind = "spiffe"
cert = "{state.pki.service[0]}"
key = "{state.pki.service[1]}"
keys = []
[identity.peers]
uid = [{uid}]
"""


def write_dev_outputs(state: DevState, url: str) -> dict[str, Any]:
    """Write ``knoxd.toml`` and ``dev.json`` for the server now at ``url``; return the JSON."""
    knoxd_config = state.directory / "knoxd.toml"
    text = _knoxd_toml(state, url)
    if not knoxd_config.exists() or knoxd_config.read_text(encoding="utf-8") != text:
        knoxd_config.write_text(text, encoding="utf-8")
    info: dict[str, Any] = {
        "url": url,
        "ca": str(state.pki.ca),
        "ca_key": str(state.pki.ca_key),
        "tokens": {user: str(state.token_path(user)) for user in ("admin", "dev")},
        "certs": {
            "host": [str(p) for p in state.pki.host],
            "service": [str(p) for p in state.pki.service],
        },
        "knoxd_config": str(knoxd_config),
    }
    tmp = state.directory / "dev.json.tmp"
    tmp.write_text(json.dumps(info) + "\n", encoding="utf-8")
    tmp.replace(state.directory / "dev.json")
    return info
