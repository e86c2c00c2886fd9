"""``baton eval views`` without a real model: the probe loader, text and control loading, the scorer's arithmetic on a
tiny random model, the report's rendering, the held-out split and the CLI's errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from baton.cli.eval_views import heldout_from_job
from baton.cli.main import main
from baton.evaluation.views import (
    PairScore,
    Perplexity,
    ProbePair,
    StanceResult,
    ViewsReport,
    _Scorer,
    context_prefix,
    default_control_texts,
    evaluate_views,
    load_probe,
    load_texts,
)
from baton.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from services.trainer.dataset import split_by_position
from services.trainer.registry import AdapterRegistry

REPO_ROOT = Path(__file__).resolve().parents[2]
GOOD = {"id": "p1", "lang": "en", "author": "I decide in the second hour.", "opposite": "I decide in the first hour."}

# ------------------------------------------------------------------------------------------------------ probes


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_probe_loader_reads_pairs_and_optional_fields(tmp_path: Path) -> None:
    second = {"author": "  Fog is a library. ", "opposite": "Fog is a danger.", "source": "07.md"}
    probe = write_lines(tmp_path / "p.jsonl", [json.dumps(GOOD), "", "   ", json.dumps(second)])
    pairs = load_probe(probe)
    assert pairs == [
        ProbePair("I decide in the second hour.", "I decide in the first hour.", id="p1", lang="en"),
        ProbePair("Fog is a library.", "Fog is a danger.", source="07.md"),  # stripped; blank lines skipped
    ]


def test_the_bundled_probe_loads() -> None:
    pairs = load_probe(REPO_ROOT / "examples" / "probes" / "kordovtsev.jsonl")
    assert len(pairs) >= 10 and all(pair.author != pair.opposite for pair in pairs)


BAD_LINES = {
    "bad JSON": ('{"author": "a", "opposite": ', "not valid JSON"),
    "not an object": ('["a", "b"]', "expected a JSON object, got list"),
    "missing author": ('{"opposite": "b"}', 'missing field "author"'),
    "missing opposite": ('{"author": "a"}', 'missing field "opposite"'),
    "empty side": ('{"author": "a", "opposite": ""}', '"opposite" is empty'),
    "blank side": ('{"author": "   ", "opposite": "b"}', '"author" is empty'),
    "not a string": ('{"author": "a", "opposite": 3}', '"opposite" must be a string, not int'),
    "identical sides": ('{"author": "same", "opposite": " same "}', '"author" and "opposite" are the same'),
    "unknown field": ('{"author": "a", "opposite": "b", "weight": 2}', "unknown field(s) 'weight'"),
    "duplicate id": ('{"id": "p1", "author": "a", "opposite": "b"}', 'id "p1" is already used on line 1'),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_malformed_probe_line_is_refused_with_its_number(tmp_path: Path, case: str) -> None:
    line, problem = BAD_LINES[case]
    probe = write_lines(tmp_path / "probe.jsonl", [json.dumps(GOOD), "", line])  # the bad line is line 3
    with pytest.raises(InvalidArgument) as caught:
        load_probe(probe)
    error = caught.value
    assert error.reason == "BAD_PROBE" and error.metadata["lines"] == "3"
    assert str(probe) in error.message and f"line 3: {problem}" in error.message


def test_every_bad_probe_line_is_reported(tmp_path: Path) -> None:
    probe = tmp_path / "probe.jsonl"
    probe.write_bytes(b'{"author": "a"}\n\xff\xfe\n' + json.dumps(GOOD).encode() + b"\n{oops\n")
    with pytest.raises(InvalidArgument) as caught:
        load_probe(probe)
    assert caught.value.metadata["lines"] == "1,2,4"
    assert "has 3 bad line(s)" in caught.value.message and "line 2: not UTF-8 text" in caught.value.message


def test_an_empty_or_missing_probe_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n", encoding="utf-8")
    with pytest.raises(InvalidArgument, match="holds no pairs"):
        load_probe(tmp_path / "empty.jsonl")
    with pytest.raises(NotFound, match="does not exist"):
        load_probe(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------------- texts


def test_texts_from_a_file_a_folder_and_a_beir_folder(tmp_path: Path) -> None:
    (tmp_path / "one.md").write_text("  First   text.\r\n", encoding="utf-8")
    assert load_texts(tmp_path / "one.md") == ["First text."]  # cleaned like ingested documents

    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for name, text in (("b.txt", "Bee."), ("a.md", "Ay."), ("sub/c.txt", "Sea."), ("d.txt", " "), ("e.pdf", "x")):
        (folder / name).write_text(text, encoding="utf-8")
    assert load_texts(folder) == ["Ay.", "Bee.", "Sea."]  # sorted by path, empty and non-text files left out
    assert load_texts(folder, limit=2) == ["Ay.", "Bee."]

    beir = tmp_path / "beir"
    beir.mkdir()
    passages = [{"_id": str(i), "title": f"T{i}", "text": f"Passage {i}."} for i in range(5)]
    write_lines(beir / "corpus.jsonl", [json.dumps(p) for p in passages])
    assert load_texts(beir, limit=2) == ["T0\n\nPassage 0.", "T1\n\nPassage 1."]


def test_texts_errors_say_what_to_give(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        load_texts(tmp_path / "nothing")
    (tmp_path / "data.csv").write_text("a,b", encoding="utf-8")
    with pytest.raises(InvalidArgument, match=r"not a \.txt or \.md file"):
        load_texts(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidArgument, match="holds no text"):
        load_texts(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    write_lines(tmp_path / "broken" / "corpus.jsonl", ['{"_id": "1", "text": "ok"}', '{"_id": "2"}'])
    with pytest.raises(InvalidArgument, match="line 2 is not a BEIR passage"):
        load_texts(tmp_path / "broken")


# The author's world (examples/corpus): the control set must stay clear of it.
AUTHOR_WORLD = re.compile(
    r"lighthouse|keeper|\bbees?\b|honey|bread|\bseas?\b|letters?\b|clock|\bdogs?\b|kettle|barometer|"
    r"маяк|пч[её]л|м[её]д\b|хлеб|\bмор(е|я|ю|ем|ск)|письм|\bчас(ы|ов)\b|собак|чайник|барометр",
    re.IGNORECASE,
)


def test_the_bundled_control_set_is_english_and_russian_and_not_the_authors() -> None:
    english, russian = default_control_texts()  # en.txt, ru.txt
    for text in (english, russian):
        assert 500 <= len(text.split()) <= 800 and text.count("\n\n") == 5  # six paragraphs
        assert not AUTHOR_WORLD.search(text), AUTHOR_WORLD.search(text)
    assert re.search(r"[а-яё]", russian) and not re.search(r"[а-яё]", english)


# ----------------------------------------------------------------------------------------------------- scoring


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random model and a random (non-zero) LoRA adapter on it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from baton.models.tiny import build_tiny_model

    folder = tmp_path_factory.mktemp("tiny")
    model = build_tiny_model(folder / "model")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(folder / "adapter"))
    return model, folder / "adapter"


def reference_perplexity(model, prefix: list[int], ids: list[int]) -> float:
    """transformers' own loss on prefix + ids: every token after the first is predicted once."""
    tensor = torch.tensor([prefix + ids])
    with torch.inference_mode():
        return math.exp(float(model(input_ids=tensor, labels=tensor).loss))


