"""
The console in a real browser: headless Chromium driven by Selenium
against the gateway run from its twistd plugin (with its Core emulator and
an aiosmtpd relay on loopback).

Skipped only when Chromium, chromedriver or Selenium is missing and
C{MDGATEWAY_REQUIRE_BROWSER} is not set (CI sets it: there they must run).
"""

from __future__ import annotations

import email
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mdgateway.ops.console.passwords import set_password
from tests.browser import chromium, skip_reason
from tests.console_screenshots import console_toml
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import free_port, running_gateway, wait_for_port
from tests.test_e2e_pipeline import EICAR, message, send, wait_for

_SKIP = skip_reason()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.timeout(240),
]

PASSWORD = "browser test password"
HOSTILE = (
    '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2;'
    'alert("pwned")</script>'
)


def _by() -> Any:
    from selenium.webdriver.common.by import By

    return By


def _click(driver: Any, find: Callable[[], Any]) -> None:
    """
    Click the link or button C{find} returns, and wait until the page it
    loads is complete. An element that left the document between finding
    and clicking (the dashboard reloads itself) is found again.
    """
    from selenium.common.exceptions import (
        StaleElementReferenceException,
        WebDriverException,
    )
    from selenium.webdriver.support.ui import WebDriverWait

    for attempt in range(3):
        old = driver.find_element(_by().TAG_NAME, "html")
        try:
            find().click()
        except StaleElementReferenceException:
            continue
        except WebDriverException as e:
            if "does not belong to the document" not in str(e) or attempt == 2:
                raise
            continue
        break
    WebDriverWait(driver, 20).until(lambda d: _gone(old))
    WebDriverWait(driver, 20).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def _gone(element: Any) -> bool:
    """
    Whether C{element} left the document. Chromium says so in two ways:
    a stale reference, or a node that "does not belong to the document".
    """
    from selenium.common.exceptions import (
        StaleElementReferenceException,
        WebDriverException,
    )

    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:
        if "does not belong to the document" in str(e):
            return True
        raise
    return False


def _no_alert(driver: Any) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert.text  # noqa: B018 (raises without an alert)
    except NoAlertPresentException:
        return True
    return False


def _assert_inert(driver: Any) -> None:
    """
    Nothing from the hostile subject ran or became an element.
    """
    assert _no_alert(driver)
    assert driver.execute_script("return window.__pwned === undefined")
    assert driver.execute_script("return document.images.length") == 0
    scripts = driver.execute_script(
        "return Array.from(document.scripts).map(s => s.src)"
    )
    assert len(scripts) == 1 and scripts[0].endswith("/console/static/console.js")


@pytest.fixture
def gateway(
    tmp_path: Path, smtpd: Callable[..., _Controller]
) -> Iterator[tuple[str, RecordingHandler]]:
    """
    A running gateway whose rule quarantines blocked mail, with an
    operator account, and two messages processed: a clean one and an
    infected one with a subject made of markup.
    """
    handler = RecordingHandler()
    downstream = smtpd(handler)
    port, admin = free_port(), free_port()
    toml = console_toml(tmp_path, port, admin, downstream.port)
    set_password(str(tmp_path / "users"), "alice", PASSWORD)
    with running_gateway(tmp_path, toml=toml, port=port):
        wait_for_port(admin)
        send(port, message("Quarterly numbers"))
        send(port, message(HOSTILE, (EICAR, "eicar.com")))
        wait_for(lambda: len(handler.messages) == 1)
        yield f"http://127.0.0.1:{admin}", handler


