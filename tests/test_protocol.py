"""The Sans-I/O event protocol: events, errors, frames, rate limits, tokens, and docs."""

from __future__ import annotations

import ast
import dataclasses
import hmac
import json
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmchat import protocol
from mmchat.modality import Attachment as MediaAttachment
from mmchat.protocol import (
    CLIENT_EVENTS,
    DEFAULT_LIMITS,
    ERROR_CODES,
    SERVER_EVENTS,
    Cancel,
    Delta,
    Done,
    Error,
    FrameAssembler,
    Hello,
    Limits,
    Message,
    ModalityInfo,
    Ping,
    Pong,
    ProtocolError,
    Ready,
    Started,
    TokenBucket,
    Usage,
    WireAttachment,
    from_stream_entry,
    make_token,
    parse_client_event,
    parse_server_event,
    serialize,
    to_stream_entry,
    verify_token,
)

ROOT = Path(__file__).resolve().parent.parent


def _protocol_files():
    """The source files of the mmchat.protocol package."""
    files = sorted(Path(protocol.__file__).parent.glob("*.py"))
    assert len(files) > 1
    return files


DOCS = ROOT / "docs"
SECRET = b"0123456789abcdef-test-secret"

CLIENT_EXAMPLES = [
    Hello("1"),
    Hello("1", token="v1.YQ.1.sig", session_id="s-1", last_seq=0),
    Hello("1", session_id="s.1:x-y", last_seq=17),
    Hello("1", token="v1.YQ.1.sig", session_id="s-1", last_seq=3, coalesce=8),
    Message("m-1"),
    Message("m-2", "hello \u00e9\u6f22\U0001f600"),
    Message("m-3", "", (WireAttachment("image/png", data=b"\x89PNG\x00\xff"),
                        WireAttachment("audio/wav", "voice", frame=1),
                        WireAttachment("audio/wav", frame=0))),
    Cancel(),
    Cancel("m-1"),
    Ping(),
    Ping("nonce-1"),
]

SERVER_EXAMPLES = [
    Ready("s-1"),
    Ready("s-2", "1", (ModalityInfo("image", ("image/png", "image/jpeg"), 10 << 20),
                       ModalityInfo("voice", (), 0)),
          True, Limits(max_attachments=2, messages_per_second=0.5, burst=1), 8),
    Started("m-1", "r-1", 1),
    Delta("r-1", 2, "Hel"),
    Delta("r-1", 3, ""),
    Delta("r-1", 9, " there, you", 4),
    Done("r-1", 4, "Hello", "stop", Usage(3, 2)),
    Done("r-2", 9, "x", "length", Usage(0, 64), {"text": 0.25, "image": 0.75},
         {"generate_ms": 12.5}, ("0123456789abcdef",), 0.125, True),
    Error("bad_value", "no", None, False),
    Error("unauthorized", "token refused", "hello", True),
    Pong(),
    Pong("n"),
]


def test_examples_cover_every_event():
    assert {type(e) for e in CLIENT_EXAMPLES} == set(CLIENT_EVENTS.values())
    assert {type(e) for e in SERVER_EXAMPLES} == set(SERVER_EVENTS.values())


@pytest.mark.parametrize("event", CLIENT_EXAMPLES, ids=repr)
def test_client_event_round_trip(event):
    text = serialize(event)
    assert json.loads(text)["type"] == event.type
    assert parse_client_event(text) == event
    assert parse_client_event(text.encode()) == event


@pytest.mark.parametrize("event", SERVER_EXAMPLES, ids=repr)
def test_server_event_round_trip(event):
    text = serialize(event)
    assert json.loads(text)["type"] == event.type
    assert parse_server_event(text) == event


def test_serialize_leaves_out_none_and_puts_type_first():
    assert serialize(Hello("1")) == '{"type":"hello","version":"1"}'
    assert serialize(Cancel()) == '{"type":"cancel"}'
    assert json.loads(serialize(Error("x", "y", None)))["fatal"] is False


