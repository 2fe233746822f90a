"""An identity at run time: its checked credentials and the one mTLS client built on them.

The credentials are the identity's certificate and key files and the upstream CA bundle. They are
read together (:func:`read_credentials`), checked (:func:`check_credentials`) and turned into a TLS
context (:func:`tls_context`) without touching the live client, so a bad set never replaces a
good one. The checks:

* hard, at start and on reload (:class:`~knoxd.upstream.identity_files.IdentityFileError`):
  readable PEM files, the key matches the certificate, what the configuration's rules demand of the
  certificate (see :mod:`knoxd.upstream.identity_files`), a CA bundle and pair the TLS library
  accepts;
* soft, returned as problems: the certificate is inside its validity dates; each certificate in the
  cert file is issued by the next one; and when the upstream CA bundle holds the issuer of the
  chain, the chain verifies to it for client authentication (a server may trust a client CA the
  daemon does not know, so an unknown issuer is not a problem). At start-up soft problems are
  logged and the credentials used anyway, since the files may be about to be fixed; a reload with a
  problem is rejected.

:class:`Identity` holds the current :class:`~knox.http_client.KnoxHTTPClient`. Callers borrow it
with :meth:`Identity.lease`; a reload that passes every check builds a new context and a new
client (``stack.md`` §1: never reload a live context in place), switches to it, and closes the old
client once no lease holds it. :meth:`Identity.watch` reloads whenever something changes in the
directories of the three files (so atomic renames and symlink swaps are seen); it stops promptly
when :meth:`Identity.stop` sets its stop event (``stack.md`` §2). A set of files that was rejected
is logged once, not on every unrelated change in its directory.

The certificate and key are handed to the TLS library through an anonymous in-memory file
(``memfd``), so what is loaded is exactly what was checked and the key is never copied to disk.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import os
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio
import watchfiles
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from knox.http_client import KnoxHTTPClient
from knoxd.config import IdentityConfig, UpstreamConfig
from knoxd.upstream.identity_files import (
    IdentityFacts,
    IdentityFileError,
    identity_facts,
    read_identity_file,
)

__all__ = [
    "CLOSE_TIMEOUT",
    "Credentials",
    "Identity",
    "check_credentials",
    "read_credentials",
    "tls_context",
]

#: Longest wait for an old client's connections to close after a rotation or at shutdown.
CLOSE_TIMEOUT = 5.0
# How long the watcher thread blocks before looking at its stop event again (the bound on a
# shutdown that forgot to set it, and on the first look at the files after the watch is set up).
_RUST_TIMEOUT_MS = 250

log = structlog.get_logger("knoxd.upstream")

RotationListener = Callable[[bool], None]


@dataclass(frozen=True, slots=True)
class Credentials:
    """The bytes of an identity's files as read together. ``repr`` shows no key material."""

    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    ca_pem: bytes | None = field(repr=False)

    def digest(self) -> bytes:
        h = hashlib.sha256()
        for part in (self.cert_pem, self.key_pem, self.ca_pem or b""):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()


def read_credentials(identity: IdentityConfig, upstream: UpstreamConfig) -> Credentials:
    """Read the cert, key and CA files (blocking). Raises :class:`IdentityFileError`."""
    ca = read_identity_file(identity, "CA", upstream.ca) if upstream.ca is not None else None
    return Credentials(
        cert_pem=read_identity_file(identity, "cert", identity.cert),
        key_pem=read_identity_file(identity, "key", identity.key),
        ca_pem=ca,
    )


def check_credentials(
    identity: IdentityConfig, credentials: Credentials, upstream: UpstreamConfig, now: dt.datetime
) -> tuple[IdentityFacts, list[str]]:
    """The facts of ``credentials`` and their soft problems (see the module docstring).

    Raises :class:`IdentityFileError` for a hard problem. Messages name the identity and files,
    never key material.
    """
    facts = identity_facts(identity, credentials.cert_pem, credentials.key_pem)
    name = identity.name
    chain = x509.load_pem_x509_certificates(credentials.cert_pem)
    leaf = chain[0]
    problems: list[str] = []
    if now > leaf.not_valid_after_utc:
        problems.append(
            f"identity {name!r}: the certificate in {identity.cert} expired at "
            f"{leaf.not_valid_after_utc.isoformat()}"
        )
    elif now < leaf.not_valid_before_utc:
        problems.append(
            f"identity {name!r}: the certificate in {identity.cert} is not valid before "
            f"{leaf.not_valid_before_utc.isoformat()}"
        )
    broken = _broken_link(chain)
    if broken is not None:
        problems.append(
            f"identity {name!r}: certificate #{broken + 1} in {identity.cert} is not issued by "
            "the one after it"
        )
    elif credentials.ca_pem is not None and not problems:
        problem = _verify_to_ca(chain, credentials.ca_pem, now)
        if problem is not None:
            problems.append(
                f"identity {name!r}: the certificate in {identity.cert} does not verify "
                f"against {upstream.ca}: {problem}"
            )
    return facts, problems


