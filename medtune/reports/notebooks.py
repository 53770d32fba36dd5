"""Executed notebooks as people read them: each progress bar once, and as HTML pages that open from a file.

- :func:`coalesce_streams`: what the pipeline applies to every executed copy papermill writes (finished, failed or
  with a dead kernel). The kernel sends a text progress bar (tqdm) as separate stream outputs, one per refresh, each
  starting with a carriage return; JupyterLab draws them as one line that updates, but the saved file keeps each
  refresh, and nbconvert, GitHub and other viewers show the final line twice (the last refresh, then tqdm's
  ``close()``). nbconvert's ``CoalesceStreamsPreprocessor`` joins consecutive outputs of one stream and keeps, on each
  line, only the text after its last carriage return: the final line (count, time, rate), once.
- :func:`to_html`: one executed notebook to a standalone HTML page with nbconvert's JupyterLab template (images
  embedded as data URIs, CSS inline; the template's CDN scripts for require.js, MathJax and Mermaid left out, so the
  page loads with no network), with a link back to the run's report.
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"


def coalesce_streams(path: str | Path) -> int:
    """Rewrite an executed notebook with each cell's consecutive stream outputs merged and carriage returns applied
    (nbconvert's ``CoalesceStreamsPreprocessor``): a progress bar shows once, ending with its final line.

    Args:
        path: the executed ``.ipynb``, rewritten in place (only when something changes).

    Returns:
        How many outputs fewer the notebook has.

    Raises:
        FileNotFoundError: no such notebook. nbformat.reader.NotJSONError: the file is not a notebook.
    """
    import nbformat
    from nbconvert.preprocessors import CoalesceStreamsPreprocessor

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    before = sum(len(c.get("outputs", [])) for c in nb.cells)
    texts = [o.get("text") for c in nb.cells for o in c.get("outputs", [])]
    nb, _ = CoalesceStreamsPreprocessor().preprocess(nb, {})
    after = sum(len(c.get("outputs", [])) for c in nb.cells)
    if after != before or texts != [o.get("text") for c in nb.cells for o in c.get("outputs", [])]:
        tmp = path.with_name(path.name + ".tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)
    return before - after


def to_html(notebook: str | Path, out: str | Path | None = None, back: str | None = "../index.html") -> Path:
    """Export an executed notebook to a standalone HTML page (nbconvert ``HTMLExporter``, JupyterLab template,
    light theme) that opens from a ``file://`` URL with no network.

    Args:
        notebook: the executed ``.ipynb``.
        out: the page to write (default: beside the notebook, ``.html``).
        back: a relative link shown at the top of the page (the run's report); None: no link.

    Returns:
        The path of the page.

    Raises:
        FileNotFoundError: no such notebook.
    """
    from nbconvert import HTMLExporter

    notebook = Path(notebook)
    out = Path(out) if out else notebook.with_suffix(".html")
    exporter = HTMLExporter(template_name="lab", extra_template_paths=[str(TEMPLATES)],
                            template_file="notebook.html.j2", embed_images=True)
    body, _ = exporter.from_filename(str(notebook), resources={"medtune_back": back})
    out.write_text(body, encoding="utf-8")
    return out


def failure(notebook: str | Path) -> dict | None:
    """Where and why an executed notebook stopped: the first error output papermill (or the pipeline, for a dead
    kernel) recorded in it.

    Args:
        notebook: the executed ``.ipynb``.

    Returns:
        ``{"cell": <execution count, or None>, "ename": <exception type>, "evalue": <its message, :func:`plain`>}``;
        None when the notebook has no error output (it finished, or is still running) or does not exist.

    Raises:
        nbformat.reader.NotJSONError: the file is not a notebook.
    """
    import nbformat

    notebook = Path(notebook)
    if not notebook.is_file():
        return None
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        for out in cell.get("outputs", []) if cell.cell_type == "code" else []:
            if out.get("output_type") == "error":
                return {"cell": cell.get("execution_count"), "ename": plain(out.get("ename")) or "Error",
                        "evalue": plain(out.get("evalue"))}
    return None


# Terminal escape sequences: CSI (colours, cursor moves) and OSC (hyperlinks, titles), ended by BEL or ESC \.
_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")


def plain(text, limit: int = 4000) -> str:
    """An error message as plain text for a page or a terminal: terminal escape sequences (colours, hyperlinks)
    removed, and at most ``limit`` characters (the first and the last half, with how much was left out between), so
    a huge message cannot bury what follows it. None gives ``""``."""
    text = _ESCAPES.sub("", "" if text is None else str(text))
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half:,} characters left out ...]\n{text[-half:]}"
