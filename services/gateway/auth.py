"""Users and API keys: who is calling, and which tenant they act for.

A user key is ``bt_`` + 43 URL-safe characters from ``secrets`` (256 random bits). Only its SHA-256 is stored, with
a short visible prefix so that people can tell their keys apart; the key itself is shown once, when it is issued.

Why SHA-256 and not argon2/bcrypt: slow, salted hashes protect *low-entropy* secrets (passwords) from offline
guessing. A 256-bit random key cannot be guessed whatever the hash, so a slow hash would buy nothing and cost tens of
milliseconds on every request (the gateway's whole overhead budget is 5 ms), and its salt would make the key
unfindable by its hash (every request would have to try every stored key). GitHub and Stripe tokens work the same way.

Each user is bound to one tenant (by default a tenant named like the user; several users may share one), and every
key acts for its user's tenant. The admin key is not a user: it comes from the settings (or ``BATON_HOME/admin.key``,
written by ``baton up``) and only manages users and keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from baton.runtime.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from baton.runtime.logging import log_event
from baton.runtime.sqlite import open_database, transaction

log = logging.getLogger(__name__)

KEY_PREFIX = "bt_"
ADMIN_KEY_PREFIX = "bt_admin_"
SHOWN_PREFIX_CHARS = len(KEY_PREFIX) + 6  # "bt_AbC123": enough to tell keys apart, far too little to guess one
MIN_ADMIN_KEY_CHARS = 32
MAX_KEY_CHARS = 256
# A user's name and a tenant's: also how they appear in paths and on disk, so kept plain.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
_NAME = re.compile(NAME_PATTERN)
_PLACEHOLDERS = ("changethis", "changeme", "change-me", "change_me", "password", "secret", "example", "placeholder")
# Writing last_used_at on every request would turn each read into a write; once a minute is precise enough.
_TOUCH_EVERY_S = 60.0

HOW_TO_GET_A_KEY = (
    "ask your admin for one (baton users keys NAME); on a local stack started with `baton up` it is in "
    "BATON_HOME/api.key, which the baton CLI uses by itself"
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    name        TEXT PRIMARY KEY,
    tenant      TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS users_by_tenant ON users (tenant);
CREATE TABLE IF NOT EXISTS api_keys (
    key_id        TEXT PRIMARY KEY,
    user_name     TEXT NOT NULL,
    key_hash      TEXT NOT NULL UNIQUE,
    prefix        TEXT NOT NULL,
    label         TEXT NOT NULL DEFAULT '',
    created_at    REAL NOT NULL,
    last_used_at  REAL,
    revoked_at    REAL
);
CREATE INDEX IF NOT EXISTS api_keys_by_user ON api_keys (user_name);
"""


def new_key() -> str:
    """A fresh user key: 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_admin_key() -> str:
    return ADMIN_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_admin_key(key: str) -> str:
    """The admin key, if it is one a person could not guess; ValueError (saying how to make one) otherwise."""
    key = key.strip()
    make_one = "make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if len(key) < MIN_ADMIN_KEY_CHARS:
        raise ValueError(f"the admin key must be at least {MIN_ADMIN_KEY_CHARS} characters of random text; {make_one}")
    if len(key) > MAX_KEY_CHARS:
        raise ValueError(f"the admin key must be at most {MAX_KEY_CHARS} characters")
    lowered = key.lower()
    if any(word in lowered for word in _PLACEHOLDERS) or len(set(key)) < 10:
        raise ValueError(f"the admin key looks like a placeholder, not a random secret; {make_one}")
    return key


def load_admin_key(explicit: str | None, key_file: Path, *, file_required: bool) -> str | None:
    """The explicit key if set, else the file's (checked either way); None when there is neither."""
    if explicit:
        return check_admin_key(explicit)
    if not key_file.exists():
        if file_required:
            raise ValueError(f"the admin key file {key_file} does not exist")
        return None
    if key_file.stat().st_mode & 0o077:
        log_event(log, "auth.admin_key_file_readable", level=logging.WARNING, path=key_file,
                  hint="chmod 600 it: other users of this machine can read the admin key")  # fmt: skip
    return check_admin_key(key_file.read_text())


