"""Did a LoRA adapter ("views") learn its author, without forgetting everything else?

Three measurements, each of the base model and of the adapter on it, in one process with one model in memory
(the base model with the adapter attached; peft's ``disable_adapter()`` gives the base model's scores):

- **held-out perplexity**: on the author's documents the adapter was *not* trained on. Lower with the adapter
  means it learned the author's language and habits, not just its training texts.
- **control perplexity**: on texts that are not the author's (by default a bundled neutral set, English and
  Russian). It should stay about where the base model had it; a large rise means the adapter forgot general
  language to fit the author. Held-out falling while control stays is "learned the author"; both falling is
  "learned the language or genre"; control rising is "forgetting".
- **stance probe**: pairs of minimal-pair statements, the author's position and its opposite; how often each
  model gives the author's side the higher log-likelihood. This asks whether the adapter took on the author's
  *opinions*, not only their vocabulary.

Perplexity is token-weighted over all texts of a set: exp(total negative log-likelihood / scored tokens). Each
text is cut into windows of at most ``window`` tokens (and never more than the model's positions), every window
starting with the same context prefix (see ``context_prefix``); every token of the text is scored once.

Models run in float32 on the CPU and in bfloat16 on a GPU (a 30 B model would not fit in float32). The adapter is
applied to the unquantised base even if it was trained as QLoRA on a 4-bit one: that is how it is served, and base
and adapter are compared on the same weights.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from baton.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.gateway.ingest.clean import clean_text

DEFAULT_WINDOW = 1024
DEFAULT_PASSAGE_LIMIT = 100  # BEIR passages read as control texts unless told otherwise
TEXT_SUFFIXES = (".txt", ".md")
# Logits of one forward pass are batch × length × vocabulary floats; this bounds them (Gemma's 262 k vocabulary
# makes a single 1024-token window 1 GiB). A batch always holds at least one sequence.
LOGITS_BUDGET_BYTES = 512 << 20
IGNORE = -100  # the label torch's cross-entropy skips

PROBE_REQUIRED = ("author", "opposite")
PROBE_OPTIONAL = ("id", "lang", "source")
MAX_REPORTED_LINES = 10
NOT_UTF8 = "\0not UTF-8"  # stands for a line that cannot be decoded (no JSON text starts with NUL)

# Rules of thumb for the one-line reading under the table (the numbers themselves are the result).
LEARNED_CHANGE = -0.05  # held-out perplexity at least 5 % lower
FORGETTING_CHANGE = 0.10  # control perplexity more than 10 % higher


# ------------------------------------------------------------------------------------------------------ probes


@dataclass(frozen=True)
class ProbePair:
    """One stance item: the author's statement and the same statement with the stance flipped."""

    author: str
    opposite: str
    id: str | None = None
    lang: str | None = None
    source: str | None = None


def load_probe(path: Path) -> list[ProbePair]:
    """The pairs of a probe file (JSONL); INVALID_ARGUMENT BAD_PROBE naming the file and each bad line's number."""
    pairs: list[ProbePair] = []
    bad: list[tuple[int, str]] = []
    seen_ids: dict[str, int] = {}
    for number, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            pair = _parse_probe_line(line)
            _check_unique_id(pair, number, seen_ids)
        except ValueError as problem:
            bad.append((number, str(problem)))
            continue
        pairs.append(pair)
    if bad:
        shown = "; ".join(f"line {number}: {problem}" for number, problem in bad[:MAX_REPORTED_LINES])
        more = f" (and {len(bad) - MAX_REPORTED_LINES} more)" if len(bad) > MAX_REPORTED_LINES else ""
        raise InvalidArgument(
            f"probe file {path} has {len(bad)} bad line(s): {shown}{more}. Each line must be one JSON object "
            '{"author": "...", "opposite": "..."} (optional "id", "lang", "source"); fix them and run again',
            reason="BAD_PROBE",
            metadata={"path": str(path), "lines": ",".join(str(number) for number, _ in bad)},
        )
    if not pairs:
        raise InvalidArgument(f"probe file {path} holds no pairs; add JSONL lines", reason="BAD_PROBE")
    return pairs


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line); a line that is not UTF-8 comes back as NOT_UTF8."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(
            f"probe file {path} does not exist; give a JSONL file of pairs", reason="PROBE_NOT_FOUND"
        ) from None
    except OSError as error:
        raise InvalidArgument(f"cannot read probe file {path} ({error.strerror})", reason="BAD_PROBE") from None
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            yield number, line.decode("utf-8")
        except UnicodeDecodeError:
            yield number, NOT_UTF8


