"""The ``medtune`` Jupyter kernel (``make kernel``): registered for a Jupyter that runs on another Python, as the
platform's JupyterLab on a rented pod does, it starts the project's environment, where ``import medtune`` works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import jupyter_client
import pytest

from medtune import lab

ROOT = Path(__file__).resolve().parents[2]

# Run by the "platform's" Python: a fresh virtual environment without medtune, given jupyter_client (and its
# dependencies) as plain path entries. It finds the kernel through JUPYTER_PATH only, starts it and runs a cell.
OUTSIDE_JUPYTER = textwrap.dedent("""
    import json, os, sys
    try:
        import medtune  # noqa: F401
        outside_imports_medtune = True
    except ImportError:
        outside_imports_medtune = False
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    os.environ.pop("PYTHONPATH")  # the kernel gets this process's environment: no trace of the project's paths
    specs = KernelSpecManager().find_kernel_specs()
    km = KernelManager(kernel_name="medtune")
    km.start_kernel(cwd=os.getcwd())
    out, errors = [], []
    try:
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=120)

        def hook(msg):
            if msg["msg_type"] == "stream":
                out.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                errors.append(msg["content"]["ename"] + ": " + msg["content"]["evalue"])

        code = "import medtune, os, sys; print(medtune.__file__); print(sys.executable); print(os.environ['PATH'])"
        reply = kc.execute_interactive(code, timeout=120, output_hook=hook)
        kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    print(json.dumps({"outside_python": sys.executable, "outside_imports_medtune": outside_imports_medtune,
                      "specs": specs, "status": reply["content"]["status"], "out": "".join(out), "errors": errors}))
""")


def test_kernel_spec_points_at_this_environment(tmp_path):
    dest = lab.install_kernel(prefix=tmp_path)
    assert dest == tmp_path / "share" / "jupyter" / "kernels" / "medtune"
    spec = json.loads((dest / "kernel.json").read_text())
    major, minor = sys.version_info[:2]
    assert spec["display_name"] == f"medtune (Python {major}.{minor})"
    assert spec["argv"][0] == sys.executable and Path(spec["argv"][0]).is_absolute()  # not "python" off PATH
    assert spec["argv"][-4:] == ["-m", "ipykernel_launcher", "-f", "{connection_file}"]
    assert spec["env"] == {"PATH": f"{Path(sys.executable).parent}{os.pathsep}${{PATH}}"}
    lab.install_kernel(prefix=tmp_path)  # registering again replaces it
    assert json.loads((dest / "kernel.json").read_text()) == spec


def test_kernel_imports_medtune_from_a_jupyter_on_another_python(tmp_path):
    prefix, home, work = tmp_path / "prefix", tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    # registered as `make kernel` does it (the module's command line), into a prefix instead of the user's folder
    cmd = [sys.executable, "-m", "medtune.lab", "--prefix", str(prefix)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=True)
    assert 'registered Jupyter kernel \'medtune\' (shown as "medtune (Python' in done.stdout

    outside = tmp_path / "platform-python"
    venv.create(outside, with_pip=False)
    outside_python = outside / "bin" / "python"
    # jupyter_client and its dependencies, by the folders they were installed to (no .pth file there is processed,
    # so an editable medtune stays invisible)
    import platformdirs
    import traitlets
    import zmq
    paths = dict.fromkeys(str(Path(m.__file__).parents[1]) for m in (jupyter_client, zmq, traitlets, platformdirs))
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "HOME": str(home),  # no user kernelspecs
        "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir),
        "PYTHONPATH": os.pathsep.join(paths),
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_PLATFORM_DIRS": "1",
    }
    done = subprocess.run([str(outside_python), "-c", OUTSIDE_JUPYTER], capture_output=True, text=True, cwd=work,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the Jupyter ran on another Python, in which medtune does not import
    assert result["outside_python"] == str(outside_python) and result["outside_imports_medtune"] is False
    assert Path(result["specs"]["medtune"]) == prefix / "share" / "jupyter" / "kernels" / "medtune"
    assert result["status"] == "ok" and result["errors"] == [], result
    medtune_file, kernel_python, kernel_path = result["out"].splitlines()
    assert Path(medtune_file) == ROOT / "medtune" / "__init__.py"  # this checkout's package
    assert kernel_python == sys.executable
    assert kernel_path == os.pathsep.join([bin_dir, env["PATH"]])  # the environment's bin first, then Jupyter's PATH


def test_headless_runs_do_not_need_the_medtune_kernel(tmp_path, monkeypatch):
    """The notebooks name the kernel "medtune"; make run-all (papermill) starts this environment's own python3 kernel,
    so it works where no "medtune" kernelspec is registered, and the executed copy still names "medtune"."""
    import nbformat
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from nbformat.v4 import new_code_cell

    from medtune import pipeline

    empty = tmp_path / "jupyter"
    monkeypatch.setenv("JUPYTER_PATH", str(empty))
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(empty))  # the user's kernels (make kernel) out of sight
    monkeypatch.setenv("MEDTUNE_OUTPUTS", str(tmp_path / "outputs"))
    dirs = [d for d in KernelSpecManager().kernel_dirs if not (Path(d) / "medtune").is_dir()]  # make lab's, in .venv
    monkeypatch.setattr(KernelSpecManager, "kernel_dirs", property(lambda self: list(dirs)))
    with pytest.raises(NoSuchKernel):
        KernelSpecManager().get_kernel_spec("medtune")

    source = nbformat.read(ROOT / "notebooks" / "03_format_prompts.ipynb", as_version=4)
    source.cells = [c for c in source.cells if "parameters" in c.metadata.get("tags", [])]
    source.cells.append(new_code_cell("import sys, medtune\nprint(sys.executable, medtune.__file__, RUN_DIR != '')"))
    folder = tmp_path / "notebooks"
    folder.mkdir()
    nbformat.write(source, folder / "00_only.ipynb")
    run = pipeline.run_all(ROOT / "params" / "smoke.yaml", notebooks_dir=folder)

    executed = nbformat.read(run.notebooks_dir / "00_only.ipynb", as_version=4)
    assert executed.metadata["kernelspec"]["name"] == "medtune"
    out = "".join(o.get("text", "") for o in executed.cells[-1].outputs)
    assert out == f"{sys.executable} {ROOT / 'medtune' / '__init__.py'} True\n"
