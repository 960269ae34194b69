"""The report in a real browser: headless Chromium runs the page's script, with no console errors.

Chromium is run directly (no driver): ``--dump-dom`` prints the DOM after the scripts ran
and ``--enable-logging=stderr`` prints every console message (errors, uncaught
exceptions and Content Security Policy violations included) to stderr, where the test
looks for them. Sorting is checked by appending a small script that clicks a column
header and writes the resulting row order into the DOM.

Skips where Chromium is absent, unless KIDNEY_SEG_REQUIRE_BROWSER=1 (CI), which makes a
missing browser a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kidney_seg.report import build_report
from tests.test_report import SCAN_CASES, full_inputs

BROWSERS = ("chromium", "chromium-browser")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--enable-logging=stderr",
    "--v=0",
    "--virtual-time-budget=5000",
)
#: stderr lines that report a console message or an uncaught exception.
CONSOLE = re.compile(r"CONSOLE|Uncaught")


def find_browser() -> str | None:
    """The Chromium executable on PATH, or None."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    if path is None:
        message = (
            f"no Chromium on PATH (looked for {', '.join(BROWSERS)}); install it with "
            "`apt-get install chromium` to run the browser checks"
        )
        if os.environ.get("KIDNEY_SEG_REQUIRE_BROWSER") == "1":
            pytest.fail(message + " (KIDNEY_SEG_REQUIRE_BROWSER=1)")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def report_inputs(tmp_path_factory) -> dict:
    """The inputs of one full report, built once for the module's checks (read-only: derived pages go elsewhere)."""
    kwargs = full_inputs(tmp_path_factory.mktemp("report"))
    build_report(**kwargs)
    return kwargs


def load(browser: str, page: Path, profile: Path) -> tuple[str, list[str]]:
    """(DOM after the page's scripts ran, console messages) of a local HTML file."""
    proc = subprocess.run(
        [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "<html" in proc.stdout, f"chromium printed no DOM:\n{proc.stderr[-3000:]}"
    return proc.stdout, [line for line in proc.stderr.splitlines() if CONSOLE.search(line)]


def _page(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>{body}</body></html>\n')
    return path


def test_detector_catches_errors_and_passes_a_clean_page(browser, tmp_path):
    """Negative and positive controls: the console check must see a deliberate error, and only then."""
    clean = _page(
        tmp_path, "clean.html", "<p id=ok>fine</p><script>document.body.setAttribute('data-ran', '1');</script>"
    )
    dom, messages = load(browser, clean, tmp_path / "profile-clean")
    assert 'data-ran="1"' in dom and messages == []
    broken = _page(
        tmp_path, "broken.html", "<script>document.body.setAttribute('data-ran', '1'); undefinedFunction();</script>"
    )
    dom, messages = load(browser, broken, tmp_path / "profile-broken")
    assert 'data-ran="1"' in dom
    assert any("undefinedFunction" in m for m in messages), messages
    syntax = _page(tmp_path, "syntax.html", "<script>var x = ;</script>")
    assert load(browser, syntax, tmp_path / "profile-syntax")[1], "a syntax error went unnoticed"


def test_detector_catches_an_external_load_blocked_by_the_report_policy(browser, tmp_path):
    from kidney_seg.report.html import CSP

    page = tmp_path / "external.html"
    page.write_text(
        f'<!DOCTYPE html><html><head><meta http-equiv="Content-Security-Policy" content="{CSP}"></head>'
        '<body><img src="https://example.invalid/x.png"></body></html>\n'
    )
    messages = load(browser, page, tmp_path / "profile")[1]
    assert any("Content Security Policy" in m for m in messages), messages


#: Appended to the report: click the TU Dice header twice and record the row order after each click.
CLICK_JS = """
<script>
(function(){
  function order(){ return Array.prototype.map.call(document.querySelectorAll('table.per-case tr.case-row'),
                                                     function(r){ return r.getAttribute('data-case'); }).join(','); }
  var th = document.querySelector('table.per-case th[data-col="tu_dice"]');
  th.click(); document.documentElement.setAttribute('data-order-asc', order());
  th.click(); document.documentElement.setAttribute('data-order-desc', order());
  document.documentElement.setAttribute('data-dir-after', th.getAttribute('data-dir'));
})();
</script>
"""


def test_report_in_chromium(browser, report_inputs, tmp_path):
    import pandas as pd

    kwargs = report_inputs
    report = kwargs["out_html"]
    html = report.read_text()
    dom, messages = load(browser, report, tmp_path / "profile")
    assert messages == [], "console messages:\n" + "\n".join(messages)
    # the page's script ran and set up every sortable table
    ready = re.search(r'<html[^>]*data-sort-ready="(\d+)"', dom)
    assert ready and int(ready.group(1)) == html.count('<table class="sortable') >= 4
    # every per-case row, every overlay and plot survived
    assert re.findall(r'<tr class="case-row" data-case="([^"]+)"', dom) == sorted(SCAN_CASES)
    assert dom.count('<figure class="overlay"') == 3 and dom.count('<figure class="dist"') >= 4
    assert 'class="failure" data-case="case_00099"' in dom
    # sorting by a click: ascending, then descending (no NaN in tu_dice here)
    clicked = tmp_path / "clicked.html"  # beside nothing the page loads: the report inlines every figure
    clicked.write_text(html.replace("</body>", CLICK_JS + "</body>"))
    dom, messages = load(browser, clicked, tmp_path / "profile-click")
    assert messages == [], "console messages:\n" + "\n".join(messages)
    per_case = pd.read_csv(kwargs["per_case_csv"])
    asc = re.search(r'data-order-asc="([^"]*)"', dom).group(1).split(",")
    desc = re.search(r'data-order-desc="([^"]*)"', dom).group(1).split(",")
    values = per_case.set_index("case_id")["tu_dice"]
    assert [values[c] for c in asc] == sorted(values) and [values[c] for c in desc] == sorted(values, reverse=True)
    assert 'data-dir-after="desc"' in dom
    # and the DOM itself holds the rows in the last (descending) order
    assert re.findall(r'<tr class="case-row" data-case="([^"]+)"', dom) == desc


def test_sort_keeps_missing_values_last(browser, report_inputs, tmp_path):
    html = report_inputs["out_html"].read_text()
    script = CLICK_JS.replace('th[data-col="tu_dice"]', 'th[data-col="tu_hd95"]')
    page = tmp_path / "nan.html"
    page.write_text(html.replace("</body>", script + "</body>"))
    dom, messages = load(browser, page, tmp_path / "profile")
    assert messages == []
    # case_00003 predicts a tumour it does not have: its TU HD95 is NaN, last in both directions
    for attr in ("data-order-asc", "data-order-desc"):
        assert re.search(rf'{attr}="([^"]*)"', dom).group(1).split(",")[-1] == "case_00003"


if __name__ == "__main__":  # check any report by hand: python -m tests.test_browser results/report.html
    exe = find_browser()
    if exe is None:
        sys.exit("no chromium on PATH")
    import tempfile

    with tempfile.TemporaryDirectory() as profile:
        dom, found = load(exe, Path(sys.argv[1]), Path(profile))
    rows = dom.count('class="case-row"')
    ready = re.search(r'data-sort-ready="(\d+)"', dom)
    print(f"{len(dom)} characters of DOM, {rows} per-case rows, sortable tables set up: {ready and ready.group(1)}")
    print("console messages:" if found else "no console messages", *found, sep="\n")
    sys.exit(1 if found else 0)
