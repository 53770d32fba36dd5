"""What a run that did not finish tells its user (tester's findings, stop 24): the report's box says why in each
case (a failed cell, Ctrl-C, SIGTERM, a dead kernel, an error before the notebook ran), error messages are plain text of
bounded length, a run that is still running is not resumed a second time, and damaged or empty input is named."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import nbformat
import psutil
import pytest
from nbformat.v4 import new_code_cell, new_notebook, new_output

from medtune import pipeline
from medtune.reports import __main__ as cli
from medtune.reports import notebooks
from medtune.settings.runs import RunDir

BOOKS = ["00_authenticate", "01_load_quantized_model", "02_check_gpu"]


def failed_run(root, status: str, notebook: str, error: str | None, evalue: str | None = None) -> RunDir:
    """A run folder as the pipeline leaves it: 00 completed, stopped in ``notebook`` with ``status``/``error``;
    ``evalue``: the executed copy of ``notebook`` has an error output with this message (None: no copy)."""
    run = RunDir(root / "20261207-100000-000000-smoke-abcdef")
    run.notebooks_dir.mkdir(parents=True)
    run.config_path.write_text("profile: smoke\nseed: 42\n")
    run.metrics_path.write_text(json.dumps({"pipeline": {"completed": ["00_authenticate.ipynb"]}}))
    run.manifest_path.write_text(json.dumps({"status": status, "notebook": notebook, "error": error,
                                             "notebooks": BOOKS, "run_id": run.run_id}))
    if evalue is not None:
        cell = new_code_cell("raise ValueError('x')", execution_count=3)
        cell.outputs = [new_output("error", ename="ValueError", evalue=evalue, traceback=[])]
        nbformat.write(new_notebook(cells=[cell]), run.notebooks_dir / f"{notebook}.ipynb")
    return run


def box(run, monkeypatch) -> str:
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(run.path.parent))
    assert cli.main(["report", run.run_id]) == 0
    page = run.report_path.read_text()
    return page[page.index('<div class="problem"'):page.index("</div>", page.index('<div class="problem"'))]


def test_plain_strips_terminal_escapes_and_bounds_the_length():
    coloured = "\x1b[31mValueError\x1b[0m see \x1b]8;;http://x\x1b\\the docs\x1b]8;;\x1b\\ now"
    assert notebooks.plain(coloured) == "ValueError see the docs now"
    assert notebooks.plain(None) == "" and notebooks.plain(12) == "12"
    assert notebooks.plain("a" * 10 + "b" * 10, limit=8) == "aaaa\n[... 12 characters left out ...]\nbbbb"
    assert len(notebooks.plain("x" * 200_000)) < 4_100


def test_the_box_says_why_in_each_case(tmp_path, monkeypatch):
    run = failed_run(tmp_path / "a", "failed", "01_load_quantized_model", "PapermillExecutionError",
                     evalue="\x1b[1m" + "bad value " * 30_000)
    shown = box(run, monkeypatch)
    assert "Status: failed in 01_load_quantized_model." in shown and "cell In [3]" in shown
    assert "characters left out" in shown and "\x1b" not in shown and len(shown) < 6_000  # the command stays near
    assert "After fixing the cause, continue it" in shown and f"make run-all RESUME={run.run_id}" in shown

    run = failed_run(tmp_path / "b", "interrupted", "01_load_quantized_model", "KeyboardInterrupt")
    shown = box(run, monkeypatch)
    assert "Stopped with Ctrl-C while 01_load_quantized_model ran; no cell had failed." in shown
    assert "Continue it (" in shown and "stopped from outside" not in shown and "After fixing" not in shown

    run = failed_run(tmp_path / "c", "failed", "01_load_quantized_model", "NoSuchKernel")
    shown = box(run, monkeypatch)
    assert "The pipeline recorded <code>NoSuchKernel</code> in 01_load_quantized_model" in shown
    assert "stopped from outside" not in shown

    run = failed_run(tmp_path / "d", "failed", "01_load_quantized_model", "KernelDied")
    assert "died (most often out of memory)" in box(run, monkeypatch)

    run = failed_run(tmp_path / "e", "stopped", "01_load_quantized_model", "Terminated")  # SIGTERM, recorded
    shown = box(run, monkeypatch)
    assert "Status: stopped in 01_load_quantized_model (SIGTERM)." in shown
    assert ("Stopped from outside with SIGTERM (<code>kill</code>, <code>docker stop</code> or a job scheduler) "
            "while 01_load_quantized_model ran; no cell had failed.") in shown
    assert "Continue it (" in shown and "After fixing" not in shown and "could not run" not in shown


def test_a_run_that_is_still_running_is_not_resumed_twice(tmp_path, monkeypatch):
    """Two processes in one run would write the same checkpoints and notebooks."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path))
    run = failed_run(tmp_path, "running", "01_load_quantized_model", None)
    me = psutil.Process(os.getpid())
    data = json.loads(run.manifest_path.read_text())
    data["process"] = {"pid": me.pid, "host": socket.gethostname(), "started": me.create_time()}
    run.manifest_path.write_text(json.dumps(data))
    with pytest.raises(RuntimeError, match=f"run {run.run_id} is still running \\(process {me.pid} on this machine\\)"):
        pipeline.run_all(None, resume=run.run_id)
    data["process"]["started"] = me.create_time() - 3600  # that pid now belongs to another process: resumable
    run.manifest_path.write_text(json.dumps(data))
    from medtune.reports import manifest

    assert manifest.live_process(run) is None
    data["process"] = {"pid": me.pid, "host": "another-pod", "started": me.create_time()}  # a restarted pod
    run.manifest_path.write_text(json.dumps(data))
    assert manifest.live_process(run) is None