def _parse_probe_line(line: str) -> ProbePair:
    if line == NOT_UTF8:
        raise ValueError("not UTF-8 text; save the file as UTF-8")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = sorted(set(record) - set(PROBE_REQUIRED) - set(PROBE_OPTIONAL))
    if unknown:
        allowed = ", ".join(PROBE_REQUIRED + PROBE_OPTIONAL)
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))} (allowed: {allowed})")
    for name in PROBE_REQUIRED:
        if name not in record:
            raise ValueError(f'missing field "{name}"')
    fields = {name: _string_field(record, name) for name in PROBE_REQUIRED + PROBE_OPTIONAL if name in record}
    if fields["author"] == fields["opposite"]:
        raise ValueError('"author" and "opposite" are the same statement; the opposite must flip the stance')
    return ProbePair(**fields)


def _string_field(record: dict[str, Any], name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise ValueError(f'"{name}" must be a string, not {type(value).__name__}')
    if not value.strip():
        raise ValueError(f'"{name}" is empty')
    return value.strip()


def _check_unique_id(pair: ProbePair, number: int, seen: dict[str, int]) -> None:
    if pair.id is None:
        return
    if pair.id in seen:
        raise ValueError(f'id "{pair.id}" is already used on line {seen[pair.id]}')
    seen[pair.id] = number


# ------------------------------------------------------------------------------------------------------- texts


def load_texts(path: Path, *, limit: int | None = None) -> list[str]:
    """Texts to score from ``path``, each cleaned like ingested documents:

    - a .txt or .md file: one text;
    - a BEIR folder (with ``corpus.jsonl``): its first ``limit`` passages (title and text) [DEFAULT_PASSAGE_LIMIT];
    - any other folder: its .txt and .md files (recursively, sorted by path), each one text, the first ``limit``.
    """
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise InvalidArgument(f"{path} is not a .txt or .md file; give texts, a folder of them or a BEIR folder")
        texts = [clean_text(_read_text(path))]
    elif (path / "corpus.jsonl").is_file():
        texts = _beir_passages(path / "corpus.jsonl", limit or DEFAULT_PASSAGE_LIMIT)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        texts = [clean_text(_read_text(p)) for p in files[:limit]]
    else:
        raise NotFound(f"{path} does not exist; give a .txt/.md file, a folder of them or a BEIR folder")
    texts = [text for text in texts if text]
    if not texts:
        raise InvalidArgument(f"{path} holds no text to score (no non-empty .txt/.md files or passages)")
    return texts


def default_control_texts() -> list[str]:
    """The bundled control set (``baton/evaluation/control/*.txt``): neutral encyclopedia-style paragraphs on
    general topics, English and Russian, one text per file."""
    folder = resources.files(__package__) / "control"
    files = sorted((entry for entry in folder.iterdir() if entry.name.endswith(".txt")), key=lambda e: e.name)
    return [clean_text(entry.read_text(encoding="utf-8")) for entry in files]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise InvalidArgument(f"cannot read {path} ({error.strerror})") from None


def _beir_passages(corpus: Path, limit: int) -> list[str]:
    texts: list[str] = []
    for number, line in _numbered_lines(corpus):
        if len(texts) >= limit:
            break
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(clean_text(f"{record.get('title') or ''}\n\n{record['text']}"))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):  # NOT_UTF8 is not JSON either
            raise InvalidArgument(f'{corpus} line {number} is not a BEIR passage {{"_id", "title", "text"}}') from None
    return texts


