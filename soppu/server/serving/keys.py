"""API keys for `soppu serve`: who may use which adapter. The one owner of the keys file.

A key is `soppu_<id>_<secret>`: the id finds its entry, the secret (32 random bytes) is
checked against a salted SHA-256 digest, so the file (JSON, mode 0600, written atomically)
holds no usable key. A user's key may use that user's adapter and the base model; an admin
key every adapter. Keys are printed once, when made; a lost key is revoked and made again.

    {"keys": [{"id": "3f9a…", "user": "alice", "admin": false, "salt": "…", "digest": "…",
               "created": "2026-12-03T11:00:00Z"}, …]}

`KeysFile.check` re-reads the file when it changes, so keys added or revoked while the
server runs take effect at the next request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from soppu import atomic
from soppu.errors import SoppuError
from soppu.userids import check_user_id

PREFIX = "soppu"


@dataclass(frozen=True)
class Key:
    id: str
    user: str | None  # None: an admin key
    admin: bool
    salt: str
    digest: str
    created: str

    def may_use(self, user: str | None) -> bool:
        """`user`'s adapter (None: the base model)."""
        return self.admin or user is None or user == self.user


class KeysFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._seen: tuple[int, int] | None = None  # (mtime_ns, size) of what `_keys` holds
        self._keys: dict[str, Key] = {}

    def entries(self) -> list[Key]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
            return [Key(**entry) for entry in data["keys"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SoppuError(f"{self.path}: not a soppu keys file ({exc})") from None

    def add(self, user: str | None = None, *, admin: bool = False) -> tuple[Key, str]:
        """A new key for `user` (or an admin key): its entry and the key itself, which is
        shown once and stored nowhere."""
        if admin == (user is not None):
            raise ValueError("a key is for one user, or an admin key (--admin), not both")
        if user is not None:
            check_user_id(user, "user")
        ident, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_hex(16)
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = Key(ident, user, admin, salt, _digest(salt, secret), created)
        with atomic.lock(self.path, "the keys file"):
            self._write([*self.entries(), key])
        return key, f"{PREFIX}_{ident}_{secret}"

    def revoke(self, ident: str) -> Key:
        with atomic.lock(self.path, "the keys file"):
            keys = self.entries()
            gone = [k for k in keys if k.id == ident]
            if not gone:
                raise SoppuError(f"{self.path}: no key with id {ident!r}")
            self._write([k for k in keys if k.id != ident])
        return gone[0]

    def check(self, token: str | None) -> Key | None:
        """The key `token` is, or None (no such key, revoked, or malformed)."""
        if not token or not token.startswith(PREFIX + "_"):
            return None
        ident, _, secret = token.removeprefix(PREFIX + "_").partition("_")
        key = self._current().get(ident)
        if key is None or not secret:
            return None
        return key if hmac.compare_digest(key.digest, _digest(key.salt, secret)) else None

    def _current(self) -> dict[str, Key]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._seen, self._keys = None, {}
            return self._keys
        seen = (stat.st_mtime_ns, stat.st_size)
        if seen != self._seen:
            self._keys = {k.id: k for k in self.entries()}
            self._seen = seen
        return self._keys

    def _write(self, keys: list[Key]) -> None:
        payload = {"keys": [asdict(k) for k in keys]}
        atomic.write_text(self.path, json.dumps(payload, indent=1) + "\n", private=True)


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()
