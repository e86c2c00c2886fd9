"""``baton cycle DOCS_DIR --name NAME``: the whole cycle through the gateway, one stage after another.

ingest (memory) → training set from the ingested collection → train under the GPU lease (views) → register →
hot-load → an answer with citations from the new adapter → what the adapter learned, measured (``baton eval views``:
held-out and control perplexity, base vs adapter, and a stance probe with ``--probe``). Every stage prints one line,
and the long ones a progress bar. Everything but the last stage goes through the gateway's HTTP API with the
caller's key, so it works against any running stack (``baton up``) and stays inside the caller's tenant; the views
are measured in this process from BATON_HOME, where the trainer keeps the adapter. The collection is NAME, so the
adapter trains on these documents only and the answer cites them.
"""

from __future__ import annotations

import argparse
import os
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from baton.cli.memory import UPLOAD_BATCH, add_gateway_flags
from baton.clients.gateway import GatewayClient
from baton.runtime.errors import FailedPrecondition, NotFound, PermissionDenied, UpstreamFailed

if TYPE_CHECKING:
    from baton.evaluation.views import ViewsReport

STAGES = ("ingest", "training set", "train", "register", "hot-load", "answer", "views")
DEFAULT_QUESTION = "What does the author of these texts believe most strongly?"
# The hyperparameters a cycle may set; None = the trainer's default.
TRAIN_OPTIONS = (
    "max_steps", "epochs", "seq_len", "grad_accumulation_steps", "rank", "learning_rate", "quantization", "seed",
    "eval_fraction", "strength", "top_layers", "evaluate",
)  # fmt: skip


@dataclass
class CycleResult:
    """What a cycle produced: enough for a caller (the demo, its test) to check every stage."""

    collection: str
    ingest: dict[str, Any] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    job: dict[str, Any] = field(default_factory=dict)
    adapter: dict[str, Any] = field(default_factory=dict)
    answer: dict[str, Any] = field(default_factory=dict)
    base_answer: dict[str, Any] = field(default_factory=dict)
    views: ViewsReport | None = None  # baton eval views of the new adapter (None: measured elsewhere or skipped)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def citations(self) -> list[dict[str, Any]]:
        return list(self.answer.get("baton", {}).get("citations", []))

    @property
    def answer_text(self) -> str:
        return str(self.answer["choices"][0]["message"]["content"])


@dataclass(frozen=True)
class CycleOptions:
    question: str = DEFAULT_QUESTION
    train: dict[str, Any] = field(default_factory=dict)  # TRAIN_OPTIONS that were set
    max_tokens: int = 64
    compare_base: bool = True  # also ask the base model, to show what the adapter changed
    # Where the trainer keeps its registry and job folders (BATON_HOME): the views stage measures the adapter there
    # (baton eval views). None: the stack runs elsewhere; the stage says which command to run there.
    home: Path | None = None
    probe: Path | None = None  # stance pairs for the views stage (baton eval views --probe)


