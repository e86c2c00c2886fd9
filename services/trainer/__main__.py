"""``python -m services.trainer [flags]`` — run the trainer (same as ``baton serve trainer``)."""

from __future__ import annotations

import sys

from baton.runtime.entrypoint import run_service
from services.trainer.settings import TrainerSettings

DESCRIPTION = """\
The trainer: (Q)LoRA training jobs that turn a tenant's texts into an adapter. Serves the Trainer gRPC contract
(SubmitJob, GetJob, ListJobs, WatchJob streaming progress, CancelJob). Jobs and their events live in SQLite and
survive restarts: an interrupted job resumes from its last checkpoint. One job trains at a time, in a child process
(a crash or an out-of-memory error fails the job, never the service), under a TRAINING lease from the GPU-lease
scheduler: asked to yield, it checkpoints and gives the GPU back, and resumes when granted again. A finished adapter
is copied into the registry as BATON_HOME/adapters/<name>/<version>/ (metadata, loss curves) and, if an inference
service is configured, hot-loaded there.

examples:
  python -m services.trainer                                    # gRPC :50063; lease from :50060 when on CUDA
  python -m services.trainer --gpu-lease always --inference-addr 127.0.0.1:50062   # CPU posing as a GPU, hot-load
  python -m services.trainer --allowed-roots /data/corpora,/home/me/texts           # where JSONL datasets may live
  baton train notes.jsonl --name my-views --base-model /models/Qwen3-30B-A3B      # submit and watch a job
  grpcurl -plaintext -d '{"tenant": "me"}' localhost:50063 baton.v1.Trainer/ListJobs
"""


def main(argv: list[str] | None = None) -> None:
    run_service(
        "trainer", TrainerSettings, argv, description=DESCRIPTION, serve="services.trainer.server:serve", models=True
    )


if __name__ == "__main__":
    main(sys.argv[1:])
