"""Users, API keys and tenants against the real gateway (and real embedder): who may call what, and who sees what.

Every /v1 route needs a key (401 without one, or with a bad or revoked one); a key acts for its user's tenant, and
another tenant's document or job answers exactly like one that never existed (404); the admin key manages users and
keys and nothing else (403 both ways). ``baton users`` and ``baton up``'s key files are checked here too.
"""

from __future__ import annotations

import re
import stat
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from baton.cli.main import main as baton
from baton.clients.gateway import GatewayClient
from baton.runtime import errors
from baton.runtime.process import free_port
from baton.stack import Stack, StackPorts
from tests.fixtures.gateway import GatewayHandle
from tests.integration.test_memory import GARDEN_EN, ingest, make_folder, new_tenant, stats

pytestmark = pytest.mark.integration

SECRET_NOTE = "# Alice's vault\n\nThe vault code is 4711 and the spare key hides under the blue flowerpot.\n"
# Routes anyone may call: probes, metrics, the API's own description. Everything else needs a key.
PUBLIC = {"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def v1_operations(gateway: GatewayHandle) -> list[tuple[str, str]]:
    """Every (method, path) the gateway documents under /v1, path parameters filled with a made-up id."""
    paths = httpx.get(f"{gateway.url}/openapi.json").json()["paths"]
    operations = []
    for path, methods in paths.items():
        if path in PUBLIC:
            continue
        assert path.startswith("/v1/"), f"{path}: not under /v1 and not in PUBLIC"
        for method in methods:
            operations.append((method.upper(), re.sub(r"\{[^}]+\}", "made-up-id", path)))
    return operations


def without_id(body: dict, identifier: str) -> dict:
    return {key: (value.replace(identifier, "ID") if isinstance(value, str) else value) for key, value in body.items()}


# ------------------------------------------------------------------------------------------------ isolation


def test_documents_search_and_jobs_belong_to_the_keys_tenant(gateway_service: GatewayHandle) -> None:
    with gateway_service.client(new_tenant()) as alice, gateway_service.client(new_tenant()) as bob:
        folder = make_folder(gateway_service.allowed_root, {"vault.md": SECRET_NOTE})
        job = alice.start_folder_ingest(folder)
        alice.follow_job(str(job["id"]), lambda _: None, poll_s=0.1)
        alice.upload_texts([("garden.md", GARDEN_EN)])
        alice_docs = alice.documents()["documents"]
        assert len(alice_docs) == 2 and alice.search("vault code", k=1)["hits"]

        for mode in ("hybrid", "vector", "bm25"):
            assert bob.search("vault code flowerpot", k=10, mode=mode)["hits"] == [], mode
        # A filter naming alice's document does not reach across tenants either.
        assert bob.search("vault", k=10, filters={"document_id": alice_docs[0]["id"]})["hits"] == []
        assert bob.documents()["total"] == 0 and stats(bob) == {"documents": 0, "chunks": 0}

        # Another tenant's document or job: the very answer a made-up id gets (never reveal existence).
        for path in (f"/v1/documents/{alice_docs[0]['id']}", f"/v1/ingest/jobs/{job['id']}"):
            identifier = path.rsplit("/", 1)[1]
            made_up = path.replace(identifier, uuid.uuid4().hex[: len(identifier)])
            for method in ("GET", "DELETE") if "documents" in path else ("GET",):
                theirs = httpx.request(method, gateway_service.url + path, headers=bearer(bob.api_key or ""))
                nobodys = httpx.request(method, gateway_service.url + made_up, headers=bearer(bob.api_key or ""))
                assert theirs.status_code == nobodys.status_code == 404, (method, path, theirs.text)
                assert without_id(theirs.json(), identifier) == without_id(nobodys.json(), made_up.rsplit("/")[-1])
        with pytest.raises(errors.NotFound):
            bob.delete_document(alice_docs[0]["id"])

        # Bob ingesting the same folder gets documents of his own; deleting his leaves alice's.
        bob_report = ingest(bob, folder)
        assert bob_report["added"] == 1  # not "unchanged": alice's copy is not his
        bob_doc = bob.documents()["documents"][0]["id"]
        assert bob_doc not in {doc["id"] for doc in alice_docs}
        bob.delete_document(bob_doc)
        assert alice.documents()["total"] == 2 and alice.search("vault code", k=1)["hits"]


def test_users_given_one_tenant_share_its_memory(gateway_service: GatewayHandle) -> None:
    team = new_tenant()
    with gateway_service.admin() as admin:
        carol = admin.ensure_user_key(f"carol-{team}", tenant=team)
        dave = admin.ensure_user_key(f"dave-{team}", tenant=team)
        assert admin.user(f"dave-{team}")["tenant"] == team
    with GatewayClient(gateway_service.url, api_key=carol["key"]) as carol_client:
        carol_client.upload_texts([("garden.md", GARDEN_EN)])
    with GatewayClient(gateway_service.url, api_key=dave["key"]) as dave_client:
        assert dave_client.me()["tenant"] == team
        assert dave_client.documents()["total"] == 1
        assert dave_client.search("tomato sunlight", k=1)["hits"][0]["title"] == "Growing tomatoes"
    with gateway_service.client(new_tenant()) as outsider:
        assert outsider.search("tomato sunlight", k=5)["hits"] == []


# ------------------------------------------------------------------------------------------------ 401


def unified_error(body: dict) -> dict:
    """Our error body, or OpenAI's shape (the chat and models routes) mapped onto it."""
    error = body["error"]
    if isinstance(error, dict):
        kind = "unauthenticated" if error["type"] == "authentication_error" else error["type"]
        return {"reason": error["code"].upper(), "error_type": kind, "error": error["message"]}
    return body


def test_every_v1_route_needs_a_key(gateway_service: GatewayHandle) -> None:
    operations = v1_operations(gateway_service)
    documented = {path for _, path in operations}
    for route in ("/v1/documents", "/v1/search", "/v1/embeddings", "/v1/stats", "/v1/users", "/v1/me"):
        assert route in documented
    with gateway_service.admin() as admin:
        revoked = admin.ensure_user_key(new_tenant())
        admin.revoke_key(revoked["user"], revoked["id"])
    cases = [
        ({}, "NO_API_KEY"),
        ({"X-Baton-Tenant": "default"}, "NO_API_KEY"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "BAD_AUTH_SCHEME"),
        (bearer("bt_" + uuid.uuid4().hex * 2), "BAD_API_KEY"),
        (bearer("sk-an-openai-key"), "BAD_API_KEY"),
        (bearer(revoked["key"]), "KEY_REVOKED"),
    ]
    for method, path in operations:
        for headers, reason in cases:
            response = httpx.request(method, gateway_service.url + path, headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            body = unified_error(response.json())
            assert body["reason"] == reason and body["error_type"] == "unauthenticated", (method, path, body)
            if reason != "BAD_AUTH_SCHEME":
                assert "baton users keys" in body["error"] and "api.key" in body["error"], body
    hinted = httpx.get(f"{gateway_service.url}/v1/documents", headers={"X-Baton-Tenant": "default"}).json()
    assert "X-Baton-Tenant is gone" in hinted["error"]
    # Public routes stay public.
    assert httpx.get(f"{gateway_service.url}/health").status_code == 200
    assert httpx.get(f"{gateway_service.url}/openapi.json").status_code == 200


def test_openai_clients_send_the_key_as_bearer(gateway_service: GatewayHandle) -> None:
    good = openai.OpenAI(base_url=f"{gateway_service.url}/v1", api_key=gateway_service.key(new_tenant()))
    assert len(good.embeddings.create(model="minilm", input="a key works").data[0].embedding) == 384
    bad = openai.OpenAI(base_url=f"{gateway_service.url}/v1", api_key="bt_not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        bad.embeddings.create(model="minilm", input="no key, no vectors")
    assert refused.value.status_code == 401


def test_revoking_a_key_or_deleting_a_user_takes_effect_at_once(gateway_service: GatewayHandle) -> None:
    name = new_tenant()
    with gateway_service.admin() as admin:
        first = admin.ensure_user_key(name, label="laptop")
        second = admin.create_key(name, label="phone")
        with GatewayClient(gateway_service.url, api_key=first["key"]) as laptop:
            laptop.upload_texts([("garden.md", GARDEN_EN)])
            admin.revoke_key(name, first["id"])
            with pytest.raises(errors.Unauthenticated) as refused:
                laptop.documents()  # the very next request
            assert refused.value.reason == "KEY_REVOKED"
        with GatewayClient(gateway_service.url, api_key=second["key"]) as phone:
            assert phone.documents()["total"] == 1  # the user's other key and its memory are untouched
            keys = {key["id"]: key for key in admin.keys(name)["keys"]}
            assert not keys[first["id"]]["active"] and keys[second["id"]]["active"]
            assert keys[second["id"]]["last_used_at"] is not None
            admin.delete_user(name)
            with pytest.raises(errors.Unauthenticated):
                phone.documents()


# ------------------------------------------------------------------------------------------------ 403


def test_admin_routes_refuse_user_keys_and_data_routes_refuse_the_admin_key(gateway_service: GatewayHandle) -> None:
    user_key = gateway_service.key(new_tenant())
    admin_routes = [(m, p) for m, p in v1_operations(gateway_service) if p.startswith("/v1/users")]
    assert len(admin_routes) == 7
    for method, path in admin_routes:
        response = httpx.request(method, gateway_service.url + path, headers=bearer(user_key))
        assert response.status_code == 403 and response.json()["reason"] == "ADMIN_ONLY", (method, path)
        assert "admin key" in response.json()["error"]
    data_routes = [("GET", "/v1/documents"), ("POST", "/v1/documents"), ("GET", "/v1/documents/made-up-id"),
                   ("DELETE", "/v1/documents/made-up-id"), ("GET", "/v1/ingest/jobs/made-up-id"),
                   ("POST", "/v1/search"), ("POST", "/v1/embeddings"), ("GET", "/v1/stats")]  # fmt: skip
    for method, path in data_routes:
        response = httpx.request(method, gateway_service.url + path, headers=bearer(gateway_service.admin_key))
        body = unified_error(response.json())
        assert response.status_code == 403 and body["reason"] == "ADMIN_KEY_NOT_A_USER", (method, path)
        assert httpx.request(method, gateway_service.url + path, headers=bearer(user_key)).status_code != 403
    with GatewayClient(gateway_service.url, api_key=gateway_service.admin_key) as admin_client:
        assert admin_client.me() == {"admin": True, "user": None, "tenant": None, "key_id": None}


def test_user_management_answers(gateway_service: GatewayHandle) -> None:
    name = new_tenant()
    with gateway_service.admin() as admin:
        created = admin.create_user(name)
        assert (created["name"], created["tenant"], created["active_keys"]) == (name, name, 0)
        with pytest.raises(errors.AlreadyExists):
            admin.create_user(name)
        with pytest.raises(errors.InvalidArgument):
            admin.create_user("no spaces allowed")
        with pytest.raises(errors.NotFound):
            admin.create_key("nobody-" + name)
        with pytest.raises(errors.FailedPrecondition):
            admin.ensure_user_key(name, tenant="some-other-tenant")
        issued = admin.create_key(name)
        assert issued["key"].startswith(issued["prefix"]) and issued["tenant"] == name
        shown = admin.user(name)
        assert [key["id"] for key in shown["keys"]] == [issued["id"]] and "key" not in shown["keys"][0]
        assert name in {user["name"] for user in admin.users()["users"]}


def test_keys_are_stored_hashed(gateway_service: GatewayHandle) -> None:
    key = gateway_service.key(new_tenant())
    with GatewayClient(gateway_service.url, api_key=key) as client:
        client.documents()
    on_disk = b"".join(path.read_bytes() for path in gateway_service.home.glob("catalog.sqlite*"))
    assert on_disk and key.encode() not in on_disk and gateway_service.admin_key.encode() not in on_disk


# ------------------------------------------------------------------------------------------------ CLI and baton up


def test_baton_users_cli(
    gateway_service: GatewayHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BATON_GATEWAY_ADMIN_KEY", gateway_service.admin_key)
    monkeypatch.delenv("BATON_API_KEY", raising=False)
    name, url = new_tenant(), gateway_service.url

    def run(*argv: str) -> str:
        baton(list(argv))
        return capsys.readouterr().out

    created = run("users", "--gateway", url, "create", name, "--label", "laptop")
    assert f"user {name} created (tenant {name})" in created
    first = re.search(r"^\s+(bt_\S+)$", created, re.M)
    assert first is not None
    second = re.search(r"^\s+(bt_\S+)$", run("users", "--gateway", url, "keys", name), re.M)
    assert second is not None and second.group(1) != first.group(1)
    listed = run("users", "--gateway", url, "keys", name, "--list")
    assert listed.count("active") == 2 and first.group(1) not in listed and "laptop" in listed
    assert re.search(rf"^{name}\s+{name}\s+2\s", run("users", "--gateway", url, "list"), re.M)

    monkeypatch.setenv("BATON_API_KEY", first.group(1))
    assert "no hits" in run("search", "--gateway", url, "anything")
    with GatewayClient(url, api_key=first.group(1)) as client:
        key_id = str(client.me()["key_id"])
    assert f"revoked {key_id}" in run("users", "--gateway", url, "revoke", name, key_id)
    with pytest.raises(SystemExit) as refused:
        baton(["search", "--gateway", url, "anything"])
    assert "was revoked" in str(refused.value) and "BATON_API_KEY" in str(refused.value)

    monkeypatch.setenv("BATON_GATEWAY_ADMIN_KEY", second.group(1))
    with pytest.raises(SystemExit) as refused:
        baton(["users", "--gateway", url, "list"])  # a user key is not the admin key
    assert "admin key" in str(refused.value)


def test_baton_up_writes_an_admin_key_and_a_key_for_me(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATON_GATEWAY_ADMIN_KEY", raising=False)
    monkeypatch.delenv("BATON_API_KEY", raising=False)
    monkeypatch.setenv("BATON_HOME", str(tmp_path))
    # Every port free: the defaults (50060-50063, 8000, 8081) may be taken by other tests' servers on this machine.
    ports = StackPorts(*(free_port() for _ in range(6)))

    def up_stack() -> Stack:  # the whole stack, as `baton up` starts it
        stack = Stack(tmp_path, ports)
        stack.up()
        return stack

    stack = up_stack()
    try:
        for name in ("admin.key", "api.key"):
            assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
        api_key = (tmp_path / "api.key").read_text().strip()
        assert stack.api_key == api_key
        with GatewayClient(ports.gateway_url) as client:  # no key given: BATON_HOME/api.key
            me = client.me()
            assert (me["admin"], me["user"], me["tenant"]) == (False, "me", "default")
            client.upload_texts([("garden.md", GARDEN_EN)])
    finally:
        stack.down()

    admin_key = (tmp_path / "admin.key").read_text()
    stack = up_stack()  # a second start keeps both keys, and the memory
    try:
        assert (tmp_path / "admin.key").read_text() == admin_key and stack.api_key == api_key
        with GatewayClient(ports.gateway_url) as client:
            assert client.documents()["total"] == 1
    finally:
        stack.down()

    (tmp_path / "api.key").write_text("bt_a-key-that-no-longer-works\n")
    stack = up_stack()  # a dead api.key is replaced; `me` keeps its tenant and memory
    try:
        assert stack.api_key != api_key and (tmp_path / "api.key").read_text().strip() == stack.api_key
        assert stat.S_IMODE((tmp_path / "api.key").stat().st_mode) == 0o600
        with GatewayClient(ports.gateway_url) as client:
            assert client.documents()["total"] == 1
    finally:
        stack.down()


def test_openapi_declares_the_key_and_the_user_routes(gateway_service: GatewayHandle) -> None:
    spec = httpx.get(f"{gateway_service.url}/openapi.json").json()
    assert spec["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["apiKey"]["description"],
    }
    for path in ("/v1/users", "/v1/users/{name}", "/v1/users/{name}/keys", "/v1/users/{name}/keys/{key_id}"):
        assert path in spec["paths"]
    assert spec["paths"]["/v1/search"]["post"]["security"] == [{"apiKey": []}]
    assert "/health" in spec["paths"] and "security" not in spec["paths"]["/health"]["get"]
