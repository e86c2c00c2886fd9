"""The gateway on the Weaviate backend (BATON_GATEWAY_STORE=weaviate) when the server dies mid-ingest.

test_weaviate_store.py kills the server under the backend itself; this test does it under a real gateway process
over HTTP: the documents being written fail with STORE_UNAVAILABLE, the gateway stays up and answers 503 while the
server is gone, and re-running the same folder ingest after a restart leaves every document exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from baton.clients.gateway import GatewayClient
from baton.store.base import SearchMode, StoreQuery
from baton.store.weaviate import WeaviateConfig, WeaviateStore
from baton.store.weaviate_server import WeaviateServer
from tests.fixtures.embedder import EmbedderHandle
from tests.fixtures.gateway import GatewayHandle
from tests.fixtures.weaviate import StartWeaviate

pytestmark = pytest.mark.integration

# One short chunk each: MiniLM embeds ~25 chunks/s on the CI CPU, so the ingest runs for seconds and the kill lands
# in the middle of it.
DOCUMENTS = 150
KILL_AFTER = 20
COLLECTION = "GatewayKill"
TENANT = "weaviate-kill"
EMBEDDING_DIM = 384  # MiniLM


@dataclass
class WeaviateGateway:
    gateway: GatewayHandle
    server: WeaviateServer


@pytest.fixture
def weaviate_gateway(
    embedder_service: EmbedderHandle, start_weaviate: StartWeaviate, tmp_path: Path
) -> Iterator[WeaviateGateway]:
    server = start_weaviate()
    (tmp_path / "gateway").mkdir()
    (tmp_path / "allowed").mkdir()
    store_flags = ["--store", "weaviate", "--weaviate-url", server.url]
    store_flags += ["--weaviate-grpc-port", str(server.grpc_port), "--weaviate-collection", COLLECTION]
    gateway = GatewayHandle(
        home=tmp_path / "gateway",
        allowed_root=tmp_path / "allowed",
        embedder_addr=embedder_service.grpc_target,
        extra_args=store_flags,
    )
    gateway.start()
    yield WeaviateGateway(gateway, server)
    gateway.stop()


def write_notes(folder: Path) -> list[Path]:
    folder.mkdir()
    paths = [folder / f"note-{number:03d}.txt" for number in range(DOCUMENTS)]
    for number, path in enumerate(paths):  # distinct texts: none is skipped as a duplicate
        path.write_text(f"Note {number}: the river near village {number} floods in spring, topic {number % 7}.\n")
    return paths


def wait_until_done(client: GatewayClient, job_id: str, documents: int) -> None:
    deadline = time.monotonic() + 60
    while int((client.ingest_job(job_id)["report"] or {}).get("done", 0)) < documents:
        assert time.monotonic() < deadline, "the ingest made no progress"
        time.sleep(0.05)


def finish(client: GatewayClient, job_id: str) -> dict[str, Any]:
    job = client.follow_job(job_id, lambda _: None, poll_s=0.1)
    assert job["state"] == "succeeded", job  # per-document failures are reported, the job itself completes
    return job["report"]


def test_killing_weaviate_mid_ingest_fails_cleanly_and_a_rerun_leaves_every_document_once(
    weaviate_gateway: WeaviateGateway,
) -> None:
    gateway, server = weaviate_gateway.gateway, weaviate_gateway.server
    sources = {str(path) for path in write_notes(gateway.allowed_root / "notes")}
    folder = gateway.allowed_root / "notes"
    with gateway.client(TENANT) as client:
        job_id = str(client.start_folder_ingest(folder)["id"])
        wait_until_done(client, job_id, KILL_AFTER)
        server.kill()
        interrupted = finish(client, job_id)
        assert_failed_cleanly(interrupted, server)
        assert_outage_is_a_503(gateway, server)

        server.start()  # the same ports and data folder; the gateway's client reconnects by itself
        assert client.health()["store"] is True
        rerun = finish(client, job_id=str(client.start_folder_ingest(folder)["id"]))
        assert rerun["failed"] == 0, rerun["documents"]
        assert rerun["added"] + rerun["unchanged"] == DOCUMENTS and rerun["added"] >= interrupted["failed"]
        assert_every_document_once(client, sources, server)


def assert_failed_cleanly(report: dict[str, Any], server: WeaviateServer) -> None:
    assert report["total"] == report["done"] == DOCUMENTS
    assert report["added"] >= KILL_AFTER and report["failed"] > 0
    assert report["added"] + report["failed"] == DOCUMENTS
    failures = report["documents"]
    assert len(failures) == min(report["failed"], 100)  # the job keeps the first 100 failures
    for failure in failures:
        assert failure["status"] == "failed" and failure["chunks"] == 0
        error = failure["error"]
        assert error["reason"] == "STORE_UNAVAILABLE" and error["error_type"] == "unhealthy", failure
        assert server.url in error["error"] and "running" in error["error"], error


def assert_outage_is_a_503(gateway: GatewayHandle, server: WeaviateServer) -> None:
    response = httpx.post(
        f"{gateway.url}/v1/search",
        json={"query": "river floods in spring", "k": 5},
        headers=gateway.headers(TENANT),
        timeout=60,
    )
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["reason"] == "STORE_UNAVAILABLE" and server.url in body["error"], body
    assert gateway.process is not None and gateway.process.alive(), "the gateway died with the store"
    health = httpx.get(f"{gateway.url}/health", timeout=30)
    assert health.status_code == 200 and health.json()["store"] is False


def assert_every_document_once(client: GatewayClient, sources: set[str], server: WeaviateServer) -> None:
    listed = client.documents(limit=1000)
    assert listed["total"] == DOCUMENTS
    assert {document["source"] for document in listed["documents"]} == sources
    assert all(document["chunks"] == 1 for document in listed["documents"])
    assert client._call("GET", "/v1/stats") == {"documents": DOCUMENTS, "chunks": DOCUMENTS}

    hits = client.search("river village floods", k=2 * DOCUMENTS, mode="vector")["hits"]
    chunk_ids = [hit["chunk_id"] for hit in hits]
    assert len(chunk_ids) == len(set(chunk_ids)) == DOCUMENTS
    assert {hit["document_id"] for hit in hits} == {document["id"] for document in listed["documents"]}

    # The server's own view, past the gateway: each visible chunk once, no leftovers of the interrupted writes.
    store = WeaviateStore(WeaviateConfig(url=server.url, grpc_port=server.grpc_port, collection=COLLECTION))
    try:
        assert store.count(TENANT) == DOCUMENTS
        assert store.document_ids(TENANT) == {document["id"] for document in listed["documents"]}
        vector = np.ones(EMBEDDING_DIM, dtype=np.float32) / np.sqrt(EMBEDDING_DIM)
        query = StoreQuery(tenant=TENANT, vector=vector, k=10 * DOCUMENTS, mode=SearchMode.VECTOR)
        stored = [hit.chunk_id for hit in store.search(query)]
        assert sorted(stored) == sorted(chunk_ids)
    finally:
        store.close()
