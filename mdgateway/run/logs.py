# -*- test-case-name: tests.test_logs -*-
"""
The gateway's log, for machines and for people.

C{json} (the default) writes JSON Lines: one object per line, no record
separator, so C{jq}, C{json.loads(line)} and log shippers read it as it is:

    {"time": "2026-11-27T20:44:44.123Z", "level": "info",
     "logger": "mdgateway.queue.manager", "msg": "0Q2Z... rule local: ...",
     "message_id": "0Q2Z....1", "rule": "local", ...}

C{time} is RFC 3339 in UTC, C{level} Twisted's level name, C{logger} the
namespace, C{msg} the rendered text; every structured field of the event
follows under its own name. A failure adds C{error} and C{traceback}.

C{text} writes one line per event for people: time, level, namespace,
text (and the traceback of a failure).

The C{mdgateway} plugin puts this observer in place of the runner's own:
see L{install}.
"""

from __future__ import annotations

import enum
import json
import math
import sys
from collections.abc import Callable, MutableMapping
from datetime import UTC, datetime
from typing import IO, Any

from constantly import NamedConstant
from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

FORMATS = ("json", "text")

#: The keys every record starts with; a structured field of the same name
#: is written with a trailing underscore.
_RESERVED = frozenset({"time", "level", "logger", "msg", "error", "traceback"})
#: Keys of legacy (C{twisted.python.log}) events that repeat the message.
_LEGACY = frozenset({"message", "time", "isError", "system", "format", "why"})


def _time(event: LogEvent) -> str:
    when = event.get("log_time")
    if not isinstance(when, int | float) or not math.isfinite(when):
        return ""
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def _level(event: LogEvent) -> str:
    level = event.get("log_level")
    name = getattr(level, "name", None)  # a LogLevel constant
    if isinstance(name, str):
        return name
    if isinstance(level, dict):  # an event read back from JSON
        return str(level.get("name", "info"))
    return "info"