def bearer_key(authorization: str | None, *, legacy_tenant_header: bool = False) -> str:
    """The key in an ``Authorization: Bearer <key>`` header; Unauthenticated, saying what to send, otherwise."""
    if not authorization or not authorization.strip():
        hint = " (X-Baton-Tenant is gone: the tenant now comes from the key)" if legacy_tenant_header else ""
        raise Unauthenticated(
            f"no API key{hint}: send the header `Authorization: Bearer <key>`; to get a key, {HOW_TO_GET_A_KEY}",
            reason="NO_API_KEY",
        )
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() == "bearer" and key:
        return key
    if scheme.lower() == "bearer":
        problem = "the key after Bearer is missing"
    elif not key:
        problem = "put `Bearer ` before the key"  # never echo what may be the key itself
    else:
        problem = f"got the {scheme[:20]!r} scheme"
    raise Unauthenticated(f"the Authorization header must be `Bearer <key>`: {problem}", reason="BAD_AUTH_SCHEME")


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: a user (and so a tenant), or the admin."""

    admin: bool
    user: str | None = None
    tenant: str | None = None
    key_id: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"admin": self.admin, "user": self.user, "tenant": self.tenant, "key_id": self.key_id}


ADMIN = Principal(admin=True)


@dataclass(frozen=True)
class User:
    name: str
    tenant: str
    created_at: float
    active_keys: int

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "tenant": self.tenant,
            "created_at": self.created_at,
            "active_keys": self.active_keys,
        }


@dataclass(frozen=True)
class ApiKey:
    """A key's record: everything but the secret, which is never stored."""

    key_id: str
    user: str
    prefix: str
    label: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.key_id,
            "user": self.user,
            "prefix": self.prefix,
            "label": self.label,
            "created_at": self.created_at,
            "last_used_at": self.last_used_at,
            "revoked_at": self.revoked_at,
            "active": self.revoked_at is None,
        }


_KEY_COLUMNS = "key_id, user_name, prefix, label, created_at, last_used_at, revoked_at"


