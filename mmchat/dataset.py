"""Dialogue datasets: JSONL, one dialogue a line (see ``docs/data.md``).

:func:`read_dataset` yields :class:`Dialogue` objects with media paths resolved and
base64 decoded, and stops at the first bad record. :func:`check_dataset` reports every
problem in a file, with its line number, and never raises on bad input. The structure is
described by ``mmchat/schema/dataset.schema.json`` (JSON Schema draft 2020-12); the
checks that a schema cannot express (media files exist, base64 decodes, modality names
are known, ids are unique) live here.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import DatasetError
from .modality import Attachment, Modality, guess_mime_type

logger = logging.getLogger(__name__)

ROLES = ("user", "assistant")
#: Categories the demo corpus uses; other datasets may use their own.
CATEGORIES = ("colour", "shape", "count", "position", "digit", "spoken", "followup",
              "chitchat", "greeting")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset. ``line`` is 1-based; 0 means the whole file."""

    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


@dataclass(frozen=True)
class AttachmentRef:
    """An attachment of a turn: a resolved media file or decoded inline bytes."""

    modality: str
    mime_type: str | None = None
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False)
    #: What the attachment says in words (a voice clip's transcript), if the data gives it.
    text: str | None = None
    #: What the attachment shows, one phrase per object in a fixed order, if the data
    #: gives it (the demo corpus: a picture's shapes left to right).
    objects: tuple[str, ...] = ()

    def read(self) -> bytes:
        """The media bytes (read from :attr:`path`, or the inline :attr:`data`)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return self.path.read_bytes()

    def to_attachment(self) -> Attachment:
        """An :class:`mmchat.Attachment` for the engine, MIME type guessed if absent."""
        mime_type = self.mime_type
        if mime_type is None:
            mime_type = guess_mime_type(self.path) if self.path else "application/octet-stream"
        return Attachment(data=self.read(), mime_type=mime_type, modality=self.modality)


@dataclass(frozen=True)
class Turn:
    role: str
    text: str
    attachments: tuple[AttachmentRef, ...] = ()
    #: Assistant turns: the key words exact-answer accuracy compares (lower-case).
    answer: str | None = None
    #: Assistant turns: the category the answer is scored under.
    category: str | None = None


@dataclass(frozen=True)
class Dialogue:
    id: str
    turns: tuple[Turn, ...]
    split: str | None = None
    category: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: Where the record came from: the file and its 1-based line number.
    source: Path | None = None
    line: int = 0


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The record schema (JSON Schema draft 2020-12)."""
    text = (resources.files("mmchat") / "schema" / "dataset.schema.json").read_text("utf-8")
    return json.loads(text)


@lru_cache(maxsize=1)
def _validator() -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema())


def read_dataset(path: str | Path) -> Iterator[Dialogue]:
    """Yield the dialogues of a JSONL file, in order.

    Relative attachment paths are resolved against the file's folder and inline data
    is decoded. Blank lines are skipped. Raises :class:`DatasetError` naming the file
    and line at the first bad record (run :func:`check_dataset` to see them all).
    """
    path = Path(path)
    seen: dict[str, int] = {}
    for lineno, record, problems in _records(path):
        if not problems:
            problems = _check_record(record, path.parent, None, seen, lineno)
        if problems:
            first = problems[0]
            where = f"{path}:{first.line}" if first.line else str(path)
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise DatasetError(f"{where}: {first.reason}{more}")
        yield _dialogue(record, path, lineno)


def check_dataset(path: str | Path,
                  modalities: Collection[str] | Mapping[str, Modality | None] | None = None,
                  ) -> list[Problem]:
    """Every problem in a JSONL dataset, in line order; an empty list means it is valid.

    :param modalities: the modality names attachments may use (``None`` accepts any).
        A mapping from name to :class:`~mmchat.Modality` also checks each attachment's
        ``mime_type`` against what that modality accepts (a ``None`` value skips it).
    """
    path = Path(path)
    allowed: Mapping[str, Modality | None] | None
    if modalities is None or isinstance(modalities, Mapping):
        allowed = modalities
    else:
        allowed = dict.fromkeys(modalities)
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    count = 0
    for lineno, record, found in _records(path):
        count += record is not None or bool(found)
        if not found:
            try:
                found = _check_record(record, path.parent, allowed, seen, lineno)
            except Exception as exc:  # a checker bug must not hide the other lines
                logger.exception("checking %s line %d failed", path, lineno)
                found = [Problem(lineno, f"could not check record: {type(exc).__name__}: {exc}")]
        problems.extend(found)
    if count == 0 and not problems:
        problems.append(Problem(0, "file has no records"))
    return problems