def _plain(value: object) -> object:
    """
    A JSON value for anything a log field may hold.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, set | frozenset | tuple):
        return list(value)  # json.dumps comes back here for what it holds
    if isinstance(value, enum.Enum):
        return value.value
    name = getattr(value, "name", None)
    if isinstance(name, str) and value in list(LogLevel.iterconstants()):
        return name
    return str(value)


def event_record(event: LogEvent) -> dict[str, Any]:
    """
    The JSON object of one event: C{time}, C{level}, C{logger}, C{msg},
    the structured fields, and C{error}/C{traceback} for a failure.
    """
    legacy = event.get("log_namespace") == "log_legacy"
    record: dict[str, Any] = {
        "time": _time(event),
        "level": _level(event),
        "logger": str(event.get("log_namespace") or "-"),
        "msg": formatEvent(event),
    }
    for key, value in event.items():
        if key.startswith("log_") or (legacy and key in _LEGACY):
            continue
        record[f"{key}_" if key in _RESERVED else key] = value
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        kind = getattr(failure.type, "__name__", "Error")
        record["error"] = f"{kind}: {failure.getErrorMessage()}"
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = "(traceback unavailable)"
    return record


def json_line(event: LogEvent) -> str:
    """
    One event as one line of JSON; never raises, so one odd field cannot
    silence the log.
    """
    record = event_record(event)
    try:
        text = json.dumps(
            record, ensure_ascii=False, separators=(",", ":"), default=_plain
        )
    except (TypeError, ValueError):
        record = {k: v if k in _RESERVED else _plain(v) for k, v in record.items()}
        text = json.dumps(record, ensure_ascii=False, separators=(",", ":"))
    return text + "\n"


def text_line(event: LogEvent) -> str:
    """
    One event as text for people: C{time level logger[ worker]: msg}.
    """
    record = event_record(event)
    marks = []
    for key in ("worker", "process"):
        if key in event:
            marks.append(f"{key} {event[key]}")
    where = record["logger"] + (f" ({', '.join(marks)})" if marks else "")
    line = f"{record['time']} {record['level']:<8} {where}: {record['msg']}\n"
    if "traceback" in record:
        line += record["traceback"].rstrip("\n") + "\n"
    return line


@implementer(ILogFilterPredicate)
class _NoFactoryChatter:
    """
    Drop Twisted's "Starting factory"/"Stopping factory" lines: every new
    connection to Core or a relay would log two lines that say nothing an
    operator can act on.
    """

    def __call__(self, event: LogEvent) -> NamedConstant:
        text = event.get("log_format") or ""
        if text.startswith(("Starting factory", "Stopping factory")):
            return PredicateResult.no
        return PredicateResult.maybe


def observer_for(log_format: str, out: IO[Any]) -> ILogObserver:
    """
    An observer writing C{log_format} (C{json} or C{text}) to C{out}.
    """
    return FilteringLogObserver(
        FileLogObserver(out, json_line if log_format == "json" else text_line),
        [_NoFactoryChatter()],
    )


def json_lines_observer(out: IO[Any]) -> ILogObserver:
    """
    A JSON Lines observer on C{out}: usable as twist's observer factory.
    """
    return observer_for("json", out)


def text_observer(out: IO[Any]) -> ILogObserver:
    """
    A text observer on C{out}: usable as twist's observer factory.
    """
    return observer_for("text", out)


# -- twistd: --logger takes a name, and the observer no arguments -------------

#: Where twistd's observer writes: set by L{install} from twistd's options.
_twistd_target: dict[str, Any] = {"logfile": None, "nodaemon": True}


def _twistd_file() -> IO[Any]:
    name = _twistd_target["logfile"]
    if name in (None, "", "-"):
        if _twistd_target["nodaemon"]:
            return sys.stdout
        name = "twistd.log"
    from twisted.python.logfile import LogFile

    log_file: IO[Any] = LogFile.fromFullPath(name)
    return log_file


def twistd_json_observer() -> ILogObserver:
    """
    twistd's C{--logger}: JSON Lines to its C{--logfile} (stdout with
    C{-n}), I{info} and above.
    """
    return _info_and_above(json_lines_observer(_twistd_file()))


def twistd_text_observer() -> ILogObserver:
    """
    twistd's C{--logger}: text to its C{--logfile}, I{info} and above.
    """
    return _info_and_above(text_observer(_twistd_file()))


def _info_and_above(observer: ILogObserver) -> ILogObserver:
    return FilteringLogObserver(
        observer, [LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)]
    )


_TWIST_FORMATS: dict[str, Callable[[IO[Any]], ILogObserver]] = {
    "json": json_lines_observer,
    "text": text_observer,
}


def install(runner_options: MutableMapping[str, Any], log_format: str | None) -> str:
    """
    Make the runner that parsed C{runner_options} (twist's or twistd's
    options, the parent of the plugin's) log with our observer, and return
    the format chosen.

    twist: its C{--log-format} is read (C{text} or C{json}) when the
    plugin's is not given, and its observer factory replaced by ours, so
    C{--log-file} and C{--log-level} keep working. twistd: our observer is
    named as its C{--logger} unless one was given; C{--logfile} is kept.

    @param log_format: the plugin's C{--log-format}, or C{None}.
    """
    if "fileLogObserverFactory" in runner_options or "logFile" in runner_options:
        chosen = log_format
        if chosen is None:
            # twist sets the factory before the plugin's options are parsed
            # only when --log-format was given.
            given = runner_options.get("fileLogObserverFactory")
            chosen = "text" if given is textFileLogObserver else "json"
        runner_options["fileLogObserverFactory"] = _TWIST_FORMATS[chosen]
        return chosen
    chosen = log_format or "json"
    if "logger" in runner_options and runner_options.get("logger") is None:
        _twistd_target["logfile"] = runner_options.get("logfile")
        _twistd_target["nodaemon"] = bool(runner_options.get("nodaemon"))
        runner_options["logger"] = f"{__name__}.twistd_{chosen}_observer"
    return chosen
