"""
Headless Chromium driven by Selenium, for the console's browser tests and
its screenshots: Debian's C{chromium} and C{chromium-driver}, a fresh
profile per browser, nothing fetched from the network.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Set (as CI does) to fail instead of skipping when no browser is found.
REQUIRE_ENV = "MDGATEWAY_REQUIRE_BROWSER"

_CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
_DRIVER = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")


def _first(paths: tuple[str, ...], name: str) -> str | None:
    for path in paths:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def browser_paths() -> tuple[str, str] | None:
    """
    The Chromium and chromedriver executables, or C{None} when either (or
    Selenium) is missing.
    """
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    chromium = _first(_CHROMIUM, "chromium")
    driver = _first(_DRIVER, "chromedriver")
    if chromium is None or driver is None:
        return None
    return chromium, driver


def skip_reason() -> str | None:
    """
    Why the browser tests cannot run here, or C{None} when they can.

    @raise RuntimeError: they cannot, and L{REQUIRE_ENV} says they must.
    """
    if browser_paths() is not None:
        return None
    reason = "headless Chromium, chromedriver or selenium is not installed"
    if os.environ.get(REQUIRE_ENV):
        raise RuntimeError(f"{REQUIRE_ENV} is set but {reason}")
    return reason


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """
    A Selenium WebDriver on a fresh headless Chromium profile.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    assert paths is not None, skip_reason()
    binary, driver_path = paths
    profile = tempfile.mkdtemp(prefix="mdgateway-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-extensions",
        "--disable-default-apps",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(
        service=Service(executable_path=driver_path), options=options
    )
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
