#!/usr/bin/env python
"""Screenshot the server's web page after one generation (the README's picture), in headless Debian chromium.

    python tools/page_screenshot.py --url http://127.0.0.1:8000 --prompt "two green triangles" --out docs/img/serve_page.png

Needs a running server (tools/serve.py), `playwright` (dev extra) and chromium on PATH (apt-get install chromium);
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shutil
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--prompt", default="two green triangles")
    p.add_argument("--image", help="a PNG / JPEG to attach to the prompt")
    p.add_argument("--steps", default="30")
    p.add_argument("--out", default="docs/img/serve_page.png")
    p.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = p.parse_args(argv)
    if not args.chromium:
        print("error: no chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    from playwright.sync_api import Error, sync_playwright

    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run"]
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=flags)
            page = browser.new_page(viewport={"width": 1040, "height": 560})
            page.goto(args.url + "/")
            page.fill("#prompt", args.prompt)
            page.fill("#steps", args.steps)
            if args.image:
                page.set_input_files("#image", args.image)
            page.click("#go")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=120_000)
            page.screenshot(path=args.out)
            browser.close()
    except Error as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
