"""Opens an interactive LCA page (lca_ext.interactive) in headless Chromium and
checks it works: no JavaScript error, the slider moves every panel to the chosen
step, play advances it; saves a screenshot.

  python scripts/browser_check.py PAGE.html [--screenshot out.png]

Drives Debian's chromium through its chromedriver (/usr/bin/chromedriver, given
explicitly, so Selenium never downloads a driver): no network is needed.
Used by tests/test_interactive.py."""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time

CHROMEDRIVER = os.environ.get("LCA_CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM = os.environ.get("LCA_CHROMIUM", "/usr/bin/chromium")

# installed before any page script runs: records uncaught errors and rejections
# that the page leaves unhandled
CATCH_ERRORS = """
window.__lcaErrors = [];
window.addEventListener('error', e => window.__lcaErrors.push('error: ' + e.message));
window.addEventListener('unhandledrejection', e => setTimeout(() => {
  if (!e.defaultPrevented) window.__lcaErrors.push('unhandled rejection: ' + e.reason); }));
"""

# the state the test compares: slider position, which pooled frame is visible,
# the markers' steps, the bars; read from the live plot (gd.data / gd.layout)
READ_STATE = """
const gd = document.getElementById('lca-interactive');
const full = gd._fullData;   // what is drawn, typed arrays decoded
const flat = z => Array.from(z, row => Array.from(row, Number)).flat();
const heat = full.filter(t => t.type === 'heatmap' && t.coloraxis === 'coloraxis');
const shown = heat.filter(t => t.visible === true);
const markers = full.filter(t => t.name === 'this step');
const bar = full.find(t => t.type === 'bar');
const slider = gd._fullLayout.sliders[0];
return JSON.stringify({active: slider.active, label: slider.steps[slider.active].label,
                       visible: shown.map(t => t.name),
                       frame_sums: shown.map(t => flat(t.z).reduce((a, b) => a + b, 0)),
                       marker_x: markers.map(t => Array.from(t.x, Number)),
                       bar_y: Array.from(bar.y, Number)});
"""


class BrowserMissing(RuntimeError):
    """Chromium or its chromedriver is not installed."""


def missing_browser() -> str:
    """Why the check cannot run here ('' if it can)."""
    for path, what in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromedriver")):
        if not (os.path.exists(path) or shutil.which(path)):
            return f"{what} not found at {path} (Debian: apt-get install chromium chromium-driver)"
    if importlib.util.find_spec("selenium") is None:
        return "selenium is not installed (pip install selenium; it is in requirements-dev.txt)"
    return ""


def _driver(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def _wait(driver, condition: str, timeout: float = 20.0):
    end = time.time() + timeout
    while time.time() < end:
        if driver.execute_script(f"return !!({condition});"):
            return
        time.sleep(0.1)
    raise AssertionError(f"page: timed out waiting for {condition}")


def _errors(driver) -> list:
    logged = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    return logged + driver.execute_script("return window.__lcaErrors || [];")


def _state(driver) -> dict:
    return json.loads(driver.execute_script(READ_STATE))


def _click_slider(driver, fraction: float) -> None:
    """A user's click on the slider's rail at ``fraction`` of its length."""
    from selenium.webdriver.common.action_chains import ActionChains

    rail = driver.find_element("css selector", "g.slider-container rect.slider-rail-touch-rect")
    width = rail.size["width"]
    # press, hold briefly, release: as a hand does (an instantaneous synthetic
    # click can leave plotly's slider ignoring a later play)
    ActionChains(driver).move_to_element_with_offset(
        rail, int((fraction - 0.5) * width), 0).click_and_hold().pause(0.2).release().perform()


def _settled(driver, previous_active: int, timeout: float = 10.0) -> dict:
    end = time.time() + timeout
    state = _state(driver)
    while state["active"] == previous_active and time.time() < end:
        time.sleep(0.1)
        state = _state(driver)
    time.sleep(0.5)            # the redraw after the slider's animate
    return _state(driver)


def check(page: str, screenshot: str = "", width: int = 1400, height: int = 1600) -> dict:
    """Runs the checks on ``page``; returns the states seen (raises
    AssertionError on a failed check, BrowserMissing if it cannot run)."""
    why = missing_browser()
    if why:
        raise BrowserMissing(why)
    driver = _driver(width, height)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CATCH_ERRORS})
        driver.get("file://" + os.path.abspath(page))
        _wait(driver, "window.Plotly && document.getElementById('lca-interactive') "
                      "&& document.getElementById('lca-interactive')._fullLayout")
        time.sleep(0.5)
        first = _state(driver)
        _click_slider(driver, 0.8)
        moved = _settled(driver, first["active"])
        assert moved["active"] != first["active"], f"slider click did not move it: {moved}"
        step = int(moved["label"])
        assert all(x == [step] for x in moved["marker_x"]), \
            f"markers {moved['marker_x']} do not follow the slider to step {step}"
        assert moved["bar_y"] != first["bar_y"], "the per-layer bars did not change"
        assert len(moved["visible"]) == len(first["visible"]), moved
        shown_steps = [int(n.rsplit("@ ", 1)[1]) for n in moved["visible"]]
        assert all(s <= step for s in shown_steps) or step < min(shown_steps + [step + 1]), \
            f"the frame shown ({moved['visible']}) is newer than step {step}"
        # play from the start: the slider advances on its own
        _click_slider(driver, 0.02)
        start = _settled(driver, moved["active"])
        driver.find_element("xpath", "//*[contains(@class,'updatemenu-button')][1]").click()
        time.sleep(1.5)
        played = _state(driver)
        driver.find_element("xpath", "(//*[contains(@class,'updatemenu-button')])[2]").click()
        assert played["active"] > start["active"], f"play did not advance: {start} -> {played}"
        # a mid-run step for the picture
        _click_slider(driver, 0.6)
        shot = _settled(driver, played["active"])
        if screenshot:       # the whole page: the window made as tall as the document
            tall = driver.execute_script("return document.documentElement.scrollHeight"
                                         " + window.outerHeight - window.innerHeight;")
            driver.set_window_size(width, max(height, int(tall) + 20))
            time.sleep(1.0)
            driver.save_screenshot(screenshot)
        errors = _errors(driver)
        assert not errors, f"JavaScript errors: {errors}"
        return dict(first=first, moved=moved, played=played, shot=shot)
    finally:
        driver.quit()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("page")
    p.add_argument("--screenshot", default="")
    args = p.parse_args(argv)
    states = check(args.page, args.screenshot)
    print(json.dumps({k: {f: v[f] for f in ("active", "label", "visible")}
                      for k, v in states.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
