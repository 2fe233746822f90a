"""knox-server's configuration file and the dev state directory."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from knox.model import Access, AccessType, PrincipalType
from knox_server.config import ConfigError, load_config
from knox_server.dev import DEV_SPIFFE_ID, prepare_dev_state, write_dev_outputs
from knox_server.tokens import TokenDB

MINIMAL = """
[server]
listen = ["127.0.0.1:9443"]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
host = "knox-test"

[storage]
url = "sqlite:///knox.db"
master_key_file = "master.keys"
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_minimal_config_resolves_paths_relative_to_the_file(tmp_path: Path) -> None:
    config = load_config(_write(tmp_path, MINIMAL))
    assert config.listen == ("127.0.0.1:9443",)
    assert config.cert == tmp_path.resolve() / "server.pem"
    assert config.storage_url == f"sqlite:///{tmp_path.resolve() / 'knox.db'}"
    assert config.knox_compat is False
    assert config.token_file is None and config.audit_file is None
    assert config.default_acl == ()


def test_default_acl_and_optional_tables(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
[auth]
token_file = "/etc/knox/tokens.toml"
[audit]
file = "audit.jsonl"
[[default_acl]]
type = "UserGroup"
id = "security-team"
access = "Admin"
"""
    )
    config = load_config(_write(tmp_path, text))
    assert config.default_acl == (
        Access(PrincipalType.USER_GROUP, "security-team", AccessType.ADMIN),
    )
    assert config.token_file == Path("/etc/knox/tokens.toml")
    assert config.audit_file == tmp_path.resolve() / "audit.jsonl"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace('host = "knox-test"', 'hots = "x"'), "server.hots: unknown key"),
        (lambda t: t + "\n[extra]\n", "extra: unknown table"),
        (lambda t: t.replace('url = "sqlite:///knox.db"', 'url = "mysql://x"'), "storage.url"),
        (lambda t: t.replace('cert = "server.pem"\n', ""), "server.cert"),
        (lambda t: t.replace('["127.0.0.1:9443"]', "[]"), "server.listen"),
        (
            lambda t: t + '[[default_acl]]\ntype = "Service"\nid = "web"\naccess = "Read"\n',
            "default_acl[0].id",
        ),
        (
            lambda t: t + '[[default_acl]]\ntype = "Robot"\nid = "x"\naccess = "Read"\n',
            "default_acl[0]",
        ),
        (lambda t: t.replace("[storage]", "[storag]"), "storag: unknown table"),
        (lambda t: t + "oops", "server.toml"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, edit: object, message: str) -> None:
    assert callable(edit)
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, edit(MINIMAL)))
    assert message in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.toml")


def test_dev_state_is_generated_once_and_reused(tmp_path: Path) -> None:
    state = prepare_dev_state(tmp_path / "dev")
    ca_before = state.pki.ca.read_bytes()
    admin_token = state.token_path("admin").read_text().strip()
    again = prepare_dev_state(tmp_path / "dev")
    assert again.pki.ca.read_bytes() == ca_before
    assert again.token_path("admin").read_text().strip() == admin_token

    for private in (
        state.pki.ca_key,
        state.pki.host[1],
        state.token_path("admin"),
        state.master_key_file,
    ):
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o600, private
    tokens = TokenDB.load(state.token_file)
    admin = tokens.lookup(admin_token)
    assert admin is not None and admin.id == "admin" and "security-team" in admin.groups
    dev = tokens.lookup(state.token_path("dev").read_text().strip())
    assert dev is not None and dev.groups == frozenset()

    service = x509.load_pem_x509_certificate(state.pki.service[0].read_bytes())
    san = service.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [DEV_SPIFFE_ID]
    host = x509.load_pem_x509_certificate(state.pki.host[0].read_bytes())
    assert host.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName) == [state.hostname]


def test_dev_outputs_describe_the_running_server(tmp_path: Path) -> None:
    state = prepare_dev_state(tmp_path / "dev")
    info = write_dev_outputs(state, "https://127.0.0.1:40123")
    on_disk = json.loads((state.directory / "dev.json").read_text())
    assert on_disk == info
    assert info["url"] == "https://127.0.0.1:40123"
    assert set(info["tokens"]) == {"admin", "dev"}
    for path in [
        info["ca"],
        info["ca_key"],
        info["knoxd_config"],
        *info["certs"]["host"],
        *info["certs"]["service"],
    ]:
        assert Path(path).is_absolute() and Path(path).exists()
    knoxd = tomllib.loads(Path(info["knoxd_config"]).read_text())
    assert knoxd["upstream"]["urls"] == ["https://127.0.0.1:40123"]
    assert [i["kind"] for i in knoxd["identity"]] == ["machine", "spiffe"]
    assert all(i["peers"]["uid"] == [os.getuid()] for i in knoxd["identity"])
