"""knox.model against Knox's rules: hash, transitions, ACL editing and matching, validation."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from knox.errors import BadPrincipalError, Code, VersionNotFoundError
from knox.model import (
    ACL,
    Access,
    AccessType,
    InvalidACLError,
    InvalidKeyError,
    InvalidKeyIDError,
    Key,
    KeyVersion,
    Machine,
    Principal,
    PrincipalMux,
    PrincipalType,
    Service,
    StatusTransitionError,
    User,
    VersionStatus,
    acl_add,
    acl_allows,
    acl_validate,
    is_valid_key_id,
    update_status,
    validate_key_id,
    validate_principal,
    version_hash,
)

PRI, ACT, INA = VersionStatus.PRIMARY, VersionStatus.ACTIVE, VersionStatus.INACTIVE
MAX_UINT64 = 2**64 - 1
VECTORS = Path(__file__).parents[2] / "shared" / "vectors" / "version_hash.json"


def kv(vid: int, status: VersionStatus, data: bytes = b"", ts: int = 0) -> KeyVersion:
    return KeyVersion(id=vid, data=data, status=status, ts=ts)


def make_key(versions: tuple[KeyVersion, ...], acl: ACL = (), key_id: str = "k") -> Key:
    return Key(id=key_id, acl=acl, versions=versions, hash=version_hash(versions))


# --- version hash ---------------------------------------------------------------------------


def _vector_cases() -> list[Any]:
    cases = json.loads(VECTORS.read_text())["cases"]
    return [
        pytest.param(
            tuple(kv(v["id"], VersionStatus(v["status"])) for v in case["versions"]),
            case["hash"],
            id="-".join(f"{v['id']}{v['status'][0]}" for v in case["versions"]),
        )
        for case in cases
    ]


def test_vectors_file_has_the_reference_table() -> None:
    assert len(_vector_cases()) >= 4


@pytest.mark.parametrize(("versions", "expected"), _vector_cases())
def test_hash_vectors_in_every_input_order(versions: tuple[KeyVersion, ...], expected: str) -> None:
    for order in itertools.permutations(versions):
        assert version_hash(order) == expected
    assert version_hash(iter(versions)) == expected


@st.composite
def version_lists(draw: st.DrawFn, min_id: int = 0) -> tuple[KeyVersion, ...]:
    """A valid version list (one Primary, unique ids) in arbitrary order."""
    ids = draw(st.lists(st.integers(min_id, MAX_UINT64), min_size=1, max_size=8, unique=True))
    others = draw(
        st.lists(st.sampled_from([ACT, INA]), min_size=len(ids) - 1, max_size=len(ids) - 1)
    )
    versions = [kv(vid, s) for vid, s in zip(ids, [PRI, *others], strict=True)]
    return tuple(draw(st.permutations(versions)))


@settings(max_examples=100, deadline=None)
@given(st.data(), version_lists())
def test_hash_is_independent_of_order(
    data: st.DataObject, versions: tuple[KeyVersion, ...]
) -> None:
    shuffled = data.draw(st.permutations(versions))
    assert version_hash(shuffled) == version_hash(versions)


# Id 0 is left out: an Active version 0 hashes like the zero padding of an Inactive one (below).
@settings(max_examples=100, deadline=None)
@given(st.data(), version_lists(min_id=1))
def test_hash_changes_when_a_status_changes(
    data: st.DataObject, versions: tuple[KeyVersion, ...]
) -> None:
    before = version_hash(versions)
    movable = [v for v in versions if v.status is not PRI]
    if not movable:
        return
    target = data.draw(st.sampled_from(movable))
    flipped = update_status(versions, target.id, INA if target.status is ACT else ACT)
    assert version_hash(flipped) != before
    if target.status is ACT:
        promoted = update_status(versions, target.id, PRI)
        assert version_hash(promoted) != before


def test_hash_cannot_tell_active_id_zero_from_inactive_padding() -> None:
    # A property of Knox's algorithm, kept for compatibility: ids are random 63-bit, never 0
    # in practice.
    assert version_hash([kv(1, PRI), kv(0, ACT)]) == version_hash([kv(1, PRI), kv(0, INA)])


def test_hash_counts_inactive_versions() -> None:
    assert version_hash([kv(1, PRI), kv(3, INA)]) != version_hash(
        [kv(1, PRI), kv(3, INA), kv(4, INA)]
    )


# --- status transitions ---------------------------------------------------------------------

BASE = (kv(10, PRI), kv(20, ACT), kv(30, INA), kv(40, ACT))
FROM_ID = {PRI: 10, ACT: 20, INA: 30}
ERR_TO_PRIMARY = "Version must be Active to promote to Primary"
ERR_TO_ACTIVE = "Primary Key can not be demoted. Specify Active key to promote."
ERR_TO_INACTIVE = "Version must be Active to demote to Inactive"


@pytest.mark.parametrize(
    ("current", "requested", "error"),
    [
        (PRI, PRI, ERR_TO_PRIMARY),
        (PRI, ACT, ERR_TO_ACTIVE),
        (PRI, INA, ERR_TO_INACTIVE),
        (ACT, PRI, None),
        (ACT, ACT, ERR_TO_ACTIVE),
        (ACT, INA, None),
        (INA, PRI, ERR_TO_PRIMARY),
        (INA, ACT, None),
        (INA, INA, ERR_TO_INACTIVE),
    ],
)
def test_transition_table(
    current: VersionStatus, requested: VersionStatus, error: str | None
) -> None:
    vid = FROM_ID[current]
    if error is not None:
        with pytest.raises(StatusTransitionError) as info:
            update_status(BASE, vid, requested)
        assert str(info.value) == error
        assert info.value.code == Code.BAD_REQUEST_DATA
        assert int(info.value.code) == 11
        assert info.value.http_status == 400
        return
    result = update_status(BASE, vid, requested)
    assert [v.id for v in result] == [10, 20, 30, 40]
    assert next(v for v in result if v.id == vid).status is requested
    make_key(result).validate()


def test_promote_demotes_old_primary_to_active_and_keeps_order() -> None:
    versions = (kv(10, PRI, b"p"), kv(20, ACT, b"a"), kv(30, INA, b"i"), kv(40, ACT, b"b"))
    result = update_status(versions, 40, PRI)
    assert result == (kv(10, ACT, b"p"), kv(20, ACT, b"a"), kv(30, INA, b"i"), kv(40, PRI, b"b"))
    assert versions[0].status is PRI


def test_deactivate_and_reactivate_touch_only_that_version() -> None:
    assert update_status(BASE, 40, INA) == (kv(10, PRI), kv(20, ACT), kv(30, INA), kv(40, INA))
    assert update_status(BASE, 30, ACT) == (kv(10, PRI), kv(20, ACT), kv(30, ACT), kv(40, ACT))


def test_unknown_version_is_code_3() -> None:
    with pytest.raises(VersionNotFoundError) as info:
        update_status(BASE, 99, INA)
    assert str(info.value) == "Key version not found"
    assert info.value.code == 3
    assert info.value.http_status == 404


# --- Key accessors and validation -----------------------------------------------------------


def test_key_accessors() -> None:
    key = make_key((kv(5, ACT), kv(7, INA), kv(3, PRI), kv(9, ACT)))
    assert key.primary == kv(3, PRI)
    assert [v.id for v in key.active] == [5, 3, 9]
    assert key.version(7) == kv(7, INA)
    with pytest.raises(VersionNotFoundError, match=r"^Key version not found$"):
        key.version(8)


@pytest.mark.parametrize(("status", "ids"), [(PRI, [3]), (ACT, [5, 3, 9]), (INA, [5, 7, 3, 9])])
def test_filtered_keeps_stored_order_and_full_hash(status: VersionStatus, ids: list[int]) -> None:
    key = make_key((kv(5, ACT), kv(7, INA), kv(3, PRI), kv(9, ACT)))
    filtered = key.filtered(status)
    assert [v.id for v in filtered.versions] == ids
    assert filtered.hash == key.hash


def test_primary_of_a_key_without_one_raises() -> None:
    key = Key(id="k", acl=(), versions=(kv(1, ACT),), hash="")
    with pytest.raises(InvalidKeyError):
        _ = key.primary


def test_valid_key_validates() -> None:
    acl = (Access(PrincipalType.USER, "alice", AccessType.ADMIN),)
    make_key((kv(1, PRI), kv(2, ACT), kv(3, INA)), acl, key_id="tink:aead:svc_1").validate()


NONE_ACL = (Access(PrincipalType.USER, "alice", AccessType.NONE),)


@pytest.mark.parametrize(
    ("key", "error", "text"),
    [
        (make_key((kv(1, PRI),), key_id="bad id"), InvalidKeyIDError, "KeyID can only contain"),
        # The id is checked before the ACL, the ACL before the versions.
        (make_key((kv(1, ACT),), NONE_ACL, key_id="bad-id"), InvalidKeyIDError, "KeyID can"),
        (make_key((kv(1, ACT),), NONE_ACL), InvalidACLError, "ACL contains None access"),
        (make_key((kv(1, PRI), kv(2, PRI))), InvalidKeyError, "More than one Primary key"),
        (make_key((kv(1, ACT),)), InvalidKeyError, "More than one Primary key"),
        (make_key((kv(1, PRI), kv(1, PRI))), InvalidKeyError, "Repeated Version ID"),
        (
            Key(id="k", acl=(), versions=(kv(1, PRI), kv(2, ACT)), hash=version_hash([kv(1, PRI)])),
            InvalidKeyError,
            "Hash does not match",
        ),
    ],
)
def test_key_validate_errors(key: Key, error: type[Exception], text: str) -> None:
    with pytest.raises(error) as info:
        key.validate()
    assert str(info.value).startswith(text)


def test_key_validate_codes() -> None:
    assert InvalidKeyIDError("").code == Code.BAD_KEY_FORMAT
    assert InvalidACLError("").http_status == 500
    assert InvalidKeyError("").http_status == 500


# --- key ids --------------------------------------------------------------------------------


@pytest.mark.parametrize("key_id", ["a", "test_key", "tink:aead:x", "A1_:", "9", "a" * 512])
def test_valid_key_ids(key_id: str) -> None:
    assert is_valid_key_id(key_id)
    validate_key_id(key_id)


@pytest.mark.parametrize(
    "key_id",
    ["", "a" * 513, "a-b", "a b", "a/b", "a.b", "abc\n", "\nabc", "é", "\u0661", "\uff41", "ǅ"],
)
def test_invalid_key_ids(key_id: str) -> None:
    assert not is_valid_key_id(key_id)
    with pytest.raises(InvalidKeyIDError) as info:
        validate_key_id(key_id)
    assert str(info.value) == (
        "KeyID can only contain alphanumeric characters, colons, and underscores."
    )
    assert info.value.code == 12


# --- ACL editing ----------------------------------------------------------------------------

ALICE_R = Access(PrincipalType.USER, "alice", AccessType.READ)
BOB_W = Access(PrincipalType.USER, "bob", AccessType.WRITE)
HOST_A = Access(PrincipalType.MACHINE, "alice", AccessType.ADMIN)


def test_acl_add_replaces_in_place() -> None:
    acl = (ALICE_R, BOB_W, HOST_A)
    new = Access(PrincipalType.USER, "bob", AccessType.ADMIN)
    assert acl_add(acl, new) == (ALICE_R, new, HOST_A)


def test_acl_add_none_removes_the_matching_entry() -> None:
    acl = (ALICE_R, BOB_W, HOST_A)
    assert acl_add(acl, Access(PrincipalType.USER, "alice", AccessType.NONE)) == (BOB_W, HOST_A)


def test_acl_add_none_on_absent_entry_is_a_no_op() -> None:
    acl = (ALICE_R, BOB_W)
    assert acl_add(acl, Access(PrincipalType.MACHINE, "bob", AccessType.NONE)) == acl
    assert acl_add((), Access(PrincipalType.USER, "x", AccessType.NONE)) == ()


def test_acl_add_appends_new_pairs() -> None:
    # Same id, different type: a different principal.
    assert acl_add((ALICE_R,), HOST_A) == (ALICE_R, HOST_A)
    assert acl_add((), BOB_W) == (BOB_W,)


def test_acl_validate() -> None:
    acl_validate(())
    acl_validate((ALICE_R, BOB_W, HOST_A))
    with pytest.raises(InvalidACLError, match=r"^ACL contains None access$"):
        acl_validate((ALICE_R, Access(PrincipalType.USER, "bob", AccessType.NONE)))
    dup = Access(PrincipalType.USER, "alice", AccessType.ADMIN)
    with pytest.raises(InvalidACLError, match=r"^Duplicate entries in ACL$") as info:
        acl_validate((ALICE_R, BOB_W, dup))
    assert info.value.code == Code.INTERNAL_SERVER_ERROR


# --- access checks --------------------------------------------------------------------------


def entry(ptype: PrincipalType, pid: str, access: AccessType = AccessType.READ) -> Access:
    return Access(ptype, pid, access)


@pytest.mark.parametrize(
    ("principal", "matching"),
    [
        (User("x", frozenset({"x"})), {PrincipalType.USER, PrincipalType.USER_GROUP}),
        (Machine("x"), {PrincipalType.MACHINE, PrincipalType.MACHINE_PREFIX}),
        (Service("x"), {PrincipalType.SERVICE, PrincipalType.SERVICE_PREFIX}),
    ],
)
def test_principal_matches_only_its_own_entry_types(
    principal: Principal, matching: set[PrincipalType]
) -> None:
    for ptype in PrincipalType:
        allowed = acl_allows((entry(ptype, "x"),), principal, AccessType.READ)
        assert allowed is (ptype in matching), ptype


def test_user_and_groups() -> None:
    alice = User("alice", frozenset({"sec", "ops"}))
    assert acl_allows((entry(PrincipalType.USER, "alice"),), alice, AccessType.READ)
    assert acl_allows((entry(PrincipalType.USER_GROUP, "ops"),), alice, AccessType.READ)
    assert not acl_allows((entry(PrincipalType.USER, "bob"),), alice, AccessType.READ)
    assert not acl_allows((entry(PrincipalType.USER_GROUP, "alice"),), alice, AccessType.READ)
    assert not acl_allows((entry(PrincipalType.USER, "ali"),), alice, AccessType.READ)


@pytest.mark.parametrize(
    ("prefix", "host", "allowed"),
    [
        ("auth", "auth004", True),
        ("auth", "authz", True),
        ("auth", "auth", True),
        ("auth004", "auth", False),
        ("auth", "xauth", False),
        ("", "auth004", False),
        ("", "", False),
    ],
)
def test_machine_prefix(prefix: str, host: str, allowed: bool) -> None:
    acl = (entry(PrincipalType.MACHINE_PREFIX, prefix),)
    assert acl_allows(acl, Machine(host), AccessType.READ) is allowed


def test_machine_exact() -> None:
    acl = (entry(PrincipalType.MACHINE, "auth004"),)
    assert acl_allows(acl, Machine("auth004"), AccessType.READ)
    assert not acl_allows(acl, Machine("auth0045"), AccessType.READ)
    assert not acl_allows(acl, Machine("auth"), AccessType.READ)


@pytest.mark.parametrize(
    ("prefix", "spiffe_id", "allowed"),
    [
        ("spiffe://d/a/", "spiffe://d/a/b", True),
        ("spiffe://d/a/", "spiffe://d/a/b/c", True),
        ("spiffe://d/a/", "spiffe://d/ab", False),
        ("spiffe://d/a/", "spiffe://d/a", False),
        # Stored without the trailing slash (create never validated it): whole components only.
        ("spiffe://d/a", "spiffe://d/a/b", True),
        ("spiffe://d/a", "spiffe://d/a", True),
        ("spiffe://d/a", "spiffe://d/ab", False),
        ("spiffe://d/a", "spiffe://d/ab/c", False),
        ("", "spiffe://d/a", False),
    ],
)
def test_service_prefix(prefix: str, spiffe_id: str, allowed: bool) -> None:
    acl = (entry(PrincipalType.SERVICE_PREFIX, prefix),)
    assert acl_allows(acl, Service(spiffe_id), AccessType.READ) is allowed


def test_service_exact() -> None:
    acl = (entry(PrincipalType.SERVICE, "spiffe://d/a"),)
    assert acl_allows(acl, Service("spiffe://d/a"), AccessType.READ)
    assert not acl_allows(acl, Service("spiffe://d/a/b"), AccessType.READ)


LEVELS = [AccessType.NONE, AccessType.READ, AccessType.WRITE, AccessType.ADMIN]


@pytest.mark.parametrize(("granted", "required"), list(itertools.product(LEVELS, LEVELS[1:])))
def test_access_levels_nest(granted: AccessType, required: AccessType) -> None:
    acl = (entry(PrincipalType.MACHINE, "h", granted),)
    expected = LEVELS.index(granted) >= LEVELS.index(required)
    assert acl_allows(acl, Machine("h"), required) is expected
    assert granted.can_access(required) is expected


def test_highest_matching_grant_wins() -> None:
    alice = User("alice", frozenset({"sec"}))
    acl = (
        entry(PrincipalType.USER, "alice", AccessType.READ),
        entry(PrincipalType.USER_GROUP, "sec", AccessType.ADMIN),
        entry(PrincipalType.USER_GROUP, "other", AccessType.WRITE),
    )
    assert alice.grant(acl) is AccessType.ADMIN
    assert acl_allows(acl, alice, AccessType.ADMIN)
    assert User("bob").grant(acl) is AccessType.NONE


def test_principal_mux_any_of() -> None:
    mux = PrincipalMux((("mtls", Machine("web1")), ("spiffe-fallback", Service("spiffe://d/web"))))
    acl = (
        entry(PrincipalType.MACHINE, "web1", AccessType.READ),
        entry(PrincipalType.SERVICE_PREFIX, "spiffe://d/", AccessType.WRITE),
    )
    assert acl_allows(acl, mux, AccessType.WRITE)
    assert not acl_allows(acl, mux, AccessType.ADMIN)
    assert acl_allows(acl[:1], mux, AccessType.READ)
    assert not acl_allows(acl[:1], mux, AccessType.WRITE)
    assert not acl_allows((), mux, AccessType.READ)
    assert mux.id == "web1"
    assert mux.default == Machine("web1")
    assert mux.kind == "mux[mtls=>machine,spiffe-fallback=>service]"
    assert not mux.is_user()


def test_principal_mux_single_and_empty() -> None:
    single = PrincipalMux((("github", User("alice")),))
    assert single.kind == "user"
    assert single.id == "alice"
    assert single.is_user()
    assert PrincipalMux((("spiffe", Service("spiffe://d/a")),)).kind == "service"
    with pytest.raises(ValueError, match="at least one"):
        PrincipalMux(())


# --- principal validation -------------------------------------------------------------------

KNOWN_TYPES = [t for t in PrincipalType if t is not PrincipalType.UNKNOWN]
ERR_EMPTY = "Principals of type user, user group, machine, or machine prefix may not be empty."
ERR_URL = "Service prefix is invalid URL, must conform to 'spiffe://<domain>/<path>/' format."
ERR_SLASH = (
    "Service prefix had no trailing slash, must conform to 'spiffe://<domain>/<path>/' format."
)


@pytest.mark.parametrize("ptype", KNOWN_TYPES)
def test_empty_principal_id_rejected_for_every_type(ptype: PrincipalType) -> None:
    with pytest.raises(BadPrincipalError) as info:
        validate_principal(Access(ptype, "", AccessType.READ))
    assert str(info.value) == ERR_EMPTY
    assert info.value.code == Code.BAD_PRINCIPAL_IDENTIFIER
    assert int(info.value.code) == 13


@pytest.mark.parametrize(
    ("ptype", "pid", "error"),
    [
        (PrincipalType.SERVICE, "https://d/a", ERR_URL),
        (PrincipalType.SERVICE_PREFIX, "https://d/a/", ERR_URL),
        (PrincipalType.SERVICE, "spiffe:///a", ERR_URL),
        (PrincipalType.SERVICE_PREFIX, "spiffe:///a/", ERR_URL),
        (PrincipalType.SERVICE, "not a url", ERR_URL),
        (PrincipalType.SERVICE_PREFIX, "spiffe://[::1/a/", ERR_URL),
        (PrincipalType.SERVICE_PREFIX, "spiffe://d/a", ERR_SLASH),
        (PrincipalType.SERVICE_PREFIX, "spiffe://d", ERR_SLASH),
        (PrincipalType.SERVICE, "spiffe://d/a", None),
        (PrincipalType.SERVICE, "spiffe://d/a/", None),
        (PrincipalType.SERVICE_PREFIX, "spiffe://d/a/", None),
        (PrincipalType.SERVICE_PREFIX, "spiffe://d/", None),
        (PrincipalType.MACHINE_PREFIX, "a", None),
        (PrincipalType.USER_GROUP, "security-team", None),
    ],
)
def test_principal_ids(ptype: PrincipalType, pid: str, error: str | None) -> None:
    item = Access(ptype, pid, AccessType.WRITE)
    if error is None:
        validate_principal(item)
        return
    with pytest.raises(BadPrincipalError) as info:
        validate_principal(item)
    assert str(info.value) == error


def test_unknown_principal_type_rejected() -> None:
    with pytest.raises(BadPrincipalError) as info:
        validate_principal(Access(PrincipalType.UNKNOWN, "x", AccessType.READ))
    assert str(info.value) == "json: Invalid PrincipalType to convert"
    assert info.value.code == 13


@pytest.mark.parametrize("ptype", list(PrincipalType))
def test_none_entries_are_not_checked(ptype: PrincipalType) -> None:
    validate_principal(Access(ptype, "", AccessType.NONE))


# --- secrecy and immutability ---------------------------------------------------------------

SECRET = b"hunter2-top-secret"


def test_secret_bytes_never_in_repr() -> None:
    version = kv(1, PRI, SECRET, 5)
    key = dataclasses.replace(make_key((version,)), tink_keyset="S0VZU0VULVNFQ1JFVA==")
    for text in (repr(version), str(version), repr(key), str(key), repr(key.versions)):
        assert "hunter2" not in text
        assert "aHVudGVyMi" not in text  # its base64
        assert "S0VZU0VU" not in text
    assert f"<{len(SECRET)} bytes>" in repr(version)


def test_values_are_frozen() -> None:
    version = kv(1, PRI, SECRET)
    key = make_key((version,))
    access = Access(PrincipalType.USER, "a", AccessType.READ)
    for obj, name, value in [
        (version, "data", b"x"),
        (version, "status", INA),
        (key, "hash", "0"),
        (key, "versions", ()),
        (access, "access", AccessType.ADMIN),
        (User("a"), "id", "b"),
        (Machine("a"), "id", "b"),
        (Service("a"), "id", "b"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)
