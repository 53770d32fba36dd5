"""The heartbeat of ``make run-all`` (medtune.pipeline.heartbeat): while a notebook runs, a line every interval with
the time so far and the latest line the running cell showed, read from the copy papermill saves as it goes. The
executed copies here are written by hand in papermill 2.7's layout, their outputs as a real run saved them (a tqdm
bar's refreshes, transformers' NotebookProgressBar as HTML); the thread runs around a sleep standing in for
papermill. A real kernel's heartbeat: tests/pipeline/test_pipeline_failures.py."""

from __future__ import annotations

import io
import os
import threading
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from medtune import pipeline
from medtune.settings.config import ConfigError

GREEN, RESET, TITLE = "\x1b[32m", "\x1b[0m", "\x1b]0;training\x07"
BAR_33 = "generating:  33%|###3      | 4/12 [00:02<00:04,  2.00it/s]"
BAR_67 = "generating:  67%|######6   | 8/12 [00:04<00:02,  2.00it/s]"
# transformers' NotebookProgressBar (the Trainer's bar in a notebook), as the executed copy of a real run held it
TRAINER_HTML = ["\n", "    <div>\n", "      \n",
                "      <progress value='7' max='10' style='width:300px; height:20px; vertical-align: middle;'>"
                "</progress>\n", "      [ 7/10 00:03 < 00:01, 1.66 it/s, Epoch 0.70/1]\n", "    </div>\n", "    "]
LOSS_TABLE = ('<table border="1" class="dataframe">\n  <thead>\n <tr style="text-align: left;">\n'
              "      <th>Step</th>\n      <th>Training Loss</th>\n    </tr>\n  </thead>\n  <tbody>\n"
              + "".join(f"    <tr>\n      <td>{s}</td>\n      <td>{3 - s / 10:.6f}</td>\n    </tr>\n"
                        for s in range(1, 21)) + "  </tbody>\n</table><p>")


def executed(path, *outputs, status="running", count=7):
    """An executed copy as papermill saves it while a cell runs: a completed cell, then one with ``status`` and
    ``outputs``, then a pending one."""
    done = new_code_cell("import medtune", execution_count=count - 1 if count else None)
    done.metadata["papermill"] = {"status": "completed", "start_time": "2026-12-07T10:00:00", "exception": False}
    done.outputs = [new_output("stream", name="stdout", text="an earlier cell's line\n")]
    cell = new_code_cell("trainer.train()", execution_count=count)
    cell.metadata["papermill"] = {"status": status, "start_time": "2026-12-07T10:00:01", "exception": False}
    cell.outputs = list(outputs)
    later = new_code_cell("print('later')")
    later.metadata["papermill"] = {"status": "pending", "start_time": None, "exception": None}
    nbformat.write(new_notebook(cells=[done, cell, later]), path)
    return path


def test_the_line_repeats_the_last_refresh_of_a_tqdm_bar_without_terminal_escapes(tmp_path):
    """tqdm sends each refresh as a stream output starting with a carriage return (on stderr), a terminal keeps
    the last one; colours and a window-title sequence are left out."""
    nb = executed(tmp_path / "04_baseline.ipynb",
                  new_output("stream", name="stdout", text="loading the held-out rows ...\n"),
                  new_output("stream", name="stderr", text=f"\r{GREEN}{BAR_33}{RESET}"),
                  new_output("stream", name="stderr", text=f"\r{TITLE}{GREEN}{BAR_33}{RESET}\r{BAR_67}\r"))
    assert pipeline.heartbeat_line("04_baseline", 1683.4, nb) == (
        "  04_baseline                  running 28 min 03 s, In [7]: "
        "generating:  67%|######6   | 8/12 [00:04<00:02,  2.00it/s]")


def test_the_trainers_html_progress_bar_is_shown_as_its_text_and_long_lines_are_cut(tmp_path):
    bar = new_output("display_data", data={"text/html": TRAINER_HTML,
                                           "text/plain": "<IPython.core.display.HTML object>"})
    nb = executed(tmp_path / "05_train_lora.ipynb", bar)
    assert pipeline.heartbeat_line("05_train_lora", 95, nb) == (
        "  05_train_lora                running 1 min 35 s, In [7]: [ 7/10 00:03 < 00:01, 1.66 it/s, Epoch 0.70/1]")
    # with the loss table under the bar (what the Trainer shows once it has logged): one line of at most 150
    # characters, the bar from its start and the latest steps' losses from its end
    bar.data["text/html"] = [*TRAINER_HTML, LOSS_TABLE]
    nb = executed(tmp_path / "05_train_lora.ipynb", bar)
    line = pipeline.heartbeat_line("05_train_lora", 7300, nb)
    head = "  05_train_lora                running 2 h 01 min, In [7]: "
    assert line == head + ("[ 7/10 00:03 < 00:01, 1.66 it/s, Epoch 0.70/1] Step Training ... 14 1.600000 15 1.500000 "
                           "16 1.400000 17 1.300000 18 1.200000 19 1.100000 20 1.000000")
    assert len(line) <= len(head) + pipeline.HEARTBEAT_CHARS