class Cycle:
    def __init__(self, client: GatewayClient, docs: Path, name: str, options: CycleOptions) -> None:
        self.client = client
        self.docs = docs
        self.name = name
        self.options = options
        self.result = CycleResult(collection=name)
        self.job_id = ""  # the training job, once stage 2 has submitted it
        self.seen_seq = 0  # its last event shown: stage 3 replays the ones after it, so none is missed

    def run(self) -> CycleResult:
        steps: list[Callable[[], str]] = [
            self._ingest, self._training_set, self._train, self._register, self._hot_load, self._answer, self._views,
        ]  # fmt: skip
        for number, (stage, step) in enumerate(zip(STAGES, steps, strict=True), start=1):
            with self._stage(number, stage):
                summary = step()
            print(f"      {summary}  ({self.result.seconds[stage]:.1f} s)", flush=True)
        return self.result

    @contextmanager
    def _stage(self, number: int, stage: str) -> Iterator[None]:
        print(f"[{number}/{len(STAGES)}] {stage}", flush=True)
        started = time.monotonic()
        yield
        self.result.seconds[stage] = time.monotonic() - started

    # ---------------------------------------------------------------------------------------------- 1. memory

    def _ingest(self) -> str:
        try:
            job = self.client.start_folder_ingest(self.docs, collection=self.name)
        except PermissionDenied:
            # The gateway may ingest only folders under its allowed roots (and may run elsewhere): upload instead.
            report = self._upload()
        else:
            with _bar("ingest", "doc") as bar:
                job = self.client.follow_job(str(job["id"]), lambda j: _draw_ingest(bar, j), poll_s=0.3)
            if job.get("error"):
                raise UpstreamFailed(f"ingest of {self.docs} failed: {job['error']}", reason="INGEST_FAILED")
            report = job["report"]
        self.result.ingest = report
        if not any(int(report.get(k, 0)) for k in ("added", "updated", "unchanged")):
            raise FailedPrecondition(
                f"nothing in {self.docs} could be ingested (supported: txt, md, html, pdf, docx)", reason="NO_DOCUMENTS"
            )
        counts = ", ".join(f"{report.get(k, 0)} {k}" for k in ("added", "updated", "unchanged", "failed"))
        return f"{counts}; {report.get('chunks', 0)} new chunks in collection {self.name!r}"

    def _upload(self) -> dict[str, Any]:
        from services.gateway.ingest.pipeline import list_supported_files

        files = list_supported_files(self.docs)
        totals: dict[str, Any] = {}
        with _bar("upload", "doc", total=len(files)) as bar:
            for start in range(0, len(files), UPLOAD_BATCH):
                batch = files[start : start + UPLOAD_BATCH]
                for key, value in self.client.upload(batch, collection=self.name).items():
                    if isinstance(value, int):
                        totals[key] = int(totals.get(key, 0)) + value
                bar.update(len(batch))
        return totals

    # ---------------------------------------------------------------------------------------------- 2-3. views

    def _training_set(self) -> str:
        """Submit the job and follow it through PREPARING: the trainer builds the training set from the collection
        (cleaned texts, tokenized, packed, split by document) before it asks for any GPU time, so a bad set fails
        here. The job then waits for the lease: stage 3."""
        request_id = f"cycle-{self.name}-{uuid.uuid4().hex[:12]}"
        job = self.client.submit_training(
            self.name, collections=[self.name], request_id=request_id, hot_load=True, **self.options.train
        )
        self.job_id = str(job["id"])
        print(f"      job {self.job_id}: LoRA rank {job['spec']['lora'].get('rank', '?')}", flush=True)
        events = self.client.watch_training(self.job_id)
        try:
            for event in events:
                _note(event)
                self.seen_seq = max(self.seen_seq, int(event.get("seq") or 0))
                if event["state"] not in ("queued", "preparing"):
                    break
        finally:
            events.close()  # the rest is followed in stage 3
        job = self.client.training_job(self.job_id)
        self._check_not_ended_badly(job)
        stats = self.result.dataset = job.get("dataset", {})
        gib = int(job.get("estimate", {}).get("vram_bytes", 0)) / (1 << 30)
        return (
            f"{stats.get('documents', 0)} documents ({stats.get('train_documents', 0)} train, "
            f"{stats.get('eval_documents', 0)} eval), {int(stats.get('train_tokens', 0))} training tokens in "
            f"{stats.get('train_blocks', 0)} blocks of {job['spec']['hyperparameters'].get('seq_len', '?')}; "
            f"{job.get('progress', {}).get('total_steps', 0)} steps, estimated peak VRAM {gib:.2f} GiB"
        )

    def _train(self) -> str:
        with _bar("waiting for the GPU", "step") as bar:
            for event in self.client.watch_training(self.job_id, after_seq=self.seen_seq):
                _draw_training(bar, event)
        job = self.client.training_job(self.job_id)
        self.result.job = job
        self._check_not_ended_badly(job)
        progress = job.get("progress", {})
        loss = f", final loss {progress['loss']:.3f}" if "loss" in progress else ""
        lease = f" under GPU lease epoch {job['lease_epoch']}" if job.get("lease_epoch") else ""
        return f"{progress.get('step', 0)} steps{lease}, {int(progress.get('tokens_seen', 0))} tokens{loss}"

    def _check_not_ended_badly(self, job: dict[str, Any]) -> None:
        if job["state"] in ("failed", "cancelled"):
            error = job.get("error", {})
            raise FailedPrecondition(
                f"training job {job['id']} ended {job['state']}: {error.get('message', 'no reason given')} "
                f"(the trainer's log: BATON_HOME/logs/trainer.log)",
                reason=str(error.get("reason") or "TRAINING_FAILED"),
            )

    # ---------------------------------------------------------------------------------------------- 4-5. serve

    def _register(self) -> str:
        adapter = self.result.job.get("adapter", {})
        listed = [a for a in self.client.adapters()["adapters"] if a["name"] == self.name]
        if not any(int(a.get("version", 0)) == int(adapter.get("version", 0)) for a in listed):
            raise NotFound(
                f"adapter {self.name} v{adapter.get('version')} is not in GET /v1/adapters", reason="NOT_REGISTERED"
            )
        self.result.adapter = adapter
        before, after = adapter.get("eval_perplexity_before"), adapter.get("eval_perplexity_after")
        ppl = f"; eval perplexity {before:.1f} → {after:.1f}" if before is not None and after is not None else ""
        return f"adapter {self.name} version {adapter.get('version')} at {adapter.get('path')}{ppl}"

    def _hot_load(self) -> str:
        if not self.result.adapter.get("hot_loaded"):
            raise FailedPrecondition(
                f"the inference service did not load {self.name}: {self.result.adapter.get('hot_load_error') or '?'}",
                reason="HOT_LOAD_FAILED",
            )
        models = [m["id"] for m in self.client.models()["data"]]
        if self.name not in models:
            raise NotFound(f"{self.name} was hot-loaded but GET /v1/models does not list it", reason="NOT_SERVED")
        return f"served without a restart; /v1/models: {', '.join(models)}"

    # ---------------------------------------------------------------------------------------------- 6. answer

    def _answer(self) -> str:
        messages = [{"role": "user", "content": self.options.question}]
        rag = {"rag": True, "collection": self.name}
        sampling = {"max_tokens": self.options.max_tokens, "temperature": 0}
        self.result.answer = self.client.chat(messages, model=self.name, baton=rag, **sampling)
        if self.options.compare_base:
            self.result.base_answer = self.client.chat(messages, baton=rag, **sampling)
        print(f"      Q: {self.options.question}")
        print(_indent("A", f"({self.name}) {self.result.answer_text}"))
        if self.result.base_answer:
            base = self.result.base_answer
            print(_indent("A", f"({base['model']}, without the adapter) {base['choices'][0]['message']['content']}"))
        for citation in self.result.citations:
            print(_citation_line(citation))
        return f"{len(self.result.citations)} citations"

    # ---------------------------------------------------------------------------------------------- 7. views

    def _views(self) -> str:
        """What the adapter learned, measured (baton eval views): held-out perplexity, control, the stance probe."""
        version = int(self.result.adapter.get("version") or 0) or None
        command = f"baton eval views {self.name}" + (f" --probe {self.options.probe}" if self.options.probe else "")
        home = self.options.home
        if home is None or not Path(str(self.result.adapter.get("path", ""))).is_dir():
            return f"the adapter lives where the trainer runs: measure it there with `{command}`"
        from baton.cli.eval_views import evaluate_registered_adapter

        report = evaluate_registered_adapter(home, self.name, version, probe=self.options.probe, progress=_say)
        self.result.views = report
        for line in report.table().splitlines():
            print(f"      {line}")
        return f"measured (again: {command})"


