"""JupyterLab: the project's environment as a named Jupyter kernel, ``medtune`` (``make kernel``, ``make lab``).

A rented GPU pod (RunPod, AutoDL) already runs a JupyterLab with the platform's own Python, in which ``import
medtune`` fails. ``python -m medtune.lab`` writes a kernelspec whose command is this environment's Python (the
project's ``.venv/bin/python``, by absolute path), so that JupyterLab, whatever Python it runs on, starts the
notebooks' kernel in the project's environment. The notebooks name this kernel in their metadata; headless runs
(``make run-all``) do not need it: papermill is given the environment's own ``python3`` kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

KERNEL_NAME = "medtune"


def display_name() -> str:
    """The name JupyterLab shows for the kernel, with this Python's version: ``"medtune (Python 3.11)"``."""
    return f"{KERNEL_NAME} (Python {sys.version_info.major}.{sys.version_info.minor})"


def install_kernel(prefix: str | Path | None = None, sys_prefix: bool = False) -> Path:
    """Register this environment's Python as the Jupyter kernel ``medtune`` (:data:`KERNEL_NAME`).

    The kernelspec's ``argv`` starts with ``sys.executable`` (absolute, symlinks kept: a venv's ``bin/python``
    must not be resolved to the base interpreter, which lacks the venv's packages), and its ``env`` puts this
    environment's ``bin/`` first on the kernel's ``PATH``, as ``make run-all`` does for its kernels. Registering
    again replaces the earlier spec.

    Args:
        prefix: install under ``<prefix>/share/jupyter/kernels/medtune`` (for a Jupyter that reads that prefix:
            its own ``sys.prefix``, or a folder on its ``JUPYTER_PATH``). None: see ``sys_prefix``.
        sys_prefix: with no ``prefix``, install into this environment (``<sys.prefix>/share/jupyter``: seen only by
            a Jupyter running from this environment, e.g. ``make lab``). False: the user's Jupyter data folder
            (``~/.local/share/jupyter/kernels``, or ``$JUPYTER_DATA_DIR``), read by every Jupyter this user
            starts, the platform's JupyterLab on a pod included (it runs as the same user, root).

    Returns:
        The kernelspec's folder (holding ``kernel.json``).

    Raises:
        OSError: the folder cannot be written.
    """
    from ipykernel.kernelspec import install

    if prefix is None and sys_prefix:
        prefix = sys.prefix
    bin_dir = str(Path(sys.executable).parent)
    dest = install(user=prefix is None, kernel_name=KERNEL_NAME, display_name=display_name(),
                   prefix=None if prefix is None else str(prefix),
                   env={"PATH": f"{bin_dir}{os.pathsep}${{PATH}}"})  # jupyter_client fills in ${PATH}
    return Path(dest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medtune.lab", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--prefix", default=None, help="install under PREFIX/share/jupyter/kernels (default: --user)")
    where.add_argument("--sys-prefix", action="store_true", help="install into this environment only")
    args = parser.parse_args(argv)
    dest = install_kernel(args.prefix, sys_prefix=args.sys_prefix)
    spec = json.loads((dest / "kernel.json").read_text())
    print(f"registered Jupyter kernel '{KERNEL_NAME}' (shown as \"{spec['display_name']}\") in {dest}")
    print(f"  it runs {spec['argv'][0]}")
    print(f"In JupyterLab pick the kernel \"{spec['display_name']}\" (Kernel > Change Kernel); a JupyterLab that "
          "was already running lists it after a page reload.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
