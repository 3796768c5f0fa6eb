"""Progress bars: drawn where the driver's output is a terminal, on top of the plain lines; never in a log."""

import io
import re
from dataclasses import replace

from lori_ray.driver import fit
from lori_ray.progress import NoBar, bars_wanted, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_where_the_drivers_output_is_a_terminal_and_not_asked_off(monkeypatch):
    monkeypatch.delenv("LORI_PROGRESS", raising=False)
    assert bars_wanted(Terminal()) and not bars_wanted(io.StringIO())  # a pipe or file: `ray job logs`, CI
    monkeypatch.setenv("LORI_PROGRESS", "plain")
    assert not bars_wanted(Terminal())
    assert isinstance(progress_bar(False, "stage", 6, "step"), NoBar)
    resumed = progress_bar(True, "resumed stage", 6, "step", done=4)
    assert resumed.n == 4  # counts on from a resumed stage's step
    resumed.close()


def test_a_stage_on_a_terminal_draws_its_bar_to_the_last_step_beside_its_lines(tmp_path, capsys, tiny_stage):
    """In the driver (no workers: the bar is drawn where it advances; on workers Ray's tqdm carries it to the
    driver)."""
    stage = tiny_stage(tmp_path, "drawn", num_workers=0, steps=6, log_every=3)
    fit(replace(stage, progress_bar=True), tmp_path / "drawn", tmp_path / "ray")
    out, err = capsys.readouterr()
    assert re.search(r"drawn: 100%\|.*\| 6\.00/6\.00 \[", err), err
    assert "[drawn] step 3/6 " in out and "[drawn] step 6/6 " in out
