"""The Knox-compatible export: key files where Knox's daemon writes them, for legacy consumers.

Knox's Go file client (``knox.NewFileClient``) and scripts read ``/var/lib/knox/v0/keys/<id>``: the
key in Knox's JSON, as Knox's daemon writes it (empty ACL, the Primary and Active versions, the
server's hash). For each ``[[export]]``, :func:`run_export` keeps ``EXPORT_DIR/v0/keys/<key id>``
equal to the key as the export's identity holds it in the cache view:

* written at start (for every exported key the view holds) and after every change of the key, each
  time atomically: a temporary file in ``EXPORT_DIR`` (where Knox puts its own) is written, given
  its owner, group and mode, fsynced, and renamed over the key file. A reader sees the old file or
  the new one, never a partial one, even after a crash;
* with the configured owner, group and mode (default root:root 0640), not Knox's 0666;
* removed when the key leaves the view (revoked, deleted on the server, unregistered), where Knox
  would keep serving it. A key missing at start (a cold cache) leaves an existing file alone
  until the upstream answers.

Directories: ``EXPORT_DIR``, ``v0`` and ``v0/keys`` are created 0755 when missing. Since root
writes into them, each must be a real directory (not a symlink) owned by knoxd's user and writable
by nobody else; Knox's daemon makes them 0777, and such a tree is refused with a message saying
what to fix. File operations go through directory fds opened without following symlinks, so
nothing can redirect them. Failed writes are logged and retried with backoff; key data is never
logged.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import structlog
import trio

from knox.model import Key, VersionStatus
from knox.wire import encode_key
from knoxd.cache.view import CacheView, Change
from knoxd.config import Config, ExportConfig

__all__ = ["ExportError", "ExportTarget", "export_document", "resolve_targets", "run_export"]

log = structlog.get_logger("knoxd.export")

_DIR_MODE = 0o755
_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 60.0
_TEMP_RE = re.compile(r"\.(?P<key>[A-Za-z0-9_:]+)\.[0-9a-f]{16}\.tmp")

_Slot = tuple[str, str]


class ExportError(Exception):
    """The export cannot work as configured (an unknown user or group, an unsafe directory); the
    message says what to fix."""


@dataclass(frozen=True, slots=True)
class ExportTarget:
    """One export with its owner and group resolved to ids."""

    key_id: str
    identity: str
    uid: int
    gid: int
    mode: int


def export_document(key: Key) -> bytes:
    """The key file's bytes: Knox's JSON of the key as Knox's GET returns it (empty ACL, Primary
    and Active versions, the hash of the full list), which Knox's file client reads."""
    return encode_key(replace(key.filtered(VersionStatus.ACTIVE), acl=(), path=""))


def resolve_targets(exports: Sequence[ExportConfig]) -> list[ExportTarget]:
    """The exports with user and group names looked up. Raises :class:`ExportError` for a name
    this host does not know."""
    return [ExportTarget(e.key, e.identity, _uid(e), _gid(e), e.mode) for e in exports]


def _uid(export: ExportConfig) -> int:
    if isinstance(export.owner, int):
        return export.owner
    try:
        return pwd.getpwnam(export.owner).pw_uid
    except KeyError:
        raise ExportError(f"export of {export.key}: no user {export.owner!r}") from None


def _gid(export: ExportConfig) -> int:
    if isinstance(export.group, int):
        return export.group
    try:
        return grp.getgrnam(export.group).gr_gid
    except KeyError:
        raise ExportError(f"export of {export.key}: no group {export.group!r}") from None


# --- the file operations (blocking; run in worker threads) -------------------------------------


class _Dirs:
    """Open fds of ``EXPORT_DIR`` and its ``v0/keys``, checked; close after use."""

    def __init__(self, export_dir: Path) -> None:
        os.makedirs(export_dir, mode=_DIR_MODE, exist_ok=True)
        self.base = _open_dir(None, str(export_dir), export_dir)
        try:
            v0 = _open_dir(self.base, "v0", export_dir / "v0")
            try:
                self.keys = _open_dir(v0, "keys", export_dir / "v0" / "keys")
            finally:
                os.close(v0)
        except BaseException:
            os.close(self.base)
            raise

    def close(self) -> None:
        os.close(self.keys)
        os.close(self.base)


def _open_dir(parent: int | None, name: str, shown: Path) -> int:
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        if parent is None:
            raise
        os.mkdir(name, _DIR_MODE, dir_fd=parent)
        fd = os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        raise ExportError(f"{shown}: not a usable directory ({exc.strerror})") from None
    st = os.fstat(fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not knoxd's ({os.geteuid()}); chown it"
    elif st.st_mode & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o}); chmod go-w it"
    if problem is not None:
        os.close(fd)
        raise ExportError(f"{shown} {problem}")
    return fd


