"""The pipeline when things go wrong: a kernel that dies (out of memory), resuming a run only when asked, a run
that does not exist, Ctrl-C and SIGTERM, a long notebook that must be seen working (the heartbeat), and secrets that
must not reach the terminal or the run's files. Throwaway notebooks in a tmp folder stand in for the real ones
(``pipeline.run_all(notebooks_dir=...)``), so each kernel does little."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from medtune import pipeline

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "params" / "smoke.yaml"
HF_CANARY = "hf_medtuneCANARYpipeline" + "Kq4" * 6
MS_CANARY = "ms-medtuneCANARYpipeline" + "8" * 16


def notebook(folder: Path, name: str, *cells: str) -> Path:
    """A notebook laid out as the real ones: title, parameters cell, then ``cells``."""
    book = new_notebook(cells=[
        new_markdown_cell(f"# {name}"),
        new_code_cell('PARAMS: str = ""  # profile\nRUN_DIR: str = ""  # run', metadata={"tags": ["parameters"]}),
        *[new_code_cell(c) for c in cells],
    ])
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    book.metadata["language_info"] = {"name": "python"}
    folder.mkdir(parents=True, exist_ok=True)
    nbformat.write(book, folder / f"{name}.ipynb")
    return folder / f"{name}.ipynb"


ACCESS = ("from medtune.settings import runs\nfrom medtune.stages import auth, preflight\n"
          "cfg, run = runs.session(PARAMS, RUN_DIR)\n"
          "status = auth.check_access(cfg)\nauth.show(status)\n"
          "run.record('auth', status)\nrun.record('preflight', preflight.run(cfg, access=status))")
DIE = ("import os, signal\nprint('loading a model too large for this machine ...', flush=True)\n"
       "os.kill(os.getpid(), signal.SIGKILL)")


@pytest.mark.slow
def test_dead_kernel_is_shown_in_the_notebook_exits_nonzero_and_the_run_resumes(tmp_path, monkeypatch, capfd):
    """SIGKILL of the kernel (what the out-of-memory killer sends): the executed notebook shows it in the cell that
    was running, with how to resume; main exits 1; the next notebook does not run. Resuming the run (only when
    asked) skips what completed and runs the rest in the same folder. Tokens in the environment of every kernel
    reach no file and no line of the pipeline's output."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("HF_TOKEN", HF_CANARY)
    monkeypatch.setenv("MODELSCOPE_API_TOKEN", MS_CANARY)
    books = tmp_path / "notebooks"
    notebook(books, "00_access", ACCESS)
    notebook(books, "01_load", "print('cell before')", DIE, "print('never runs')")
    notebook(books, "02_after", "print('after the load')")

    code = pipeline.main(["--params", str(SMOKE), "--notebooks-dir", str(books)])
    assert code == 1
    out, err = capfd.readouterr()
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]  # beside it: the index of runs
    assert "the kernel died in 01_load.ipynb, cell In [4]" in err and "out of memory" in err
    assert f"RESUME={run_dir.name}" in err
    executed = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    assert executed == ["00_access.ipynb", "01_load.ipynb"]
    nb = nbformat.read(run_dir / "notebooks" / "01_load.ipynb", as_version=4)
    assert nb.cells[0].cell_type == "markdown" and "The kernel died" in nb.cells[0].source
    assert f"make run-all RESUME={run_dir.name}" in nb.cells[0].source
    dead = next(c for c in nb.cells if c.cell_type == "code" and "os.kill" in c.source)
    assert dead.metadata.papermill.status == "failed"
    assert [o.output_type for o in dead.outputs][-1] == "error" and dead.outputs[-1].ename == "DeadKernelError"
    assert "out of memory" in dead.outputs[-1].evalue
    later = next(c for c in nb.cells if c.cell_type == "code" and "never runs" in c.source)
    assert later.metadata.papermill.status == "pending" and not later.outputs
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["pipeline"]["completed"] == ["00_access.ipynb"]
    assert metrics["preflight"]["ok"] is True and metrics["auth"]["hub_needed"] is False
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert (manifest["status"], manifest["notebook"], manifest["error"]) == ("failed", "01_load", "KernelDied")

    notebook(books, "01_load", "print('loaded this time')")  # e.g. after freeing memory
    run = pipeline.run_all(SMOKE, resume=run_dir.name, notebooks_dir=books)
    assert run.path == run_dir
    out2, _ = capfd.readouterr()
    assert "00_access" in out2 and "done earlier, skipped" in out2
    assert json.loads((run_dir / "metrics.json").read_text())["pipeline"]["completed"] == [
        "00_access.ipynb", "01_load.ipynb", "02_after.ipynb"]
    assert "loaded this time" in (run_dir / "notebooks" / "01_load.ipynb").read_text()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "finished" and [s["status"] for s in manifest["sessions"]] == ["failed", "finished"]

    for text in (out, err, out2):
        assert HF_CANARY not in text and MS_CANARY not in text
    for path in run_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert HF_CANARY.encode() not in data and MS_CANARY.encode() not in data, path


