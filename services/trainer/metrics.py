"""The trainer's Prometheus metrics (served on metrics_port's /metrics).

The Grafana training panel draws loss, eval loss and tokens/s of the job training now from the gauges; jobs by state
and the outcome counter show the queue; the lease-wait and yield histograms show what sharing the GPU costs
(yield = from the signal to the child's exit with its checkpoint saved, which must fit the scheduler's deadline).
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from services.trainer.model import JobState

_SLOW_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)
_CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class TrainerMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.jobs = Gauge("baton_trainer_jobs", "Jobs by state (terminal ones since the service started).", ["state"],
                          registry=registry)  # fmt: skip
        self.finished = Counter("baton_trainer_jobs_finished", "Jobs that reached a terminal state.", ["state"],
                                registry=registry)  # fmt: skip
        self.step = Gauge("baton_trainer_step", "Optimizer step of the job training now.", registry=registry)
        self.total_steps = Gauge("baton_trainer_total_steps", "Steps the job training now will run.", registry=registry)
        self.loss = Gauge("baton_trainer_loss", "Training loss of the last step.", registry=registry)
        self.eval_loss = Gauge("baton_trainer_eval_loss", "Latest eval-split loss.", registry=registry)
        self.learning_rate = Gauge("baton_trainer_learning_rate", "Learning rate of the last step.", registry=registry)
        self.tokens_per_second = Gauge(
            "baton_trainer_tokens_per_second", "Training throughput of the job training now.", registry=registry
        )
        self.eta_seconds = Gauge(
            "baton_trainer_eta_seconds", "Estimated seconds left of the job training now.", registry=registry
        )
        self.tokens = Counter("baton_trainer_tokens", "Training tokens processed (all jobs).", registry=registry)
        self.checkpoints = Counter("baton_trainer_checkpoints", "Checkpoints saved, by reason.", ["reason"],
                                   registry=registry)  # fmt: skip
        self.checkpoint_seconds = Histogram(
            "baton_trainer_checkpoint_seconds",
            "Time to save one checkpoint, as the training process reports it.",
            buckets=_CHECKPOINT_BUCKETS,
            registry=registry,
        )
        self.yield_seconds = Histogram(
            "baton_trainer_yield_seconds",
            "From asking the training process to yield (or stop) to its exit: with a checkpoint, or with the finished "
            "adapter when the ask came on its last steps.",
            buckets=_CHECKPOINT_BUCKETS,
            registry=registry,
        )
        self.lease_wait_seconds = Histogram(
            "baton_trainer_lease_wait_seconds", "Waits for the TRAINING lease.", buckets=_SLOW_BUCKETS,
            registry=registry,
        )  # fmt: skip
        self.lease_held = Gauge(
            "baton_trainer_lease_held", "1 while a job holds the TRAINING lease.", registry=registry
        )
        self.preemptions = Counter("baton_trainer_preemptions", "Times a job yielded the GPU.", registry=registry)
        self.lease_losses = Counter(
            "baton_trainer_lease_losses", "Times a lease was lost and the training process killed.", registry=registry
        )
        self.child_crashes = Counter(
            "baton_trainer_child_crashes", "Training processes that crashed (no error of their own).", registry=registry
        )
        self.prepare_seconds = Histogram(
            "baton_trainer_prepare_seconds", "PREPARING: building the dataset.", buckets=_SLOW_BUCKETS,
            registry=registry,
        )  # fmt: skip
        for state in JobState:
            self.jobs.labels(state.value).set(0)

    def count_states(self, counts: dict[JobState, int]) -> None:
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state, 0))

    def clear_progress(self) -> None:
        for gauge in (self.step, self.total_steps, self.loss, self.learning_rate, self.tokens_per_second):
            gauge.set(0)
        self.eta_seconds.set(0)