def test_serialize_refuses_what_is_not_an_event():
    with pytest.raises(TypeError):
        serialize(WireAttachment("image/png", data=b""))
    with pytest.raises(ValueError):
        serialize(Done("r", 1, "", "stop", Usage(0, 0), {"image": float("nan")}))


def test_null_means_absent():
    assert parse_client_event('{"type":"hello","version":"1","token":null,"session_id":null}') \
        == Hello("1")
    assert parse_client_event('{"type":"message","id":"m","text":null,"attachments":null}') \
        == Message("m")


def test_attachment_to_core_attachment():
    wire = WireAttachment("image/png", "image", b"abc")
    assert wire.to_attachment() == MediaAttachment(b"abc", "image/png", "image")
    with pytest.raises(ValueError, match="pending"):
        WireAttachment("image/png", frame=0).to_attachment()


_ids = st.from_regex(r"[A-Za-z0-9._:-]{1,20}", fullmatch=True)
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=50)
_attachments = st.lists(st.builds(
    WireAttachment, mime_type=st.sampled_from(["image/png", "audio/wav", "image/svg+xml"]),
    modality=st.none() | st.sampled_from(["image", "voice"]),
    data=st.binary(max_size=40)), max_size=4).map(tuple)


@settings(deadline=None)
@given(st.one_of(
    st.builds(Hello, version=st.just("1"), token=st.none() | _text, session_id=st.none()),
    st.builds(Hello, version=st.just("1"), session_id=_ids,
              last_seq=st.none() | st.integers(0, 2**53 - 1)),
    st.builds(Message, id=_ids, text=_text, attachments=_attachments),
    st.builds(Cancel, id=st.none() | _ids),
    st.builds(Ping, nonce=st.none() | st.text(max_size=20).filter(
        lambda s: not any(0xD800 <= ord(c) <= 0xDFFF for c in s))),
))
def test_generated_client_events_round_trip(event):
    assert parse_client_event(serialize(event)) == event


@settings(deadline=None)
@given(st.one_of(
    st.builds(Delta, response_id=_ids, seq=st.integers(1, 2**53 - 1), text=_text),
    st.builds(lambda rid, seq, n, text: Delta(rid, seq, text, seq - n), _ids,
              st.integers(2, 2**53 - 1), st.integers(1, 255), _text).filter(
        lambda d: d.first_seq >= 1),
    st.builds(Started, id=_ids, response_id=_ids, seq=st.integers(1, 2**53 - 1)),
    st.builds(Done, response_id=_ids, seq=st.integers(1, 100), text=_text,
              finish_reason=st.sampled_from(protocol.FINISH_REASONS),
              usage=st.builds(Usage, st.integers(0, 10**6), st.integers(0, 10**6)),
              attention=st.dictionaries(_ids, st.floats(0, 1), max_size=3),
              timings=st.dictionaries(_ids, st.floats(0, 1e6), max_size=3),
              confidence=st.none() | st.floats(0, 1), fallback=st.booleans()),
))
def test_generated_server_events_round_trip(event):
    if isinstance(event, (Started, Delta, Done)) and not getattr(event, "first_seq", None):
        entry = protocol.to_stream_entry(event)  # written directly, as to_json gives it
        data = protocol.to_json(event)
        assert entry.data == {k: v for k, v in data.items()
                              if k not in ("type", "response_id", "seq", "text")}
        assert protocol.from_stream_entry(entry) == event
    text = serialize(event)
    assert parse_server_event(text) == event
    # the frames written directly are the JSON to_json gives
    assert text == json.dumps(protocol.to_json(event), ensure_ascii=False,
                              separators=(",", ":"))


@pytest.mark.parametrize("frame", [
    '{"type":"delta","response_id":"r","seq":3,"text":"ab","first_seq":3}',
    '{"type":"delta","response_id":"r","seq":3,"text":"ab","first_seq":0}',
    '{"type":"ready","session_id":"s","version":"1","coalesce":0}',
    '{"type":"ready","session_id":"s","version":"1","coalesce":257}',
])
def test_server_event_coalescing_fields_are_checked(frame):
    with pytest.raises(ProtocolError) as caught:
        parse_server_event(frame)
    assert caught.value.code == "bad_value"