def test_perplexity_and_stance_match_transformers_own_loss(tiny: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path, adapter_path = tiny
    text = "Москва и Казань — большие города. The quick brown fox jumps over the lazy dog."
    probe = [
        ProbePair("The fox is quick.", "The fox is slow.", id="fox", source="essays/fox.md"),
        ProbePair("The dog is lazy.", "The dog is busy.", id="dog", source="dog.md"),
        ProbePair("The sky is blue.", "The sky is green.", id="sky"),  # no source: in neither group
    ]
    report = evaluate_views(
        model_path, adapter_path, heldout=[text], control=[text, text], probe=probe, device="cpu",
        heldout_sources=["/home/me/notes/fox.md"],
    )  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    prefix = context_prefix(tokenizer)
    assert prefix == [tokenizer.eos_token_id]  # no <bos> of its own: the end-of-text token starts a document
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_path)), str(adapter_path))
    with tuned.disable_adapter():
        base_ppl = reference_perplexity(tuned, prefix, ids)
    adapter_ppl = reference_perplexity(tuned, prefix, ids)
    assert report.heldout.tokens == len(ids) and report.heldout.texts == 1
    assert report.heldout.base == pytest.approx(base_ppl, rel=1e-4)
    assert report.heldout.adapter == pytest.approx(adapter_ppl, rel=1e-4)
    assert report.heldout.adapter != pytest.approx(report.heldout.base, rel=1e-3)  # the adapter is not a no-op
    assert report.control is not None and report.control.tokens == 2 * len(ids)  # token-weighted over texts
    assert report.control.base == pytest.approx(base_ppl, rel=1e-4)

    assert report.stance is not None
    pair = report.stance.pairs[0]
    author_ids = tokenizer("The fox is quick.", add_special_tokens=False)["input_ids"]
    sum_log_prob = -math.log(reference_perplexity(tuned, prefix, author_ids)) * len(author_ids)
    assert pair.id == "fox" and pair.adapter_author == pytest.approx(sum_log_prob, rel=1e-4)
    assert (
        report.stance.adapter_preferred == sum(p.adapter_author > p.adapter_opposite for p in report.stance.pairs) / 3
    )
    # A pair whose source document was held out (matched by file name) is reported apart from the trained ones.
    assert [p.held_out for p in report.stance.pairs] == [True, False, None]
    groups = report.stance.by_source()
    assert [p.id for p in groups["held_out"].pairs] == ["fox"] and [p.id for p in groups["trained"].pairs] == ["dog"]


