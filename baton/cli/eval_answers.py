"""``baton eval answers --beir DIR``: do answers use the facts? The corpus goes into a tenant of its own, then the
first N questions are asked through the running stack's chat with memory on and off (greedy, one answer budget),
and a table (or ``--json``) says how often the answer contains a gold answer and cites the gold document, the
latency per mode and the prompt tokens the model read. The work is in baton.evaluation.answers."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from baton.cli.memory import add_gateway_flags
from baton.clients.gateway import GatewayClient, default_admin_key
from baton.runtime.errors import BatonError

DEFAULT_QUESTIONS = 200
DEFAULT_ANSWER_TOKENS = 64


def register(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "answers",
        help="gold answer in the answer, citation of the gold document, latency: RAG on vs off",
        description=__doc__,
    )
    parser.add_argument("--beir", required=True, help="folder with corpus.jsonl, queries.jsonl and answers.jsonl")
    parser.add_argument("--max-questions", type=int, default=DEFAULT_QUESTIONS,
                        help=f"ask the first N questions of answers.jsonl [{DEFAULT_QUESTIONS}]")  # fmt: skip
    parser.add_argument("--offset", type=int, default=0,
                        help="skip the first N questions (tune on one slice, report on another) [0]")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                        help=f"answer budget in tokens, the same in both modes [{DEFAULT_ANSWER_TOKENS}]")  # fmt: skip
    parser.add_argument("-k", type=int, default=None, help="chunks retrieved per question [the gateway's chat_k]")
    parser.add_argument("--grounding", type=float, default=None,
                        help="context-aware decoding weight with memory, 0 off [gateway default]")  # fmt: skip
    parser.add_argument("--modes", default="rag,no-rag",
                        help="which modes to ask, comma-separated: rag, no-rag [both]")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=1,
                        help="chats in flight at once [1: latencies without queueing]")  # fmt: skip
    parser.add_argument("--user", default=None, help="user and tenant that holds the dataset [eval-<dataset>]")
    parser.add_argument("--json", action="store_true", help="print one JSON object (with every answer) instead")
    add_gateway_flags(parser)
    parser.set_defaults(run=eval_answers)


def eval_answers(args: argparse.Namespace) -> None:
    from baton.beir import BeirDataset, upload_corpus
    from baton.evaluation import answers

    try:
        dataset = answers.AnswerSet.load(Path(args.beir), max_questions=args.max_questions, offset=args.offset)
    except (BatonError, OSError) as error:
        raise SystemExit(f"baton eval answers: {error}") from None
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(answers.MODES))
    if unknown or not modes:
        raise SystemExit(f"baton eval answers: --modes takes {' and '.join(answers.MODES)}, not {args.modes!r}")
    user = args.user or f"eval-{dataset.name}"
    say = (lambda _: None) if args.json else print
    say(f"{dataset.name}: {len(dataset.corpus)} documents, {len(dataset.questions)} questions (tenant {user})")
    admin_key = default_admin_key()
    if admin_key is None:
        raise SystemExit("baton eval answers: needs the admin key (BATON_GATEWAY_ADMIN_KEY or BATON_HOME/admin.key) "
                         "to give the dataset a tenant of its own")  # fmt: skip
    quiet = args.json or not sys.stderr.isatty()
    with GatewayClient(args.gateway, api_key=admin_key) as admin:
        issued = admin.ensure_user_key(user, tenant=user, label="baton eval answers")
        try:
            with GatewayClient(args.gateway, api_key=str(issued["key"])) as client:
                with tqdm(total=len(dataset.corpus), desc="ingest", unit="doc", disable=quiet) as bar:
                    upload_corpus(client, BeirDataset(dataset.name, dataset.corpus, {}, {}), bar.update)
                total = len(modes) * len(dataset.questions)
                with tqdm(total=total, desc="ask", unit="chat", disable=quiet) as bar:
                    outcomes = answers.run(client, dataset.questions, modes=modes, max_tokens=args.max_tokens,
                                           k=args.k, grounding=args.grounding, concurrency=args.concurrency,
                                           on_done=lambda _: bar.update())  # fmt: skip
        finally:
            admin.revoke_key(user, str(issued["id"]))
    rows = answers.summarise(outcomes)
    result = answers.report(dataset, rows, outcomes, max_tokens=args.max_tokens, k=args.k, offset=args.offset,
                            grounding=args.grounding)  # fmt: skip
    if args.json:
        print(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        _print_table(result)


def _print_table(result: dict[str, Any]) -> None:
    print(f"\nanswer budget {result['settings']['max_tokens']} tokens, greedy; {result['normalisation']}")
    header = ("mode", "answers", "contains gold", "cites gold", "gold in sources", "cited/answer", "p50 s", "p95 s",
              "prompt tok")  # fmt: skip
    print(f"{header[0]:<8}{header[1]:>8}" + "".join(f"{h:>16}" for h in header[2:]))
    for mode, row in result["modes"].items():
        values = (row["contains_gold"], row["cites_gold"], row["gold_in_sources"], row["citations_per_answer"],
                  row["latency_p50_s"], row["latency_p95_s"], row["mean_prompt_tokens"])  # fmt: skip
        errors = f" ({row['errors']} failed)" if row["errors"] else ""
        print(f"{mode:<8}{row['questions']:>8}" + "".join(f"{v:>16.3f}" for v in values[:-1]) +
              f"{values[-1]:>16.1f}{errors}")  # fmt: skip
    for mode, row in result["modes"].items():
        if row["gold_in_sources"]:  # a mode that had sources to cite
            print(_citations_line(mode, row))
    ratio = result["rag_over_no_rag"]
    print(f"contains gold, RAG on / off: {'n/a (off is 0)' if ratio is None else f'{ratio:.1f}×'}")


def _citations_line(mode: str, row: dict[str, Any]) -> str:
    right, wrong = row["right_answers"], row["questions"] - row["right_answers"]
    return (f"{mode}: cites gold in {row['right_citing_gold']} of {right} right answers and "
            f"{row['wrong_citing_gold']} of {wrong} wrong ones; {row['citing_nothing']} cite no source")  # fmt: skip
