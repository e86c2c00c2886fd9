"""``python -m services.trainer.prepare SPEC_JSON RESULT_JSON`` — PREPARING, in a process of its own.

Builds the job's dataset exactly as the training process will (services/trainer/dataset.py: read, clean, tokenize
with the base model's tokenizer, split by document, pack) and writes the statistics, or the reason the data is
unusable (broken JSONL lines with their numbers, an empty dataset), to RESULT_JSON. The service learns this before
the job waits for the GPU, without importing transformers itself; a crash here fails the job, not the service. The
training process builds the dataset again (same seed, same result, checked by the data hash) because it must not
depend on anything but JOB_DIR.

RESULT_JSON: {"stats": {...the dataset event's fields, total_steps...}, "format": "text"|"messages", "notes": [...]} or
{"error": {"reason", "message", "metadata"}}. Exit 0 when the result was written (either kind), 1 otherwise.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from baton.runtime.errors import BatonError


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    from services.trainer import dataset
    from services.trainer.run_spec import JobSpec, plan_steps

    job = JobSpec.from_json(spec)
    try:
        built = dataset.build_dataset(
            dataset.source_from_spec(job.dataset),
            dataset.load_tokenizer(job.base_model_path),
            seq_len=job.hyper.seq_len,
            eval_fraction=job.hyper.eval_fraction,
            seed=job.hyper.seed,
            max_positions=dataset.model_max_positions(job.base_model_path),
        )
    except BatonError as error:
        return {"error": {"reason": error.reason, "message": error.message, "metadata": error.metadata}}
    stats = {**built.stats.to_event(), "total_steps": plan_steps(len(built.train), job.hyper).total_steps}
    return {"stats": stats, "format": built.stats.format, "notes": list(built.notes)}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec_path, result_path = Path(argv[0]), Path(argv[1])
    result = prepare(json.loads(spec_path.read_text(encoding="utf-8")))
    staging = result_path.with_suffix(".tmp")
    staging.write_text(json.dumps(result), encoding="utf-8")
    staging.replace(result_path)  # the service never reads half a result
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