def test_console_in_a_browser(gateway: tuple[str, RecordingHandler]) -> None:
    """
    An operator logs in with their account, sees the dashboard (chart and
    Core's health), finds a message by subject, opens the infected one
    whose subject is markup (shown as text; nothing runs, no element is
    injected), is refused a release without confirmation, releases it
    with both confirmations and sees it delivered; a form sent without its
    CSRF token is refused and changes nothing; logout ends the session.
    """
    By = _by()  # noqa: N806 (Selenium's name)
    base, handler = gateway
    with chromium() as driver:
        # Login with the operator account.
        driver.get(base + "/console/dashboard")
        assert driver.current_url.startswith(base + "/console/login")
        driver.find_element(
            By.CSS_SELECTOR, "#password-login input[name=name]"
        ).send_keys("alice")
        driver.find_element(
            By.CSS_SELECTOR, "#password-login input[name=password]"
        ).send_keys(PASSWORD)
        _click(
            driver,
            lambda: driver.find_element(By.CSS_SELECTOR, "#password-login button"),
        )
        assert driver.current_url == base + "/console/dashboard"

        # The dashboard.
        assert driver.find_element(By.CSS_SELECTOR, "main h1").text.startswith(
            "Dashboard"
        )
        assert driver.find_element(By.CSS_SELECTOR, ".operator").text == "alice"
        assert driver.find_elements(By.CSS_SELECTOR, "#chart-hour rect.bar")
        core = driver.find_element(By.ID, "core").text
        assert "http://127.0.0.1:" in core and "yes" in core
        assert driver.find_element(By.ID, "autorefresh").is_selected()
        _assert_inert(driver)

        # Find the clean message by subject.
        _click(driver, lambda: driver.find_element(By.LINK_TEXT, "History"))
        driver.find_element(By.ID, "f-subject").send_keys("quarterly")
        _click(
            driver, lambda: driver.find_element(By.CSS_SELECTOR, "form.search button")
        )
        rows = driver.find_elements(By.CSS_SELECTOR, "#results tbody tr")
        assert len(rows) == 1
        assert "Quarterly numbers" in rows[0].text
        _click(driver, lambda: rows[0].find_element(By.CSS_SELECTOR, "a.subject"))
        assert "delivered" in driver.find_element(By.ID, "deliveries").text

        # The hostile subject is text everywhere it shows.
        _click(driver, lambda: driver.find_element(By.LINK_TEXT, "History"))
        subject = driver.find_element(By.CSS_SELECTOR, "#results a.subject")
        assert subject.text == HOSTILE
        _assert_inert(driver)
        _click(driver, lambda: driver.find_element(By.LINK_TEXT, "Quarantine"))
        _assert_inert(driver)
        driver.find_element(By.ID, "select-all").click()
        boxes = driver.find_elements(By.CSS_SELECTOR, "input.select-item")
        assert boxes and all(b.is_selected() for b in boxes)
        _click(
            driver, lambda: driver.find_element(By.CSS_SELECTOR, "#results a.subject")
        )
        assert driver.find_element(By.CSS_SELECTOR, "dd .subject").text == HOSTILE
        assert "eicar.com: Infected" in driver.page_source
        _assert_inert(driver)
        item_url = driver.current_url

        # A form without its CSRF token is refused and changes nothing.
        driver.execute_script(
            "document.querySelector('#pin').form"
            ".querySelector('input[name=csrf]').remove()"
        )
        _click(driver, lambda: driver.find_element(By.ID, "pin"))
        assert "security token is missing" in driver.page_source
        driver.get(item_url)
        assert driver.find_element(By.ID, "pin").text == "Pin"

        # Release without confirmation: refused, nothing released.
        _click(driver, lambda: driver.find_element(By.ID, "release"))
        assert driver.find_element(By.ID, "confirm-infected")
        _click(driver, lambda: driver.find_element(By.ID, "do-release"))
        assert "release was not confirmed" in driver.page_source
        driver.find_element(By.ID, "confirm").click()
        _click(driver, lambda: driver.find_element(By.ID, "do-release"))
        assert "second confirmation was not given" in driver.page_source
        driver.get(item_url)
        assert "Released\nno" in driver.find_element(By.CSS_SELECTOR, "dl.facts").text

        # Release with both confirmations: delivered.
        _click(driver, lambda: driver.find_element(By.ID, "release"))
        driver.find_element(By.ID, "confirm").click()
        driver.find_element(By.ID, "confirm-infected").click()
        _click(driver, lambda: driver.find_element(By.ID, "do-release"))
        assert "queued as" in driver.find_element(By.CSS_SELECTOR, ".flash.ok").text
        assert (
            "by console:alice" in driver.find_element(By.CSS_SELECTOR, "dl.facts").text
        )
        wait_for(lambda: len(handler.messages) == 2)
        released = handler.messages[1]
        assert b"X-Metadefender-EmailSecurity-OriginalCopy: True" in released.content
        parts = email.message_from_bytes(released.content).walk()
        assert EICAR in [p.get_payload(decode=True) for p in parts]

        def delivered_in_history() -> bool:
            driver.get(base + "/console/messages?status=delivered&subject=pwned")
            return bool(driver.find_elements(By.CSS_SELECTOR, "#results tbody tr"))

        wait_for(delivered_in_history)
        _assert_inert(driver)

        # Logout.
        _click(driver, lambda: driver.find_element(By.ID, "logout"))
        assert "You have logged out." in driver.page_source
        driver.get(base + "/console/queue")
        assert driver.current_url.startswith(base + "/console/login")
