"""Progress that can be trusted at scale: done/total, rate and ETA; periodic lines off a terminal."""

from __future__ import annotations

import logging
import re

from census_scvi.progress import progress_line, set_progress, track


def test_off_terminal_logs_every_tenth_with_units_rate_and_eta(caplog, monkeypatch):
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    logging.getLogger("census_scvi").setLevel(logging.INFO)
    set_progress(True)
    chunks = [1000] * 37 + [500]  # 37,500 cells in uneven chunks
    with caplog.at_level(logging.INFO, logger="census_scvi"):
        out = list(track(chunks, description="embedding", total=37_500, weight=int, unit="cells"))
    assert out == chunks  # items pass through unchanged, in order
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("embedding:")]
    percents = [int(re.search(r": (\d+)%", line).group(1)) for line in lines]
    assert percents[-1] == 100 and "37,500/37,500 cells" in lines[-1]
    assert 9 <= len(lines) <= 11  # one line per ~10%, not one per chunk
    assert percents == sorted(percents) and all(
        b - a >= 8 for a, b in zip(percents, percents[1:], strict=False)
    )
    assert all("cells/s" in line and "ETA" in line for line in lines)


def test_quiet_yields_without_logging(caplog):
    set_progress(False)
    try:
        with caplog.at_level(logging.INFO, logger="census_scvi"):
            assert list(track(range(5), description="x", total=5)) == [0, 1, 2, 3, 4]
        assert not caplog.records
    finally:
        set_progress(True)


def test_progress_line_rate_and_eta():
    line = progress_line("HVG pass 1/2", 40_000, 100_000, 4.0, "cells")
    assert line == "HVG pass 1/2: 40% (40,000/100,000 cells, 10,000 cells/s, ETA 0:00:06)"