def test_runs_are_new_unless_resume_is_asked(tmp_path, monkeypatch):
    """Two run_all calls with the same profile make two runs; neither touches the other. (No notebooks here: the
    folder is empty, so nothing is executed.)"""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    empty = tmp_path / "none"
    empty.mkdir()
    a = pipeline.run_all(SMOKE, notebooks_dir=empty)
    a.record("train", {"steps": 4})
    b = pipeline.run_all(SMOKE, notebooks_dir=empty)
    assert a.path != b.path and a.path.parent == b.path.parent
    assert a.metrics()["train"] == {"steps": 4} and "train" not in b.metrics()
    c = pipeline.run_all(SMOKE, resume=a.path, notebooks_dir=empty)  # by folder
    d = pipeline.run_all(SMOKE, resume=a.run_id, notebooks_dir=empty)  # by id, as make run-all RESUME=<id>
    assert c.path == d.path == a.path
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == sorted([a.run_id, b.run_id])


def test_resume_of_a_run_that_does_not_exist(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    assert pipeline.main(["--resume", "20990101-000000-000000-smoke-abcdef"]) == 1
    err = capsys.readouterr().err
    assert "no run to resume" in err and "20990101-000000-000000-smoke-abcdef" in err
    assert not (tmp_path / "outputs").exists()  # nothing was created instead


def test_dotenv_is_ignored_by_git():
    """Tokens kept in a .env file must never be committed."""
    for name in (".env", ".env.local"):
        done = subprocess.run(["git", "check-ignore", "-q", name], cwd=ROOT, capture_output=True)
        assert done.returncode == 0, f"{name} is not ignored by git (.gitignore)"


def test_kernels_run_over_ipc_sockets_not_loopback_tcp(tmp_path, monkeypatch, capfd):
    """The pipeline starts kernels over Unix-domain sockets (medtune.pipeline.kernel_manager_class): nothing listens
    on a loopback TCP port another user of the machine could reach, and ipykernel's "running over TCP without
    encryption" warning is not printed once per notebook (nor written to the kernel's log beside it). Fails when the
    kernel manager goes back to TCP."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    books = tmp_path / "notebooks"
    notebook(books, "00_transport", "from ipykernel.kernelapp import IPKernelApp\n"
                                    "app = IPKernelApp.instance()\nprint('TRANSPORT', app.transport)")
    run = pipeline.run_all(SMOKE, notebooks_dir=books)
    out, err = capfd.readouterr()
    executed = (run.notebooks_dir / "00_transport.ipynb").read_text()
    assert "TRANSPORT ipc" in executed
    kernel_log = (run.notebooks_dir / "00_transport.kernel.log").read_text()  # the kernel's own output goes here
    assert "without encryption" not in out + err + kernel_log


BAR = ("import sys, time\nfrom tqdm.std import tqdm\n"
       "for _ in tqdm(range(3), desc='scoring', file=sys.stdout, mininterval=0, ascii=True):\n    time.sleep(0.05)")


def test_a_failing_run_keeps_tidy_notebooks_says_where_it_failed_and_is_reported(tmp_path, monkeypatch, capfd):
    """Real kernels: each executed copy shows a progress bar once with its final line (3/3), also in the notebook
    that failed; the manifest says the run failed in that notebook; python -m medtune.pipeline still writes the
    run's report and the index of runs, with that status."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    books = tmp_path / "notebooks"
    notebook(books, "00_bar", BAR)
    notebook(books, "01_fails", BAR, "raise ValueError('the data is wrong')")
    notebook(books, "02_never", "print('never runs')")
    assert pipeline.main(["--params", str(SMOKE), "--notebooks-dir", str(books)]) == 1
    out, err = capfd.readouterr()
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    for name in ("00_bar", "01_fails"):
        nb = nbformat.read(run_dir / "notebooks" / f"{name}.ipynb", as_version=4)
        streams = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "stream"]
        text = "".join(o.text for o in streams if o.name == "stdout")
        assert "\r" not in text and text.count("scoring: 100%") == 1, (name, text)
        assert re.search(r"^scoring: 100%\|##########\| 3/3 \[\d\d:\d\d<00:00, +[\d.]+(it/s|s/it)\]$", text, re.M), text
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert (manifest["status"], manifest["notebook"], manifest["error"]) == (
        "failed", "01_fails", "PapermillExecutionError")
    assert manifest["notebooks"] == ["00_bar", "01_fails", "02_never"] and manifest["ended_at"]
    page = (run_dir / "index.html").read_text()
    assert '<span class="status failed">failed in 01_fails</span>' in page
    assert '<a href="notebooks/01_fails.html">01_fails</a>' in page and (run_dir / "notebooks/01_fails.html").is_file()
    assert "<tr><td>02_never</td><td>not run</td>" in page
    # the terminal and the top of the report say what failed, where the notebook is, and how to continue
    assert "error: notebook failed in cell 4: ValueError: the data is wrong" in err
    assert f"the executed notebook: {run_dir / 'notebooks' / '01_fails.ipynb'}" in err
    assert f"continue it with: make run-all RESUME={run_dir.name}" in err and "path above" not in err
    problem = page[page.index('<div class="problem"'):page.index('<h2 id="results">')]
    assert 'Status: failed in 01_fails.</b> <a href="notebooks/01_fails.html">01_fails</a>, cell In [4]:' in problem
    assert '<pre class="error">ValueError: the data is wrong</pre>' in problem
    assert f'<pre class="command">make run-all RESUME={run_dir.name}</pre>' in problem
    index = (tmp_path / "outputs" / "index.html").read_text()
    assert f'<a href="{run_dir.name}/index.html">' in index and "failed in 01_fails" in index
    assert f"report: {run_dir / 'index.html'}" in out