def _say(line: str) -> None:
    print(f"      {line}", flush=True)


def _bar(description: str, unit: str, total: int | None = None) -> tqdm:
    # disable=None: drawn on a terminal only; logs (CI, pipes) keep the stage lines without the redraws.
    return tqdm(total=total, desc=f"      {description}", unit=unit, dynamic_ncols=True, leave=False, disable=None)


def _draw_ingest(bar: tqdm, job: dict[str, Any]) -> None:
    report = job.get("report") or {}
    bar.total = int(report.get("total") or 0) or None
    bar.n = int(report.get("done") or 0)
    bar.set_postfix(chunks=int(report.get("chunks") or 0), refresh=False)
    bar.refresh()


def _draw_training(bar: tqdm, event: dict[str, Any]) -> None:
    progress = event.get("progress") or (event.get("job") or {}).get("progress") or {}
    if progress.get("total_steps"):
        bar.total = int(progress["total_steps"])
    bar.n = int(progress.get("step", 0))
    bar.set_description(f"      {event.get('state', '?')}", refresh=False)
    postfix = {"loss": f"{progress['loss']:.3f}"} if "loss" in progress else {}
    if progress.get("eta_s") is not None:
        postfix["eta"] = f"{progress['eta_s']:.0f}s"
    bar.set_postfix(postfix, refresh=False)
    bar.refresh()
    _note(event)


