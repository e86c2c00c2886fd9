"""``baton eval``: measured quality, one subcommand per question a user asks.

- ``retrieval``: does search find the right passages? (nDCG@10, recall, MRR on a BEIR-layout set)
- ``views``: did the adapter learn the author, and not forget everything else? (held-out and control perplexity,
  the stance probe)
- ``answers``: do answers use the facts? (gold answer in the answer, citation of the gold document, latency, RAG on
  vs off)
"""

from __future__ import annotations

import argparse

from baton.cli import eval_answers, eval_views
from baton.cli.memory import add_gateway_flags, eval_retrieval


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="measure quality: baton eval retrieval | views | answers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    retrieval = kinds.add_parser("retrieval", help="nDCG@10, recall@10/@100, MRR on a BEIR-layout dataset")
    retrieval.add_argument("--beir", required=True, help="folder with corpus.jsonl, queries.jsonl, qrels/test.tsv")
    retrieval.add_argument("--modes", default="bm25,vector,hybrid", help="comma-separated search modes")
    retrieval.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    retrieval.add_argument("--user", default=None, help="user and tenant that holds the dataset [eval-<dataset>]")
    add_gateway_flags(retrieval)
    retrieval.set_defaults(run=eval_retrieval)
    eval_views.register(kinds)
    eval_answers.register(kinds)
