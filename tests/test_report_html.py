"""report.html in a real browser: headless Chromium loads it, every plot decodes, no script errors."""

import json
import os
import re
import shutil
import subprocess

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--virtual-time-budget=5000"]
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || e.target && e.target.src)), true);
window.addEventListener('load', () => {
  const images = [...document.images];
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.title = `PROBE images=${images.length} broken=${broken} errors=${window.__errors.length}`;
});
</script>"""


@pytest.fixture(scope="module")
def chromium():
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: the Makefile's browser step should have installed it")
        pytest.skip("chromium is not installed (make test installs it)")
    return CHROMIUM


def test_report_html_renders_its_table_and_plots(demo_run, chromium, tmp_path):
    out, _ = demo_run
    page = (out / "report.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</head>", PROBE + "</head>", 1))
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([chromium, *FLAGS, *profile, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(PROBE[^<]*)</title>", dom.stdout)
    assert title, dom.stderr[-2000:]
    assert title.group(1) == "PROBE images=2 broken=0 errors=0"
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *FLAGS, *profile, "--window-size=1400,2000", f"--screenshot={shot}", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert image.size == (1400, 2000)
    assert len(set(image.resize((140, 200)).getdata())) > 20  # a rendered page, not a blank one
    for text in ("Summary", "Trade-off", "Per-layer sensitivity", "gptq-w4g128", "Recommended: "):
        assert text in page


def test_compress_report_rebuilds_without_recomputing(demo_run, tmp_path):
    out, _ = demo_run
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy2(out / "report.json", copy / "report.json")
    result = run_cli("report", str(copy))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    assert json.loads((copy / "report.json").read_text()) == json.loads((out / "report.json").read_text())
    assert "Per-layer sensitivity" in (copy / "report.html").read_text()
    assert run_cli("report", str(tmp_path / "nothing")).returncode == 2
