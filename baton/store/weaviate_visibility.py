"""What a read of ``baton.store.weaviate`` may see: each tenant's visibility state, and baton's filters as Weaviate
filters.

The state (one object per tenant in ``<collection>State``) is a random token that changes on every state write and
the documents being written right now, each with the one generation searches may see. A ``View`` joins it with the
user's equality / any-of filters: ``where`` is the Weaviate filter, ``admits`` checks a returned object against the
same rules (Weaviate does not apply a filter as of one instant). See the store's module docstring for the protocol.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import weaviate.classes as wvc
from weaviate.collections import Collection
from weaviate.collections.classes.filters import _Filters

from baton.runtime.errors import InvalidArgument, UpstreamFailed
from baton.store.base import Filters, MetadataValue
from baton.store.validation import checked_filter_key
from baton.store.weaviate_client import NAMESPACE

_STATE_ID = uuid.uuid5(NAMESPACE, "tenant-state")


@dataclass
class State:
    """A tenant's visibility state: ``token`` changes on every write; ``in_flight`` maps a document being written
    to the one generation searches may see (None: none of its chunks)."""

    token: str = ""
    in_flight: dict[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidate:
    chunk_id: str
    document_id: str
    generation: str
    text: str
    metadata: dict[str, MetadataValue]
    vector: np.ndarray | None


class View:
    """What one read may see: the user's filters within the tenant's visible generations. ``where`` is the Weaviate
    filter; ``admits`` checks a returned object against the same rules."""

    def __init__(self, state: State, filters: Filters) -> None:
        self.state = state
        self.filters = filters
        user = user_filter(filters)
        assert user is not False, "a filter that matches nothing is answered before any search"
        self.where = all_of(user, visibility(state))

    def admits(self, candidate: Candidate) -> bool:
        in_flight = self.state.in_flight
        if candidate.document_id in in_flight and in_flight[candidate.document_id] != candidate.generation:
            return False
        return all(_matches(candidate, key, wanted) for key, wanted in self.filters.items())


def _matches(candidate: Candidate, key: str, wanted: MetadataValue | Sequence[MetadataValue]) -> bool:
    values = [wanted] if isinstance(wanted, str | bytes | int | float | bool) else list(wanted)
    if key in ("document_id", "chunk_id"):
        own = getattr(candidate, key)
        return any(own == (str(int(value)) if isinstance(value, bool) else str(value)) for value in values)
    if key not in candidate.metadata:
        return False
    return filter_token(key, candidate.metadata[key]) in {filter_token(key, value) for value in values}


# --- the state ------------------------------------------------------------------------------------------------------


def read_state(states_of: Collection) -> State:
    obj = states_of.query.fetch_object_by_id(_STATE_ID, return_properties=["state"])
    if obj is None:
        return State()
    raw = json.loads(str(obj.properties["state"]))
    return State(token=str(raw["token"]), in_flight=dict(raw["in_flight"]))


def write_state(states_of: Collection, state: State) -> None:
    """Write the state object with a fresh token (a batch write upserts: one call whether it exists or not)."""
    state.token = secrets.token_hex(8)
    payload = json.dumps({"token": state.token, "in_flight": state.in_flight}, ensure_ascii=False)
    result = states_of.data.insert_many([wvc.data.DataObject(properties={"state": payload}, uuid=_STATE_ID)])
    if result.errors:
        raise UpstreamFailed(
            f"Weaviate refused the store's state write: {result.errors[0].message}", reason="STORE_WRITE_FAILED"
        )


def visibility(state: State) -> _Filters | None:
    """What searches must not see: per in-flight document, every chunk but those of its visible generation."""
    parts: list[_Filters] = []
    for document_id, visible in state.in_flight.items():
        other_document = wvc.query.Filter.by_property("document_id").not_equal(document_id)
        parts.append(other_document if visible is None else other_document | of_generation(visible))
    return all_of(*parts)


def visible_generation(chunks_of: Collection, document_id: str) -> str | None:
    """The generation of a document's chunks when no write of it is in flight (then they all share one)."""
    found = chunks_of.query.fetch_objects(filters=of_document(document_id), limit=1, return_properties=["generation"])
    return str(found.objects[0].properties["generation"]) if found.objects else None


# --- filters --------------------------------------------------------------------------------------------------------


def of_document(document_id: str) -> _Filters:
    return wvc.query.Filter.by_property("document_id").equal(document_id)


def of_documents(documents: Sequence[str]) -> _Filters:
    return wvc.query.Filter.by_property("document_id").contains_any(list(documents))


def of_generation(generation: str) -> _Filters:
    return wvc.query.Filter.by_property("generation").equal(generation)


def other_generation(generation: str) -> _Filters:
    return wvc.query.Filter.by_property("generation").not_equal(generation)


def all_of(*parts: _Filters | None) -> _Filters | None:
    present = [part for part in parts if part is not None]
    if not present:
        return None
    return present[0] if len(present) == 1 else wvc.query.Filter.all_of(present)


def filter_token(key: str, value: MetadataValue) -> str:
    """The ``filters`` token of one metadata value. Numbers and booleans compare as numbers (True == 1 == 1.0), as
    SQLite's json_extract does in the embedded store; strings compare exactly."""
    if isinstance(value, str):
        return f"{key}=s:{value}"
    number = float(value)
    return f"{key}=n:{int(number)}" if number.is_integer() else f"{key}=n:{number!r}"


def user_filter(filters: Filters) -> _Filters | bool | None:
    """The Weaviate filter of equality / any-of filters; None for no filter, False for one that matches nothing."""
    parts: list[_Filters] = []
    for key, wanted in filters.items():
        values = [wanted] if isinstance(wanted, str | bytes | int | float | bool) else list(wanted)
        if not values:
            return False
        for value in values:
            if not isinstance(value, str | int | float | bool):
                raise InvalidArgument(f"filter {key!r}: {value!r} is not a string, number or boolean")
        if key in ("document_id", "chunk_id"):
            texts = [str(int(value)) if isinstance(value, bool) else str(value) for value in values]
            parts.append(wvc.query.Filter.by_property(key).contains_any(texts))
        else:
            tokens = [filter_token(checked_filter_key(key), value) for value in values]
            parts.append(wvc.query.Filter.by_property("filters").contains_any(tokens))
    return all_of(*parts)
