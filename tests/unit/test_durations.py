"""tests/durations.py: the seconds per test file that order `make test`'s parallel workers."""

from __future__ import annotations

from tests import durations

LOG = """\
============================= slowest durations =============================
93.12s setup    tests/integration/test_real_models.py::test_greedy[vllm:gemma3-270m]
26.61s call     tests/integration/test_real_models.py::test_greedy[vllm:gemma3-270m]
5.02s teardown tests/integration/test_real_models.py::test_the_real_models_answer_sensibly
0.01s call     tests/unit/test_chunker.py::test_x
(1766 durations < 0.005s hidden.  Use -vv to show these durations.)
908 passed, 28 warnings in 1513.35s (0:25:13)
"""


def test_file_seconds_sums_setup_call_and_teardown_per_file() -> None:
    seconds = durations.file_seconds(LOG)
    assert seconds.keys() == {"tests/integration/test_real_models.py", "tests/unit/test_chunker.py"}
    assert round(seconds["tests/integration/test_real_models.py"], 2) == 124.75


def test_the_checked_in_file_names_test_files_that_exist() -> None:
    recorded = durations.load()
    assert len(recorded) >= 40, "tests/durations.json lost its files: rewrite it (python -m tests.durations LOG)"
    missing = [name for name in recorded if not (durations.DURATIONS.parent.parent / name).is_file()]
    assert not missing, f"tests/durations.json names files that are gone: {missing}; rewrite it"