# ----------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Perplexity:
    """Token-weighted perplexity of one set of texts under the base model and under the adapter."""

    texts: int
    tokens: int  # tokens scored (each text's tokens once)
    base: float
    adapter: float

    @property
    def change(self) -> float:
        """Relative change, adapter against base: −0.4 = 40 % lower with the adapter."""
        return self.adapter / self.base - 1

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "change": self.change}


@dataclass(frozen=True)
class PairScore:
    """Log-likelihoods (sum of token log-probabilities, nats) of a probe pair's two statements."""

    id: str | None
    base_author: float
    base_opposite: float
    adapter_author: float
    adapter_opposite: float
    held_out: bool | None = None  # the pair's source document was held out of training (None: not known)

    @property
    def base_margin(self) -> float:
        return self.base_author - self.base_opposite

    @property
    def adapter_margin(self) -> float:
        return self.adapter_author - self.adapter_opposite

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "base_margin": self.base_margin, "adapter_margin": self.adapter_margin}


@dataclass(frozen=True)
class StanceResult:
    """How often each model prefers the author's side; a tie counts as not preferring it."""

    pairs: tuple[PairScore, ...]

    def by_source(self) -> dict[str, StanceResult]:
        """The pairs whose source document the adapter trained on, and those whose source it never saw — known when
        the pairs name their ``source`` and the training split is recorded. A position the adapter could only
        infer from other texts is a different test from one it read."""
        groups = {
            "trained": tuple(p for p in self.pairs if p.held_out is False),
            "held_out": tuple(p for p in self.pairs if p.held_out),
        }
        if not groups["held_out"]:
            return {}
        return {name: StanceResult(pairs) for name, pairs in groups.items() if pairs}

    @property
    def base_preferred(self) -> float:
        return sum(p.base_margin > 0 for p in self.pairs) / len(self.pairs)

    @property
    def adapter_preferred(self) -> float:
        return sum(p.adapter_margin > 0 for p in self.pairs) / len(self.pairs)

    @property
    def base_mean_margin(self) -> float:
        return sum(p.base_margin for p in self.pairs) / len(self.pairs)

    @property
    def adapter_mean_margin(self) -> float:
        return sum(p.adapter_margin for p in self.pairs) / len(self.pairs)

    def summary(self) -> dict[str, Any]:
        return {
            "pairs": len(self.pairs),
            "base_preferred": self.base_preferred,
            "adapter_preferred": self.adapter_preferred,
            "base_mean_margin": self.base_mean_margin,
            "adapter_mean_margin": self.adapter_mean_margin,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.summary(),
            "by_source": {name: group.summary() for name, group in self.by_source().items()},
            "items": [pair.to_dict() for pair in self.pairs],
        }