def test_windows_cover_each_token_once_and_padding_changes_nothing(tiny: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_path, adapter_path = tiny
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_path)), str(adapter_path))
    scorer = _Scorer(model.eval(), tokenizer, "cpu", window=16)
    text = " ".join(f"word{i}" for i in range(40))
    windows = scorer.text_windows(text)
    assert all(w.ids[: w.context] == scorer.prefix and len(w.ids) <= 16 for w in windows)
    content = [token for w in windows for token in w.ids[w.context :]]
    assert content == tokenizer(text, add_special_tokens=False)["input_ids"]

    short = scorer.statement("A short one.")
    alone = scorer.score([short])[0]
    together = scorer.score([*windows, short, short])  # padded beside longer windows, in batches of several
    assert together[-1][1] == alone[1] and together[-1][0] == pytest.approx(alone[0], abs=1e-4)
    assert sum(count for _, count in together[: len(windows)]) == len(content)


# ------------------------------------------------------------------------------------------------------ report


def sample_report() -> ViewsReport:
    pairs = (PairScore("a", -10.0, -11.0, -8.0, -9.5), PairScore("b", -10.0, -9.0, -8.0, -8.0))  # tie: not preferred
    return ViewsReport(
        adapter="kordovtsev v2",
        base_model="smollm2-135m-instruct",
        device="cpu",
        seconds=12.3,
        heldout=Perplexity(texts=3, tokens=1200, base=40.0, adapter=24.0),
        control=Perplexity(texts=1, tokens=800, base=20.0, adapter=20.5),
        stance=StanceResult(pairs),
        notes=("held-out: 3 documents",),
    )


def test_the_table_and_the_dict_carry_the_numbers() -> None:
    report = sample_report()
    table = report.table()
    assert "views of kordovtsev v2 on smollm2-135m-instruct (cpu, 12.3 s)" in table
    assert re.search(r"held-out perplexity \(3 texts by the author\), 1,200 tokens +40\.00 +24\.00 +-40\.0 %", table)
    assert re.search(r"control perplexity \(1 text by others\), 800 tokens +20\.00 +20\.50 +\+2\.5 %", table)
    assert re.search(r"author's side preferred \(2 pairs\) +50\.0 % +50\.0 % +\+0\.0 pp", table)
    assert re.search(r"mean log-likelihood margin \(nats\) +\+0\.00 +\+0\.75 +\+0\.75", table)
    assert "reading: the adapter predicts the author's unseen texts better (-40.0 %), and general text" in table

    data = json.loads(json.dumps(report.to_dict()))  # JSON-ready
    assert data["heldout"]["change"] == pytest.approx(-0.4) and data["control"]["tokens"] == 800
    assert data["stance"]["adapter_preferred"] == 0.5 and data["stance"]["items"][1]["adapter_margin"] == 0.0
    assert data["notes"] == ["held-out: 3 documents"] and data["reading"] == report.reading()