class KeyStore:
    """Users and key hashes in SQLite (the catalog's file, own tables); the admin key held as a hash in memory.

    No cache in front of the lookup: an indexed SQLite read costs tens of microseconds, and without a cache a
    revoked key stops working on the very next request.
    """

    def __init__(self, path: Path, admin_key: str | None) -> None:
        self._db = open_database(path, _SCHEMA, None)  # the catalog's file: its schema version is the catalog's
        self._lock = threading.RLock()
        self._admin_digest = hashlib.sha256(admin_key.encode()).digest() if admin_key else None
        self._touched: dict[str, float] = {}

    @property
    def has_admin(self) -> bool:
        return self._admin_digest is not None

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._db, self._lock)

    # ---------------------------------------------------------------------------------------------- authenticate

    def authenticate(self, key: str) -> Principal:
        """The principal a key acts as; Unauthenticated for an unknown, malformed or revoked key."""
        digest = hashlib.sha256(key.encode()).digest()
        # Constant-time: the admin key is a fixed secret an attacker could otherwise probe byte by byte.
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return ADMIN
        if not key.startswith(KEY_PREFIX) or len(key) > MAX_KEY_CHARS:
            raise Unauthenticated(
                f"this is not a baton API key (they start with {KEY_PREFIX}); to get one, {HOW_TO_GET_A_KEY}",
                reason="BAD_API_KEY",
            )
        # Lookup by hash: what an attacker controls is the preimage, so timing reveals nothing about stored keys.
        with self._lock:
            row = self._db.execute(
                "SELECT k.key_id, k.user_name, u.tenant, k.revoked_at FROM api_keys k"
                " JOIN users u ON u.name = k.user_name WHERE k.key_hash = ?",
                (digest.hex(),),
            ).fetchone()
        if row is None:
            raise Unauthenticated(f"this API key is not valid; to get one, {HOW_TO_GET_A_KEY}", reason="BAD_API_KEY")
        key_id, user, tenant, revoked_at = row
        if revoked_at is not None:
            raise Unauthenticated(
                f"this API key ({key_id}) was revoked; to get a new one, {HOW_TO_GET_A_KEY}", reason="KEY_REVOKED"
            )
        self._touch(key_id)
        return Principal(admin=False, user=user, tenant=tenant, key_id=key_id)

    def _touch(self, key_id: str) -> None:
        now = time.time()
        with self._lock:
            if now - self._touched.get(key_id, 0.0) < _TOUCH_EVERY_S:
                return
            self._touched[key_id] = now
            self._db.execute("UPDATE api_keys SET last_used_at = ? WHERE key_id = ?", (now, key_id))

    # ---------------------------------------------------------------------------------------------- users

    def create_user(self, name: str, tenant: str | None = None) -> User:
        tenant = tenant or name
        for what, value in (("user name", name), ("tenant", tenant)):
            if not _NAME.match(value):
                raise InvalidArgument(
                    f"{what} {value!r} must be 1-64 letters, digits, '_' or '-', starting with a letter or digit",
                    reason="BAD_NAME",
                )
        try:
            with self._transaction() as db:
                db.execute("INSERT INTO users (name, tenant, created_at) VALUES (?, ?, ?)", (name, tenant, time.time()))
        except sqlite3.IntegrityError as error:
            raise AlreadyExists(
                f"user {name!r} already exists; issue it another key with POST /v1/users/{name}/keys",
                reason="USER_EXISTS",
            ) from error
        log_event(log, "auth.user_created", user=name, tenant=tenant)
        return self.get_user(name)

    def get_user(self, name: str) -> User:
        with self._lock:
            row = self._db.execute(
                "SELECT u.name, u.tenant, u.created_at, count(k.key_id) FROM users u"
                " LEFT JOIN api_keys k ON k.user_name = u.name AND k.revoked_at IS NULL WHERE u.name = ?"
                " GROUP BY u.name",
                (name,),
            ).fetchone()
        if row is None:
            raise NotFound(f"no user {name!r}; list them with GET /v1/users (baton users list)", reason="NO_USER")
        return User(*row)

    def list_users(self, *, limit: int = 100, offset: int = 0) -> tuple[list[User], int]:
        with self._lock:
            rows = self._db.execute(
                "SELECT u.name, u.tenant, u.created_at, count(k.key_id) FROM users u"
                " LEFT JOIN api_keys k ON k.user_name = u.name AND k.revoked_at IS NULL"
                " GROUP BY u.name ORDER BY u.name LIMIT ? OFFSET ?",
                (limit, offset),
            ).fetchall()
            total = self._db.execute("SELECT count(*) FROM users").fetchone()[0]
        return [User(*row) for row in rows], int(total)

    def delete_user(self, name: str) -> int:
        """Delete a user and its keys (they stop working at once); the tenant's documents stay. Keys deleted."""
        self.get_user(name)
        with self._transaction() as db:
            deleted = db.execute("DELETE FROM api_keys WHERE user_name = ?", (name,)).rowcount
            db.execute("DELETE FROM users WHERE name = ?", (name,))
        log_event(log, "auth.user_deleted", user=name, keys=deleted)
        return int(deleted)

    # ---------------------------------------------------------------------------------------------- keys

    def issue_key(self, user: str, label: str = "") -> tuple[ApiKey, str]:
        """A new key for ``user``: its record and the secret (returned here once, never stored)."""
        self.get_user(user)
        secret = new_key()
        key_id = "key_" + secrets.token_hex(6)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO api_keys (key_id, user_name, key_hash, prefix, label, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key_id, user, hash_key(secret), secret[:SHOWN_PREFIX_CHARS], label, time.time()),
            )
        log_event(log, "auth.key_issued", user=user, key_id=key_id)
        return self.get_key(user, key_id), secret

    def get_key(self, user: str, key_id: str) -> ApiKey:
        with self._lock:
            row = self._db.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_name = ? AND key_id = ?", (user, key_id)
            ).fetchone()
        if row is None:
            raise NotFound(f"user {user!r} has no key {key_id!r}; list them with GET /v1/users/{user}/keys",
                           reason="NO_API_KEY_RECORD")  # fmt: skip
        return ApiKey(*row)

    def list_keys(self, user: str) -> list[ApiKey]:
        self.get_user(user)
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE user_name = ? ORDER BY created_at", (user,)
            ).fetchall()
        return [ApiKey(*row) for row in rows]

    def revoke_key(self, user: str, key_id: str) -> ApiKey:
        """Idempotent: revoking a revoked key keeps its first revocation time."""
        self.get_key(user, key_id)
        with self._transaction() as db:
            db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE user_name = ? AND key_id = ? AND revoked_at IS NULL",
                (time.time(), user, key_id),
            )
        log_event(log, "auth.key_revoked", user=user, key_id=key_id)
        return self.get_key(user, key_id)

    def close(self) -> None:
        with self._lock:
            self._db.close()
