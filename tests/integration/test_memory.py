"""Memory end to end: real gateway + real embedder (MiniLM) + real embedded store, over HTTP.

Each test works in its own tenant (and folder), so tests share the session's processes without seeing each other.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from baton.clients.gateway import GatewayClient
from baton.runtime import errors
from tests.fixtures.gateway import GatewayHandle

pytestmark = pytest.mark.integration

PHILOSOPHY_RU = """# Философия свободы

## Кант

Иммануил Кант считал, что свобода воли есть способность разума давать себе закон. Моральный закон
не навязан извне: разумное существо само устанавливает его для себя.

## Сартр

Жан-Поль Сартр писал, что человек обречён быть свободным. Он отвечает за каждый свой выбор и не может
сослаться на природу или обстоятельства.
"""

GARDEN_EN = """# Growing tomatoes

Tomatoes need at least six hours of direct sunlight a day. Water them deeply twice a week, and add mulch to keep
the soil moist. Prune the suckers that grow between the stem and the branches.

## Harvest

Pick the fruit when it is evenly red and slightly soft. Green tomatoes ripen on a windowsill within a week.
"""

BREAD_HTML = """<html><head><title>Sourdough basics</title></head><body>
<nav>Home | Recipes | About</nav>
<h1>Sourdough basics</h1><p>A sourdough starter is a culture of wild yeast and lactic acid bacteria. Feed it flour
and water every day, and bake when it doubles in size within six hours.</p>
<footer>Copyright 2026 Bakery blog</footer></body></html>"""


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def make_folder(root: Path, files: dict[str, str | bytes]) -> Path:
    folder = root / uuid.uuid4().hex[:8]
    folder.mkdir()
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


def ingest(client: GatewayClient, folder: Path) -> dict:
    job = client.start_folder_ingest(folder)
    job = client.follow_job(str(job["id"]), lambda _: None, poll_s=0.1)
    assert job["state"] == "succeeded", job
    return job["report"]


def top_sources(client: GatewayClient, query: str, mode: str = "hybrid", k: int = 3) -> list[str]:
    return [Path(hit["source"]).name for hit in client.search(query, k=k, mode=mode)["hits"]]


def stats(client: GatewayClient) -> dict:
    return client._call("GET", "/v1/stats")


@pytest.fixture
def tenant_client(gateway_service: GatewayHandle):
    with gateway_service.client(new_tenant()) as client:
        yield client


# ------------------------------------------------------------------------------------------------ ingest + search


def test_ingest_then_search_finds_the_right_chunk_with_citation(
    gateway_service: GatewayHandle, tenant_client: GatewayClient
) -> None:
    folder = make_folder(
        gateway_service.allowed_root,
        {"philosophy.md": PHILOSOPHY_RU, "garden.md": GARDEN_EN, "web/bread.html": BREAD_HTML},
    )
    report = ingest(tenant_client, folder)
    assert (report["added"], report["failed"]) == (3, 0)
    hits = tenant_client.search("how often should I water tomato plants", k=3)["hits"]
    assert Path(hits[0]["source"]).name == "garden.md"
    assert hits[0]["title"] == "Growing tomatoes" and "Water them deeply" in hits[0]["text"]
    bread = tenant_client.search("wild yeast starter", k=1)["hits"][0]
    assert bread["title"] == "Sourdough basics" and "Copyright" not in bread["text"]  # boilerplate dropped
    ru = tenant_client.search("обречён быть свободным", k=1, mode="bm25")["hits"][0]
    assert ru["heading"].endswith("Сартр")


def test_russian_is_found_by_bm25_in_another_word_form(
    gateway_service: GatewayHandle, tenant_client: GatewayClient
) -> None:
    ingest(tenant_client, make_folder(gateway_service.allowed_root, {"philosophy.md": PHILOSOPHY_RU}))
    # "свободу", "законов", "разума" do not occur verbatim: stems of "свобода", "закон", "разума"
    for query in ("свободу разума", "законов", "выборы человека"):
        hits = tenant_client.search(query, k=1, mode="bm25")["hits"]
        assert hits and Path(hits[0]["source"]).name == "philosophy.md", query
    hybrid = tenant_client.search("свободу воли по Канту", k=1)["hits"][0]
    assert hybrid["heading"].endswith("Кант")


# ------------------------------------------------------------------------------------------------ incremental


def test_reingest_unchanged_embeds_nothing_changed_replaces_deleted_disappears(
    gateway_service: GatewayHandle, tenant_client: GatewayClient
) -> None:
    folder = make_folder(gateway_service.allowed_root, {"garden.md": GARDEN_EN, "bread.html": BREAD_HTML})
    first = ingest(tenant_client, folder)
    assert first["added"] == 2
    again = ingest(tenant_client, folder)
    assert (again["unchanged"], again["added"], again["updated"], again["chunks"]) == (2, 0, 0, 0)
    assert again["embed_s"] == 0

    (folder / "garden.md").write_text("# Growing cucumbers\n\nCucumbers climb trellises and love warm nights.\n")
    changed = ingest(tenant_client, folder)
    assert (changed["updated"], changed["unchanged"]) == (1, 1)
    assert top_sources(tenant_client, "cucumbers trellis", k=1) == ["garden.md"]
    assert not any("tomato" in hit["text"].lower() for hit in tenant_client.search("tomatoes sunlight", k=10)["hits"])

    (folder / "bread.html").unlink()
    removed = ingest(tenant_client, folder)
    assert removed["deleted"] == 1
    assert "bread.html" not in top_sources(tenant_client, "sourdough starter yeast", k=10)
    assert stats(tenant_client)["documents"] == 1


def test_identical_content_is_stored_once(gateway_service: GatewayHandle, tenant_client: GatewayClient) -> None:
    folder = make_folder(gateway_service.allowed_root, {"a.md": GARDEN_EN, "copy/b.md": GARDEN_EN})
    report = ingest(tenant_client, folder)
    assert (report["added"], report["duplicate"]) == (1, 1)
    sources = top_sources(tenant_client, "tomatoes", k=10)
    assert len(set(sources)) == 1


def test_kill_9_mid_ingest_then_rerun_equals_an_uninterrupted_run(gateway_service: GatewayHandle) -> None:
    files = {f"notes/{i:03d}.md": f"# Note {i}\n\n" + f"Observation number {i} about topic {i % 7}. " * 40
             for i in range(120)}  # fmt: skip
    interrupted_folder = make_folder(gateway_service.allowed_root, files)
    reference_folder = make_folder(gateway_service.allowed_root, files)
    with gateway_service.client(new_tenant()) as victim, gateway_service.client(new_tenant()) as reference:
        job = victim.start_folder_ingest(interrupted_folder)
        deadline = time.monotonic() + 120
        while int((victim.ingest_job(str(job["id"]))["report"] or {}).get("done", 0)) < 10:
            assert time.monotonic() < deadline, "ingest made no progress"
            time.sleep(0.05)
        gateway_service.kill()
        gateway_service.start()
        assert victim.ingest_job(str(job["id"]))["state"] == "interrupted"
        rerun = ingest(victim, interrupted_folder)
        assert rerun["failed"] == 0 and rerun["unchanged"] >= 10
        ingest(reference, reference_folder)

        def summary(client: GatewayClient) -> list[tuple[str, str, int]]:
            docs = client.documents(limit=1000)["documents"]
            return sorted((Path(d["source"]).name, d["content_hash"], d["chunks"]) for d in docs)

        assert summary(victim) == summary(reference)
        victim_stats, reference_stats = stats(victim), stats(reference)
        assert victim_stats == reference_stats == {"documents": 120, "chunks": sum(c for *_, c in summary(victim))}
        query = "observation about topic 3"
        assert top_sources(victim, query, k=5) == top_sources(reference, query, k=5)


# ------------------------------------------------------------------------------------------------ tenants


def test_tenant_a_never_sees_tenant_b(gateway_service: GatewayHandle) -> None:
    with gateway_service.client(new_tenant()) as alice, gateway_service.client(new_tenant()) as bob:
        ingest(alice, make_folder(gateway_service.allowed_root, {"secret.md": "# Alice\n\nThe vault code is 4711."}))
        assert bob.search("vault code", k=10)["hits"] == []
        assert bob.documents()["total"] == 0
        alice_doc = alice.documents()["documents"][0]["id"]
        with pytest.raises(errors.NotFound):
            bob._call("GET", f"/v1/documents/{alice_doc}")
        with pytest.raises(errors.NotFound):
            bob.delete_document(alice_doc)
        assert alice.search("vault code", k=1)["hits"]


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_uploads_get_clear_4xx_and_leave_the_index_unchanged(
    gateway_service: GatewayHandle, tenant_client: GatewayClient, tmp_path: Path
) -> None:
    ingest(tenant_client, make_folder(gateway_service.allowed_root, {"garden.md": GARDEN_EN}))
    before = stats(tenant_client)
    junk = bytes(range(256)) * 64
    cases: list[tuple[str, bytes, int, str]] = [
        ("junk.txt", junk, 422, "NOT_TEXT"),
        ("empty.txt", b"", 400, "EMPTY_DOCUMENT"),
        ("broken.pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog >>\ngarbage", 422, "UNPARSEABLE"),
        ("tool.exe", b"MZ\x90\x00", 422, "UNSUPPORTED_FORMAT"),
        ("big.txt", b"a " * (3 * 1024 * 1024), 413, "DOCUMENT_TOO_LARGE"),  # 6 MB > the 5 MB test limit
    ]
    for name, data, status, reason in cases:
        response = httpx.post(
            f"{gateway_service.url}/v1/documents",
            files=[("files", (name, data))],
            headers={"Authorization": f"Bearer {tenant_client.api_key}"},
        )
        assert response.status_code == status, (name, response.text)
        body = response.json()
        assert body["reason"] == reason and body["error"], (name, body)
    assert stats(tenant_client) == before


def test_upload_over_the_request_limit_is_refused_before_reading(
    gateway_service: GatewayHandle, tenant_client: GatewayClient, tmp_path: Path
) -> None:
    huge = tmp_path / "huge.txt"
    with huge.open("wb") as handle:
        handle.truncate(200 * 1024 * 1024)  # 200 MB (sparse), over the 20 MB upload limit of the test gateway
    with huge.open("rb") as handle:
        response = httpx.post(
            f"{gateway_service.url}/v1/documents",
            files=[("files", ("huge.txt", handle))],
            headers={"Authorization": f"Bearer {tenant_client.api_key}"},
        )
    assert response.status_code == 413 and response.json()["reason"] == "UPLOAD_TOO_LARGE"


def test_folder_with_bad_files_indexes_the_good_ones_and_reports_the_rest(
    gateway_service: GatewayHandle, tenant_client: GatewayClient
) -> None:
    folder = make_folder(gateway_service.allowed_root, {"ok.md": GARDEN_EN, "junk.txt": bytes(range(256)) * 8,
                                                        "empty.md": b""})  # fmt: skip
    with (folder / "huge.txt").open("wb") as handle:
        handle.truncate(200 * 1024 * 1024)
    report = ingest(tenant_client, folder)
    assert (report["added"], report["failed"]) == (1, 3)
    reasons = sorted(d["error"]["reason"] for d in report["documents"] if d["status"] == "failed")
    assert reasons == ["DOCUMENT_TOO_LARGE", "EMPTY_DOCUMENT", "NOT_TEXT"]


def test_paths_outside_the_allowed_roots_are_refused(gateway_service: GatewayHandle, tmp_path: Path) -> None:
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "diary.md").write_text("# secret\n\nDo not ingest me.")
    link_parent = make_folder(gateway_service.allowed_root, {})
    os.symlink(outside, link_parent / "escape")
    with gateway_service.client(new_tenant()) as client:
        for path, reason in [
            (outside, "PATH_NOT_ALLOWED"),
            (gateway_service.allowed_root / ".." / outside.name, "PATH_NOT_ALLOWED"),
            (link_parent / "escape", "PATH_NOT_ALLOWED"),
        ]:
            with pytest.raises(errors.PermissionDenied) as refused:
                client.start_folder_ingest(path)
            assert refused.value.reason == reason
        # A symlink inside an allowed folder that points outside is skipped, not followed.
        report = ingest(client, link_parent)
        assert report["total"] == 0
        assert stats(client) == {"documents": 0, "chunks": 0}


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"query": ""}, 400, "EMPTY_QUERY"),
        ({"query": "   "}, 400, "EMPTY_QUERY"),
        ({"query": "tomatoes", "k": 0}, 422, "BAD_K"),
        ({"query": "tomatoes", "k": 1_000_000}, 422, "BAD_K"),
        ({"query": "tomatoes", "mode": "psychic"}, 422, "INVALID_REQUEST"),
        ({"k": 3}, 422, "INVALID_REQUEST"),
    ],
)
def test_bad_searches_get_clear_4xx(gateway_service: GatewayHandle, body: dict, status: int, reason: str) -> None:
    response = httpx.post(f"{gateway_service.url}/v1/search", json=body, headers=gateway_service.headers("bad-input"))
    assert response.status_code == status, response.text
    assert response.json()["reason"] == reason


def test_malformed_json_and_unknown_routes(gateway_service: GatewayHandle) -> None:
    headers = {"content-type": "application/json"} | gateway_service.headers("bad-input")
    response = httpx.post(f"{gateway_service.url}/v1/search", content=b"{not json", headers=headers)
    assert response.status_code in (400, 422) and "error" in response.json()
    assert httpx.get(f"{gateway_service.url}/v1/nothing-here").json()["error_type"] == "not_found"


def test_openapi_documents_every_route(gateway_service: GatewayHandle) -> None:
    paths = httpx.get(f"{gateway_service.url}/openapi.json").json()["paths"]
    for route in ("/v1/documents", "/v1/documents/{document_id}", "/v1/search", "/v1/embeddings",
                  "/v1/ingest/jobs/{job_id}", "/v1/stats", "/health"):  # fmt: skip
        assert route in paths
    assert httpx.get(f"{gateway_service.url}/docs").status_code == 200


def test_embeddings_proxy_speaks_openai(gateway_service: GatewayHandle) -> None:
    client = openai.OpenAI(base_url=f"{gateway_service.url}/v1", api_key=gateway_service.key("embeddings"))
    result = client.embeddings.create(model="minilm", input=["eating food", "eating bread", "stock market fell"])
    vectors = [item.embedding for item in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.3
    # MiniLM's WordPiece: [CLS] eating food [SEP], [CLS] eating bread [SEP], [CLS] stock market fell [SEP].
    assert result.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert result.usage.prompt_tokens == result.usage.total_tokens == 4 + 4 + 5
    # openai-python asks for base64 unless told otherwise; floats, asked for, are the same vectors.
    as_floats = client.embeddings.create(model="minilm", input="eating food", encoding_format="float")
    assert as_floats.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    raw = httpx.post(
        f"{gateway_service.url}/v1/embeddings",
        json={"input": "eating food", "encoding_format": "base64"},
        headers=gateway_service.headers("embeddings"),
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert decoded.tolist() == pytest.approx(vectors[0], abs=1e-6)


def test_embeddings_errors_are_openai_errors(gateway_service: GatewayHandle) -> None:
    client = openai.OpenAI(
        base_url=f"{gateway_service.url}/v1", api_key=gateway_service.key("embeddings"), max_retries=0
    )
    with pytest.raises(openai.BadRequestError) as empty:
        client.embeddings.create(model="minilm", input=["a text", ""])
    assert empty.value.code == "empty_input" and "non-empty" in empty.value.message
    with pytest.raises(openai.UnprocessableEntityError) as malformed:
        client.embeddings.create(model="minilm", input="a text", encoding_format="int8")  # type: ignore[arg-type]
    assert malformed.value.code == "invalid_request" and "encoding_format" in malformed.value.message
    junk = httpx.post(
        f"{gateway_service.url}/v1/embeddings",
        content=b"\x00\xff{not json",
        headers={"content-type": "application/json"} | gateway_service.headers("embeddings"),
    )
    assert junk.status_code in (400, 422) and junk.json()["error"]["type"] == "invalid_request_error"