@dataclass(frozen=True)
class ViewsReport:
    """Everything ``baton eval views`` measured; ``table()`` for people, ``to_dict()`` for programs."""

    adapter: str  # what was evaluated, for the title ("kordovtsev v2" or a folder)
    base_model: str
    device: str
    seconds: float
    heldout: Perplexity
    control: Perplexity | None
    stance: StanceResult | None
    notes: tuple[str, ...] = ()  # where the texts came from

    def table(self) -> str:
        rows = [("", "base", "adapter", "change")]
        rows.append(_perplexity_row(f"held-out perplexity ({_count(self.heldout.texts, 'text')} by the author)",
                                    self.heldout))  # fmt: skip
        if self.control is not None:
            rows.append(_perplexity_row(f"control perplexity ({_count(self.control.texts, 'text')} by others)",
                                        self.control))  # fmt: skip
        if self.stance is not None:
            rows += _stance_rows(self.stance)
        title = f"views of {self.adapter} on {self.base_model} ({self.device}, {self.seconds:.1f} s)"
        return "\n".join([title, *_aligned(rows), *(f"  {note}" for note in self.notes), f"reading: {self.reading()}"])

    def reading(self) -> str:
        """One sentence on what the numbers say, by the rules of thumb LEARNED_CHANGE and FORGETTING_CHANGE."""
        held = self.heldout.change
        verb = "predicts" if held <= LEARNED_CHANGE else "does not predict"
        text = f"the adapter {verb} the author's unseen texts better ({held * 100:+.1f} %)"
        if self.control is not None:
            text += _control_reading(held, self.control.change)
        if self.stance is not None:
            moved = (self.stance.adapter_preferred - self.stance.base_preferred) * 100
            text += f"; the stance probe moved {moved:+.1f} pp toward the author"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "base_model": self.base_model,
            "device": self.device,
            "seconds": self.seconds,
            "heldout": self.heldout.to_dict(),
            "control": self.control.to_dict() if self.control is not None else None,
            "stance": self.stance.to_dict() if self.stance is not None else None,
            "notes": list(self.notes),
            "reading": self.reading(),
        }


def _control_reading(held: float, control: float) -> str:
    if control > FORGETTING_CHANGE:
        return f", but general text worse ({control * 100:+.1f} %): it is forgetting"
    if control <= LEARNED_CHANGE and control <= held / 2:
        return f"; general text improved too ({control * 100:+.1f} %): much of it is the language, not the author"
    return f", and general text about as well ({control * 100:+.1f} %)"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _perplexity_row(label: str, value: Perplexity) -> tuple[str, str, str, str]:
    return (
        f"{label}, {value.tokens:,} tokens",
        f"{value.base:.2f}",
        f"{value.adapter:.2f}",
        f"{value.change * 100:+.1f} %",
    )


_GROUP_LABELS = {"trained": "source trained on", "held_out": "source held out"}


def _stance_rows(stance: StanceResult) -> list[tuple[str, str, str, str]]:
    margin = stance.adapter_mean_margin - stance.base_mean_margin
    return [
        _preferred_row(f"stance: author's side preferred ({_count(len(stance.pairs), 'pair')})", stance),
        *(
            _preferred_row(f"  of which {_GROUP_LABELS[name]} ({_count(len(group.pairs), 'pair')})", group)
            for name, group in stance.by_source().items()
        ),
        (
            "stance: mean log-likelihood margin (nats)",
            f"{stance.base_mean_margin:+.2f}",
            f"{stance.adapter_mean_margin:+.2f}",
            f"{margin:+.2f}",
        ),
    ]


def _preferred_row(label: str, stance: StanceResult) -> tuple[str, str, str, str]:
    change = (stance.adapter_preferred - stance.base_preferred) * 100
    return (
        label,
        f"{stance.base_preferred * 100:.1f} %",
        f"{stance.adapter_preferred * 100:.1f} %",
        f"{change:+.1f} pp",
    )