# -- reading -----------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int, Any, list[Problem]]]:
    """``(line, record, problems)`` for each non-blank line; ``record`` is None when the
    line could not be parsed, and the problems say why."""
    try:
        fh = path.open("rb")
    except FileNotFoundError:
        yield 0, None, [Problem(0, f"file not found: {path}")]
        return
    except OSError as exc:
        yield 0, None, [Problem(0, f"cannot open {path}: {exc.strerror or exc}")]
        return
    with fh:
        lineno = 0
        while True:
            try:
                raw = fh.readline()
            except OSError as exc:
                yield lineno + 1, None, [Problem(lineno + 1, f"read error: {exc}")]
                return
            if not raw:
                return
            lineno += 1
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, None, [Problem(lineno, f"not UTF-8 text: {exc.reason} at "
                                                     f"byte {exc.start}")]
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, None, [Problem(lineno, f"invalid JSON: {exc.msg} at column "
                                                     f"{exc.colno}")]
                continue
            except (RecursionError, ValueError) as exc:
                yield lineno, None, [Problem(lineno, f"invalid JSON: {exc}")]
                continue
            yield lineno, record, []


def _dialogue(record: dict[str, Any], path: Path, lineno: int) -> Dialogue:
    turns = []
    for turn in record["turns"]:
        refs = []
        for a in turn.get("attachments", ()):
            media = ({"path": _resolve(path.parent, a["path"])} if "path" in a else
                     {"data": base64.b64decode(a["data"], validate=True)})
            refs.append(AttachmentRef(a["modality"], a.get("mime_type"), **media,
                                      text=a.get("text"), objects=tuple(a.get("objects", ()))))
        turns.append(Turn(turn["role"], turn["text"], tuple(refs), turn.get("answer"),
                          turn.get("category")))
    return Dialogue(record["id"], tuple(turns), record.get("split"), record.get("category"),
                    record.get("meta", {}), path, lineno)


def _resolve(folder: Path, relative: str) -> Path:
    return (folder / Path(relative).expanduser()).resolve()


# -- checking ----------------------------------------------------------------------------


def _check_record(record: Any, folder: Path, modalities: Mapping[str, Modality | None] | None,
                  seen: dict[str, int], lineno: int) -> list[Problem]:
    errors = sorted(_validator().iter_errors(record), key=lambda e: _path_key(e.absolute_path))
    reasons = [_schema_reason(e) for e in errors]
    if isinstance(record, dict):
        reasons += _check_dialogue(record, folder, modalities, seen, lineno)
    out: list[Problem] = []
    for reason in reasons:  # one report per reason, in order
        problem = Problem(lineno, reason)
        if problem not in out:
            out.append(problem)
    return out


def _path_key(path: Any) -> list[tuple[int, str]]:
    return [(p, "") if isinstance(p, int) else (-1, str(p)) for p in path]


