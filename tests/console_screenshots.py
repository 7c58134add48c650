"""
Screenshots of the console's main pages for docs/console.md, taken with
headless Chromium against a real gateway (the twistd plugin, its Core
emulator and an aiosmtpd relay on loopback) after some mail has passed.

    python3 -m tests.console_screenshots docs/console
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.browser import chromium
from tests.downstream import RecordingHandler, _Controller
from tests.gatewayproc import free_port, running_gateway, wait_for_port
from tests.test_e2e_pipeline import EICAR, message, pipeline_toml, send, wait_for

TOKEN = "screenshot-admin-token"

PAGES = (
    ("dashboard", "/console/dashboard"),
    ("history", "/console/messages"),
    ("quarantine", "/console/quarantine"),
    ("refused", "/console/refused"),
    ("queue", "/console/queue"),
    ("config", "/console/config"),
)


def console_toml(tmp: Path, port: int, admin: int, downstream: int) -> str:
    """
    A gateway whose rule quarantines blocked mail, with the admin API and
    console on C{admin}.
    """
    token = tmp / "admin.token"
    token.write_text(TOKEN)
    toml, _ = pipeline_toml(
        port,
        tmp,
        downstream,
        rule='blocked_action = "block"\nquarantine_blocked = true',
    )
    admin_section = (
        f'[admin]\nendpoint = "tcp:{admin}:interface=127.0.0.1"\n'
        f'token_file = "{token}"\nusers_file = "{tmp / "users"}"\n'
    )
    return toml.replace("[emulator]", admin_section + "[emulator]")


def login(driver: Any, base: str, token: str = TOKEN) -> None:
    from selenium.webdriver.common.by import By

    driver.get(base + "/console/login")
    box = driver.find_element(By.CSS_SELECTOR, "#token-login input[name=token]")
    box.send_keys(token)
    driver.find_element(By.CSS_SELECTOR, "#token-login button").click()


def shoot(driver: Any, path: Path, width: int = 1280) -> None:
    """
    A screenshot of the whole page (up to 2400 pixels high).
    """
    metrics = {"width": width, "height": 600, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    metrics["height"] = min(max(int(height), 600), 2400)
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    time.sleep(0.2)
    driver.save_screenshot(str(path))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    handler = RecordingHandler()
    controller = _Controller(handler, hostname="127.0.0.1", port=0)
    controller.start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            tmp = Path(scratch)
            port, admin = free_port(), free_port()
            toml = console_toml(tmp, port, admin, controller.port)
            with running_gateway(tmp, toml=toml, port=port):
                wait_for_port(admin)
                for n in range(6):
                    send(port, message(f"Weekly report {n}"))
                send(port, message("Invoice 2291", (EICAR, "invoice.com")))
                send(port, message("Your parcel", (EICAR, "label.exe")))
                wait_for(lambda: len(handler.messages) >= 6)
                time.sleep(2)
                base = f"http://127.0.0.1:{admin}"
                with chromium(1280, 900) as driver:
                    login(driver, base)
                    for name, path in PAGES:
                        driver.get(base + path)
                        shoot(driver, out / f"{name}.png")
                    driver.get(base + "/console/quarantine")
                    link = driver.find_element("css selector", "#results a.subject")
                    link.click()
                    shoot(driver, out / "quarantine-item.png")
                    driver.find_element("id", "release").click()
                    shoot(driver, out / "release-confirm.png")
    finally:
        controller.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console"))
