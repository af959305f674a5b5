"""The head atlas: built through the API and the command, valid HTML, every image and link present, and in a real
headless Chromium: no console error, no broken image, the search filters the heads, the overview is not blank."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import textspan
from textspan.cli import main

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atlas")
    textspan.write_shapes_world(tmp / "w", 48, seed=9)
    textspan.cache_images(tmp / "w" / "images", tmp / "cache", "shapes", device="cpu")
    textspan.label_cache(tmp / "cache", tmp / "labels", bank="shapes", n_texts=4, layers="all", rank=16)
    textspan.ablate_cache(tmp / "cache", tmp / "abl")
    res = textspan.build_atlas(tmp / "cache", tmp / "labels", tmp / "site", ablations=tmp / "abl", n_images=3,
                               map_images=2)
    return tmp, res


def test_atlas_files(site):
    tmp, res = site
    out = tmp / "site"
    assert res.n_heads == 32 and res.n_maps == 32 and res.n_thumbnails > 0
    assert set(res.measures) == {"variance", "margin", "ablation", "attribute", "norm"}
    assert len(list((out / "heads").glob("L*H*.html"))) == 32
    run = json.loads((out / "run.json").read_text())
    assert run["command"] == "atlas" and run["model_fingerprint"] and run["bank_digest"] and run["versions"]
    # the top images of a text are the cache's rows with the largest projection on the head's direction
    labels = textspan.HeadLabels.load(tmp / "labels")
    r = labels["L3H1"]
    u = r.directions[0] / np.linalg.norm(r.directions[0])
    C = np.asarray(textspan.HeadCache(tmp / "cache").heads[:, 3, 1], dtype=np.float64)
    want = np.argsort(-((C - r.mean) @ u), kind="stable")[:3]
    page = (out / "heads" / "L3H1.html").read_text()
    first_row = page.split("<tr>")[2]
    assert re.findall(r"thumbs/(\d+)\.jpg", first_row) == [f"{i:06d}" for i in want]


def test_atlas_pages_are_valid_html_with_no_broken_reference(site):
    import html5lib

    out = site[0] / "site"
    pages = [out / "index.html", *sorted((out / "heads").glob("*.html"))]
    parser = html5lib.HTMLParser(strict=True)
    for page in pages:
        text = page.read_text()
        assert text.startswith("<!DOCTYPE html>"), page
        parser.parse(text)  # raises on any parse error
        for ref in re.findall(r'(?:src|href)="([^"#]+)"', text):
            assert not ref.startswith(("http:", "https:", "//")), f"{page.name} reaches the network: {ref}"
            assert (page.parent / ref).resolve().is_file(), f"{page.name}: broken reference {ref}"


def test_atlas_command_and_refusals(site, tmp_path):
    tmp, _ = site
    res = CliRunner().invoke(main, ["atlas", str(tmp / "cache"), "--labels", str(tmp / "labels"), "--images", "2",
                                    "--map-images", "0", "-o", str(tmp_path / "s"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "32 head pages" in res.output and (tmp_path / "s" / "index.html").is_file()
    other = tmp_path / "other"
    textspan.write_shapes_world(other / "w", 12, seed=1)
    textspan.cache_images(other / "w" / "images", other / "cache", "shapes-spurious", device="cpu")
    res = CliRunner().invoke(main, ["atlas", str(other / "cache"), "--labels", str(tmp / "labels"), "-o",
                                    str(tmp_path / "x")])
    assert res.exit_code == 1 and "another model" in res.output


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="browser tests need Debian's chromium and chromium-driver "
                                                        "(apt-get install chromium chromium-driver); not installed")
def test_atlas_in_headless_chromium(site, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    out = site[0] / "site"
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900",
                "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        pages = [out / "index.html", out / "heads" / "L3H1.html", out / "heads" / "L0H0.html"]
        for page in pages:
            driver.get(page.as_uri())
            broken = driver.execute_script(
                "return Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                ".map(i => i.src)")
            assert broken == [], broken
            errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert errors == [], errors
        driver.get((out / "index.html").as_uri())
        # every grid cell painted by the script
        painted = driver.execute_script(
            "return Array.from(document.querySelectorAll('td[data-head]')).filter(t => t.style.background).length")
        assert painted == 32
        # the search filters the heads, in the page
        labels = textspan.HeadLabels.load(site[0] / "labels")
        want = sorted(h for h in labels.heads() if any("water" in t.lower() for t in labels[h].texts))
        assert 0 < len(want) < 32
        box = driver.find_element(By.ID, "search")
        box.send_keys("water")
        items = driver.find_elements(By.CSS_SELECTOR, "#results li")
        got = [li.get_attribute("data-head") for li in items]
        assert sorted(got) == want
        # ranked by the share of the head's variance its matching texts explain, the share shown
        share = {h: sum(float(v) for t, v in zip(labels[h].texts, labels[h].variance_explained)
                        if "water" in t.lower()) for h in want}
        shown = [float(li.get_attribute("data-share")) for li in items]
        assert shown == sorted(shown, reverse=True)
        assert got[0] == max(share, key=share.get)
        assert np.allclose(shown, [share[h] for h in got], atol=1e-5)
        assert "% of its variance" in items[0].text
        hits = driver.find_elements(By.CSS_SELECTOR, "td.hit")
        assert len(hits) == len(want)
        # the grid cells show each head's top text
        top = driver.execute_script("return document.querySelector('td[data-head=\"L3H1\"] .top').textContent")
        assert top == labels["L3H1"].texts[0]
        # another measure recolours the grid
        before = driver.execute_script("return document.querySelector('td[data-head=\"L3H1\"]').style.background")
        driver.execute_script("var s = document.getElementById('measure'); s.value = 'ablation';"
                              "s.dispatchEvent(new Event('change'));")
        after = driver.execute_script("return document.querySelector('td[data-head=\"L3H1\"]').style.background")
        assert before != after
        shot = tmp_path / "overview.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # not blank: text and coloured cells


def test_atlas_neuron_pages(site, tmp_path):
    import html5lib

    tmp = site[0]
    textspan.analyse_neurons(tmp / "w" / "images", tmp_path / "n2", "shapes", layer=2, bank="shapes", components=3,
                             top_k=5, device="cpu")
    res = textspan.build_atlas(tmp / "cache", tmp / "labels", tmp_path / "site", n_images=2, map_images=0,
                               neurons=[tmp_path / "n2"], top_neurons=4)
    page = tmp_path / "site" / "neurons" / "L2.html"
    text = page.read_text()
    html5lib.HTMLParser(strict=True).parse(text)
    assert text.count("<tr><td>") == 4 and "neurons/L2.html" in (tmp_path / "site" / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#]+)"', text):
        assert (page.parent / ref).resolve().is_file(), f"broken reference {ref}"
    # the 4 neurons shown are those with the largest mean centred norm, in that order
    norms = np.load(tmp_path / "n2" / "norms.npy")
    want = np.argsort(-norms.mean(axis=0), kind="stable")[:4]
    assert re.findall(r"<tr><td>(\d+)</td>", text) == [str(n) for n in want]
    assert res.n_heads > 0
    # a neurons folder of another model is refused
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"command": "neurons", "model_fingerprint": "x",
                                                "arguments": {"layer": 1}}))
    with pytest.raises(textspan.errors.TextspanError, match="another model"):
        textspan.build_atlas(tmp / "cache", tmp / "labels", tmp_path / "site2", map_images=0, neurons=other)
