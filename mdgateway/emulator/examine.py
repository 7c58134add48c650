# -*- test-case-name: tests.test_core_emulator -*-
"""
The examination of one upload: everything the emulated Core decides about
a file and its archive children, done once, off the reactor thread.

L{examine} reads the upload, recognises its type, extracts archives (each
child examined the same way, to a depth limit), runs Proactive DLP and Deep
CDR, writes the converted copy, and returns a tree of frozen L{Node}s that
the result documents are built from. It touches no shared state: only the
upload, the files it writes under its working directory, and C{uuid4}.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from typing import BinaryIO

import attrs

from mdgateway.emulator.archives import (
    EXTRACTION_FAILED,
    ArchiveProblemError,
    Limits,
    extract,
    remove,
    zip_names,
)
from mdgateway.emulator.config import EmulatorConfig
from mdgateway.emulator.detect import Findings, scan_stream
from mdgateway.emulator.filetype import FileType, sniff
from mdgateway.emulator.postprocess import (
    DAMAGED,
    CdrOutcome,
    DlpOutcome,
    dlp_scan,
    redact,
    sanitize,
)

#: C{scan_all_result_a} for each C{scan_all_result_i} the emulator uses
#: (code 0 is worded per Core version; see L{Shape.clean_text}).
CODES: dict[int, str] = {
    0: "No Threat Detected",
    1: "Infected",
    3: "Failed",
    9: "Exceeded Archive Depth",
    10: "Not Scanned",
    12: "Encrypted Archive",
    13: "Exceeded Archive Size",
    14: "Exceeded Archive File Number",
    19: "Canceled",
    20: "Sensitive Data Found",
    24: "Extraction Failed",
    255: "In Progress",
}
#: Worst first: an archive's overall code is its worst child's (or its own).
_RANK = (1, 12, 9, 13, 14, 24, 3, 10, 20, 0)
#: Codes whose file the emulated workflow blocks (20 only with DLP blocking).
BLOCKING = frozenset({1, 3, 9, 10, 12, 13, 14, 19, 24})
DEPTH = 9


def worst(codes: Sequence[int]) -> int:
    """
    The worst of C{codes} by Core's severity (0 when empty).
    """
    return min(codes, key=_RANK.index, default=0)


@attrs.frozen
class Node:
    """
    One examined file (an upload or an archive child).

    @ivar display_name: C{file_info.display_name}: the upload's
        C{filename} header as sent, or C{"outer.zip/inner/path"} for a
        child.
    @ivar name: the file's own name, decoded (converted names start with
        its stem).
    @ivar own_code: what the file's own bytes gave (0, 1, 3, 10, or an
        archive problem: 9, 12, 13, 14, 24), before its children and DLP.
    @ivar code: the overall C{scan_all_result_i} (children and DLP
        included).
    @ivar issues: every code found in the file or its children, worst
        first (for C{verdicts}).
    @ivar extracted: the file is an archive that was extracted (it has
        C{extracted_files}, perhaps with no entry).
    @ivar dlp: what DLP found, or C{None} when DLP did not run.
    @ivar cdr: what Deep CDR did, or C{None} when it did not run.
    @ivar converted_path: the converted copy (sanitized or redacted).
    @ivar converted_name: its name (Deep CDR's C{converted_destination},
        or DLP's C{filename}).
    """

    data_id: str
    display_name: str
    name: str
    findings: Findings
    file_type: FileType
    own_code: int
    code: int
    blocked: bool
    issues: tuple[int, ...]
    children: tuple[Node, ...] = ()
    extracted: bool = False
    dlp: DlpOutcome | None = None
    cdr: CdrOutcome | None = None
    converted_path: str | None = None
    converted_name: str | None = None
    converted_to: str = ""

    @property
    def infected(self) -> bool:
        """
        The engines found a threat in this file's own bytes.
        """
        return self.findings.infected

    def walk(self) -> list[Node]:
        """
        This node and every descendant, depth first.
        """
        nodes = [self]
        for child in self.children:
            nodes.extend(child.walk())
        return nodes

    def converted_files(self) -> list[str]:
        """
        Every converted file written for this tree.
        """
        return [n.converted_path for n in self.walk() if n.converted_path]


def _split(name: str) -> tuple[str, str]:
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, extension = base.rpartition(".")
    if not dot or not stem:
        return base, ""
    return stem, extension.lower()


class _Examiner:
    def __init__(
        self,
        config: EmulatorConfig,
        workdir: str,
        rule: str,
        passwords: Sequence[bytes],
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.dlp = config.dlp_for(rule)
        self.passwords = passwords

    def node(
        self,
        stream: BinaryIO,
        *,
        display_name: str,
        name: str,
        depth: int,
        convert: bool,
    ) -> Node:
        config = self.config
        stream.seek(0)
        findings = scan_stream(stream)
        stem, extension = _split(name)
        names = zip_names(stream) if findings.head.startswith(b"PK") else None
        file_type = sniff(findings, extension, names)
        data_id = uuid.uuid4().hex
        own = 0
        if findings.fail:
            own = 3
        elif findings.not_scanned:
            own = 10
        elif findings.infected:
            own = 1
        children: list[Node] = []
        extracted = False
        if file_type.archive is not None and own in (0, 1):
            problem, extracted = self._children(
                stream, file_type, display_name, depth, children
            )
            if problem is not None:
                own = worst([own, problem])
        dlp = None
        if self.dlp and file_type.document and own not in (3, 10):
            hits = dlp_scan(stream, file_type, findings)
            dlp = DlpOutcome(hits)
        issues = [own] if own else []
        for child in children:
            issues.extend(child.issues)
        if dlp is not None and dlp.hits:
            issues.append(20)
        issues = sorted(set(issues), key=_RANK.index)
        code = worst(issues)
        blocked = code in BLOCKING or (code == 20 and config.dlp_block)
        node = Node(
            data_id=data_id,
            display_name=display_name,
            name=name,
            findings=findings,
            file_type=file_type,
            own_code=own,
            code=code,
            blocked=blocked,
            issues=tuple(issues),
            children=tuple(children),
            extracted=extracted,
            dlp=dlp,
        )
        if convert and not blocked:
            node = self._convert(node, stream, names, stem, extension)
        return node

    def _children(
        self,
        stream: BinaryIO,
        file_type: FileType,
        display_name: str,
        depth: int,
        children: list[Node],
    ) -> tuple[int | None, bool]:
        """
        Extract and examine the children; return the archive problem (if
        any) and whether the archive counts as extracted.
        """
        config = self.config
        assert file_type.archive is not None
        if depth >= config.archive_depth:
            return DEPTH, False
        limits = Limits(files=config.archive_files, size=config.archive_size)
        entries = extract(
            stream,
            file_type.archive,
            outer_name=display_name,
            passwords=self.passwords,
            limits=limits,
            workdir=self.workdir,
        )
        try:
            for entry in entries:
                try:
                    with open(entry.path, "rb") as child:
                        children.append(
                            self.node(
                                child,
                                display_name=f"{display_name}/{entry.name}",
                                name=entry.name,
                                depth=depth + 1,
                                convert=False,
                            )
                        )
                finally:
                    remove(entry.path)
        except ArchiveProblemError as e:
            if e.code == EXTRACTION_FAILED and not config.shape.extraction_failed:
                children.clear()  # older Core versions scan it as a plain file
                return None, False
            return e.code, bool(children)
        return None, True

    def _convert(
        self,
        node: Node,
        stream: BinaryIO,
        names: list[str] | None,
        stem: str,
        extension: str,
    ) -> Node:
        file_type = node.file_type
        stem = stem or "file"
        suffix = file_type.extension_for(extension)
        dot_suffix = f".{suffix}" if suffix else ""
        path = os.path.join(self.workdir, node.data_id)
        dlp = node.dlp
        if dlp is not None and dlp.hits:
            # The DLP-allowed file with hits: DLP redacts it (no Deep CDR).
            try:
                with open(path, "wb") as out:
                    redact(stream, file_type, dlp.hits, out)
            except DAMAGED:
                remove(path)
                return attrs.evolve(node, dlp=attrs.evolve(dlp, redact_failed=True))
            except BaseException:
                remove(path)
                raise
            return attrs.evolve(
                node,
                dlp=attrs.evolve(dlp, redacted=True),
                converted_path=path,
                converted_name=(
                    f"{stem}_proactive-dlp-processed_by_OPSWAT_MetaDefender_"
                    f"{node.data_id}{dot_suffix}"
                ),
            )
        if not file_type.known_as(self.config.sanitize_types):
            return node
        try:
            with open(path, "wb") as out:
                cdr = sanitize(stream, file_type, node.findings, names, out)
        except BaseException:
            remove(path)
            raise
        if not cdr.sanitized:
            remove(path)
            return attrs.evolve(node, cdr=cdr)
        return attrs.evolve(
            node,
            cdr=cdr,
            converted_path=path,
            converted_name=(
                f"{stem}_sanitized_by_OPSWAT_MetaDefender_{node.data_id}{dot_suffix}"
            ),
            converted_to=suffix,
        )


def examine(
    stream: BinaryIO,
    *,
    display_name: str,
    name: str,
    rule: str,
    passwords: Sequence[bytes],
    config: EmulatorConfig,
    workdir: str,
) -> Node:
    """
    Examine one upload (a seekable stream) and its archive children.

    Files written under C{workdir}: the converted copy, named by the
    upload's C{data_id}, and temporary copies of archive children (removed
    before this returns). On an exception nothing is left behind.

    @param display_name: the C{filename} header as sent.
    @param name: the same, URL-decoded.
    @param passwords: the C{archivepwd*} headers, decoded, in order.
    """
    examiner = _Examiner(config, workdir, rule, passwords)
    return examiner.node(
        stream, display_name=display_name, name=name, depth=0, convert=True
    )


#: The type an unexamined upload is reported as (what Core says of bytes
#: it does not recognise).
UNEXAMINED_TYPE = FileType("application/octet-stream", "data")


def unexamined(*, display_name: str, name: str, size: int) -> Node:
    """
    The node of an upload the instant stand-in does not read: clean, of
    an unknown type, without hashes (see L{EmulatorConfig.instant}).
    """
    return Node(
        data_id=uuid.uuid4().hex,
        display_name=display_name,
        name=name,
        findings=Findings(size=size, md5="", sha1="", sha256="", head=b""),
        file_type=UNEXAMINED_TYPE,
        own_code=0,
        code=0,
        blocked=False,
        issues=(),
    )
