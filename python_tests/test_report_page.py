"""report.html and compare.html: one self-contained page each, checked by parsing
and, where Debian's Chromium, its driver and selenium are installed, in a real
headless browser that keeps a screenshot under build/test-artefacts/."""
import base64
import html.parser
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch

from alphanet_ext import cli, synthetic
from alphanet_ext.page import markdown_body

ARTEFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artefacts"


class Elements(html.parser.HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parsed(path):
    elements = Elements()
    elements.feed(Path(path).read_text())
    return elements


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """A fit's report folder and a compare's, from one small problem with a val set."""
    folder = tmp_path_factory.mktemp("pages")
    problem = synthetic.make_long_tailed(num_classes=30, dim=16, max_count=200, min_count=4, val_per_class=5,
                                         test_per_class=10, seed=2)
    data = folder / "data"
    data.mkdir()
    import numpy as np
    for role in ("train", "val", "test"):
        np.save(data / f"{role}_x.npy", getattr(problem, f"{role}_x").numpy())
        np.save(data / f"{role}_y.npy", getattr(problem, f"{role}_y").numpy())
    torch.save({"weight": problem.weight, "bias": problem.bias}, data / "classifier.pt")
    common = ["--train", str(data), "--classifier", str(data / "classifier.pt"), "--epochs", "2", "--quiet"]
    assert cli.main(["fit", *common, "--out", str(folder / "c.pt"), "--rho", "0.5", "1",
                     "--report", str(folder / "report")]) == 0
    assert cli.main(["compare", *common, "--rho", "0.5", "--crt-epochs", "2", "--report", str(folder / "compare")]) == 0
    return folder / "report", folder / "compare"


def tables_in(markdown_text: str) -> int:
    return sum(1 for line in markdown_text.splitlines() if line.startswith("|---"))


@pytest.mark.parametrize("name", ["report", "compare"])
def test_the_page_is_self_contained_and_holds_every_table_and_plot(reports, name):
    folder = reports[0] if name == "report" else reports[1]
    page = parsed(folder / f"{name}.html")
    kinds = [tag for tag, _ in page.tags]
    assert "script" not in kinds and "link" not in kinds and "iframe" not in kinds  # nothing runs, nothing loads
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            assert key not in attrs or attrs[key].startswith("data:image/png;base64,"), (tag, attrs)
    markdown_text = (folder / f"{name}.md").read_text()
    assert kinds.count("table") == tables_in(markdown_text) > 0
    text = " ".join(page.text)
    for line in markdown_text.splitlines():  # every table cell is on the page
        if line.startswith("|") and not line.startswith("|---"):
            for cell in line.strip("|").split("|"):
                assert cell.strip() in text
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    pngs = sorted(path.name for path in folder.glob("*.png"))
    assert sorted(attrs["alt"] for attrs in images) == pngs and len(pngs) >= (3 if name == "report" else 1)
    for attrs in images:
        embedded = base64.b64decode(attrs["src"].split(",", 1)[1], validate=True)
        assert embedded == (folder / attrs["alt"]).read_bytes()  # the plot itself, byte for byte
        assert min(png_size(embedded)) > 100


def test_markdown_subset():
    body = markdown_body("# AlphaNet correction report: WORSE than the input classifier on val\n\n"
                         "**Warning: few-split top-1 5.0 -> 4.0**\n\nSome text\ncontinued <here>.\n"
                         "* first\n* second\n\n| a<b | c |\n|---|---|\n| 1 & 2 | **3** |\n")
    assert '<h1 class="warning">' in body and '<p class="warning"><strong>Warning: few-split' in body
    assert "<p>Some text continued &lt;here&gt;.</p>" in body
    assert "<ul><li>first</li><li>second</li></ul>" in body
    assert "<th>a&lt;b</th>" in body and "<td>1 &amp; 2</td><td><strong>3</strong></td>" in body


def browser():
    """A headless Chromium driven by selenium, or None where one is not installed."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None
    if not (chromium and driver):
        return None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.mark.parametrize("name", ["report", "compare"])
def test_the_page_in_a_headless_browser(reports, name):
    driver = browser()
    if driver is None:
        pytest.skip("needs chromium, chromedriver (Debian: apt-get install chromium chromium-driver) and selenium")
    folder = reports[0] if name == "report" else reports[1]
    try:
        driver.set_page_load_timeout(60)
        driver.get((folder / f"{name}.html").as_uri())
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
        assert images and len(images) == len(list(folder.glob("*.png")))
        for alt, complete, width, height in images:  # every image decoded, at its own size
            assert complete and (width, height) == png_size((folder / alt).read_bytes()), alt
        assert driver.execute_script("return document.querySelectorAll('table').length") == \
            tables_in((folder / f"{name}.md").read_text())
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0  # no loads
        size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {  # the whole page, not the window
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
        os.makedirs(ARTEFACTS, exist_ok=True)
        (ARTEFACTS / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))
        width, height = png_size((ARTEFACTS / f"{name}.png").read_bytes())
        assert width >= 600 and height >= 1000
    finally:
        driver.quit()
