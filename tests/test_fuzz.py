"""Fuzzing ingest (issue #16): every mutated table reads as a table or as a UserError that names the file.

The harness is tested first (a hang, an abort and a memory blow-up in a worker each become a finding, and
the next input gets a fresh worker); then 20 s of the derandomized fuzz pass, which fails listing every
distinct finding with its input saved under pytest's tmp folder. `make fuzz` runs the same for longer,
shrinks what it finds and saves it to /tmp/loraflow-fuzz-findings.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz_ingest import (
    CRASH,
    MEMORY,
    TABLE,
    TIMEOUT,
    USER_ERROR,
    Fuzzer,
    fuzz,
    save_findings,
    saved_input,
)
from tests.fuzz_inputs import ROWS, FuzzInput, make_seeds

pytestmark = pytest.mark.unit
FUZZ_SECONDS = 12.0  # plus at most GRACE_S for the last input, and ~4 s to start the zygote: under 60 s
GRACE_S = 8.0


@pytest.fixture(scope="module")
def fuzzer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzer]:
    with Fuzzer(tmp_path_factory.mktemp("fuzz")) as fuzzer:
        yield fuzzer


def _unmutated(name: str) -> FuzzInput:
    seed = next(s for s in make_seeds() if s.name == name)
    return FuzzInput(seed, seed.suffix, seed.data, ())


@pytest.mark.parametrize("name", [s.name for s in make_seeds()])
def test_every_seed_reads_as_its_rows(fuzzer: Fuzzer, name: str) -> None:
    outcome = fuzzer.run(_unmutated(name))
    assert (outcome.kind, outcome.rows) == (TABLE, ROWS), outcome.headline


def test_a_hang_an_abort_and_a_memory_blowup_are_findings(fuzzer: Fuzzer) -> None:
    hang = fuzzer.probe("sleep", 10, timeout_s=1)
    assert hang.kind == TIMEOUT and hang.finding
    assert "_probe" in hang.where, hang.where  # the stack dumped before the kill says where it was
    crash = fuzzer.probe("abort")
    assert (crash.kind, crash.type) == (CRASH, "SIGABRT")
    baseline = fuzzer.run(_unmutated("geo.csv")).peak
    memory = fuzzer.probe("allocate", 1 << 30, memory_limit=baseline + (256 << 20))
    assert memory.kind == MEMORY and memory.peak > baseline + (256 << 20), memory.headline
    after = fuzzer.run(_unmutated("geo.xlsx"))  # a fresh worker replaced each killed one
    assert (after.kind, after.rows) == (TABLE, ROWS), after.headline


# What the fuzzer found, kept as regular cases: each crashed, hung or raised a traceback on the commit
# named in its finding.json ("found_on"); each must now read as a table or end in a user error.
FOUND = sorted(p.parent for p in (Path(__file__).parent / "fuzz_findings").glob("*/finding.json"))


@pytest.mark.parametrize("place", FOUND, ids=[p.name for p in FOUND])
def test_an_earlier_fuzz_finding_reads_as_a_table_or_a_user_error(fuzzer: Fuzzer, place: Path) -> None:
    outcome = fuzzer.run(saved_input(place))
    assert outcome.kind in (TABLE, USER_ERROR) and not outcome.finding, (
        f"{outcome.headline}\n{outcome.detail}"
    )


def test_fuzzed_tables_read_as_a_table_or_a_user_error(fuzzer: Fuzzer, tmp_path: Path) -> None:
    started = time.monotonic()
    report = fuzz(fuzzer, FUZZ_SECONDS, explore=False, grace_s=GRACE_S)
    assert time.monotonic() - started < FUZZ_SECONDS + GRACE_S + 5
    saved = save_findings(report, tmp_path / "findings")
    if report.findings:
        pytest.fail(f"{report.summary()}\n{report.describe(saved)}", pytrace=False)
    # Not vacuous: enough inputs ran (slow reads show in the summary's slowest), and reached both good ends.
    assert report.tried >= 20 and report.categories[TABLE] and report.categories[USER_ERROR], report.summary()