def test_sigterm_stops_main_with_143_and_its_handler_is_put_back(monkeypatch, capsys):
    """A real SIGTERM to this process while main runs (run_all replaced by a wait): it becomes
    pipeline.Terminated, main says so and returns 143; the handler that was there before (here the test's own, in
    case the pipeline's were missing) is back afterwards, and SIGTERM reaches it again outside main."""
    import signal
    import time

    def not_installed(signum, frame):
        raise AssertionError("SIGTERM reached the previous handler: main installed none")

    def run_all(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)  # the handler raises here
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.setattr(pipeline, "run_all", run_all)
    previous = signal.signal(signal.SIGTERM, not_installed)
    try:
        assert pipeline.main([]) == 143
        assert signal.getsignal(signal.SIGTERM) is not_installed
        with pytest.raises(AssertionError, match="reached the previous handler"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert "error: stopped by SIGTERM (kill, docker stop or the job scheduler)" in capsys.readouterr().err


def test_an_empty_resume_is_an_error_not_a_new_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    assert pipeline.main(["--resume", " "]) == 2
    assert "--resume is empty" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def test_a_damaged_metrics_file_is_named(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.metrics_path.write_text('{"train": {"loss": 1.')
    with pytest.raises(ValueError, match="metrics.json is not valid JSON .*restore it from a copy"):
        run.metrics()
    run.metrics_path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="metrics.json holds a list, not a JSON object"):
        run.metrics()


def test_sigterm_while_the_session_starts_still_names_the_run_and_it_resumes(tmp_path, monkeypatch, capsys):
    """SIGTERM (or Ctrl-C) while manifest.start gathers the environment (importing torch, git, nvidia-smi: seconds on
    a GPU machine), after the run folder was made: main exits 143 and says how to continue that run (it said only
    "stopped by SIGTERM", and the folder it left had no manifest and no id shown); the run then resumes."""
    from medtune.reports import manifest

    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MEDTUNE_HEARTBEAT_S", "0")
    books, none = tmp_path / "notebooks", tmp_path / "none"
    none.mkdir()
    books.mkdir()
    nbformat.write(new_notebook(cells=[new_code_cell("print('never runs')")]), books / "00_quick.ipynb")
    real = manifest.environment

    def stopped():
        raise pipeline.Terminated("SIGTERM")

    monkeypatch.setattr(manifest, "environment", stopped)
    smoke = Path(__file__).resolve().parents[2] / "params" / "smoke.yaml"
    assert pipeline.main(["--params", str(smoke), "--notebooks-dir", str(books), "--no-report"]) == 143
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    err = capsys.readouterr().err
    assert "error: stopped by SIGTERM" in err and f"continue it with: make run-all RESUME={run_dir.name}" in err
    assert "the executed notebook" not in err  # none was written
    monkeypatch.setattr(manifest, "environment", real)
    assert pipeline.main(["--resume", run_dir.name, "--notebooks-dir", str(none), "--no-report"]) == 0  # no kernel
    assert manifest.status(RunDir.open(run_dir)).state == "finished"


def test_after_a_stop_the_kernels_shutdown_is_not_reported_as_an_error(monkeypatch, capsys, caplog):
    """After SIGTERM (or Ctrl-C) main prints its own message only: nbclient's "Kernel died while waiting for execute
    reply" (through papermill's logger) and asyncio's "Task exception was never retrieved" traceback, which the
    kernel's shutdown can cause depending on when the interrupted task is collected, are dropped. Before a stop,
    and after main returns, those loggers speak as usual."""
    import logging
    import signal
    import time

    def stopped(*args, **kwargs):
        try:
            logging.getLogger("papermill").error("before the stop: still reported")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here
        finally:  # what nbclient and asyncio log while the kernel is shut down
            logging.getLogger("papermill").error("Kernel died while waiting for execute reply.")
            logging.getLogger("asyncio").error("Task exception was never retrieved")

    monkeypatch.setattr(pipeline, "run_all", stopped)
    with caplog.at_level(logging.ERROR):
        assert pipeline.main([]) == 143
        logging.getLogger("asyncio").error("after main: reported again")
    assert "before the stop: still reported" in caplog.text
    assert "Kernel died" not in caplog.text and "never retrieved" not in caplog.text, caplog.text
    assert "after main: reported again" in caplog.text
    assert "error: stopped by SIGTERM" in capsys.readouterr().err