def _msg(**fields):
    return json.dumps({"type": "message", "id": "m-1", **fields})


def _att(**fields):
    return _msg(attachments=[fields])


# (frame, code, ref, fatal) for every code parse_client_event raises.
ERROR_CASES = [
    ("{not json", "malformed_json", None, False),
    (b"\xff\xfe{}", "malformed_json", None, False),
    ('{"type":"ping","type":"hello"}', "malformed_json", None, False),
    ('{"type":"ping","nonce":NaN}', "malformed_json", None, False),
    ("[" * 100_000 + "]" * 100_000, "malformed_json", None, False),
    ('{"type":"ping","nonce":1' + "0" * 5000 + "}", "malformed_json", None, False),
    ("[]", "bad_type", None, False),
    ('"hello"', "bad_type", None, False),
    ('{"type":1}', "bad_type", None, False),
    ('{"type":"hello","version":1}', "bad_type", "hello", False),
    ('{"type":"hello","version":"1","last_seq":true}', "bad_type", "hello", False),
    ('{"type":"hello","version":"1","last_seq":1.0}', "bad_type", "hello", False),
    (_msg(text=["x"]), "bad_type", "m-1", False),
    (_msg(attachments={}), "bad_type", "m-1", False),
    (_msg(attachments=["x"]), "bad_type", "m-1", False),
    ('{"type":"nope"}', "unknown_event", None, False),
    ('{"type":"ready","session_id":"s","version":"1"}', "unknown_event", None, False),
    ("{}", "missing_field", None, False),
    ('{"type":"hello"}', "missing_field", "hello", False),
    ('{"type":"message","text":"hi"}', "missing_field", None, False),
    (_att(data="aGk="), "missing_field", "m-1", False),
    ('{"type":"ping","extra":1}', "unknown_field", "ping", False),
    (_att(mime_type="image/png", data="aGk=", type="x"), "unknown_field", "m-1", False),
    (_msg(id=""), "bad_value", None, False),
    ('{"type":"message","id":"has space"}', "bad_value", None, False),
    ('{"type":"hello","version":"1","session_id":"a{b}"}', "bad_value", "hello", False),
    ('{"type":"hello","version":"1","last_seq":3}', "bad_value", "hello", False),
    ('{"type":"hello","version":"1","session_id":"s","last_seq":-1}', "bad_value", "hello",
     False),
    ('{"type":"ping","nonce":"' + "n" * 129 + '"}', "bad_value", "ping", False),
    ('{"type":"hello","version":"1","coalesce":0}', "bad_value", "hello", False),
    ('{"type":"hello","version":"1","coalesce":257}', "bad_value", "hello", False),
    ('{"type":"hello","version":"1","coalesce":"8"}', "bad_type", "hello", False),
    ('{"type":"ping","nonce":"\\ud800"}', "bad_value", "ping", False),
    (_att(mime_type="png", data=""), "bad_value", "m-1", False),
    (_att(mime_type="image/png"), "bad_value", "m-1", False),
    (_att(mime_type="image/png", data="", frame=0), "bad_value", "m-1", False),
    (_att(mime_type="image/png", frame=1), "bad_value", "m-1", False),
    (_msg(attachments=[{"mime_type": "a/b", "frame": 0}, {"mime_type": "a/b", "frame": 0}]),
     "bad_value", "m-1", False),
    (_att(mime_type="image/png", modality="Bad Name", data=""), "bad_value", "m-1", False),
    (_att(mime_type="image/png", data="a"), "invalid_base64", "m-1", False),
    (_att(mime_type="image/png", data="a*b="), "invalid_base64", "m-1", False),
    (_att(mime_type="image/png", data="\u00e9\u00e9=="), "invalid_base64", "m-1", False),
    ('{"type":"hello","version":"2"}', "unsupported_version", "hello", True),
    ("x" * (DEFAULT_LIMITS.max_event_bytes + 1), "frame_too_large", None, True),
    (_msg(attachments=[{"mime_type": "a/b", "data": ""}] * 5), "too_many_attachments", "m-1",
     False),
]


