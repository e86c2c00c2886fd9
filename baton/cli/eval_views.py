"""``baton eval views ADAPTER``: did the adapter learn the author, without forgetting everything else?

Runs in this process, with no service: it reads the adapter registry in BATON_HOME (adapters/NAME/VERSION/), the
base model folder named in the adapter's baton-adapter.json, and the held-out documents of the job that trained it
(the trainer's split by document, recomputed from the job's spec.json exactly as the trainer made it), then scores
texts with the base model and with the adapter (baton/evaluation/views.py). ``evaluate_registered_adapter`` is the
same for ``baton cycle`` and the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from baton.runtime.errors import FailedPrecondition, NotFound

if TYPE_CHECKING:
    from baton.evaluation.views import ProbePair, ViewsReport
    from services.trainer.registry import AdapterRegistry, RegisteredVersion

DESCRIPTION = """\
Did the adapter learn the author, without forgetting everything else? This scores texts with the base model and
with the adapter, in this process (no service needed; a minute or more on a CPU for a small model): the author's
documents that the training job held out, control texts by others, and, with --probe, a stance probe.

It reads BATON_HOME: adapters/NAME/VERSION/ (the adapter, and the base model folder it records) and the training
job's folder trainer/jobs/JOB/ (which documents it held out).
"""

EPILOG = """\
what the numbers mean (each for the base model, the adapter, and the change):
  held-out perplexity  how surprised the model is, per token, by the author's documents the adapter was NOT
                       trained on (the training job's eval split, or --heldout). Lower is better; good: clearly
                       lower with the adapter (-10 % and more; tens of % on a corpus with a distinctive voice).
  control perplexity   the same on texts that are not the author's (a bundled neutral English + Russian set, or
                       --control). Good: about unchanged (within +-10 %). Both falling: the adapter learned the
                       language or genre more than the author; control rising: it forgot general text (train
                       fewer steps, or with a lower learning rate or rank).
  stance               for each pair of a --probe file (the author's statement, its opposite), which of the two
                       the model finds more likely (sum of token log-probabilities). The share preferring the
                       author's side: 50 % is a coin toss; good: the adapter well above the base model. The mean
                       margin is the average log-likelihood gap, author minus opposite, in nats.
  change               adapter against base: % for perplexities, percentage points (pp) for the stance.

examples:
  baton eval views kordovtsev --probe examples/probes/kordovtsev.jsonl
  baton eval views kordovtsev --version 1 --json
  baton eval views my-views --heldout ~/notes/unseen/ --control ../shared/data/scifact --control-limit 50

environment: BATON_HOME (default ./var); BATON_TRAINER_ADAPTER_ROOT and BATON_TRAINER_JOBS_DIR if the trainer
keeps its registry or job folders elsewhere
"""


def _home() -> Path:
    return Path(os.environ.get("BATON_HOME", "var")).resolve()


# --------------------------------------------------------------------------------------------------- resolution


def find_adapter(registry: AdapterRegistry, name: str, version: int | None) -> RegisteredVersion:
    """The registered version (the latest when ``version`` is None); NOT_FOUND lists what is registered."""
    versions = registry.versions(name)
    if not versions:
        raise NotFound(
            f"no adapter {name!r} in {registry.root}; registered: {_registered(registry)}",
            reason="ADAPTER_NOT_FOUND",
        )
    if version is None:
        version = versions[-1]
    elif version not in versions:
        listed = ", ".join(str(v) for v in versions)
        raise NotFound(f"adapter {name!r} has no version {version}; it has {listed}", reason="ADAPTER_NOT_FOUND")
    return registry.read(name, version)


def _registered(registry: AdapterRegistry) -> str:
    found: dict[str, list[str]] = {}
    for entry in registry.all_versions():
        found.setdefault(entry.name, []).append(str(entry.version))
    if not found:
        return "none yet (train one: baton train DATA --name NAME)"
    return ", ".join(f"{name} (versions {', '.join(versions)})" for name, versions in sorted(found.items()))


def base_model_of(registered: RegisteredVersion, override: Path | None = None) -> Path:
    """The base model folder the adapter was trained on (its metadata), or ``override``; it must exist."""
    recorded = registered.metadata.get("base_model_path") or registered.registry.get("base_model_path")
    if override is None and not recorded:
        raise FailedPrecondition(
            f"{registered.path} records no base model (baton-adapter.json base_model_path); pass --base-model PATH",
            reason="BASE_MODEL_MISSING",
        )
    folder = override or Path(str(recorded))
    if not (folder / "config.json").is_file():
        how = "check --base-model" if override else "put the model back there, or pass --base-model PATH"
        raise FailedPrecondition(
            f"the base model folder {folder} of adapter {registered.relative_path} is missing (no config.json); {how}",
            reason="BASE_MODEL_MISSING",
            metadata={"path": str(folder)},
        )
    return folder


def heldout_from_job(registered: RegisteredVersion, jobs_dir: Path) -> tuple[list[str], str]:
    """The texts of the documents the training job held out, and a line saying where they come from.

    The adapter's metadata lists them (``dataset.eval_document_ids``); they are read again from the job's documents
    (spec.json in its job folder, kept after the job ends) with the trainer's own reader. Adapters trained before
    the list was recorded get the split recomputed from the job's seed and eval_fraction with the trainer's splitter
    of that time (``split_by_position``), checked against the number of eval documents the metadata recorded.
    """
    from services.trainer.dataset import split_by_position

    spec = _job_spec(registered, jobs_dir)
    documents = _training_documents(spec, registered)
    recorded_ids = (registered.metadata.get("dataset") or {}).get("eval_document_ids")
    if recorded_ids is not None:
        wanted = set(map(str, recorded_ids))
        held = [index for index, document in enumerate(documents) if str(document.id) in wanted]
    else:
        _, held = split_by_position(len(documents), spec.hyper.eval_fraction, spec.hyper.seed)
    recorded = (registered.metadata.get("dataset") or {}).get("eval_documents")
    if recorded is not None and int(recorded) != len(held):
        raise FailedPrecondition(
            f"the training data of job {spec.job_id} changed since it trained adapter {registered.relative_path} "
            f"({len(held)} held-out documents now, {recorded} then), so its split cannot be rebuilt; pass --heldout "
            "PATH with texts by the author the adapter did not see",
            reason="SPLIT_CHANGED",
        )
    if not held:
        raise FailedPrecondition(
            f"job {spec.job_id} held out no documents (eval_fraction {spec.hyper.eval_fraction}, {len(documents)} "
            "documents): nothing of the author is unseen; pass --heldout PATH, or train with --eval-fraction 0.1",
            reason="NO_RECORDED_SPLIT",
        )
    note = (
        f"held-out: the {len(held)} of {len(documents)} documents job {spec.job_id} kept out of training "
        f"(seed {spec.hyper.seed}, eval_fraction {spec.hyper.eval_fraction})"
    )
    return [documents[i].text for i in held], note


def _job_spec(registered: RegisteredVersion, jobs_dir: Path) -> Any:
    from services.trainer.run_spec import JobSpec

    job_id = registered.registry.get("job_id") or registered.metadata.get("job_id")
    path = jobs_dir / str(job_id) / "spec.json"
    if not job_id or not path.is_file():
        where = f"its job folder {path.parent} is gone" if job_id else "its registry.json names no training job"
        raise FailedPrecondition(
            f"adapter {registered.relative_path} has no recorded split ({where}), so its held-out documents are "
            "unknown; pass --heldout PATH with texts by the author the adapter did not see",
            reason="NO_RECORDED_SPLIT",
        )
    return JobSpec.from_json(json.loads(path.read_text(encoding="utf-8")))


def _training_documents(spec: Any, registered: RegisteredVersion) -> list[Any]:
    # The trainer's own reader: the same documents, cleaned and with empty ones dropped, in the same order as the
    # split was drawn over — a copy of its rules could drift from them.
    from services.trainer.dataset import read_documents, source_from_spec

    documents, fmt, _ = read_documents(source_from_spec(spec.dataset))
    if fmt != "text":
        raise FailedPrecondition(
            f"adapter {registered.relative_path} was trained on chat lines, whose held-out conversations are not "
            "plain texts of the author; pass --heldout PATH with texts by the author the adapter did not see",
            reason="NO_RECORDED_SPLIT",
        )
    return list(documents)


# --------------------------------------------------------------------------------------------------- evaluation


def evaluate_registered_adapter(
    home: Path,
    name: str,
    version: int | None = None,
    *,
    probe: Path | None = None,
    control: Path | None = None,
    control_limit: int | None = None,
    heldout: Path | None = None,
    base_model: Path | None = None,
    device: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> ViewsReport:
    """``baton eval views`` as a function: resolve adapter ``name`` in ``home`` and measure it (see the module).

    Everything that can be wrong with the inputs is found before the model loads; ``progress`` then hears one line
    on what is about to be scored.
    """
    from baton.evaluation.views import evaluate_views
    from services.trainer.registry import AdapterRegistry
    from services.trainer.settings import TrainerSettings

    settings = TrainerSettings(home=home)  # where the trainer keeps the registry and job folders
    registered = find_adapter(AdapterRegistry(settings.resolved_adapter_root()), name, version)
    base = base_model_of(registered, base_model)
    inputs = _gather_inputs(registered, settings.resolved_jobs_dir(), probe, control, control_limit, heldout)
    if progress is not None:
        progress(
            f"scoring with {base.name}, without and with adapter {registered.relative_path}: held-out texts "
            f"{len(inputs.heldout)}, control texts {len(inputs.control)}, probe pairs {len(inputs.probe)} ..."
        )
    return evaluate_views(
        base,
        registered.path,
        heldout=inputs.heldout,
        control=inputs.control,
        probe=inputs.probe,
        device=device,
        label=f"{registered.name} v{registered.version}",
        notes=inputs.notes,
        heldout_sources=inputs.heldout_sources,
    )


@dataclass(frozen=True)
class _Inputs:
    heldout: list[str]
    control: list[str]
    probe: list[ProbePair]
    notes: list[str]  # where each came from, printed under the table
    heldout_sources: list[str]  # where the held-out documents were ingested from, when the job's split is used


def _gather_inputs(
    registered: RegisteredVersion,
    jobs_dir: Path,
    probe: Path | None,
    control: Path | None,
    control_limit: int | None,
    heldout: Path | None,
) -> _Inputs:
    from baton.evaluation.views import default_control_texts, load_probe, load_texts

    pairs = load_probe(probe) if probe is not None else []  # bad lines fail before minutes of model loading
    control_texts = load_texts(control, limit=control_limit) if control else default_control_texts()
    sources: list[str] = []
    if heldout is not None:
        heldout_texts, heldout_note = load_texts(heldout), f"held-out: {heldout}"
    else:
        heldout_texts, heldout_note = heldout_from_job(registered, jobs_dir)
        sources = [str(s) for s in (registered.metadata.get("dataset") or {}).get("eval_document_sources") or []]
    notes = [
        heldout_note,
        f"control: {control}" if control else "control: the bundled English and Russian set",
        *([f"probe: {probe}"] if probe else []),
        f"adapter: {registered.path}",
    ]
    return _Inputs(heldout_texts, control_texts, pairs, notes, sources)


# ------------------------------------------------------------------------------------------------------- the CLI


def _run(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders or nothing: never wait on a model hub
    # Progress bars and load reports of transformers would drown the table a person waits for; set before it is
    # imported (it reads them then), and not by importing it here, so a mistyped name fails in a second.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    report = evaluate_registered_adapter(
        _home(),
        args.adapter,
        args.version,
        probe=_path(args.probe),
        control=_path(args.control),
        control_limit=args.control_limit,
        heldout=_path(args.heldout),
        base_model=_path(args.base_model),
        device=args.device,
        progress=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) if args.json else report.table())


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def register(kinds: argparse._SubParsersAction) -> None:
    parser = kinds.add_parser(
        "views",
        help="did the adapter learn the author without forgetting? held-out and control perplexity, stance probe",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", metavar="ADAPTER", help="a registered adapter's name (see: baton adapters)")
    parser.add_argument("--version", type=int, metavar="N", help="which version of it [the latest]")
    parser.add_argument(
        "--probe", metavar="FILE", help="stance pairs, JSONL {author, opposite} (e.g. examples/probes/*.jsonl)"
    )
    parser.add_argument(
        "--control",
        metavar="PATH",
        help="texts not by the author: a .txt/.md file, a folder of them, or a BEIR folder [the bundled set]",
    )
    parser.add_argument(
        "--control-limit", type=int, metavar="N", help="use the first N passages or files of --control [100 passages]"
    )
    parser.add_argument(
        "--heldout", metavar="PATH", help="texts by the author the adapter did not see [the training job's eval split]"
    )
    parser.add_argument("--base-model", metavar="PATH", help="the base model folder [the one the adapter records]")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to run [auto]")
    parser.add_argument("--json", action="store_true", help="print the measurements as JSON instead of a table")
    parser.set_defaults(run=_run)
