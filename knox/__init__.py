"""Knox for Python: the shared core (data model, v0 JSON, daemon socket protocol) and clients."""

from knox.errors import Code, KnoxError
from knox.model import (
    ACL,
    Access,
    AccessType,
    Key,
    KeyVersion,
    PrincipalType,
    VersionStatus,
)

__version__ = "0.1.0"

__all__ = [
    "ACL",
    "Access",
    "AccessType",
    "Code",
    "Key",
    "KeyVersion",
    "KnoxError",
    "PrincipalType",
    "VersionStatus",
    "__version__",
]