def _write(dirs: _Dirs, target: ExportTarget, document: bytes) -> None:
    temp = f".{target.key_id}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temp, flags, 0o600, dir_fd=dirs.base)
    try:
        try:
            view = memoryview(document)
            while view:
                view = view[os.write(fd, view) :]
            # Mode first: once the file is given away, changing it would need CAP_FOWNER.
            os.fchmod(fd, target.mode)
            os.fchown(fd, target.uid, target.gid)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, target.key_id, src_dir_fd=dirs.base, dst_dir_fd=dirs.keys)
    except BaseException:
        _unlink(dirs.base, temp)
        raise
    # No fsync of the directory: after a crash the rename may be lost, leaving the previous
    # complete file, and the next start rewrites every exported key the cache holds.


def _remove(dirs: _Dirs, target: ExportTarget) -> bool:
    if not _unlink(dirs.keys, target.key_id):
        return False
    os.fsync(dirs.keys)
    return True


def _unlink(dir_fd: int, name: str) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


def _apply(export_dir: Path, target: ExportTarget, document: bytes | None) -> bool:
    """Write ``document`` as the target's file, or remove the file if None. False only if there
    was no file to remove."""
    dirs = _Dirs(export_dir)
    try:
        if document is None:
            return _remove(dirs, target)
        _write(dirs, target, document)
        return True
    finally:
        dirs.close()


def _prepare(export_dir: Path, key_ids: set[str]) -> None:
    """Check (and create) the directories, and drop temporary files a crash left behind."""
    dirs = _Dirs(export_dir)
    try:
        for name in os.listdir(dirs.base):
            m = _TEMP_RE.fullmatch(name)
            if m is not None and m["key"] in key_ids:
                _unlink(dirs.base, name)
    finally:
        dirs.close()


# --- the trio shell -----------------------------------------------------------------------------


class _Exporter:
    """Listens to the view for the exported keys and keeps one pending mark per key: a burst of
    changes costs one write of the newest state."""

    def __init__(self, config: Config, view: CacheView, targets: list[ExportTarget]) -> None:
        self._export_dir = config.daemon.export_dir
        self._view = view
        self._targets = {(t.identity, t.key_id): t for t in targets}
        self._pending: dict[_Slot, None] = {}
        self._wakeup = trio.Event()
        self._written: dict[_Slot, bytes] = {}

    def __enter__(self) -> _Exporter:
        for identity, key_id in self._targets:
            self._view.subscribe(identity, key_id, self._on_change)
            if self._view.get(identity, key_id) is not None:
                self._pending[identity, key_id] = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        for identity, key_id in self._targets:
            self._view.unsubscribe(identity, key_id, self._on_change)

    def _on_change(self, change: Change) -> None:
        self._pending[change.identity, change.key_id] = None
        self._wakeup.set()

    async def run(self) -> None:
        failures = 0
        while True:
            while not self._pending:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            slot = next(iter(self._pending))
            del self._pending[slot]
            try:
                await self._sync(slot)
            except (OSError, ExportError) as exc:
                failures += 1
                delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** (failures - 1))
                log.warning(
                    "export failed; retrying",
                    key_id=slot[1],
                    identity=slot[0],
                    error=str(exc) if isinstance(exc, ExportError) else exc.strerror or str(exc),
                    retry_in_seconds=delay,
                )
                self._pending.setdefault(slot, None)
                await trio.sleep(delay)
            else:
                failures = 0

    async def _sync(self, slot: _Slot) -> None:
        """Make the file match the view's current state of the key."""
        target = self._targets[slot]
        entry = self._view.get(*slot)
        if entry is None:
            # Also when nothing was written this run: a file from an earlier run must go too.
            removed = await trio.to_thread.run_sync(_apply, self._export_dir, target, None)
            self._written.pop(slot, None)
            if removed:
                log.info("export removed", key_id=target.key_id, identity=target.identity)
            return
        document = export_document(entry.key)
        digest = hashlib.sha256(document).digest()
        if self._written.get(slot) == digest:
            return
        await trio.to_thread.run_sync(_apply, self._export_dir, target, document)
        self._written[slot] = digest
        log.info("export written", key_id=target.key_id, identity=target.identity)


async def run_export(
    config: Config,
    view: CacheView,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Keep the ``[[export]]`` key files in step with the view until cancelled.

    Before ``task_status.started()``: the owners and groups are resolved, the directories checked
    (and created), and leftover temporary files removed; a problem there raises
    :class:`ExportError` (or :class:`OSError` if the export directory cannot be created). Without
    exports, ``started()`` is called and this returns at once.
    """
    if not config.exports:
        task_status.started()
        return
    targets = resolve_targets(config.exports)
    await trio.to_thread.run_sync(_prepare, config.daemon.export_dir, {t.key_id for t in targets})
    with _Exporter(config, view, targets) as exporter:
        log.info("exporting keys", export_dir=str(config.daemon.export_dir), keys=len(targets))
        task_status.started()
        await exporter.run()