def _note(event: dict[str, Any]) -> None:
    """A training event's message for people (state changes, evaluations, checkpoints), one line each."""
    if event.get("message") and event.get("type") not in ("step", "snapshot"):
        tqdm.write(f"      · {event['message']}")


def _citation_line(citation: dict[str, Any]) -> str:
    where = " > ".join(part for part in (citation.get("title"), citation.get("heading")) if part)
    page = f", p. {citation['page']}" if citation.get("page") else ""
    source = Path(str(citation.get("source", ""))).name
    return f"      [{citation['index']}] {where}{page} — {source} (score {citation['score']:.3f})"


def _indent(label: str, text: str) -> str:
    return textwrap.fill(
        " ".join(text.split()), width=110, initial_indent=f"      {label}: ", subsequent_indent=" " * 9
    )


# ---------------------------------------------------------------------------------------------------- command


def cycle(args: argparse.Namespace) -> None:
    docs = Path(args.docs).expanduser().resolve()
    if not docs.is_dir():
        raise SystemExit(f"baton cycle: {docs} is not a folder")
    train = {key: getattr(args, key) for key in TRAIN_OPTIONS if getattr(args, key) is not None}
    home = Path(os.environ.get("BATON_HOME", "var")).resolve()
    probe = Path(args.probe).expanduser().resolve() if args.probe else None
    options = CycleOptions(question=args.question, train=train, max_tokens=args.max_tokens, home=home, probe=probe)
    started = time.monotonic()
    with GatewayClient(args.gateway) as client:
        Cycle(client, docs, args.name, options).run()
    print(f"done in {time.monotonic() - started:.1f} s: chat with it as model {args.name!r} (OpenAI API, "
          f"{args.gateway}/v1)")  # fmt: skip


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "cycle",
        help="the whole cycle: ingest a folder, train an adapter on it, serve it, answer with citations",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("docs", help="a folder of your texts (txt, md, html, pdf, docx)")
    parser.add_argument("--name", required=True, help="adapter and collection name (a-z0-9._-)")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="what to ask the new model at the end")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer length in tokens (default 64)")
    parser.add_argument("--max-steps", dest="max_steps", type=int, help="optimizer steps (default: one epoch)")
    parser.add_argument("--epochs", type=float, help="passes over the documents (default 1)")
    parser.add_argument("--seq-len", dest="seq_len", type=int, help="tokens per training sequence")
    parser.add_argument("--grad-accum", dest="grad_accumulation_steps", type=int, help="micro-batches per step")
    parser.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    parser.add_argument("--lr", dest="learning_rate", type=float, help="peak learning rate")
    parser.add_argument("--strength", type=float, help="share of the trained update the adapter keeps (default 1)")
    parser.add_argument(
        "--top-layers", dest="top_layers", type=float,
        help="share of the layers, from the top, whose update the adapter keeps (default 1; below: the base model)",
    )  # fmt: skip
    parser.add_argument("--quant", dest="quantization", choices=["nf4", "none"], help="nf4 = QLoRA (default)")
    parser.add_argument("--seed", type=int, help="training seed")
    parser.add_argument("--eval-fraction", dest="eval_fraction", type=float, help="share of documents held out")
    parser.add_argument(
        "--no-trainer-eval", dest="evaluate", action="store_const", const=False,
        help="hold the documents out but let the views stage score them, not the trainer too (two passes fewer)",
    )  # fmt: skip
    parser.add_argument("--probe", help="stance pairs (JSONL) for the views stage, e.g. examples/probes/*.jsonl")
    add_gateway_flags(parser)
    parser.set_defaults(run=cycle)
