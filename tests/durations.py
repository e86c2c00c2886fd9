"""Write tests/durations.json — each test file's seconds in a `make test` run — from that run's `--durations=0` log.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder \\
        -m 'not eval and not solo' --durations=0 | tee /tmp/durations.log
    .venv/bin/python -m tests.durations /tmp/durations.log

``tests/conftest.py`` hands the files to the parallel workers longest first (docs/tests.md). Rewrite the file when a
test file is added or its time changes by much; a file missing from it is simply started first.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

DURATIONS = Path(__file__).with_name("durations.json")
# pytest's --durations lines: "12.34s call     tests/x/test_y.py::test_z[param]"
LINE = re.compile(r"^(?P<seconds>\d+(?:\.\d+)?)s (?:setup|call|teardown)\s+(?P<file>[^:\s]+)::")


def file_seconds(log: str) -> dict[str, float]:
    """Seconds per test file: its tests' setup, call and teardown summed."""
    seconds: dict[str, float] = defaultdict(float)
    for line in log.splitlines():
        if match := LINE.match(line):
            seconds[match["file"]] += float(match["seconds"])
    return dict(seconds)


def load() -> dict[str, float]:
    return json.loads(DURATIONS.read_text(encoding="utf-8")) if DURATIONS.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the output of a pytest run with --durations=0")
    args = parser.parse_args(argv)
    seconds = file_seconds(args.log.read_text(encoding="utf-8", errors="replace"))
    if not seconds:
        parser.error(f"{args.log} has no --durations lines: run pytest with --durations=0")
    ranked = dict(sorted(((f, round(s, 1)) for f, s in seconds.items()), key=lambda kv: -kv[1]))
    DURATIONS.write_text(json.dumps(ranked, indent=1) + "\n", encoding="utf-8")
    print(f"{DURATIONS}: {len(ranked)} files, {sum(ranked.values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
