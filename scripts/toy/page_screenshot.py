#!/usr/bin/env python
"""Drive the server's page in a real browser and save a screenshot of it.

    python scripts/toy/page_screenshot.py                      # starts a server, writes docs/server-page.png
    python scripts/toy/page_screenshot.py --url http://127.0.0.1:7860 --out page.png

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``; ``pip install selenium``) opens
``/``, types a prompt, clicks Generate and waits until the image is in the gallery, then paints a
mask on an image in the img2img tab and inpaints it, and saves a screenshot. Fails (exit 1) when an
image does not appear or the page shows an error.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from ldm.server.process import ServerProcess

logger = logging.getLogger("page_screenshot")
CHROMEDRIVER = "/usr/bin/chromedriver"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    parser.add_argument("--out", type=Path, default=Path("docs/server-page.png"))
    parser.add_argument("--prompt", default="a red house")
    parser.add_argument("--inpaint-prompt", default="a yellow star")
    parser.add_argument("--timeout", type=float, default=120, help="seconds to wait for each image")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.url:
        return screenshot(args.url, args)
    with ServerProcess(["--threads", "2"]) as server:
        return screenshot(server.url, args)


def screenshot(url: str, args: argparse.Namespace) -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(url + "/")
        wait_for(driver, "the sampler list", lambda: driver.execute_script(
            "return document.getElementById('sampler_name').options.length") > 0, args.timeout)
        generate_text_to_image(driver, args)
        inpaint_the_first_image(driver, args)
        driver.execute_script("window.scrollTo(0, 0)")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
        logger.info("saved %s", args.out)
    finally:
        driver.quit()
    return 0


def generate_text_to_image(driver, args: argparse.Namespace) -> None:
    type_into(driver, "prompt", args.prompt)
    for field, value in (("steps", "20"), ("seed", "3"), ("n_iter", "2")):
        type_into(driver, field, value)
    started = time.monotonic()
    driver.find_element("id", "generate").click()
    wait_for_images(driver, 2, args.timeout)
    logger.info("txt2img: two images in %.1f s", time.monotonic() - started)


def inpaint_the_first_image(driver, args: argparse.Namespace) -> None:
    """Save the first result, load it in the img2img tab, paint a mask stroke, inpaint."""
    from selenium.webdriver.common.action_chains import ActionChains

    source = driver.execute_script("return document.querySelector('#gallery figure:last-child img').src")
    image = Image.open(io.BytesIO(base64.b64decode(source.partition(",")[2])))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "start.png"
        image.save(path)
        driver.find_element("css selector", ".tab[data-mode=img2img]").click()
        driver.find_element("id", "init_image").send_keys(str(path))
        wait_for(driver, "the image on the canvas", lambda: driver.execute_script(
            "return document.getElementById('image_canvas').width") > 0, args.timeout)
    driver.find_element("id", "use_mask").click()
    type_into(driver, "brush", "90")
    type_into(driver, "prompt", args.inpaint_prompt)
    type_into(driver, "n_iter", "1")
    type_into(driver, "denoising_strength", "1")
    canvas = driver.find_element("id", "mask_canvas")
    ActionChains(driver).move_to_element(canvas).click_and_hold().move_by_offset(10, 30).move_by_offset(20, 20).release().perform()
    driver.find_element("id", "generate").click()
    wait_for_images(driver, 3, args.timeout)
    logger.info("inpainting: done")


def type_into(driver, element_id: str, text: str) -> None:
    element = driver.find_element("id", element_id)
    element.clear()
    element.send_keys(text)


def wait_for_images(driver, count: int, timeout: float) -> None:
    wait_for(driver, f"{count} images in the gallery", lambda: driver.execute_script(
        "return [...document.querySelectorAll('#gallery img')].filter(i => i.complete && i.naturalWidth > 0)"
        ".length") >= count, timeout)


def wait_for(driver, what: str, condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        error = driver.execute_script("return document.getElementById('error').textContent")
        if error:
            raise SystemExit(f"the page shows an error while waiting for {what}: {error}")
        if condition():
            return
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


if __name__ == "__main__":
    sys.exit(main())
