"""Regenerate docs/report.png, the README's picture of the HTML report of a failing check:
``python tools/screenshot_report.py`` (``--out PATH`` to write elsewhere).

It runs the README walkthrough's command (the seed engine's real bug, a Q6_K expert tensor read as
Q4_K, planted in layer 2 of the bundled tiny model and checked against the bundled goldens) with
``--html``, then has a headless Chromium take a picture of the page: the three cases' tables and,
below them, the first divergence's detail panel, which the report opens by itself.  Where no
Chromium is installed it says ``skipped: no chromium`` and exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "report.png"
MODEL = "src/moesnap/data/tiny.gguf"                      # relative to ROOT, as the README writes it
INJECT = "qtype:layer=2,tensor=ffn_down_exps,as=q4_k"
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: the window: wide enough that the legend lines do not wrap much, tall enough that the detail
#: panel under the tables is in frame (the page is about 1,900 pixels high at this width)
WIDTH, HEIGHT = 1000, 1920
LIMIT = 300_000                                           # bytes: keep the repository small


def find_chromium(given: str | None) -> str | None:
    if given:
        return shutil.which(given) or (given if Path(given).is_file() else None)
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def write_report(html: Path) -> None:
    """The README's check, with ``--html``; it must fail (exit 1), or the picture would show no fault."""
    cmd = [sys.executable, "-m", "moesnap", "-q", "check", MODEL, "--suite", "tiny", "--device", "cpu",
           "--inject", INJECT, "--html", str(html), "--force"]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "MOESNAP_NO_PROGRESS": "1"},
                         capture_output=True, text=True)
    if res.returncode != 1 or not html.is_file():
        sys.exit(f"screenshot_report: `{' '.join(cmd[2:])}` exited {res.returncode}, expected 1 (a failing "
                 f"check):\n{res.stderr.strip()}")


def screenshot(browser: str, html: Path, out: Path, profile: Path) -> None:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--force-device-scale-factor=1", f"--window-size={WIDTH},{HEIGHT}",
           f"--screenshot={out}", html.as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not out.is_file():
        sys.exit(f"screenshot_report: {browser} exited {res.returncode} without writing {out}:\n"
                 f"{res.stderr.strip()[-2000:]}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT, help=f"the PNG to write (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--chromium", metavar="PATH", help=f"the browser (default: the first of {', '.join(BROWSERS)})")
    a = ap.parse_args(argv)
    browser = find_chromium(a.chromium)
    if browser is None:
        print("skipped: no chromium")
        return 0
    out = a.out.resolve()
    with tempfile.TemporaryDirectory(prefix="moesnap-shot-") as tmp:
        html = Path(tmp) / "report.html"
        write_report(html)
        shot = Path(tmp) / "report.png"
        screenshot(browser, html, shot, Path(tmp) / "profile")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, out)
    size = out.stat().st_size
    print(f"wrote {out} ({size:,} bytes, {WIDTH}x{HEIGHT})")
    if size > LIMIT:
        print(f"warning: over {LIMIT:,} bytes; make the window smaller", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