def _profile(tmp_path: Path, name: str, **changes) -> Path:
    import yaml

    d = yaml.safe_load(SMOKE.read_text(encoding="utf-8"))
    for key, value in changes.items():
        d[key] = {**d[key], **value} if isinstance(value, dict) and isinstance(d.get(key), dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d), encoding="utf-8")
    return path


def test_resume_with_a_fixed_sft_section_before_05_ran_takes_it_and_keeps_the_old(tmp_path, monkeypatch):
    """05 failed on a training setting: RESUME with the fixed profile continues the run with it (00-04 are not
    redone); the previous config.yaml is kept and the change recorded."""
    from medtune.settings import config as C
    from medtune.settings.runs import RunDir

    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    run = RunDir.create(C.load(SMOKE))
    run.record("pipeline", {"completed": ["00_authenticate.ipynb", "01_load_quantized_model.ipynb",
                                          "02_check_gpu.ipynb", "03_format_prompts.ipynb", "04_baseline.ipynb"]})
    fixed = _profile(tmp_path, "fixed", profile="smoke-fixed", sft={"learning_rate": 1.0e-4})
    assert pipeline.update_resumed_config(run, fixed) == ["sft"]
    assert run.config().sft["learning_rate"] == 1.0e-4 and run.config().profile == "smoke"
    (kept,) = run.path.glob("config.*.yaml")
    assert C.load(kept).sft["learning_rate"] == 2.0e-4
    assert run.metrics()["pipeline"]["config_changes"][0]["keys"] == ["sft"]
    assert pipeline.update_resumed_config(run, fixed) == []  # same settings now: nothing to do


def test_every_setting_has_the_notebook_that_first_uses_it():
    import dataclasses

    from medtune.settings.config import RunConfig

    assert set(pipeline.FIRST_USED_BY) == {f.name for f in dataclasses.fields(RunConfig)} - {"profile"}
    assert pipeline.CHECKS_ONLY not in pipeline.FIRST_USED_BY.values()  # 00 checks settings; it uses none
    old, new = {"max_length": 512, "learning_rate": 2e-4}, {"max_length": 1024, "learning_rate": 1e-4}
    assert pipeline.first_use("sft", old, new) == ("03_format_prompts.ipynb", "sft.max_length")
    assert pipeline.first_use("sft", {"learning_rate": 2e-4}, {"learning_rate": 1e-4}) == ("05_train_lora.ipynb", "sft")