def test_the_pairs_on_held_out_documents_are_reported_apart() -> None:
    pairs = (
        PairScore("seen-1", -10.0, -11.0, -8.0, -9.5, held_out=False),  # adapter prefers the author
        PairScore("seen-2", -10.0, -9.0, -8.0, -9.0, held_out=False),  # adapter prefers the author, base does not
        PairScore("unseen", -10.0, -11.0, -9.0, -8.0, held_out=True),  # the adapter lost the author's side
    )
    report = ViewsReport(**{**sample_report().__dict__, "stance": StanceResult(pairs)})
    table = report.table()
    assert re.search(r"author's side preferred \(3 pairs\) +66\.7 % +66\.7 % +\+0\.0 pp", table)
    assert re.search(r"  of which source trained on \(2 pairs\) +50\.0 % +100\.0 % +\+50\.0 pp", table)
    assert re.search(r"  of which source held out \(1 pair\) +100\.0 % +0\.0 % +-100\.0 pp", table)
    data = json.loads(json.dumps(report.to_dict()))["stance"]
    assert data["by_source"]["trained"] == {**data["by_source"]["trained"], "pairs": 2, "adapter_preferred": 1.0}
    assert data["by_source"]["held_out"]["adapter_preferred"] == 0.0 and "items" not in data["by_source"]["held_out"]
    assert "of which" not in sample_report().table()  # no split known: one row, as before
    assert json.loads(json.dumps(sample_report().to_dict()))["stance"]["by_source"] == {}


def test_the_reading_names_forgetting() -> None:
    report = sample_report()
    forgetful = ViewsReport(**{**report.__dict__, "control": Perplexity(1, 800, base=20.0, adapter=30.0)})
    assert "but general text worse (+50.0 %): it is forgetting" in forgetful.reading()


# ------------------------------------------------------------------------------------------- held-out and CLI


def register(home: Path, name: str, job_id: str, *, base: Path, eval_documents: int = 1) -> None:
    """A version in the registry as the trainer publishes it (the weights' bytes do not matter here)."""
    output = home / "out" / job_id
    output.mkdir(parents=True)
    (output / "adapter_config.json").write_text("{}", encoding="utf-8")
    (output / "adapter_model.safetensors").write_bytes(b"")
    metadata = {"base_model_path": str(base), "job_id": job_id, "dataset": {"eval_documents": eval_documents}}
    (output / "baton-adapter.json").write_text(json.dumps(metadata), encoding="utf-8")
    AdapterRegistry(home / "adapters").publish(name, job_id, output, {"tenant": "me", "base_model_path": str(base)})


def write_job(home: Path, job_id: str, documents: list[str], **hyper: object) -> None:
    """A job over ingested texts (BATON_HOME/texts), as the trainer service writes its spec.json."""
    texts = home / "texts"
    texts.mkdir(exist_ok=True)
    refs = []
    for i, text in enumerate(documents):
        (texts / f"h{i}.txt").write_text(text, encoding="utf-8")
        refs.append({"id": f"doc-{i}", "path": str(texts / f"h{i}.txt")})
    write_spec(home, job_id, {"kind": "texts", "documents": refs}, **hyper)


