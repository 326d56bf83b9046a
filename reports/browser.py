"""Open report pages in headless Chromium, offline: console messages, inline SVGs, links, a screenshot.

    python -m reports.browser PAGE.html [...] [--shots DIR] [--min-svg N]

One Chromium launch per page with ``--dump-dom`` (the DOM after load) and ``--screenshot``;
``--enable-logging=stderr --v=0`` prints every console message as a ``CONSOLE`` line. The pages
carry no script, so any console message is a failure. Host resolution is mapped to nothing, so a
page that tried to fetch from the network would log an error rather than reach it. Exit 1 when a
page fails; 77 when no Chromium is installed (Debian/Ubuntu: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND",
         "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]
CONSOLE = re.compile(r":CONSOLE[:(]")
EXTERNAL = re.compile(r"^(https?:)?//", re.I)


def find() -> str | None:
    """``$TQ_CHROMIUM``, else the first Chromium/Chrome on PATH."""
    env = os.environ.get("TQ_CHROMIUM")
    if env:
        return env if shutil.which(env) else None
    return next((p for c in CANDIDATES if (p := shutil.which(c))), None)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.svgs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.svgs += tag == "svg"
        if a.get("id"):
            self.ids.add(a["id"])
        for k in ("href", "src", "xlink:href", "action", "poster", "data"):
            if a.get(k):
                self.refs.append(a[k])


@dataclass
class Check:
    page: pathlib.Path
    returncode: int
    dom: str
    console: list[str] = field(default_factory=list)
    svgs: int = 0
    external: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    screenshot: pathlib.Path | None = None

    def problems(self, min_svg: int = 0) -> list[str]:
        out = [f"console: {c}" for c in self.console]
        out += [f"external resource: {u}" for u in self.external]
        out += [f"broken link: {u}" for u in self.broken]
        if self.returncode != 0:
            out.append(f"chromium exited with status {self.returncode}")
        if "</html>" not in self.dom:
            out.append("no DOM dumped")
        if self.svgs < min_svg:
            out.append(f"{self.svgs} inline <svg> elements, expected at least {min_svg}")
        return out


def links(page: pathlib.Path, dom: str) -> tuple[list[str], list[str], int]:
    """(external URLs, local links whose file or anchor is missing, number of <svg>) in a DOM."""
    p = _Refs()
    p.feed(dom)
    external, broken = [], []
    for ref in p.refs:
        if EXTERNAL.match(ref):
            external.append(ref)
        elif ref.startswith("#"):
            if ref[1:] and ref[1:] not in p.ids:
                broken.append(ref)
        elif not re.match(r"^(mailto|data):", ref, re.I):
            target = (page.parent / ref.split("#")[0].split("?")[0]).resolve()
            if not target.exists():
                broken.append(ref)
    return external, broken, p.svgs


def check(page: str | os.PathLike, screenshot: str | os.PathLike | None = None, *, width: int = 1280,
          height: int = 2400, timeout: int = 120, chromium: str | None = None) -> Check:
    """Load ``page`` (a local file) in a fresh headless Chromium profile and report what it saw."""
    exe = chromium or find()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install -y chromium, or set TQ_CHROMIUM)")
    page = pathlib.Path(page).resolve()
    with tempfile.TemporaryDirectory(prefix="tq-chromium-") as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}", "--dump-dom"]
        if screenshot:
            pathlib.Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            cmd.append(f"--screenshot={pathlib.Path(screenshot).resolve()}")
        # A library preloaded for Python (e.g. OpenBLAS via LD_PRELOAD) can abort Chromium.
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        proc = subprocess.run(cmd + [page.as_uri()], capture_output=True, text=True, timeout=timeout,
                              env={**env, "HOME": profile})
    external, broken, svgs = links(page, proc.stdout)
    console = [line.strip() for line in proc.stderr.splitlines() if CONSOLE.search(line)]
    shot = pathlib.Path(screenshot) if screenshot and pathlib.Path(screenshot).exists() else None
    return Check(page, proc.returncode, proc.stdout, console, svgs, external, broken, shot)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m reports.browser", description=__doc__.splitlines()[0])
    p.add_argument("pages", nargs="+")
    p.add_argument("--shots", default=None, help="folder for one PNG screenshot per page")
    p.add_argument("--min-svg", type=int, default=1, help="fail a page with fewer inline <svg> (default 1)")
    p.add_argument("--height", type=int, default=2400)
    args = p.parse_args(argv)
    if find() is None:
        print("reports.browser: no Chromium found (apt-get install -y chromium, or set TQ_CHROMIUM)", file=sys.stderr)
        return 77
    failed = 0
    for i, page in enumerate(args.pages):
        shot = pathlib.Path(args.shots) / f"{i:02d}_{pathlib.Path(page).parent.name}_{pathlib.Path(page).stem}.png" \
            if args.shots else None
        c = check(page, shot, height=args.height)
        problems = c.problems(args.min_svg)
        failed += bool(problems)
        shot_note = f", screenshot {shot}" if c.screenshot else ""
        print(f"{'FAIL' if problems else 'ok  '} {page}: {c.svgs} svg{shot_note}")
        for pr in problems:
            print(f"     {pr}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
