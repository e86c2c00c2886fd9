"""Chat prompt variants for a small model, measured offline: how a source is shown and how far it is focused.

``baton eval answers`` measures the whole stack and takes minutes per 100 questions; this script isolates the prompt.
Each XQuAD-style question (``answers.jsonl``: a gold document and gold answers) gets its gold paragraph as the only
source — what the stack gives nine times in ten (the other tenth adds one or two more) — focused by the gateway's own
``packing.focus`` and rendered by its own ``format_source`` and ``ChatFormat``; the model answers greedily in-process
(transformers; the hf engine's greedy output equals it token for token), and the answer counts when it contains a gold
answer (``baton.evaluation.answers.contains_answer``). The first variant is the baseline: the table gives each
variant's rate, and against the baseline the questions it won and lost (a paired count, as the rates are close).

    .venv/bin/python benchmarks/eval_prompt.py --offset 200 --questions 350 \
        --variants bare:2,labelled:2,bare:1,bare:3,titled:2

A variant is ``STYLE:SENTENCES``: ``bare`` (the passage alone: the chat default), ``labelled`` (``[1] Title`` first,
as before), ``titled`` (the title alone first); SENTENCES 0 keeps the whole paragraph. Tune on questions past the
ones you report (``baton eval answers`` reports the first 200).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from baton.evaluation.answers import contains_answer
from baton.models.pretrained import models_dir, prepare
from benchmarks.common import print_table
from services.gateway.chat.packing import focus, stems
from services.gateway.chat.prompt import CHAT, format_source

STYLES = ("bare", "labelled", "titled")


@dataclass(frozen=True)
class Variant:
    style: str
    sentences: int

    @classmethod
    def parse(cls, text: str) -> Variant:
        style, _, sentences = text.partition(":")
        if style not in STYLES or not sentences.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r}: a variant is STYLE:SENTENCES, STYLE one of {STYLES}")
        return cls(style, int(sentences))

    def __str__(self) -> str:
        return f"{self.style}:{self.sentences}"

    def source(self, title: str, question: str, paragraph: str) -> str:
        text = focus(paragraph, stems(question), self.sentences, skip={title}) if self.sentences else paragraph
        if self.style == "titled":
            return f"{title.replace('_', ' ')}\n{text}"
        return format_source(1, title, "", None, text, labelled=self.style == "labelled")


def load(folder: Path, offset: int, count: int) -> list[tuple[str, str, str, list[str]]]:
    """(title, paragraph, question, gold answers) for questions offset..offset+count of answers.jsonl."""
    corpus = {row["_id"]: row for row in map(json.loads, (folder / "corpus.jsonl").open())}
    queries = {row["_id"]: row["text"] for row in map(json.loads, (folder / "queries.jsonl").open())}
    rows = [json.loads(line) for line in (folder / "answers.jsonl").open()][offset : offset + count]
    return [
        (corpus[r["doc_id"]].get("title", ""), corpus[r["doc_id"]]["text"], queries[r["_id"]], r["answers"])
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--beir", type=Path, default=Path("../shared/data/xquad-en"), help="folder with answers.jsonl")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="a catalogue name (prepared once)")
    parser.add_argument("--offset", type=int, default=200, help="skip the first N questions (the reported ones)")
    parser.add_argument("--questions", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=64, help="answer budget, as baton eval answers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--variants", type=lambda s: [Variant.parse(v) for v in s.split(",")], default="bare:2,labelled:2"
    )
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    path = prepare(args.model, models_dir(Path(__file__).resolve().parents[1] / "var"))
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    questions = load(args.beir, args.offset, args.questions)

    def answer(prompt: list[tuple[str, str]]) -> str:
        text = tokenizer.apply_chat_template(
            [{"role": r, "content": c} for r, c in prompt], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
            )
        return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    right: dict[Variant, list[bool]] = {}
    for variant in args.variants:
        started = time.perf_counter()
        right[variant] = [
            contains_answer(answer(CHAT.render([("user", q)], [variant.source(title, q, paragraph)])), golds)
            for title, paragraph, q, golds in questions
        ]
        print(
            f"{variant}: {sum(right[variant]) / len(questions):.3f} ({time.perf_counter() - started:.0f} s)", flush=True
        )
    baseline = right[args.variants[0]]
    rows = [
        [
            str(variant),
            f"{sum(hits) / len(hits):.3f}",
            str(sum(h and not b for h, b in zip(hits, baseline, strict=True))),
            str(sum(b and not h for h, b in zip(hits, baseline, strict=True))),
        ]
        for variant, hits in right.items()
    ]
    title = f"{args.model}, questions {args.offset}–{args.offset + len(questions)} of {args.beir.name}"
    print_table(title, ["variant", "contains a gold answer", f"won vs {args.variants[0]}", "lost"], rows)


if __name__ == "__main__":
    main()
