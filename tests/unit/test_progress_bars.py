"""Executed notebooks show each progress bar once, ending with its final line (medtune.reports.notebooks): the
outputs below are those of 04's cells as papermill saved them (tqdm sends every refresh as its own stream output,
starting with a carriage return, and the final line twice: last refresh, then close)."""

from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_notebook, new_output

from medtune.reports import notebooks

FINAL = "generating: 100%|##########| 1/1 [00:06<00:00,  6.30s/it, 13.8 new tokens/s over all sequences, batch 4]"
LOGLIK = "option log-likelihood: 100%|##########| 1/1 [00:08<00:00,  8.71s/it]"
WARNING = "warning, medqa_style_illustrative: D is 2 of 2 readable predictions (100%), ...\n"


def executed_04(path):
    """Two cells of 04_baseline as saved by papermill 2.7 (outputs copied from a smoke run)."""
    generate = new_code_cell("answers = heldout.answer_heldout(cfg, run, model, tokenizer, run.baseline_path)",
                             execution_count=7)
    generate.outputs = [
        new_output("stream", name="stdout", text="\rgenerating:   0%|          | 0/1 [00:00<?, ?it/s]"),
        new_output("stream", name="stdout", text="\r" + FINAL),
        new_output("stream", name="stdout", text="\r" + FINAL),
        new_output("stream", name="stdout", text="\n"),
    ]
    bench = new_code_cell('bench = multiple_choice.measure(cfg, run, model, tokenizer, "baseline")', execution_count=9)
    bench.outputs = [
        new_output("stream", name="stderr", text="Failed to load CPU gemm_4bit_forward ...\n"),
        new_output("stream", name="stdout", text="medqa_style_illustrative: 2 items, mode loglik, language en\n"),
        new_output("stream", name="stdout", text="\roption log-likelihood:   0%|          | 0/1 [00:00<?, ?it/s]"),
        new_output("stream", name="stdout", text="\r" + LOGLIK.replace("8.71", "8.70")),
        new_output("stream", name="stdout", text="\r" + LOGLIK),
        new_output("stream", name="stdout", text="\n" + WARNING),
        new_output("display_data", data={"text/markdown": "| benchmark | accuracy |", "text/plain": "<Markdown>"}),
    ]
    nbformat.write(new_notebook(cells=[generate, bench]), path)


def test_each_bar_once_with_its_final_line(tmp_path):
    path = tmp_path / "04_baseline.ipynb"
    executed_04(path)
    assert notebooks.coalesce_streams(path) == 3 + 4  # 4 outputs -> 1; 7 -> 3
    nb = nbformat.read(path, as_version=4)
    (generate,) = nb.cells[0].outputs
    assert generate.output_type == "stream" and generate.text == FINAL + "\n"
    stderr, stdout, display = nb.cells[1].outputs
    assert stderr.name == "stderr" and stderr.text == "Failed to load CPU gemm_4bit_forward ...\n"
    assert stdout.text == f"medqa_style_illustrative: 2 items, mode loglik, language en\n{LOGLIK}\n{WARNING}"
    assert display.output_type == "display_data" and display.data["text/markdown"] == "| benchmark | accuracy |"
    assert nb.cells[1].execution_count == 9
    # a second pass changes nothing (the pipeline may tidy a resumed run's copy again)
    before = path.read_bytes()
    assert notebooks.coalesce_streams(path) == 0 and path.read_bytes() == before


def test_the_html_page_shows_the_final_line_once_and_loads_nothing_from_the_network(tmp_path):
    path = tmp_path / "04_baseline.ipynb"
    executed_04(path)
    notebooks.coalesce_streams(path)
    page = notebooks.to_html(path).read_text()
    assert page.count("generating: 100%") == 1 and page.count("option log-likelihood: 100%") == 1
    assert "6.30s/it, 13.8 new tokens/s" in page and "8.71s/it" in page and "8.70s/it" not in page
    assert "cdnjs" not in page and "<script src=" not in page  # require.js, MathJax and Mermaid left out
    assert '<a href="../index.html">' in page