def _where(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_reason(error: Any) -> str:
    path = list(error.absolute_path)
    where = _where(path)
    if error.validator == "minItems" and path == ["turns"]:
        return "empty dialogue: no turns"
    if error.validator == "oneOf" and len(path) >= 3 and path[-2] == "attachments":
        if not isinstance(error.instance, dict):
            return f"{where}: {error.instance!r} is not of type 'object'"  # reported already
        return f"{where}: an attachment needs exactly one of 'path' or 'data'"
    if error.validator == "type" and not path:
        return f"a record must be a JSON object, not {type(error.instance).__name__}"
    if error.validator == "pattern" and path and path[-1] == "category":
        return f"{where}: category {error.instance!r} must be a lower-case word"
    if error.validator == "pattern" and path and path[-1] == "modality":
        return f"{where}: modality {error.instance!r} must be a plain name like 'image'"
    if error.validator == "pattern" and path and path[-1] == "mime_type":
        return f"{where}: {error.instance!r} is not a MIME type like 'image/png'"
    message = error.message
    return f"{where}: {message}" if where else message


def _check_dialogue(record: dict[str, Any], folder: Path,
                    modalities: Mapping[str, Modality | None] | None, seen: dict[str, int],
                    lineno: int) -> list[str]:
    reasons: list[str] = []
    ident = record.get("id")
    if isinstance(ident, str) and ident:
        if ident in seen:
            reasons.append(f"duplicate id {ident!r} (first on line {seen[ident]})")
        else:
            seen[ident] = lineno
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        return reasons
    if not any(isinstance(t, dict) and t.get("role") == "assistant" for t in turns):
        reasons.append("dialogue has no assistant turn")
    for i, turn in enumerate(turns):
        if isinstance(turn, dict):
            reasons += _check_turn(turn, f"turns[{i}]", folder, modalities)
    return reasons


def _check_turn(turn: dict[str, Any], where: str, folder: Path,
                modalities: Mapping[str, Modality | None] | None) -> list[str]:
    reasons: list[str] = []
    role = turn.get("role")
    attachments = turn.get("attachments")
    attachments = attachments if isinstance(attachments, list) else []
    text = turn.get("text")
    if role == "user":
        if text == "" and not attachments:
            reasons.append(f"{where}: user turn has neither text nor attachments")
        for key in ("answer", "category"):
            if key in turn:
                reasons.append(f"{where}: {key!r} belongs on assistant turns only")
    elif role == "assistant":
        if isinstance(text, str) and not text.strip():
            reasons.append(f"{where}: assistant turn has empty text")
        if attachments:
            reasons.append(f"{where}: assistant turns cannot carry attachments")
        answer = turn.get("answer")
        if isinstance(answer, str) and answer != answer.lower():
            reasons.append(f"{where}.answer: {answer!r} must be lower-case")
    for j, attachment in enumerate(attachments):
        if isinstance(attachment, dict):
            reasons += _check_attachment(attachment, f"{where}.attachments[{j}]", folder,
                                         modalities)
    return reasons


def _check_attachment(attachment: dict[str, Any], where: str, folder: Path,
                      modalities: Mapping[str, Modality | None] | None) -> list[str]:
    reasons: list[str] = []
    name = attachment.get("modality")
    modality = None
    if isinstance(name, str) and modalities is not None:
        if name not in modalities:
            known = ", ".join(sorted(modalities)) or "none"
            reasons.append(f"{where}: unknown modality {name!r} (known: {known})")
        else:
            modality = modalities[name]
    rel = attachment.get("path")
    data = attachment.get("data")
    payload_ok = False
    if isinstance(rel, str) and rel and "data" not in attachment:
        try:
            media = _resolve(folder, rel)
            if not media.exists():
                reasons.append(f"{where}: media file not found: {rel}")
            elif not media.is_file():
                reasons.append(f"{where}: media path is not a file: {rel}")
            else:
                payload_ok = True
        except (OSError, RuntimeError, ValueError) as exc:
            reasons.append(f"{where}: bad media path {rel!r}: {exc}")
    if isinstance(data, str) and data and "path" not in attachment:
        try:
            base64.b64decode(data, validate=True)
            payload_ok = True
        except (binascii.Error, ValueError) as exc:
            reasons.append(f"{where}: bad base64 in 'data': {exc}")
    if modality is not None and payload_ok:
        reasons += _check_mime_type(attachment, where, modality)
    return reasons


def _check_mime_type(attachment: dict[str, Any], where: str, modality: Modality) -> list[str]:
    """A stated MIME type, or one implied by the file's extension, must be accepted."""
    mime_type = attachment.get("mime_type")
    if not isinstance(mime_type, str):
        if "path" not in attachment:
            return []
        mime_type = guess_mime_type(attachment["path"])
        if mime_type == "application/octet-stream":
            return []  # nothing to go by: decoders read the content
    if modality.accepts(mime_type):
        return []
    return [f"{where}: the {modality.name} modality does not accept {mime_type!r} "
            f"(accepts: {', '.join(modality.mime_types)})"]
