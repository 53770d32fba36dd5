"""Screenshot of a run's report for the README (docs/report-smoke.png), taken in headless Chromium as the tests open
the page: from a file:// URL, no server.

    python scripts/report_screenshot.py outputs/<run-id> docs/report-smoke.png

It shows the page from its title down to the end of the figures (status, settings and manifest are above the
results; the shot keeps the title and jumps to the results), 1100 pixels wide, reduced to 128 colours to stay small.
Needs chromium and chromedriver (make test installs them) and selenium (the dev extra).
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the run folder (its index.html is the report: make report)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--width", type=int, default=1100)
    args = parser.parse_args()
    page = args.run / "index.html"
    if not page.is_file():
        raise SystemExit(f"{page} does not exist: make report RUN={args.run} first")

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        driver.set_window_size(args.width, 800)
        driver.get(page.resolve().as_uri())
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(args.width, height + 200)
        shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        scale = shot.width / driver.execute_script("return window.innerWidth")
        top = driver.find_element(By.TAG_NAME, "header").rect
        results = driver.find_element(By.ID, "results").rect
        answers = driver.find_element(By.ID, "answers").rect
    finally:
        driver.quit()

    def box(y0: float, y1: float) -> Image.Image:
        return shot.crop((0, int(y0 * scale), shot.width, int(y1 * scale)))

    head = box(0, top["y"] + top["height"] + 12)
    body = box(results["y"] - 8, answers["y"] - 8)
    out = Image.new("RGB", (shot.width, head.height + body.height), "white")
    out.paste(head, (0, 0))
    out.paste(body, (0, head.height))
    out = out.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out.save(args.out, optimize=True)
    print(f"wrote {args.out} ({out.width}x{out.height}, {args.out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
