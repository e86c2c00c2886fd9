"""API keys: hashed at rest, bound to a tenant, checked on every request; the admin key manages users only."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from baton.clients.gateway import default_admin_key, default_api_key, read_secret, write_secret
from baton.runtime.errors import AlreadyExists, InvalidArgument, NotFound, Unauthenticated
from baton.runtime.http import install_error_handlers
from services.gateway import auth
from services.gateway.auth import KeyStore, bearer_key, check_admin_key, hash_key, load_admin_key, new_admin_key
from services.gateway.routes import users
from services.gateway.settings import GatewaySettings
from services.gateway.tenancy import current_tenant

ADMIN = new_admin_key()


@pytest.fixture
def store(tmp_path: Path):
    keys = KeyStore(tmp_path / "catalog.sqlite", ADMIN)
    yield keys
    keys.close()


# ------------------------------------------------------------------------------------------------ keys and hashes


def test_keys_are_long_random_and_stored_only_as_their_hash(store: KeyStore, tmp_path: Path) -> None:
    fresh = {auth.new_key() for _ in range(1000)}
    assert len(fresh) == 1000
    assert all(key.startswith("bt_") and len(key) == 3 + 43 for key in fresh)
    store.create_user("alice")
    record, secret = store.issue_key("alice", "laptop")
    assert hash_key(secret) == hash_key(secret) and len(hash_key(secret)) == 64
    assert record.prefix == secret[: auth.SHOWN_PREFIX_CHARS] and record.label == "laptop"
    on_disk = b"".join(path.read_bytes() for path in tmp_path.iterdir())  # the database, its WAL and shm
    assert secret.encode() not in on_disk
    assert secret[auth.SHOWN_PREFIX_CHARS :].encode() not in on_disk
    assert hash_key(secret).encode() in on_disk
    assert "key" not in record.to_json()


def test_a_key_acts_for_its_users_tenant(store: KeyStore) -> None:
    store.create_user("alice")
    store.create_user("bob", tenant="team")
    store.create_user("carol", tenant="team")
    alice = store.authenticate(store.issue_key("alice")[1])
    bob = store.authenticate(store.issue_key("bob")[1])
    carol = store.authenticate(store.issue_key("carol")[1])
    assert (alice.admin, alice.user, alice.tenant) == (False, "alice", "alice")
    assert (bob.tenant, carol.tenant) == ("team", "team")
    assert bob.key_id != carol.key_id


def test_unknown_malformed_and_revoked_keys_are_refused(store: KeyStore) -> None:
    store.create_user("alice")
    record, secret = store.issue_key("alice")
    for wrong in (auth.new_key(), "sk-openai-looking-key", secret[:-1], secret + "x", "bt_" + "a" * 300):
        with pytest.raises(Unauthenticated) as refused:
            store.authenticate(wrong)
        assert refused.value.reason == "BAD_API_KEY"
        assert "baton users keys" in refused.value.message
    revoked = store.revoke_key("alice", record.key_id)
    assert revoked.revoked_at is not None and not revoked.to_json()["active"]
    with pytest.raises(Unauthenticated) as refused:
        store.authenticate(secret)
    assert refused.value.reason == "KEY_REVOKED" and record.key_id in refused.value.message
    assert store.revoke_key("alice", record.key_id).revoked_at == revoked.revoked_at  # idempotent
    other = store.issue_key("alice")[1]
    assert store.authenticate(other).user == "alice"  # revoking one key leaves the others


def test_deleting_a_user_ends_its_keys(store: KeyStore) -> None:
    store.create_user("alice")
    secrets = [store.issue_key("alice")[1] for _ in range(3)]
    assert store.get_user("alice").active_keys == 3
    assert store.delete_user("alice") == 3
    for secret in secrets:
        with pytest.raises(Unauthenticated):
            store.authenticate(secret)
    with pytest.raises(NotFound):
        store.get_user("alice")
    store.create_user("alice")  # the name is free again, with none of the old keys
    assert store.list_keys("alice") == []


def test_users_are_unique_and_named_plainly(store: KeyStore) -> None:
    store.create_user("alice")
    with pytest.raises(AlreadyExists):
        store.create_user("alice", tenant="elsewhere")
    for bad in ("", "-dash", "has space", "x" * 65, "../etc"):
        with pytest.raises(InvalidArgument):
            store.create_user(bad)
    with pytest.raises(InvalidArgument):
        store.create_user("ok", tenant="bad tenant")
    with pytest.raises(NotFound):
        store.issue_key("nobody")
    with pytest.raises(NotFound):
        store.revoke_key("alice", "key_000000000000")
    users, total = store.list_users()
    assert total == 1 and [u.name for u in users] == ["alice"]


def test_last_used_is_recorded_without_a_write_per_request(store: KeyStore) -> None:
    store.create_user("alice")
    record, secret = store.issue_key("alice")
    assert store.get_key("alice", record.key_id).last_used_at is None
    store.authenticate(secret)
    first = store.get_key("alice", record.key_id).last_used_at
    assert first is not None
    store.authenticate(secret)
    assert store.get_key("alice", record.key_id).last_used_at == first  # throttled: once a minute


def test_keys_survive_a_restart(tmp_path: Path) -> None:
    first = KeyStore(tmp_path / "catalog.sqlite", ADMIN)
    first.create_user("alice")
    _, secret = first.issue_key("alice")
    first.close()
    again = KeyStore(tmp_path / "catalog.sqlite", None)
    assert again.authenticate(secret).tenant == "alice"
    assert not again.has_admin
    with pytest.raises(Unauthenticated):
        again.authenticate(ADMIN)  # no admin key configured: the old one means nothing
    again.close()


# ------------------------------------------------------------------------------------------------ the admin key


def test_admin_key_must_not_be_guessable() -> None:
    assert check_admin_key(f"  {ADMIN}\n") == ADMIN
    for weak in ("short", "changethis" * 4, "a" * 40, "0123456789" * 4 + "changeme", "ab" * 20):
        with pytest.raises(ValueError, match=r"placeholder|at least"):
            check_admin_key(weak)


def test_admin_key_from_settings_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "admin.key"
    assert load_admin_key(None, key_file, file_required=False) is None
    with pytest.raises(ValueError, match="does not exist"):
        load_admin_key(None, key_file, file_required=True)
    write_secret(key_file, ADMIN)
    assert load_admin_key(None, key_file, file_required=False) == ADMIN
    other = new_admin_key()
    assert load_admin_key(other, key_file, file_required=False) == other  # explicit wins
    key_file.write_text("changethis")
    with pytest.raises(ValueError):
        load_admin_key(None, key_file, file_required=False)

    monkeypatch.setenv("BATON_GATEWAY_ADMIN_KEY", "changethis")
    with pytest.raises(ValidationError, match="at least 32"):
        GatewaySettings()
    monkeypatch.setenv("BATON_GATEWAY_ADMIN_KEY", "")
    assert GatewaySettings().admin_key is None
    monkeypatch.setenv("BATON_GATEWAY_ADMIN_KEY", ADMIN)
    settings = GatewaySettings(home=tmp_path)
    assert settings.admin_key is not None and settings.admin_key.get_secret_value() == ADMIN
    assert ADMIN not in repr(settings)  # never in a log line
    assert settings.resolved_admin_key_file() == tmp_path / "admin.key"


def test_admin_is_not_a_user(store: KeyStore) -> None:
    principal = store.authenticate(ADMIN)
    assert principal.admin and principal.tenant is None


# ------------------------------------------------------------------------------------------------ the header


def test_bearer_header_parsing() -> None:
    assert bearer_key("Bearer bt_abc") == "bt_abc"
    assert bearer_key("  bearer   bt_abc  ") == "bt_abc"
    for missing in (None, "", "   "):
        with pytest.raises(Unauthenticated) as refused:
            bearer_key(missing)
        assert refused.value.reason == "NO_API_KEY"
        assert "Authorization: Bearer" in refused.value.message and "api.key" in refused.value.message
    with pytest.raises(Unauthenticated, match="X-Baton-Tenant is gone"):
        bearer_key(None, legacy_tenant_header=True)
    for wrong, says in (("Basic dXNlcjpwYXNz", "'Basic' scheme"), ("Bearer", "missing"), ("bt_abc", "before")):
        with pytest.raises(Unauthenticated) as refused:
            bearer_key(wrong)
        assert refused.value.reason == "BAD_AUTH_SCHEME" and says in refused.value.message
        assert "bt_abc" not in refused.value.message and "dXNl" not in refused.value.message  # secrets not echoed


# ------------------------------------------------------------------------------------------------ key files


def test_key_files_are_owner_only_and_found_by_the_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_umask = os.umask(0)  # the worst case: nothing masked
    try:
        write_secret(tmp_path / "api.key", "bt_user")
        write_secret(tmp_path / "admin.key", ADMIN)
    finally:
        os.umask(old_umask)
    for name in ("api.key", "admin.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert read_secret(tmp_path / "api.key") == "bt_user"
    assert read_secret(tmp_path / "missing.key") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin.key", "api.key"]  # no temporary files left

    monkeypatch.setenv("BATON_HOME", str(tmp_path))
    monkeypatch.delenv("BATON_API_KEY", raising=False)
    monkeypatch.delenv("BATON_GATEWAY_ADMIN_KEY", raising=False)
    assert (default_api_key(), default_admin_key()) == ("bt_user", ADMIN)
    monkeypatch.setenv("BATON_API_KEY", "bt_from_env")
    assert default_api_key() == "bt_from_env"


# ------------------------------------------------------------------------------------------------ over HTTP


@pytest.fixture
def http(store: KeyStore):
    app = FastAPI()
    install_error_handlers(app)
    app.state.gateway = SimpleNamespace(auth=store)
    app.include_router(users.router)

    @app.get("/v1/data")
    async def data(tenant: Annotated[str, Depends(current_tenant)]) -> dict[str, str]:
        return {"tenant": tenant}

    with TestClient(app) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_http_no_key_bad_key_and_the_wrong_kind_of_key(http: TestClient, store: KeyStore) -> None:
    response = http.get("/v1/data")
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["reason"] == "NO_API_KEY" and "baton users keys" in response.json()["error"]
    assert http.get("/v1/data", headers=bearer(auth.new_key())).json()["reason"] == "BAD_API_KEY"
    store.create_user("alice")
    alice = store.issue_key("alice")[1]
    assert http.get("/v1/data", headers=bearer(alice)).json() == {"tenant": "alice"}
    refused = http.get("/v1/data", headers=bearer(ADMIN))
    assert refused.status_code == 403 and refused.json()["reason"] == "ADMIN_KEY_NOT_A_USER"
    refused = http.get("/v1/users", headers=bearer(alice))
    assert refused.status_code == 403 and refused.json()["reason"] == "ADMIN_ONLY"
    assert http.get("/v1/users").status_code == 401
    assert http.get("/v1/me", headers=bearer(alice)).json()["tenant"] == "alice"


def test_http_admin_creates_users_and_keys(http: TestClient) -> None:
    admin = bearer(ADMIN)
    created = http.post("/v1/users", json={"name": "bob", "tenant": "team"}, headers=admin)
    assert created.status_code == 201 and created.json()["tenant"] == "team"
    assert http.post("/v1/users", json={"name": "bob"}, headers=admin).status_code == 409
    assert http.post("/v1/users", json={"name": "no spaces"}, headers=admin).status_code == 422
    issued = http.post("/v1/users/bob/keys", json={"label": "laptop"}, headers=admin)
    assert issued.status_code == 201 and issued.headers["Cache-Control"] == "no-store"
    key = issued.json()
    assert key["key"].startswith("bt_") and key["tenant"] == "team" and key["label"] == "laptop"
    assert http.post("/v1/users/bob/keys", headers=admin).status_code == 201  # the body is optional
    assert http.get("/v1/data", headers=bearer(key["key"])).json() == {"tenant": "team"}
    listed = http.get("/v1/users/bob/keys", headers=admin).json()["keys"]
    assert len(listed) == 2 and all("key" not in k for k in listed)
    assert http.get("/v1/users", headers=admin).json()["users"][0]["active_keys"] == 2
    assert http.get("/v1/users/nobody", headers=admin).status_code == 404
    revoked = http.delete(f"/v1/users/bob/keys/{key['id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["active"] is False
    assert http.get("/v1/data", headers=bearer(key["key"])).json()["reason"] == "KEY_REVOKED"
    assert http.delete("/v1/users/bob", headers=admin).json()["keys_deleted"] == 2
    assert http.get("/v1/users", headers=admin).json()["total"] == 0