@pytest.mark.parametrize(("frame", "code", "ref", "fatal"), ERROR_CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(ERROR_CASES)])
def test_client_event_errors(frame, code, ref, fatal):
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(frame)
    error = caught.value
    assert (error.code, error.ref, error.fatal) == (code, ref, fatal)
    assert code in ERROR_CODES
    event = error.to_event()
    assert event == Error(code, str(error), ref, fatal)
    assert parse_server_event(serialize(event)) == event


def test_every_parse_error_code_is_exercised():
    raised = {case[1] for case in ERROR_CASES}
    source = "\n".join(path.read_text() for path in _protocol_files())
    used = set(re.findall(r'(?:ProtocolError|fail)\(\s*"([a-z_]+)"', source))
    assert used - {"unauthorized", "frames_pending", "unexpected_frame"} <= raised
    assert used <= set(ERROR_CODES)


def test_limits_are_configurable():
    limits = Limits(max_event_bytes=64, max_attachments=1)
    with pytest.raises(ProtocolError) as caught:
        parse_client_event(_msg(text="x" * 64), limits)
    assert caught.value.code == "frame_too_large"
    assert caught.value.close_code == protocol.CLOSE_MESSAGE_TOO_BIG
    with pytest.raises(ProtocolError, match="at most 1"):
        parse_client_event(_msg(attachments=[{"mime_type": "a/b", "data": ""}] * 2),
                           Limits(max_attachments=1))


def test_multibyte_text_counts_bytes_not_characters():
    frame = json.dumps({"type": "message", "id": "m", "text": "\u6f22" * 30},
                       ensure_ascii=False)
    parse_client_event(frame, Limits(max_event_bytes=len(frame.encode())))
    with pytest.raises(ProtocolError, match="frame_too_large|over the limit"):
        parse_client_event(frame, Limits(max_event_bytes=len(frame)))


def test_close_codes():
    assert ProtocolError("x", "y").close_code is None
    assert ProtocolError("unauthorized", "y", fatal=True).close_code == 1008
    assert ProtocolError("frame_too_large", "y", fatal=True).close_code == 1009
    assert protocol.close_code_for("going_away") == 1001
    assert protocol.close_code_for("internal_error") == 1011


def test_parse_refuses_other_argument_types():
    with pytest.raises(TypeError):
        parse_client_event(123)  # type: ignore[arg-type]


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
_field_names = st.sampled_from(["version", "token", "session_id", "last_seq", "id", "text",
                                "attachments", "nonce", "mime_type", "data", "frame",
                                "modality", "x"])
_attachment_objects = st.dictionaries(_field_names, _json | st.integers(-2, 3), max_size=4)
_event_objects = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from([*CLIENT_EVENTS, *SERVER_EVENTS, "nope"]) | _json,
    st.dictionaries(_field_names,
                    _json | st.just("1") | st.lists(_attachment_objects, max_size=5),
                    max_size=5))


def _only_events_or_protocol_errors(frame):
    try:
        event = parse_client_event(frame, Limits(max_event_bytes=4096))
    except ProtocolError as exc:
        assert exc.code in ERROR_CODES
        assert isinstance(exc.fatal, bool)
    else:
        assert type(event) in CLIENT_EVENTS.values()
        assert parse_client_event(serialize(event)) == event


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.text(),
    st.binary(),
    _json.map(json.dumps),
    _event_objects.map(json.dumps),
    _event_objects.map(lambda obj: json.dumps(obj).encode("utf-16")),
))
def test_fuzz_parse_client_event(frame):
    _only_events_or_protocol_errors(frame)