def _broken_link(chain: list[x509.Certificate]) -> int | None:
    for index, (child, parent) in enumerate(itertools.pairwise(chain)):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            return index
    return None


def _verify_to_ca(chain: list[x509.Certificate], ca_pem: bytes, now: dt.datetime) -> str | None:
    try:
        roots = x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        return "the CA file holds no PEM certificate"
    top = chain[-1]
    if not any(root.subject == top.issuer or root == top for root in roots):
        return None
    # Knox accepts client certificates without a SAN extension; so does this check.
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    verifier = (
        PolicyBuilder()
        .store(Store(roots))
        .time(now)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as exc:
        return str(exc).removeprefix("validation failed: ")
    return None


def tls_context(identity: IdentityConfig, credentials: Credentials) -> ssl.SSLContext:
    """A TLS 1.2+ client context trusting exactly the CA bundle (the system store without one)
    and presenting the pair. Raises :class:`IdentityFileError` if the TLS library refuses them."""
    try:
        if credentials.ca_pem is None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        else:
            ctx = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cadata=credentials.ca_pem.decode("ascii")
            )
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise IdentityFileError(
            f"identity {identity.name!r}: the TLS library refused the CA bundle: {e}"
        ) from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    fd = os.memfd_create("knoxd-identity", os.MFD_CLOEXEC)
    try:
        payload = memoryview(credentials.cert_pem + b"\n" + credentials.key_pem)
        while payload:
            payload = payload[os.write(fd, payload) :]
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    except (ssl.SSLError, OSError) as e:
        # OpenSSL's reason names the failing step, never key bytes.
        raise IdentityFileError(
            f"identity {identity.name!r}: the TLS library refused the certificate and key: "
            f"{getattr(e, 'reason', None) or e}"
        ) from None
    finally:
        os.close(fd)
    return ctx


class _Holder:
    """A client and how many leases hold it."""

    __slots__ = ("client", "users")

    def __init__(self, client: KnoxHTTPClient) -> None:
        self.client = client
        self.users = 0


