"""
The gateway's log format: JSON Lines for machines, text for people, and
how the plugin puts its observer in the runner's place.
"""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.internet.testing import EventLoggingObserver
from twisted.logger import (
    Logger,
    LogLevel,
    eventAsJSON,
    eventFromJSON,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.trial.unittest import SynchronousTestCase

from mdgateway.run import logs
from mdgateway.run.logs import install, json_line, text_line


def emitted(**fields: Any) -> dict[str, Any]:
    """
    The event a Logger emits for C{log.info(format, **fields)}.
    """
    events = EventLoggingObserver()
    log = Logger(namespace="mdgateway.test", observer=events)
    log.info("queued {message_id} for {count} recipient(s)", **fields)
    return events[0]


class JSONLinesTests(SynchronousTestCase):
    def test_one_object_per_line(self) -> None:
        """
        An event is one line of JSON (no RFC 7464 separator) starting with
        time (RFC 3339, UTC), level, logger and the rendered message, then
        the structured fields; no Twisted-internal C{log_*} key.
        """
        event = emitted(message_id="0Q2Z", count=2, client="192.0.2.7")
        event["log_time"] = 1796272902.5
        line = json_line(event)
        self.assertTrue(line.endswith("\n") and line.count("\n") == 1)
        self.assertNotIn("\x1e", line)
        record = json.loads(line)
        self.assertEqual(list(record)[:4], ["time", "level", "logger", "msg"], record)
        self.assertEqual(record["time"], "2026-12-03T04:41:42.500Z")
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["logger"], "mdgateway.test")
        self.assertEqual(record["msg"], "queued 0Q2Z for 2 recipient(s)")
        self.assertEqual(
            (record["message_id"], record["count"], record["client"]),
            ("0Q2Z", 2, "192.0.2.7"),
        )
        self.assertFalse([k for k in record if k.startswith("log_")])

    def test_failure_has_error_and_traceback(self) -> None:
        """
        A logged failure adds C{error} (type and message) and C{traceback}.
        """
        events = EventLoggingObserver()
        log = Logger(namespace="x", observer=events)
        try:
            raise ValueError("bad thing")
        except ValueError:
            log.failure("processing {message_id} failed", message_id="Q1")
        record = json.loads(json_line(events[0]))
        self.assertEqual(record["level"], "critical")
        self.assertEqual(record["msg"], "processing Q1 failed")
        self.assertEqual(record["error"], "ValueError: bad thing")
        self.assertIn("Traceback", record["traceback"])

    def test_odd_fields_do_not_break_the_line(self) -> None:
        """
        Fields that JSON cannot hold are written as text; a field named like
        a record key keeps its value under a trailing underscore.
        """
        event = emitted(message_id=b"\xff-bytes", count={3}, msg="mine")
        event["peer"] = object()
        record = json.loads(json_line(event))
        self.assertEqual(record["message_id"], "\ufffd-bytes")
        self.assertEqual(record["count"], [3])
        self.assertEqual(record["msg_"], "mine")
        self.assertTrue(record["peer"].startswith("<object object"))

    def test_legacy_event(self) -> None:
        """
        An event from C{twisted.python.log} (a library's old-style line) is
        rendered into C{msg} without its duplicate legacy keys.
        """
        event = {
            "log_namespace": "log_legacy",
            "log_level": LogLevel.info,
            "log_format": "{log_text}",
            "log_text": "Site starting on 8080",
            "message": ("Site starting on 8080",),
            "system": "-",
            "isError": 0,
            "time": 1.0,
            "log_time": 1.0,
        }
        record = json.loads(json_line(event))
        self.assertEqual(record["msg"], "Site starting on 8080")
        self.assertEqual(set(record), {"time", "level", "logger", "msg"})

    def test_child_event_read_back(self) -> None:
        """
        A worker's event, written by Twisted's JSON observer and read back
        by the primary, comes out in the same shape with its worker mark.
        """
        out = io.StringIO()
        jsonFileLogObserver(out, recordSeparator="")(
            emitted(message_id="W1", count=1) | {"log_time": 5.0}
        )
        event = eventFromJSON(out.getvalue())
        event["worker"] = 1
        record = json.loads(json_line(event))
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["msg"], "queued W1 for 1 recipient(s)")
        self.assertEqual(record["worker"], 1)

    def test_text_line(self) -> None:
        """
        The text format is one line: time, level, logger (and the process
        a child event came from), message.
        """
        event = emitted(message_id="T1", count=1)
        event["log_time"] = 0.0
        event["process"] = "emulator"
        self.assertEqual(
            text_line(event),
            "1970-01-01T00:00:00.000Z info     mdgateway.test (process "
            "emulator): queued T1 for 1 recipient(s)\n",
        )

    def test_worker_json_is_lossless(self) -> None:
        """
        The pipe from a child stays Twisted's own JSON, so its events keep
        their format string and fields for the primary to render.
        """
        text = eventAsJSON(emitted(message_id="A", count=1))
        self.assertEqual(
            eventFromJSON(text)["log_format"],
            "queued {message_id} for {count} recipient(s)",
        )


class InstallTests(SynchronousTestCase):
    def test_twist_default_is_json_lines(self) -> None:
        """
        Under twist without any --log-format, the runner's observer factory
        becomes our JSON Lines one.
        """
        options: dict[str, Any] = {"logFile": io.StringIO()}
        self.assertEqual(install(options, None), "json")
        self.assertIs(options["fileLogObserverFactory"], logs.json_lines_observer)

    def test_twist_log_format_is_read(self) -> None:
        """
        twist's own --log-format=text (given before the plugin's options)
        chooses our text format; the plugin's option wins over it.
        """
        options: dict[str, Any] = {
            "logFile": io.StringIO(),
            "fileLogObserverFactory": textFileLogObserver,
        }
        self.assertEqual(install(dict(options), None), "text")
        self.assertEqual(install(options, "json"), "json")
        self.assertIs(options["fileLogObserverFactory"], logs.json_lines_observer)

    def test_twistd_logger(self) -> None:
        """
        Under twistd our observer is named as its --logger (keeping its
        --logfile), unless the operator named one.
        """
        options: dict[str, Any] = {"logger": None, "logfile": "/tmp/x.log"}
        self.assertEqual(install(options, "text"), "text")
        self.assertEqual(options["logger"], "mdgateway.run.logs.twistd_text_observer")
        own: dict[str, Any] = {"logger": "my.observer", "logfile": None}
        install(own, None)
        self.assertEqual(own["logger"], "my.observer")

    def test_observer_writes_lines(self) -> None:
        """
        The observer writes and flushes one line per event.
        """
        out = io.StringIO()
        logs.json_lines_observer(out)(emitted(message_id="F", count=0))
        (line,) = out.getvalue().splitlines()
        self.assertEqual(json.loads(line)["message_id"], "F")


class NoiseTests(SynchronousTestCase):
    """
    What the gateway's observers leave out.
    """

    def test_factory_chatter_dropped(self) -> None:
        """
        Twisted's "Starting factory"/"Stopping factory" events (one pair
        per new connection to Core or a relay) are not written; other
        events of the same level are.
        """
        out = io.StringIO()
        observer = logs.json_lines_observer(out)
        for verb in ("Starting", "Stopping"):
            chatter = dict(emitted(), log_format=verb + " factory {factory!r}")
            observer(chatter)
        observer(emitted(message_id="G", count=1))
        (line,) = out.getvalue().splitlines()
        self.assertEqual(json.loads(line)["message_id"], "G")