# Binary frames.

def _framed(n, inline=0):
    attachments = [WireAttachment("audio/wav", frame=i) for i in reversed(range(n))]
    attachments += [WireAttachment("image/png", data=b"inline")] * inline
    return Message("m-1", "hi", tuple(attachments))


def test_assembler_passes_messages_without_frames():
    assembler = FrameAssembler()
    message = _framed(0, inline=1)
    assert assembler.add_message(message) is message
    assert assembler.pending is None


def test_assembler_fills_frames_in_index_order():
    assembler = FrameAssembler()
    assert assembler.add_message(_framed(2, inline=1)) is None
    assert assembler.pending is not None
    assert assembler.add_frame(b"zero") is None
    message = assembler.add_frame(b"one")
    assert message is not None and assembler.pending is None
    assert [(a.data, a.frame) for a in message.attachments] == [
        (b"one", None), (b"zero", None), (b"inline", None)]
    assert [a.to_attachment().data for a in message.attachments] == [b"one", b"zero", b"inline"]


def test_assembler_from_the_wire():
    assembler = FrameAssembler()
    event = parse_client_event(_msg(attachments=[{"mime_type": "audio/wav", "frame": 0}]))
    assert assembler.add_message(event) is None
    assert assembler.add_frame(memoryview(b"RIFF")).attachments[0].data == b"RIFF"


def test_assembler_errors():
    assembler = FrameAssembler(Limits(max_attachment_bytes=4, max_message_bytes=6))
    with pytest.raises(ProtocolError) as caught:
        assembler.add_frame(b"x")
    assert (caught.value.code, caught.value.fatal) == ("unexpected_frame", True)

    assembler.add_message(_framed(2))
    with pytest.raises(ProtocolError) as caught:
        assembler.add_message(_framed(1))
    assert (caught.value.code, caught.value.ref) == ("frames_pending", "m-1")
    assert assembler.pending is None

    assembler.add_message(_framed(1))
    with pytest.raises(ProtocolError) as caught:
        assembler.add_frame(b"12345")
    assert (caught.value.code, caught.value.close_code) == ("frame_too_large", 1009)
    assert assembler.pending is None

    assembler.add_message(_framed(2))
    assembler.add_frame(b"1234")
    with pytest.raises(ProtocolError, match="exceed 6 bytes"):
        assembler.add_frame(b"123")
    assert assembler.pending is None

    with pytest.raises(ProtocolError) as caught:
        FrameAssembler(Limits(max_attachments=1)).add_message(_framed(2))
    assert caught.value.code == "too_many_attachments"


# Rate limits.

