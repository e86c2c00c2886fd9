"""A chat stack around one of the real pretrained models (SmolLM2-135M-Instruct, Gemma 3 270M): the shared embedder,
an hf inference process serving the model, and a gateway — all real processes on free loopback ports.

The inference process runs torch with one thread. On a 2-core machine that other jobs share, two threads wait for
each other at every operation while the other core is busy: 64 greedy tokens of SmolLM2 took 82 s with two threads
and 16 s with one, under the same load (and answers are the same: greedy, float32).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai

from baton.runtime.process import ServiceProcess
from baton.v1 import inference_pb2
from tests.fixtures.embedder import EmbedderHandle
from tests.fixtures.gateway import GatewayHandle
from tests.fixtures.inference import WAKE_TIMEOUT_S, InferenceHandle


class OneThreadInference(InferenceHandle):
    """The inference service serving a real model on the CPU with one torch thread, no lease."""

    def start(self, *, wait_awake: bool = True) -> InferenceHandle:
        args = ["--home", str(self.home), "--engine", "hf", "--model-path", str(self.model_path)]
        args += ["--adapter-root", str(self.adapter_root), "--grpc-port", str(self.grpc_port)]
        args += ["--metrics-port", str(self.metrics_port), "--gpu-lease", "never", *self.extra_args]
        env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
        self.process = ServiceProcess(
            "inference-hf",
            "services.inference",
            args,
            grpc_target=self.target,
            log_path=self.home / "inference.log",
            env=env,
        )
        self.process.start(wait_healthy_s=120)
        if wait_awake:
            asyncio.run(self.wait_state(inference_pb2.INFERENCE_STATE_AWAKE, WAKE_TIMEOUT_S["hf"]))
        return self


@dataclass
class RealModelStack:
    gateway: GatewayHandle
    inference: InferenceHandle

    def openai(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=self.gateway.key(tenant))


@contextmanager
def real_model_stack(embedder: EmbedderHandle, model: Path, home: Path) -> Iterator[RealModelStack]:
    (home / "adapters").mkdir(parents=True, exist_ok=True)
    inference = OneThreadInference("hf", home / "inference", model, home / "adapters", scheduler=None)
    (home / "inference").mkdir(parents=True, exist_ok=True)
    inference.start()
    gateway = GatewayHandle(
        home=home / "gateway",
        allowed_root=home / "allowed",
        embedder_addr=embedder.grpc_target,
        extra_args=["--inference-addr", inference.target],
    )
    gateway.home.mkdir(parents=True, exist_ok=True)
    gateway.allowed_root.mkdir(parents=True, exist_ok=True)
    try:
        gateway.start()
        yield RealModelStack(gateway, inference)
    finally:
        gateway.stop()
        inference.stop()