def test_resume_after_03_refused_rows_takes_the_fixes_00_only_checked(tmp_path, monkeypatch):
    """Issue 13: 03 stopped on over-long rows; its first suggested fix, bad_rows: skip (and heldout_size, max_rows,
    sft.max_length), was refused on RESUME ... PARAMS= as "used since 00_authenticate", though 00 only checks them.
    Now they are taken, and 00 is marked to run again, so the new settings are checked before 03; its earlier
    executed copy is kept."""
    from medtune.settings import config as C
    from medtune.settings.runs import RunDir

    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    run = RunDir.create(C.load(SMOKE))
    done = ["00_authenticate.ipynb", "01_load_quantized_model.ipynb", "02_check_gpu.ipynb"]
    run.record("pipeline", {"completed": done})
    run.notebooks_dir.mkdir()
    (run.notebooks_dir / "00_authenticate.ipynb").write_text("{}")
    fixed = _profile(tmp_path, "fixed", bad_rows="skip", heldout_size=6, max_rows=12, sft={"max_length": 1024})
    assert pipeline.update_resumed_config(run, fixed) == ["bad_rows", "heldout_size", "max_rows", "sft"]
    cfg = run.config()
    assert (cfg.bad_rows, cfg.heldout_size, cfg.max_rows, cfg.sft["max_length"]) == ("skip", 6, 12, 1024)
    m = run.metrics()["pipeline"]
    assert m["completed"] == ["01_load_quantized_model.ipynb", "02_check_gpu.ipynb"]  # 00 checks them again
    (kept,) = run.notebooks_dir.glob("00_authenticate.*.ipynb")
    assert kept.name == f"00_authenticate.{m['config_changes'][0]['at']}.ipynb"
    assert not (run.notebooks_dir / "00_authenticate.ipynb").exists()
    # the model is used since 01: a changed model is still refused
    with pytest.raises(C.ConfigError, match=r"model \(used since 01_load_quantized_model\)"):
        pipeline.update_resumed_config(run, _profile(tmp_path, "other", model="owner/other-model", bad_rows="skip",
                                                     heldout_size=6, max_rows=12, sft={"max_length": 1024}))


@pytest.mark.parametrize(("changes", "named"), [
    ({"max_new_tokens": 48}, "max_new_tokens (used since 04_baseline)"),
    ({"heldout_size": 6}, "heldout_size (used since 03_format_prompts)"),
    ({"sft": {"max_length": 256}}, "sft.max_length (used since 03_format_prompts)"),
    ({"quantization": {"bnb_4bit_use_double_quant": True}}, "quantization (used since 01_load_quantized_model)"),
    ({"lora": {"r": 8}}, "lora (05 already wrote checkpoints with the old value)"),
])
def test_resume_refuses_a_change_a_finished_notebook_already_used(tmp_path, monkeypatch, changes, named):
    from medtune.settings import config as C
    from medtune.settings.runs import RunDir

    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    run = RunDir.create(C.load(SMOKE))
    run.record("pipeline", {"completed": ["00_authenticate.ipynb", "01_load_quantized_model.ipynb",
                                          "02_check_gpu.ipynb", "03_format_prompts.ipynb", "04_baseline.ipynb"]})
    (run.checkpoints_dir / "checkpoint-2").mkdir(parents=True)
    before = run.config_path.read_text()
    with pytest.raises(C.ConfigError) as err:
        pipeline.update_resumed_config(run, _profile(tmp_path, "changed", **changes))
    assert named in str(err.value)
    assert f"make run-all RESUME={run.run_id}, without PARAMS" in str(err.value)
    assert run.config_path.read_text() == before and not list(run.path.glob("config.*.yaml"))  # nothing touched


