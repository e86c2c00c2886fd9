"""Re-embedding a memory with another model (baton.store.reembed): never two models' vectors in one store.

The embedding function is a stand-in here (a deterministic hash of the text): what is tested is the bookkeeping —
recorded models, resumption, catching up, the swap. tests/integration/test_multilingual_memory.py runs the real
command with the real models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from baton.runtime.errors import FailedPrecondition
from baton.store.base import ChunkRecord
from baton.store.embedded import EmbeddedStore
from baton.store.reembed import (
    DONE_FILE,
    check_store_model,
    model_identity,
    next_store_path,
    reembed_store,
    swap_in_reembedded,
)

DIM = 8
OLD = model_identity("old/model", "a" * 64)
NEW = model_identity("new/model", "b" * 64)


def fake_vector(text: str, salt: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256((salt + text).encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return vector / np.linalg.norm(vector)


class Model:
    """Embeds by hashing; counts the texts it saw; can fail after ``fail_after`` calls (an interrupted run)."""

    def __init__(self, salt: str, fail_after: int | None = None) -> None:
        self.salt, self.fail_after, self.texts, self.calls = salt, fail_after, 0, 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("killed")
        self.texts += len(texts)
        return np.stack([fake_vector(text, self.salt) for text in texts])

    async def embed(self, texts: list[str]) -> np.ndarray:
        return self(texts)


def fill(store: EmbeddedStore, documents: int, salt: str = "old", tenant: str = "alice") -> None:
    for index in range(documents):
        texts = [f"document {index} part {part}" for part in range(2)]
        chunks = [
            ChunkRecord(f"d{index}:{part}", f"d{index}", tenant, text, fake_vector(text, salt), {"n": part})
            for part, text in enumerate(texts)
        ]
        store.replace_document(tenant, f"d{index}", chunks)


@pytest.fixture
def old_store(tmp_path: Path) -> Path:
    store = EmbeddedStore(tmp_path / "store")
    store.set_embedding_model(OLD)
    fill(store, 10)
    fill(store, 2, tenant="bob")
    store.close()
    return tmp_path / "store"


def test_reembed_builds_the_new_store_beside_the_old_one_with_the_new_vectors(old_store: Path) -> None:
    model = Model("new")
    report = reembed_store(old_store, model, NEW, documents_per_batch=3)
    assert (report.documents_embedded, report.chunks_embedded, report.documents_kept) == (12, 24, 0)
    assert report.target == next_store_path(old_store)
    assert (report.target / DONE_FILE).read_text().strip() == NEW
    new = EmbeddedStore(report.target)
    try:
        assert new.embedding_model() == NEW
        assert (new.count("alice"), new.count("bob")) == (20, 4)
        for text, vector in new.sample_chunks(5):
            assert np.allclose(vector, fake_vector(text, "new"))
    finally:
        new.close()
    old = EmbeddedStore(old_store)
    assert old.embedding_model() == OLD and old.count() == 24  # untouched
    old.close()


def test_an_interrupted_reembed_resumes_and_a_rerun_catches_up_with_changes(old_store: Path) -> None:
    with pytest.raises(RuntimeError, match="killed"):
        reembed_store(old_store, Model("new", fail_after=2), NEW, documents_per_batch=3)
    assert not (next_store_path(old_store) / DONE_FILE).exists()  # not done: no swap possible
    model = Model("new")
    report = reembed_store(old_store, model, NEW, documents_per_batch=3)
    assert report.documents_kept == 6 and report.documents_embedded == 6  # two batches were already done
    # More happens to the old store (the gateway kept serving): a rerun does only that.
    old = EmbeddedStore(old_store)
    fill(old, 11)  # d0..d9 again with the same texts (nothing to do), and a new d10
    edited = "document 1, edited"
    old.replace_document("alice", "d1", [ChunkRecord("d1:0", "d1", "alice", edited, fake_vector(edited, "old"))])
    old.delete_document("alice", "d3")
    old.close()
    again = reembed_store(old_store, Model("new"), NEW)
    assert (again.documents_embedded, again.documents_removed, again.chunks_embedded) == (2, 1, 3)


def test_a_half_built_store_of_another_model_is_not_mixed_into(old_store: Path) -> None:
    with pytest.raises(RuntimeError):
        reembed_store(old_store, Model("new", fail_after=1), NEW, documents_per_batch=3)
    third = model_identity("third/model", "c" * 64)
    with pytest.raises(FailedPrecondition) as error:
        reembed_store(old_store, Model("third"), third)
    assert error.value.reason == "EMBEDDING_MODEL_MISMATCH"


def test_the_swap_happens_only_for_a_finished_reembedding_with_the_served_model(old_store: Path) -> None:
    reembed_store(old_store, Model("new"), NEW)
    assert swap_in_reembedded(old_store, OLD) is None  # the gateway still serves the old model: nothing moves
    retired = swap_in_reembedded(old_store, NEW)
    assert retired is not None and retired.name.startswith("store.replaced-")
    swapped = EmbeddedStore(old_store)
    assert swapped.embedding_model() == NEW and swapped.count() == 24
    swapped.close()
    assert not next_store_path(old_store).exists() and not (old_store / DONE_FILE).exists()


async def test_the_gateway_check_records_accepts_and_refuses(tmp_path: Path, old_store: Path) -> None:
    fresh = EmbeddedStore(tmp_path / "fresh")
    await check_store_model(fresh, NEW, Model("new").embed, where="fresh")  # an empty store takes the model it is given
    assert fresh.embedding_model() == NEW
    fresh.close()
    store = EmbeddedStore(old_store)
    await check_store_model(store, OLD, Model("old").embed, where="here")
    with pytest.raises(FailedPrecondition) as error:
        await check_store_model(store, NEW, Model("new").embed, where="here")
    store.close()
    assert error.value.reason == "EMBEDDING_MODEL_MISMATCH"
    assert "baton store reembed" in error.value.message and OLD in error.value.message


async def test_a_store_from_before_models_were_recorded_is_adopted_only_by_its_own_model(tmp_path: Path) -> None:
    store = EmbeddedStore(tmp_path / "legacy")
    fill(store, 6)
    with pytest.raises(FailedPrecondition):
        await check_store_model(store, NEW, Model("new").embed, where="here")  # other vectors: refused
    assert store.embedding_model() is None
    await check_store_model(store, OLD, Model("old").embed, where="here")  # the same vectors: adopted and recorded
    assert store.embedding_model() == OLD
    store.close()
