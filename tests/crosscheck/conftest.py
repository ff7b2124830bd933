"""Cross-check figures: every measured agreement is printed in the terminal summary."""

from __future__ import annotations

import pytest

# (config, pair, quantity, value) in the order measured
FIGURES: list[tuple[str, str, str, float]] = []


@pytest.fixture(scope="session")
def figures():
    """Call ``figures(config, pair, quantity, value)`` to record (and print) one measurement."""

    def record(config: str, pair: str, quantity: str, value: float) -> None:
        FIGURES.append((config, pair, quantity, float(value)))
        print(f"\ncrosscheck {config:<24} {pair:<14} {quantity:<26} {value:.3e}", flush=True)

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # noqa: ARG001
    if not FIGURES:
        return
    tr = terminalreporter
    tr.section("crosscheck: measured agreement")
    tr.write_line(f"{'config':<24} {'pair':<14} {'quantity':<26} value")
    for cfg, pair, qty, value in FIGURES:
        tr.write_line(f"{cfg:<24} {pair:<14} {qty:<26} {value:.3e}")