def write_spec(home: Path, job_id: str, dataset: dict[str, object], **hyper: object) -> None:
    spec = {"job_id": job_id, "name": "n", "base_model_path": "/m", "dataset": dataset,
            "hyper": {"eval_fraction": 0.25, "seed": 7, **hyper}}  # fmt: skip
    job_dir = home / "trainer" / "jobs" / job_id
    job_dir.mkdir(parents=True)
    (job_dir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")


def test_the_held_out_documents_are_the_trainers_split(tmp_path: Path) -> None:
    documents = [f"Document number {i}." for i in range(8)]
    documents.insert(3, "  \n ")  # empty after cleaning: the trainer drops it before splitting
    write_job(tmp_path, "job-1", documents)
    register(tmp_path, "views", "job-1", base=tmp_path, eval_documents=2)
    registered = AdapterRegistry(tmp_path / "adapters").read("views", 1)
    texts, note = heldout_from_job(registered, tmp_path / "trainer" / "jobs")
    kept = [d for d in documents if d.strip()]
    assert texts == [kept[i] for i in split_by_position(len(kept), 0.25, 7)[1]]
    assert "2 of 8 documents job job-1 kept out" in note

    write_job(tmp_path, "job-2", documents, eval_fraction=0.5)
    register(tmp_path, "views", "job-2", base=tmp_path, eval_documents=2)  # the data changed since: 4 now
    with pytest.raises(FailedPrecondition, match="changed since"):
        heldout_from_job(AdapterRegistry(tmp_path / "adapters").read("views", 2), tmp_path / "trainer" / "jobs")


def test_the_held_out_lines_of_a_jsonl_job_and_the_refusal_of_chat_lines(tmp_path: Path) -> None:
    texts = [f"Line {i} of the author." for i in range(4)]
    data = write_lines(tmp_path / "data.jsonl", [json.dumps({"text": text}) for text in texts])  # baton train DIR
    write_spec(tmp_path, "job-1", {"kind": "jsonl", "path": str(data), "format": "auto"})
    register(tmp_path, "views", "job-1", base=tmp_path)
    held, _ = heldout_from_job(AdapterRegistry(tmp_path / "adapters").read("views", 1), tmp_path / "trainer" / "jobs")
    assert held == [texts[split_by_position(4, 0.25, 7)[1][0]]]

    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    chats = write_lines(tmp_path / "chat.jsonl", [json.dumps(chat)] * 4)
    write_spec(tmp_path, "job-2", {"kind": "jsonl", "path": str(chats), "format": "auto"})
    register(tmp_path, "views", "job-2", base=tmp_path)
    with pytest.raises(FailedPrecondition, match=r"trained on chat lines.*--heldout PATH"):
        heldout_from_job(AdapterRegistry(tmp_path / "adapters").read("views", 2), tmp_path / "trainer" / "jobs")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("BATON_HOME", str(tmp_path))
    for variable in ("BATON_TRAINER_ADAPTER_ROOT", "BATON_TRAINER_JOBS_DIR"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path


def cli_error(*args: str) -> str:
    with pytest.raises(SystemExit) as caught:
        main(["eval", "views", *args])
    return str(caught.value.code)


def test_the_cli_lists_the_registered_adapters_for_an_unknown_name(home: Path) -> None:
    assert "registered: none yet (train one: baton train DATA --name NAME)" in cli_error("kordovtsev")
    base = home / "base"
    base.mkdir()
    (base / "config.json").write_text("{}", encoding="utf-8")
    register(home, "other", "job-a", base=base)
    register(home, "other", "job-b", base=base)
    message = cli_error("kordovtsev")
    assert message.startswith("baton eval: no adapter 'kordovtsev' in ")
    assert "registered: other (versions 1, 2)" in message
    assert "adapter 'other' has no version 5; it has 1, 2" in cli_error("other", "--version", "5")


def test_the_cli_says_what_to_do_without_a_split_a_base_model_or_a_good_probe(home: Path) -> None:
    register(home, "gone-base", "job-a", base=home / "nowhere")
    assert "base model folder" in (message := cli_error("gone-base")) and "--base-model PATH" in message
    base = home / "base"
    base.mkdir()
    (base / "config.json").write_text("{}", encoding="utf-8")
    register(home, "no-job", "job-b", base=base)  # its job folder is gone
    message = cli_error("no-job")
    assert "has no recorded split" in message and "pass --heldout PATH" in message
    probe = write_lines(home / "probe.jsonl", [json.dumps(GOOD), '{"author": "x", "opposite": "x"}'])
    message = cli_error("no-job", "--probe", str(probe))
    assert f"probe file {probe}" in message and "line 2:" in message