class Identity:
    """One configured identity with its current upstream client.

    Build with :meth:`load` (start-up; blocking file reads), run :meth:`watch` in a nursery, call
    :meth:`stop` then :meth:`aclose` on shutdown.
    """

    def __init__(
        self,
        config: IdentityConfig,
        upstream: UpstreamConfig,
        credentials: Credentials,
        facts: IdentityFacts,
        context: ssl.SSLContext,
    ) -> None:
        self.config = config
        self._upstream = upstream
        self._credentials = credentials
        self._facts = facts
        self._current = _Holder(self._client(facts, context))
        self._retired: list[_Holder] = []
        self._stop = trio.Event()
        self._listeners: list[RotationListener] = []
        self._last_rejection: bytes | str | None = None
        self.reloads = 0

    @classmethod
    def load(
        cls, config: IdentityConfig, upstream: UpstreamConfig, *, now: dt.datetime | None = None
    ) -> Identity:
        """Read and check the files at start-up. Soft problems are logged, hard ones raise
        :class:`IdentityFileError`."""
        credentials = read_credentials(config, upstream)
        facts, problems = check_credentials(
            config, credentials, upstream, now or dt.datetime.now(dt.UTC)
        )
        for problem in problems:
            log.warning("identity credentials have a problem; using them anyway", problem=problem)
        return cls(config, upstream, credentials, facts, tls_context(config, credentials))

    def _client(self, facts: IdentityFacts, context: ssl.SSLContext) -> KnoxHTTPClient:
        return KnoxHTTPClient(
            self._upstream.urls,
            auth=facts.principal,
            ssl_context=context,
            timeout=self._upstream.timeout_seconds,
            # HTTP/1.1, one connection per request in flight: Go Knox speaks nothing else, and
            # httpcore 1.0.9's HTTP/2 can hold one long-poll's answer until another on the same
            # connection answers (and costs more CPU per request).
            http2=False,
        )

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, principal={self._facts.principal!r})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def facts(self) -> IdentityFacts:
        """What the current credentials present upstream."""
        return self._facts

    def add_listener(self, listener: RotationListener) -> None:
        """Call ``listener(principal_changed)`` after each switch to new credentials."""
        self._listeners.append(listener)

    @asynccontextmanager
    async def lease(self) -> AsyncIterator[KnoxHTTPClient]:
        """The current client, kept open until the block exits even if a rotation retires it."""
        holder = self._current
        holder.users += 1
        try:
            yield holder.client
        finally:
            holder.users -= 1
            if holder is not self._current and holder.users == 0 and holder in self._retired:
                self._retired.remove(holder)
                await _close(holder)

    async def reload(self, *, now: dt.datetime | None = None) -> bool:
        """Re-read the files and switch to them if they changed and pass every check.

        True if the identity switched. A rejected set is logged (once per distinct set) and the
        current client stays in use.
        """
        try:
            credentials = await trio.to_thread.run_sync(
                read_credentials, self.config, self._upstream
            )
        except IdentityFileError as e:
            self._rejected(str(e), str(e))
            return False
        if credentials == self._credentials:
            return False
        try:
            facts, context = await trio.to_thread.run_sync(
                self._prepare, credentials, now or dt.datetime.now(dt.UTC)
            )
        except IdentityFileError as e:
            self._rejected(credentials.digest(), str(e))
            return False
        old = self._current
        principal_changed = facts.principal != self._facts.principal
        self._current = _Holder(self._client(facts, context))
        self._credentials = credentials
        self._facts = facts
        self._last_rejection = None
        self.reloads += 1
        log.info(
            "identity credentials reloaded",
            identity=self.name,
            principal=facts.principal,
            not_after=facts.not_after.isoformat(),
        )
        if old.users == 0:
            await _close(old)
        else:
            self._retired.append(old)
        for listener in self._listeners:
            listener(principal_changed)
        return True

    def _prepare(
        self, credentials: Credentials, now: dt.datetime
    ) -> tuple[IdentityFacts, ssl.SSLContext]:
        facts, problems = check_credentials(self.config, credentials, self._upstream, now)
        if problems:
            raise IdentityFileError(problems[0])
        return facts, tls_context(self.config, credentials)

    def _rejected(self, fingerprint: bytes | str, reason: str) -> None:
        if fingerprint == self._last_rejection:
            return
        self._last_rejection = fingerprint
        log.warning(
            "rejected the identity's new files; keeping the current credentials",
            identity=self.name,
            reason=reason,
        )

    def watched_directories(self) -> list[Path]:
        paths = [self.config.cert, self.config.key]
        if self._upstream.ca is not None:
            paths.append(self._upstream.ca)
        return sorted({p.parent for p in paths})

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reload on every change in the files' directories until :meth:`stop`.

        ``task_status.started()`` is called once the watcher is in place; the files are looked at
        then too, so a change made between loading and watching is not missed. If the directories
        cannot be watched, that is logged and the identity keeps its current credentials (it just
        cannot rotate without a restart).
        """
        first = True
        watcher = watchfiles.awatch(
            *self.watched_directories(),
            watch_filter=None,
            stop_event=self._stop,
            recursive=False,
            rust_timeout=_RUST_TIMEOUT_MS,
            yield_on_timeout=True,
        )
        try:
            # aclosing: a cancelled watch still closes the generator (and its inotify watcher).
            async with aclosing(watcher):
                async for changes in watcher:
                    if changes or first:
                        await self.reload()
                    if first:
                        first = False
                        task_status.started()
        except OSError as e:
            problem: str | None = str(e)
        else:
            problem = None
        if first:
            task_status.started()
        if problem is None:
            return
        log.error(
            "cannot watch the identity's files; rotation needs a restart",
            identity=self.name,
            error=problem,
        )

    def stop(self) -> None:
        """Stop :meth:`watch` promptly. Idempotent."""
        self._stop.set()

    async def aclose(self) -> None:
        """Stop watching and close every client. Shielded from cancellation, bounded in time."""
        self.stop()
        holders = [self._current, *self._retired]
        self._retired.clear()
        for holder in holders:
            await _close(holder)


async def _close(holder: _Holder) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
        await holder.client.aclose()