def _aligned(rows: list[tuple[str, str, str, str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return ["  ".join([row[0].ljust(widths[0]), *(cell.rjust(widths[i]) for i, cell in enumerate(row) if i)]).rstrip()
            for row in rows]  # fmt: skip


# ----------------------------------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class _Sequence:
    """Token ids to run; only the tokens from ``context`` on are scored (those before only condition them)."""

    ids: list[int]
    context: int


def context_prefix(tokenizer: Any) -> list[int]:
    """The tokens every scored sequence starts with, so that its first real token is scored too.

    The tokenizer's own leading special tokens where it adds any (Gemma's ``<bos>``, without which its output is
    garbage); otherwise the end-of-sequence token, which is what precedes a document in the packed streams models
    (and baton's trainer, which ends every document with it) are trained on. Not ``bos_token`` in that case: in a
    chat model such as SmolLM2 it is ``<|im_start|>``, which announces a chat turn, not a text.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    if start:
        return list(full[:start])
    fallback = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    return [int(fallback)] if fallback is not None else []


class _Scorer:
    """Log-likelihoods of token sequences under a causal LM, in padded batches bounded by LOGITS_BUDGET_BYTES."""

    def __init__(self, model: Any, tokenizer: Any, device: str, window: int) -> None:
        from baton.models.token_nll import LogitsHead

        self.model = model
        self.head = LogitsHead.of(model)
        self.tokenizer = tokenizer
        self.device = device
        self.prefix = context_prefix(tokenizer)
        self.window = max(len(self.prefix) + 1, window)
        vocab = int(model.get_output_embeddings().weight.shape[0])
        self.batch_tokens = max(1, LOGITS_BUDGET_BYTES // (4 * vocab))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)  # padded positions are masked and never scored

    def text_windows(self, text: str) -> list[_Sequence]:
        """The text cut into windows, each ``prefix + chunk``, every token of the text in exactly one chunk."""
        ids = self._encode(text)
        step = self.window - len(self.prefix)
        return [_Sequence(self.prefix + ids[i : i + step], len(self.prefix)) for i in range(0, len(ids), step)]

    def statement(self, text: str) -> _Sequence:
        return _Sequence(self.prefix + self._encode(text)[: self.window - len(self.prefix)], len(self.prefix))

    def score(self, sequences: Sequence[_Sequence]) -> list[tuple[float, int]]:
        """(sum of log-probabilities in nats, tokens scored) of each sequence, in the given order."""
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].ids))  # little padding per batch
        results: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
        for batch in self._batches(order, sequences):
            for index, result in zip(batch, self._score_batch([sequences[i] for i in batch]), strict=True):
                results[index] = result
        return results

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def _batches(self, order: list[int], sequences: Sequence[_Sequence]) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in order:  # longest first, so the first sequence of a batch sets its padded width
            width = len(sequences[batch[0]].ids) if batch else len(sequences[index].ids)
            too_many = (len(batch) + 1) * width > self.batch_tokens
            # Padding is computed and thrown away: a sequence under half the batch's width starts a new batch.
            if batch and (too_many or 2 * len(sequences[index].ids) < width):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def _score_batch(self, batch: list[_Sequence]) -> list[tuple[float, int]]:
        import torch

        from baton.models.token_nll import next_token_nll

        width = max(len(s.ids) for s in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        targets = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for row, sequence in enumerate(batch):
            length = len(sequence.ids)
            ids[row, :length] = torch.tensor(sequence.ids)
            mask[row, :length] = 1
            targets[row, sequence.context : length] = ids[row, sequence.context : length]
        ids, mask, targets = ids.to(self.device), mask.to(self.device), targets.to(self.device)
        with torch.inference_mode():  # without the logits tensor where the model allows (baton/models/token_nll.py)
            nll = next_token_nll(self.model, self.head, ids, mask, targets)
            sums = (-nll.sum(dim=1)).tolist()
            counts = (targets[:, 1:] != IGNORE).sum(dim=1).tolist()
        return [(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]


# -------------------------------------------------------------------------------------------------- evaluation


def resolve_device(requested: str) -> str:
    """``auto`` → cuda when torch sees a GPU, else cpu; ``cuda`` without a GPU is FAILED_PRECONDITION."""
    import torch

    if requested not in ("auto", "cpu", "cuda"):
        raise InvalidArgument(f"device {requested!r} is unknown; use auto, cpu or cuda")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition("--device cuda was asked for, but torch sees no GPU here; use --device cpu")
    return requested


def load_adapted_model(base_model: Path, adapter: Path, device: str) -> tuple[Any, Any]:
    """The base model with the adapter attached (eval mode) and the base model's tokenizer, from local folders."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (base_model / "config.json").is_file():
        raise FailedPrecondition(
            f"the base model folder {base_model} has no config.json; give a local Hugging Face model folder",
            reason="BASE_MODEL_MISSING",
        )
    if not (adapter / "adapter_config.json").is_file():
        raise NotFound(f"{adapter} holds no peft adapter (adapter_config.json)", reason="ADAPTER_FILES_NOT_FOUND")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(str(base_model), local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=dtype, local_files_only=True).to(device)
    return PeftModel.from_pretrained(base, str(adapter)).eval(), tokenizer


def model_positions(config: Any) -> int | None:
    """The model's context length from its config, or None when the config does not say."""
    for holder in (config, getattr(config, "text_config", None)):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(holder, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def evaluate_views(
    base_model: Path,
    adapter: Path,
    *,
    heldout: Sequence[str],
    control: Sequence[str] = (),
    probe: Sequence[ProbePair] = (),
    device: str = "auto",
    window: int = DEFAULT_WINDOW,
    label: str | None = None,
    notes: Sequence[str] = (),
    heldout_sources: Collection[str] = (),
) -> ViewsReport:
    """Score ``heldout``, ``control`` and the ``probe`` statements with the base model and with the adapter.

    The stance probe compares the **sum** of a statement's token log-probabilities (its log-likelihood), not the
    mean: a pair is a minimal pair of near-equal length, so the sum is the model's probability of the exact
    sentence and compares like with like, while a mean per token would shift the verdict whenever the two sides
    tokenize into a different number of tokens (a side with one extra easy token would gain a better mean for
    free). A tie (equal sums) counts as not preferring the author's side.

    ``heldout_sources``: the file names of the held-out documents; probe pairs whose ``source`` is one of them are
    reported apart (``StanceResult.by_source``).
    """
    if not heldout:
        raise InvalidArgument("no held-out texts to score; give texts by the author that the adapter did not see")
    started = time.monotonic()
    device = resolve_device(device)
    model, tokenizer = load_adapted_model(base_model, adapter, device)
    positions = model_positions(model.config)
    scorer = _Scorer(model, tokenizer, device, min(window, positions) if positions else window)
    held = [w for text in heldout for w in scorer.text_windows(text)]
    ctrl = [w for text in control for w in scorer.text_windows(text)]
    statements = [scorer.statement(text) for pair in probe for text in (pair.author, pair.opposite)]
    everything = held + ctrl + statements
    with model.disable_adapter():
        base = scorer.score(everything)
    tuned = scorer.score(everything)
    cut = (len(held), len(held) + len(ctrl))
    return ViewsReport(
        adapter=label or str(adapter),
        base_model=base_model.name,
        device=device,
        seconds=round(time.monotonic() - started, 2),
        heldout=_perplexity(len(heldout), base[: cut[0]], tuned[: cut[0]]),
        control=_perplexity(len(control), base[cut[0] : cut[1]], tuned[cut[0] : cut[1]]) if control else None,
        stance=_stance(probe, base[cut[1] :], tuned[cut[1] :], heldout_sources) if probe else None,
        notes=tuple(notes),
    )


def _perplexity(texts: int, base: list[tuple[float, int]], tuned: list[tuple[float, int]]) -> Perplexity:
    tokens = sum(count for _, count in base)
    if not tokens:
        raise InvalidArgument("the texts hold no tokens to score")
    return Perplexity(
        texts=texts,
        tokens=tokens,
        base=math.exp(-sum(s for s, _ in base) / tokens),
        adapter=math.exp(-sum(s for s, _ in tuned) / tokens),
    )


def _stance(
    probe: Sequence[ProbePair],
    base: list[tuple[float, int]],
    tuned: list[tuple[float, int]],
    heldout_sources: Collection[str] = (),
) -> StanceResult:
    held = {Path(name).name for name in heldout_sources if name}

    def held_out(pair: ProbePair) -> bool | None:
        return Path(pair.source).name in held if held and pair.source else None

    pairs = tuple(
        PairScore(pair.id, base[2 * i][0], base[2 * i + 1][0], tuned[2 * i][0], tuned[2 * i + 1][0], held_out(pair))
        for i, pair in enumerate(probe)
    )
    return StanceResult(pairs)
