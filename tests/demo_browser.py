"""Drive the demo page from headless Chromium (Debian's `chromium` + `chromium-driver`, Selenium).

Used by tests/test_demo.py, and runnable to take the README's screenshot of a real pipeline:

    python tests/demo_browser.py --pipeline outputs/quickstart/best --digit 7 --screenshot benchmarks/results/demo.png
"""

import argparse
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import PIL.Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, or None when either is missing."""
    browser = next((path for path in CHROMIUM if os.path.exists(path)), shutil.which("chromium"))
    driver = next((path for path in CHROMEDRIVER if os.path.exists(path)), shutil.which("chromedriver"))
    return (browser, driver) if browser and driver else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serve_demo(pipeline: str, log_path: Path, timeout_s: float = 180.0):
    """`python -m demo --pipeline ...` on 127.0.0.1 and a free port; yields the URL; the server is stopped on exit,
    whatever happens."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env.update(
        PYTHONPATH=str(ROOT),
        OMP_NUM_THREADS="1",
        GRADIO_ANALYTICS_ENABLED="False",
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
    )
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "demo", "--pipeline", pipeline, "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + timeout_s
            while True:
                if server.poll() is not None:
                    raise RuntimeError(
                        f"the demo server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}"
                    )
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the demo did not answer on {url} in {timeout_s} s:\n{log_path.read_text()[-3000:]}"
                    )
                time.sleep(0.5)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=20)


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1400):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    options.add_argument(f"--window-size={width},{height}")
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, timeout_s: float = 120.0, what: str = "the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(lambda d: condition(d))
    except Exception as error:
        status = driver.find_elements("css selector", "#status")
        raise AssertionError(
            f"waiting for {what} failed ({type(error).__name__}); status: {status[0].text if status else '?'!r}"
        ) from error


def status_text(driver) -> str:
    return driver.find_element("css selector", "#status").text


def wait_for_status(driver, fragment: str, timeout_s: float = 120.0) -> str:
    wait_for(driver, lambda d: fragment in status_text(d), timeout_s, what=f"status {fragment!r}")
    return status_text(driver)


def visible_element(driver, css: str, timeout_s: float = 30.0):
    """The element once the page has rendered it and shows it (an accordion opens with an animation, a component
    may render after the page loads)."""
    wait_for(
        driver,
        lambda d: any(element.is_displayed() for element in d.find_elements("css selector", css)),
        timeout_s,
        what=f"a visible {css}",
    )
    return next(element for element in driver.find_elements("css selector", css) if element.is_displayed())


def set_text(driver, element_id: str, text: str) -> None:
    """Replace the text of a Gradio Textbox / Number (the `input` or `textarea` inside `#element_id`)."""
    from selenium.webdriver.common.keys import Keys

    field = visible_element(driver, f"#{element_id} input, #{element_id} textarea")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.BACKSPACE)
    field.send_keys(text)
    field.send_keys(Keys.TAB)  # Gradio reads the value on blur


def choose(driver, element_id: str, option: str) -> None:
    """Pick `option` in a Gradio Dropdown: open it, then click the list item with that value."""
    field = visible_element(driver, f"#{element_id} input")
    field.click()
    # The open list is the element the combobox controls; its items carry the option as aria-label.
    item = f"#{field.get_attribute('aria-controls')} [role=option][aria-label='{option}']"
    wait_for(driver, lambda d: d.find_elements("css selector", item), 20, what=f"option {option!r} of #{element_id}")
    driver.find_element("css selector", item).click()
    wait_for(driver, lambda d: field.get_attribute("value") == option, 20, what=f"#{element_id} = {option!r}")


def shown_file(driver, element_id: str, timeout_s: float = 120.0) -> bytes:
    """The file a Gradio Image component shows, fetched from the page's own URL."""
    css = f"#{element_id} img"
    wait_for(driver, lambda d: d.find_elements("css selector", css), timeout_s, what=f"an image in #{element_id}")
    source = driver.find_element("css selector", css).get_attribute("src")
    with urllib.request.urlopen(source, timeout=30) as response:
        return response.read()


def shown_image(driver, element_id: str, timeout_s: float = 120.0) -> PIL.Image.Image:
    """The (first frame of the) image a Gradio Image component shows."""
    return PIL.Image.open(io.BytesIO(shown_file(driver, element_id, timeout_s))).copy()


def open_panel(driver, element_id: str) -> None:
    """Open a Gradio Accordion by its header."""
    driver.find_element("css selector", f"#{element_id} .label-wrap").click()


def click(driver, element_id: str) -> None:
    driver.find_element("css selector", f"#{element_id}").click()


def main() -> None:
    parser = argparse.ArgumentParser(description="Screenshot the demo page after one generation.")
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--digit", default="7", help="a label of the pipeline's id2label (the shipped MNIST: 0..9)")
    parser.add_argument("--seed", default="0")
    parser.add_argument("--second_sampler", default=None)
    parser.add_argument("--screenshot", required=True)
    args = parser.parse_args()
    log = Path(args.screenshot).with_suffix(".server.log")
    with serve_demo(args.pipeline, log) as url, chromium(height=1900) as driver:
        driver.get(url)
        wait_for_status(driver, "Loaded")
        choose(driver, "digit", args.digit)
        set_text(driver, "seed", args.seed)
        if args.second_sampler:
            open_panel(driver, "compare_panel")
            choose(driver, "second_sampler", args.second_sampler)
        click(driver, "generate")
        wait_for_status(driver, "Generated", timeout_s=600)
        shown_image(driver, "grid")
        time.sleep(1)
        driver.save_screenshot(args.screenshot)
    log.unlink()
    print(f"wrote {args.screenshot}")


if __name__ == "__main__":
    main()