@pytest.mark.slow
def test_ctrl_c_says_how_to_continue_without_a_traceback(tmp_path):
    """Ctrl-C in the terminal (SIGINT to the whole process group, kernel included) while a notebook runs: the
    pipeline exits 130 with a short message naming the notebook and the RESUME command, no traceback; the manifest
    says interrupted in that notebook; the report says so at the top."""
    import os
    import signal
    import sys
    import time

    books = tmp_path / "notebooks"
    notebook(books, "00_quick", "print('quick')")
    notebook(books, "01_slow", "import time\nprint('working', flush=True)\ntime.sleep(120)")
    env = {**os.environ, "MEDTUNE_OUTPUTS": str(tmp_path / "outputs")}
    proc = subprocess.Popen([sys.executable, "-m", "medtune.pipeline", "--params", str(SMOKE), "--notebooks-dir",
                             str(books)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    started = time.monotonic()
    lines = []
    for line in proc.stdout:  # wait until 01 runs and its kernel has started the cell
        lines.append(line)
        if "01_slow" in line and "running" in line:
            break
    assert time.monotonic() - started < 120, lines
    time.sleep(8)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    assert "Traceback" not in err, err
    assert "error: interrupted (Ctrl-C)" in err
    assert f"the executed notebook: {run_dir / 'notebooks' / '01_slow.ipynb'}" in err
    assert f"continue it with: make run-all RESUME={run_dir.name}" in err
    assert "after fixing the cause" not in err  # Ctrl-C has no cause to fix
    assert len(err.strip().splitlines()) <= 8, err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recorded = (manifest["status"], manifest["notebook"], manifest["error"])
    assert recorded == ("interrupted", "01_slow", "KeyboardInterrupt")
    page = (run_dir / "index.html").read_text()
    assert "Status: interrupted in 01_slow." in page and f"make run-all RESUME={run_dir.name}" in page
    assert "KeyboardInterrupt" in page and "Continue it (" in page and "stopped from outside" not in page


@pytest.mark.slow
def test_sigterm_stops_the_run_as_ctrl_c_does_and_says_how_to_continue(tmp_path):
    """SIGTERM to the pipeline's process alone (``kill <pid>``, ``docker stop``; the kernel gets none) while a
    notebook runs: the kernel is shut down, the pipeline exits 143 with the same short message as for Ctrl-C (the
    notebook, the RESUME command, no traceback), the manifest says stopped in that notebook, and the report is
    written and says SIGTERM. Before it, the heartbeat printed what the cell printed last (then silent)."""
    import os
    import signal
    import sys
    import time

    import psutil

    books = tmp_path / "notebooks"
    notebook(books, "00_quick", "print('quick')")
    notebook(books, "01_slow", "import time\nprint('loading a model too large for this machine', flush=True)\n"
                               "time.sleep(120)")
    env = {**os.environ, "MEDTUNE_OUTPUTS": str(tmp_path / "outputs"), "MEDTUNE_HEARTBEAT_S": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "medtune.pipeline", "--params", str(SMOKE), "--notebooks-dir",
                             str(books)], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    started = time.monotonic()
    lines = []
    for line in proc.stdout:  # wait until 01's cell has printed and the heartbeat has repeated it
        lines.append(line)
        if "01_slow" in line and "loading a model" in line:
            break
    assert time.monotonic() - started < 120, lines
    kernels = psutil.Process(proc.pid).children(recursive=True)
    assert kernels, "no kernel process under the pipeline"
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    (run_dir,) = [p for p in (tmp_path / "outputs").iterdir() if p.is_dir()]
    assert re.fullmatch(r"  01_slow {22}running \d+ s, In \[3\]: loading a model too large for this machine\n",
                        lines[-1]), lines
    assert "Traceback" not in err, err
    assert "error: stopped by SIGTERM (kill, docker stop or the job scheduler)" in err
    assert f"the executed notebook: {run_dir / 'notebooks' / '01_slow.ipynb'}" in err
    assert f"continue it with: make run-all RESUME={run_dir.name}" in err
    assert "after fixing the cause" not in err and len(err.strip().splitlines()) <= 8, err
    assert f"report: {run_dir / 'index.html'}" in out
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recorded = (manifest["status"], manifest["notebook"], manifest["error"], manifest["sessions"][-1]["status"])
    assert recorded == ("stopped", "01_slow", "Terminated", "stopped")
    page = (run_dir / "index.html").read_text()
    assert "Status: stopped in 01_slow (SIGTERM)." in page and f"make run-all RESUME={run_dir.name}" in page
    assert "Continue it (" in page and "After fixing the cause" not in page
    gone, alive = psutil.wait_procs(kernels, timeout=10)
    assert not alive, alive  # the kernel did not outlive the pipeline


def test_the_heartbeat_shows_a_running_cells_progress_bar(tmp_path, monkeypatch, capsys):
    """A real kernel, MEDTUNE_HEARTBEAT_S=1: while 01's cell runs, lines in the terminal with the time so far, the
    cell, and the latest refresh of its tqdm bar (sent to stderr with carriage returns); the lines stop with the
    notebook, before its "ok"."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    monkeypatch.setenv("MEDTUNE_HEARTBEAT_S", "1")
    books = tmp_path / "notebooks"
    notebook(books, "00_quick", "print('quick')")
    notebook(books, "01_steps", "import sys, time\nfrom tqdm.std import tqdm\n"
                                "for _ in tqdm(range(8), desc='training', file=sys.stderr, mininterval=0,\n"
                                "              ascii=True):\n"
                                "    time.sleep(0.5)")
    pipeline.run_all(SMOKE, notebooks_dir=books)
    out = capsys.readouterr().out.splitlines()
    beats = [line for line in out if line.startswith("  01_steps") and " running " in line and "..." not in line]
    bar = r"training: +\d+%\|[#0-9 ]{10}\| [0-8]/8 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+(it/s|s/it)\]"
    assert any(re.fullmatch(r"  01_steps {21}running \d s, In \[3\]: " + bar, line) for line in beats), out
    ok = next(i for i, line in enumerate(out) if line.startswith("  01_steps") and " ok (" in line)
    assert out.index(beats[-1]) < ok, out