def test_without_a_running_cell_or_a_readable_fresh_copy_the_line_says_the_time_only(tmp_path):
    name = "  01_load                      running"
    nb = executed(tmp_path / "01_load.ipynb", status="running")
    assert pipeline.heartbeat_line("01_load", 61, nb) == f"{name} 1 min 01 s, In [7] (no output yet)"
    executed(nb, new_output("stream", name="stdout", text="old line\n"), status="completed")  # between two cells
    assert pipeline.heartbeat_line("01_load", 61, nb) == f"{name} 1 min 01 s"
    text = executed(nb, new_output("stream", name="stdout", text="half\n")).read_text()
    nb.write_text(text[: len(text) // 2])  # papermill is writing it
    assert pipeline.heartbeat_line("01_load", 45, nb) == f"{name} 45 s"
    assert pipeline.heartbeat_line("01_load", 45, tmp_path / "missing.ipynb") == f"{name} 45 s"
    # a copy left by an earlier attempt of the notebook (older than this one's start) is not read
    executed(nb, new_output("stream", name="stdout", text="from the earlier attempt\n"))
    os.utime(nb, (time.time() - 600, time.time() - 600))
    assert pipeline.heartbeat_line("01_load", 3, nb, since=time.time() - 5) == f"{name} 3 s"


def test_a_line_printed_after_the_copy_was_saved_is_newer_than_the_copy(tmp_path):
    """papermill saves the copy as outputs arrive, not after the last one: a line printed before a long silence (a
    model loading) is in no saved copy, but papermill gave it to Printed (its stdout_file and stderr_file) as it
    came; the copy still says which cell runs (numbered by its place before the kernel numbers it)."""
    nb = executed(tmp_path / "01_load.ipynb", count=None)  # as saved at the cell's start
    saved = nb.stat().st_mtime
    printed = pipeline.Printed()
    assert printed.latest == (0.0, "")
    printed.write(f"\r{GREEN}loading a model too large for this machine ...{RESET}\n")
    printed.write("\n")  # nothing to show: the line before stays
    assert printed.latest[1] == "loading a model too large for this machine ..."
    printed.latest = (saved + 1, printed.latest[1])
    assert pipeline.heartbeat_line("01_load", 600, nb, printed=printed.latest) == (
        "  01_load                      running 10 min 00 s, In [2]: loading a model too large for this machine ...")
    # printed before the copy was saved: the copy's last output is newer (the Trainer's HTML bar shows only there)
    bar = new_output("display_data", data={"text/html": TRAINER_HTML,
                                           "text/plain": "<IPython.core.display.HTML object>"})
    executed(nb, bar)
    assert pipeline.heartbeat_line("05_train_lora", 30, nb, printed=(nb.stat().st_mtime - 1, "older line")) == (
        "  05_train_lora                running 30 s, In [7]: [ 7/10 00:03 < 00:01, 1.66 it/s, Epoch 0.70/1]")
    # no copy of this attempt yet: what it printed since it started
    assert pipeline.heartbeat_line("01_load", 5, tmp_path / "none.ipynb", since=100.0, printed=(101.0, "a")) == (
        "  01_load                      running 5 s: a")


@pytest.mark.parametrize(("text", "line"), [
    ("\rscoring:  50%|#####     | 1/2\rscoring: 100%|##########| 2/2\n", "scoring: 100%|##########| 2/2"),
    ("first\nsecond\n\n", "second"),
    ("done\r", "done"),
    ("\x1b[1mbold\x1b[0m\tand tab\x07", "bold and tab"),
    ("\r\n \r", ""),
    # tput sgr0 (ESC ( B then CSI m), save and restore the cursor, 8-bit CSI and C1 controls, a right-to-left override
    ("\x1b[31mred\x1b(B\x1b[m done\n", "red done"),
    ("\x1b7saved\x1b8\n", "saved"),
    ("abc\x9b31mred\x85\x90\n", "abcred"),
    ("file \u202egnp.exe\n", "file gnp.exe"),
])
def test_last_line_is_what_a_terminal_would_show_last(text, line):
    assert pipeline.last_line(text) == line


def test_the_interval_comes_from_the_environment_and_a_wrong_value_names_the_fix(monkeypatch):
    monkeypatch.delenv("MEDTUNE_HEARTBEAT_S", raising=False)
    assert pipeline.heartbeat_interval() == pipeline.HEARTBEAT_S == 60
    monkeypatch.setenv("MEDTUNE_HEARTBEAT_S", "0")
    assert pipeline.heartbeat_interval() == 0
    monkeypatch.setenv("MEDTUNE_HEARTBEAT_S", " 2.5 ")
    assert pipeline.heartbeat_interval() == 2.5
    for wrong in ("1m", "-5", "nan"):
        monkeypatch.setenv("MEDTUNE_HEARTBEAT_S", wrong)
        with pytest.raises(ConfigError, match=rf"MEDTUNE_HEARTBEAT_S='{wrong}' is not a number of seconds: set it to "
                                              r"e.g. 60 .*, or 0 to turn the heartbeat off"):
            pipeline.heartbeat_interval()
    # a line every millisecond (a typo for 1, or "ms" meant) flooded the terminal: at least a second, or 0
    for often in ("0.001", "1e-300", "0.5"):
        monkeypatch.setenv("MEDTUNE_HEARTBEAT_S", often)
        with pytest.raises(ConfigError, match=rf"MEDTUNE_HEARTBEAT_S='{often}' is under 1 s: .* set it to e.g. 60, "
                                              r"or 0 to turn the heartbeat off"):
            pipeline.heartbeat_interval()
    monkeypatch.setenv("MEDTUNE_HEARTBEAT_S", "1")
    assert pipeline.heartbeat_interval() == 1


def test_an_interval_longer_than_threading_allows_is_no_error_in_the_thread(tmp_path, monkeypatch):
    """MEDTUNE_HEARTBEAT_S=1e10 is accepted (a number of seconds, effectively off), but Event.wait raised
    OverflowError for it: a traceback from the heartbeat thread in the terminal for every notebook."""
    errors = []
    monkeypatch.setattr(threading, "excepthook", errors.append)
    out = io.StringIO()
    with pipeline.heartbeat("05_train_lora", tmp_path / "05_train_lora.ipynb", 1e10, out=out):
        time.sleep(0.2)
    assert [e.exc_value for e in errors] == [] and out.getvalue() == ""
    assert not heartbeat_threads()


def heartbeat_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("heartbeat ")]


def test_the_thread_beats_while_the_notebook_runs_and_stops_with_it(tmp_path):
    """A sleep stands in for papermill: lines every interval while it runs, none after; a notebook shorter than
    the interval prints nothing; a notebook that fails (or Ctrl-C) stops the thread too."""
    nb, bar = tmp_path / "05_train_lora.ipynb", new_output("stream", name="stderr", text="\r" + BAR_33)
    out = io.StringIO()
    with pipeline.heartbeat("05_train_lora", nb, 0.1, out=out):
        executed(nb, bar)  # papermill writes the copy once the notebook has started
        time.sleep(0.55)
    lines = out.getvalue().splitlines()
    assert 3 <= len(lines) <= 6, lines
    assert all(line == f"  05_train_lora                running 0 s, In [7]: {BAR_33}" for line in lines), lines
    assert not heartbeat_threads()
    time.sleep(0.3)
    assert out.getvalue().splitlines() == lines  # nothing after the notebook ended

    quick = io.StringIO()
    with pipeline.heartbeat("00_authenticate", nb, 5, out=quick):
        time.sleep(0.05)
    assert quick.getvalue() == "" and not heartbeat_threads()

    failed = io.StringIO()
    with pytest.raises(KeyboardInterrupt), pipeline.heartbeat("03_format_prompts", nb, 0.1, out=failed):
        time.sleep(0.25)
        raise KeyboardInterrupt
    assert failed.getvalue().count("\n") >= 1 and not heartbeat_threads()

    off = io.StringIO()
    with pipeline.heartbeat("04_baseline", nb, 0, out=off):
        assert not heartbeat_threads()
        time.sleep(0.1)
    assert off.getvalue() == ""
