"""``baton ingest``, ``baton search``, ``baton eval retrieval`` (registered by baton.cli.evaluate): thin clients of the
gateway's HTTP API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from tqdm import tqdm

from baton.clients.gateway import GatewayClient, default_admin_key
from baton.runtime.errors import PermissionDenied

DEFAULT_GATEWAY = os.environ.get("BATON_GATEWAY_URL", "http://127.0.0.1:8000")
UPLOAD_BATCH = 32


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    # No key flag: a secret on the command line is visible to every user of the machine (ps); see BATON_API_KEY.
    parser.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway URL [env BATON_GATEWAY_URL]")


def ingest(args: argparse.Namespace) -> None:
    folder = Path(args.folder).expanduser().resolve()
    if not folder.is_dir():
        raise SystemExit(f"baton ingest: {folder} is not a folder")
    with GatewayClient(args.gateway) as client:
        try:
            job = client.start_folder_ingest(folder, collection=args.collection)
        except PermissionDenied as refused:
            print(f"note: {refused.message}\n      uploading the files instead (no deletion of removed files).")
            _upload_folder(client, folder, args.collection)
            return
        with tqdm(desc="ingest", unit="doc", dynamic_ncols=True) as bar:
            job = client.follow_job(str(job["id"]), lambda j: _draw(bar, j))
    _summarise(job["report"], job.get("error"))


def _draw(bar: tqdm, job: dict[str, Any]) -> None:
    report = job.get("report") or {}
    bar.total = int(report.get("total") or 0) or None
    bar.n = int(report.get("done") or 0)
    elapsed = float(report.get("elapsed_s") or 0)
    chunks = int(report.get("chunks") or 0)
    bar.set_postfix(chunks=chunks, chunks_per_s=f"{chunks / elapsed:.1f}" if elapsed else "-", refresh=False)
    bar.refresh()


def _upload_folder(client: GatewayClient, folder: Path, collection: str) -> None:
    from services.gateway.ingest.pipeline import list_supported_files

    files = list_supported_files(folder)
    totals: dict[str, Any] = {}
    with tqdm(total=len(files), desc="upload", unit="doc", dynamic_ncols=True) as bar:
        for start in range(0, len(files), UPLOAD_BATCH):
            batch = files[start : start + UPLOAD_BATCH]
            report = client.upload(batch, collection=collection)
            for key, value in report.items():
                if isinstance(value, int):
                    totals[key] = int(totals.get(key, 0)) + value
            totals.setdefault("documents", []).extend(d for d in report["documents"] if d["status"] == "failed")
            bar.update(len(batch))
            bar.set_postfix(chunks=totals.get("chunks", 0), refresh=False)
    _summarise(totals, None)


def _summarise(report: dict[str, Any], error: object) -> None:
    if error:
        raise SystemExit(f"baton ingest failed: {error}")
    counts = ", ".join(f"{report.get(k, 0)} {k}" for k in ("added", "updated", "unchanged", "duplicate", "deleted"))
    print(f"{counts}; {report.get('chunks', 0)} chunks; {report.get('failed', 0)} failed")
    for failed in report.get("documents", []):
        if failed.get("status") == "failed":
            print(f"  failed: {failed['source']}: {failed['error']['error']}")


def search(args: argparse.Namespace) -> None:
    with GatewayClient(args.gateway) as client:
        result = client.search(args.query, k=args.k, mode=args.mode, collection=args.collection)
    if not result["hits"]:
        print("no hits (is anything ingested? baton ingest DIR)")
    for hit in result["hits"]:
        where = " > ".join(p for p in (hit["title"], hit["heading"]) if p)
        page = f", p. {hit['page']}" if hit.get("page") else ""
        print(f"[{hit['rank']}] {hit['score']:.3f}  {where}{page}  ({hit['source']})")
        text = " ".join(str(hit["text"]).split())
        print(f"     {text[:300]}{'…' if len(text) > 300 else ''}")


def eval_retrieval(args: argparse.Namespace) -> None:
    from baton.beir import BeirDataset, evaluate, upload_corpus

    dataset = BeirDataset.load(Path(args.beir), max_queries=args.max_queries)
    user = args.user or f"eval-{dataset.name}"
    print(f"{dataset.name}: {len(dataset.corpus)} documents, {len(dataset.queries)} queries (user and tenant {user})")
    # The dataset gets a tenant of its own (the scores assume nothing else is in it), so this is an admin's job:
    # a key issued for this run and revoked after it.
    admin_key = default_admin_key()
    if admin_key is None:
        raise SystemExit("baton eval: needs the admin key (BATON_GATEWAY_ADMIN_KEY or BATON_HOME/admin.key) to "
                         "give the dataset a tenant of its own")  # fmt: skip
    with GatewayClient(args.gateway, api_key=admin_key) as admin:
        issued = admin.ensure_user_key(user, tenant=user, label="baton eval")
        try:
            with GatewayClient(args.gateway, api_key=str(issued["key"])) as client:
                with tqdm(total=len(dataset.corpus), desc="ingest", unit="doc", dynamic_ncols=True) as bar:
                    upload_corpus(client, dataset, bar.update)
                rows = [evaluate(client, dataset, mode) for mode in args.modes.split(",")]
        finally:
            admin.revoke_key(user, str(issued["id"]))
    print(f"\n{'mode':<8}{'nDCG@10':>10}{'recall@10':>12}{'recall@100':>12}{'MRR@10':>10}")
    for row in rows:
        print(f"{row.mode:<8}{row.ndcg_at_10:>10.4f}{row.recall_at_10:>12.4f}{row.recall_at_100:>12.4f}"
              f"{row.mrr_at_10:>10.4f}")  # fmt: skip


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("ingest", help="turn a folder of texts into searchable memory")
    parser.add_argument("folder", help="folder with .txt .md .html .pdf .docx files (searched recursively)")
    parser.add_argument("--collection", default="default", help="collection to file them under")
    add_gateway_flags(parser)
    parser.set_defaults(run=ingest)

    parser = commands.add_parser("search", help="search memory (hybrid BM25 + vectors) with citations")
    parser.add_argument("query")
    parser.add_argument("-k", type=int, default=5, help="how many hits")
    parser.add_argument("--mode", choices=["hybrid", "vector", "bm25"], default="hybrid")
    parser.add_argument("--collection", default=None)
    add_gateway_flags(parser)
    parser.set_defaults(run=search)