def test_token_bucket_bursts_then_refills():
    bucket = TokenBucket(rate=2.0, burst=3, now=100.0)
    assert [bucket.try_acquire(100.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.retry_after(100.0) == pytest.approx(0.5)
    assert not bucket.try_acquire(100.4)
    assert bucket.try_acquire(100.5)
    assert not bucket.try_acquire(100.5)
    assert [bucket.try_acquire(1000.0) for _ in range(4)] == [True, True, True, False]


def test_token_bucket_ignores_time_going_backwards():
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.try_acquire(10.0)
    assert not bucket.try_acquire(5.0)
    assert not bucket.try_acquire(10.5)
    assert bucket.try_acquire(11.0)


def test_token_bucket_rejects_nonsense():
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=2, now=0).try_acquire(0, cost=3)


# Tokens.

def test_token_round_trip():
    token = make_token(SECRET, "alice@example.com", 2_000)
    assert token.startswith("v1.")
    assert verify_token(SECRET, token, now=1_999.5) == "alice@example.com"
    assert verify_token(SECRET.decode(), make_token(SECRET.decode(), "\u00e9", 5), 0) == "\u00e9"


def test_token_uses_compare_digest(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(protocol.tokens.hmac, "compare_digest", spy)
    verify_token(SECRET, make_token(SECRET, "bob", 10), now=0)
    assert len(calls) == 1


def _tampered(token, index, value):
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


_GOOD = make_token(SECRET, "alice", 2_000)


@pytest.mark.parametrize(("secret", "token", "now", "why"), [
    (SECRET, _GOOD, 2_000, "expired"),
    (SECRET, _GOOD, 10**12, "expired"),
    (b"another-secret-of-16", _GOOD, 0, "bad signature"),
    (SECRET, _tampered(_GOOD, 1, "Ym9i"), 0, "bad signature"),
    (SECRET, _tampered(_GOOD, 2, "99999"), 0, "bad signature"),
    (SECRET, _tampered(_GOOD, 3, "AAAA"), 0, "bad signature"),
    (SECRET, _GOOD + "x", 0, "bad signature"),
    (SECRET, _tampered(_GOOD, 0, "v2"), 0, "malformed"),
    (SECRET, _tampered(_GOOD, 2, "-5"), 0, "malformed"),
    (SECRET, _tampered(_GOOD, 1, "a=b"), 0, "malformed"),
    (SECRET, _GOOD + ".x", 0, "malformed"),
    (SECRET, "", 0, "malformed"),
    (SECRET, "v1...", 0, "malformed"),
    (SECRET, "\u00e9" + _GOOD, 0, "malformed"),
    (SECRET, "v1." + "A" * 5000, 0, "malformed"),
    (SECRET, None, 0, "malformed"),
])
def test_token_refusals(secret, token, now, why):
    with pytest.raises(ProtocolError) as caught:
        verify_token(secret, token, now)
    assert (caught.value.code, caught.value.fatal) == ("unauthorized", True)
    assert str(caught.value) == f"token refused: {why}"


@settings(deadline=None)
@given(st.text(max_size=80))
def test_fuzz_verify_token(token):
    with pytest.raises(ProtocolError):
        verify_token(SECRET, token, 0)


def test_make_token_checks_its_arguments():
    with pytest.raises(ValueError):
        make_token(b"short", "alice", 1)
    with pytest.raises(ValueError):
        make_token(SECRET, "", 1)
    with pytest.raises(ValueError):
        make_token(SECRET, "alice", 1.5)  # type: ignore[arg-type]


# Stream entries for resume.

@pytest.mark.parametrize("event", [e for e in SERVER_EXAMPLES
                                   if isinstance(e, (Started, Delta, Done))], ids=repr)
def test_stream_entry_round_trip(event):
    entry = to_stream_entry(event)
    assert (entry.seq, entry.response_id, entry.kind) == (event.seq, event.response_id,
                                                          event.type)
    assert entry.final == isinstance(event, Done)
    json.dumps(dict(entry.data))
    assert from_stream_entry(entry) == event


def test_only_reply_events_go_to_the_stream():
    with pytest.raises(TypeError):
        to_stream_entry(Pong())  # type: ignore[arg-type]


# Sans-I/O.

def test_protocol_does_no_io():
    imported = set()
    for path in _protocol_files():
        tree = ast.parse(path.read_text())
        imported |= {alias.name.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                     if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    assert not imported & {"websockets", "socket", "asyncio", "redis", "ssl", "select"}


# The AsyncAPI document and the prose reference.

@pytest.fixture(scope="module")
def asyncapi():
    return yaml.safe_load((DOCS / "asyncapi.yaml").read_text())


def node_ref_parts(ref):
    assert ref.startswith("#/")
    return ref[2:].split("/")


def _deref(doc, node):
    while isinstance(node, dict) and "$ref" in node:
        target = doc
        for part in node_ref_parts(node["$ref"]):
            target = target[part]
        node = target
    return node


def test_asyncapi_lists_every_event(asyncapi):
    assert asyncapi["asyncapi"].startswith(("2.6", "3."))
    messages = asyncapi["components"]["messages"]
    for name in [*CLIENT_EVENTS, *SERVER_EVENTS]:
        assert name in messages, f"{name} is missing from docs/asyncapi.yaml"
        payload = _deref(asyncapi, messages[name]["payload"])
        assert payload["properties"]["type"] == {"const": name}
    operations = asyncapi["operations"]
    received = {_deref(asyncapi, m)["name"] for m in operations["receiveClientEvents"]["messages"]}
    sent = {_deref(asyncapi, m)["name"] for m in operations["sendServerEvents"]["messages"]}
    assert received == {*CLIENT_EVENTS, "attachmentFrame"}
    assert sent == set(SERVER_EVENTS)


_SCHEMA_EXAMPLES = {**{type(e): e for e in CLIENT_EXAMPLES},
                    **{type(e): e for e in SERVER_EXAMPLES}}
_SCHEMA_EXAMPLES[Hello] = CLIENT_EXAMPLES[3]
_SCHEMA_EXAMPLES[Message] = CLIENT_EXAMPLES[6]
_SCHEMA_EXAMPLES[Ready] = SERVER_EXAMPLES[1]
_SCHEMA_EXAMPLES[Delta] = SERVER_EXAMPLES[5]
_SCHEMA_EXAMPLES[Done] = SERVER_EXAMPLES[7]
_SCHEMA_EXAMPLES[Error] = SERVER_EXAMPLES[9]


@pytest.mark.parametrize("cls", [*CLIENT_EVENTS.values(), *SERVER_EVENTS.values()],
                         ids=lambda c: c.type)
def test_asyncapi_schema_matches_the_dataclass(asyncapi, cls):
    schema = _deref(asyncapi, asyncapi["components"]["messages"][cls.type]["payload"])
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(schema["properties"]) == fields | {"type"}
    assert schema["additionalProperties"] is False
    # "required" in the schema is exactly what the parser insists on.
    parse = parse_client_event if cls.type in CLIENT_EVENTS else parse_server_event
    full = json.loads(serialize(_SCHEMA_EXAMPLES[cls]))
    assert set(full) == fields | {"type"}
    required = {"type"}
    for name in fields:
        try:
            parse(json.dumps({k: v for k, v in full.items() if k != name}))
        except ProtocolError as exc:
            if exc.code == "missing_field":
                required.add(name)
    assert set(schema["required"]) == required


@pytest.mark.parametrize("cls", [WireAttachment, ModalityInfo, Limits, Usage],
                         ids=lambda c: c.__name__)
def test_asyncapi_nested_schemas_match(asyncapi, cls):
    schema = asyncapi["components"]["schemas"][cls.__name__]
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    assert set(schema.get("required", [])) == required


def test_asyncapi_limits_defaults_match(asyncapi):
    schema = asyncapi["components"]["schemas"]["Limits"]["properties"]
    assert {k: v["default"] for k, v in schema.items()} == dataclasses.asdict(DEFAULT_LIMITS)


def test_asyncapi_error_codes_match(asyncapi):
    codes = asyncapi["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
    assert sorted(codes) == sorted(ERROR_CODES)


def test_asyncapi_examples_parse(asyncapi):
    for name, message in asyncapi["components"]["messages"].items():
        for example in message.get("examples", []):
            text = json.dumps(example["payload"])
            parse = parse_client_event if name in CLIENT_EVENTS else parse_server_event
            event = parse(text)
            assert event.type == name
            assert parse(serialize(event)) == event


def test_protocol_md_documents_everything():
    text = (DOCS / "protocol.md").read_text()
    for name in [*CLIENT_EVENTS, *SERVER_EVENTS]:
        assert f"### `{name}`" in text, f"docs/protocol.md has no section for {name}"
    table = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9_]+)` \|", text, re.MULTILINE)}
    assert set(ERROR_CODES) <= table
    for code in ("1001", "1008", "1009", "1011"):
        assert f"| {code} |" in text
    for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL):
        obj = json.loads(block.replace("\u2026", ""))
        parse = parse_client_event if obj["type"] in CLIENT_EVENTS else parse_server_event
        assert parse(json.dumps(obj)).type == obj["type"]

