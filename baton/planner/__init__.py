"""The resource planner: what a job takes (VRAM, host RAM, disk, time) and whether it fits the GPU.

A pure library — no I/O — used by ``baton plan``, the gateway's ``POST /v1/plan`` and the services' lease requests
(trainer, inference, embedder). Inputs are a model's ``config.json`` fields (``ModelArch``; ``catalog`` bundles
Qwen3-30B-A3B, Qwen3-8B/14B, Llama-3.1-8B, Mistral-7B), a job (``TrainingJob``, ``RagJob``, ``ServingJob``) and a
GPU (``catalog.GPUS`` or a custom ``GpuSpec``). Every estimate is an itemised ``Breakdown``; the modules' docstrings
give the arithmetic, and tests/integration/test_planner_measured.py checks it against measured peaks.
"""

from baton.planner.catalog import EMBEDDING_MODELS, GPUS, MODEL_CONFIGS, EmbeddingModel, GpuSpec, cpu_device
from baton.planner.models import ModelArch
from baton.planner.plan import Breakdown, Item, LeaseAdvice, Plan, Report, Sharing, Verdict
from baton.planner.rag import RagJob, plan_rag
from baton.planner.report import render
from baton.planner.scenario import build_report, scenario, seed_scenario
from baton.planner.serving import ServingJob, plan_serving
from baton.planner.sharing import plan_sharing
from baton.planner.training import TrainingJob, plan_training, training_memory

__all__ = [
    "EMBEDDING_MODELS",
    "GPUS",
    "MODEL_CONFIGS",
    "Breakdown",
    "EmbeddingModel",
    "GpuSpec",
    "Item",
    "LeaseAdvice",
    "ModelArch",
    "Plan",
    "RagJob",
    "Report",
    "ServingJob",
    "Sharing",
    "TrainingJob",
    "Verdict",
    "build_report",
    "cpu_device",
    "plan_rag",
    "plan_serving",
    "plan_sharing",
    "plan_training",
    "render",
    "scenario",
    "seed_scenario",
    "training_memory",
]
