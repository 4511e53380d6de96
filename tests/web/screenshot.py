"""Take docs/web.png: a real conversation with a picture, on the bundled model.

    python tests/web/screenshot.py [OUT.png [WIDTH HEIGHT [dark]]]

Runs ``mmchat serve`` and Debian's chromium the same way tests/test_web.py does.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alt_renderer import draw_scene  # noqa: E402
from test_web import BUNDLED, ROOT, ServeProcess, _ask, _chromium, _finished, _open  # noqa: E402


def main(out: Path, width: int = 900, height: int = 880, scheme: str = "light") -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        server = ServeProcess({"MMCHAT_MODEL__CHECKPOINT": str(BUNDLED)}, Path(tmp))
        server.start()
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=_chromium())
                page = browser.new_page(viewport={"width": width, "height": height},
                                        color_scheme=scheme)
                _open(page, server)
                _finished(_ask(page, "hello"))
                scene = draw_scene([("circle", "red", (0, 1)), ("square", "blue", (2, 1))])
                page.set_input_files("#file", files=[
                    {"name": "scene.png", "mimeType": "image/png", "buffer": scene}])
                reply = _ask(page, "what colour is the square?")
                _finished(reply)
                reply.locator("summary").click()
                _finished(_ask(page, "and where was the circle?"))
                page.fill("#text", "how many shapes are there?")
                page.screenshot(path=str(out))
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    args = sys.argv[1:]
    main(Path(args[0]) if args else ROOT / "docs" / "web.png",
         *(int(a) for a in args[1:3]), *args[3:4])
