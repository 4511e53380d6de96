// Unit tests of mmchat.js against a fake WebSocket, run in Chromium by tests/test_web.py:
// run() returns one {name, ok, error} per test. Waits are for conditions, never sleeps.
import { MMChat, MMChatError } from "/mmchat.js";

const LIMITS = { max_event_bytes: 1048576, max_attachments: 2, max_attachment_bytes: 300000,
                 max_message_bytes: 400000, messages_per_second: 1, burst: 5 };
const MODALITIES = [{ name: "image", mime_types: ["image/png"], max_bytes: 200000 },
                    { name: "voice", mime_types: ["audio/wav"], max_bytes: 200000 }];

/** A fake server: every socket the client opens, and what it sent. */
class FakeServer {
  constructor({ onHello } = {}) {
    this.sockets = [];
    this.hellos = [];
    this.onHello = onHello ?? ((socket, hello) => socket.emit({
      type: "ready", session_id: "s-1", version: "1", modalities: MODALITIES,
      resumed: !!hello.session_id, limits: LIMITS }));
    const server = this;
    this.WebSocket = class {
      constructor(url) {
        this.url = url;
        this.sent = [];
        this.readyState = 0;
        server.sockets.push(this);
        queueMicrotask(() => { this.readyState = 1; this.onopen?.(); });
      }
      send(data) {
        if (this.readyState !== 1) throw new Error("send on a closed socket");
        const frame = typeof data === "string" ? JSON.parse(data) : data;
        this.sent.push(frame);
        if (frame.type === "hello") { server.hellos.push(frame); server.onHello(this, frame); }
      }
      close(code = 1000, reason = "") { this.drop(code, reason); }
      drop(code = 1006, reason = "") {
        if (this.readyState === 3) return;
        this.readyState = 3;
        this.onclose?.({ code, reason });
      }
      emit(event) { this.onmessage?.({ data: JSON.stringify(event) }); }
      messages() { return this.sent.filter((f) => f.type === "message"); }
    };
  }
  get last() { return this.sockets[this.sockets.length - 1]; }
}

async function until(check, what) {
  for (let i = 0; i < 2000; i++) {
    if (check()) return;
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  throw new Error(`never happened: ${what}`);
}

function assertEqual(got, want, what) {
  const a = JSON.stringify(got), b = JSON.stringify(want);
  if (a !== b) throw new Error(`${what}: got ${a}, want ${b}`);
}

const connect = (server, options = {}) => MMChat.connect("ws://fake/", {
  WebSocket: server.WebSocket, backoff: { initialMs: 1, maxMs: 5 }, ...options });

async function collect(reply) {
  const texts = [];
  for await (const delta of reply) texts.push(delta.text);
  return texts;
}

const tests = {
  async "deltas come out in seq order when frames arrive out of order"() {
    const server = new FakeServer();
    const chat = await connect(server);
    const reply = chat.send({ text: "hi" });
    await until(() => server.last.messages().length === 1, "message sent");
    const id = server.last.messages()[0].id;
    const s = server.last;
    s.emit({ type: "started", id, response_id: "r-1", seq: 1 });
    s.emit({ type: "delta", response_id: "r-1", seq: 3, text: "b" });
    s.emit({ type: "delta", response_id: "r-1", seq: 2, text: "a" });
    s.emit({ type: "done", response_id: "r-1", seq: 4, text: "ab", finish_reason: "stop" });
    assertEqual(await collect(reply), ["a", "b"], "deltas");
    assertEqual(reply.deltas.map((d) => d.seq), [2, 3], "seqs");
    assertEqual(chat.lastSeq, 4, "last seq");
  },

  async "coalesced deltas: asked for in every hello, and in seq order by their first seq"() {
    const server = new FakeServer();
    const chat = await connect(server, { coalesce: 8 });
    const reply = chat.send({ text: "hi" });
    await until(() => server.last.messages().length === 1, "message sent");
    assertEqual(server.hellos[0], { type: "hello", version: "1", coalesce: 8 }, "hello");
    const id = server.last.messages()[0].id;
    const s = server.last;
    s.emit({ type: "started", id, response_id: "r-1", seq: 1 });
    s.emit({ type: "delta", response_id: "r-1", seq: 6, first_seq: 3, text: " cat on a mat" });
    assertEqual(chat.lastSeq, 1, "held after the gap");
    s.emit({ type: "delta", response_id: "r-1", seq: 2, text: "A" });
    assertEqual(chat.lastSeq, 6, "the coalesced delta followed the one it waited for");
    s.emit({ type: "done", response_id: "r-1", seq: 7, text: "A cat on a mat", finish_reason: "stop" });
    assertEqual(await collect(reply), ["A", " cat on a mat"], "deltas");
    s.drop(1006);
    await until(() => server.hellos.length === 2, "hello again");
    assertEqual(server.hellos[1], { type: "hello", version: "1", coalesce: 8,
                                    session_id: "s-1", last_seq: 7 }, "resume hello");
  },

  async "a resume asks from the last seq and duplicate deltas are dropped"() {
    const server = new FakeServer();
    const chat = await connect(server);
    const states = [];
    chat.addEventListener("status", (ev) => states.push(ev.detail));
    const reply = chat.send({ text: "hello" });
    await until(() => server.last.messages().length === 1, "message sent");
    const id = server.last.messages()[0].id;
    server.last.emit({ type: "started", id, response_id: "r-1", seq: 1 });
    server.last.emit({ type: "delta", response_id: "r-1", seq: 2, text: "He" });
    server.last.drop(1006);
    await until(() => server.hellos.length === 2, "hello again");
    assertEqual(server.hellos[1], { type: "hello", version: "1", session_id: "s-1", last_seq: 2 },
                "resume hello");
    assertEqual(server.last.messages().length, 0, "started message not sent again");
    server.last.emit({ type: "delta", response_id: "r-1", seq: 2, text: "He" });
    server.last.emit({ type: "delta", response_id: "r-1", seq: 3, text: "llo" });
    server.last.emit({ type: "delta", response_id: "r-1", seq: 3, text: "llo" });
    server.last.emit({ type: "done", response_id: "r-1", seq: 4, text: "Hello", finish_reason: "stop" });
    assertEqual(await collect(reply), ["He", "llo"], "deltas");
    assertEqual(states, [{ state: "reconnecting", resumed: false },
                         { state: "connected", resumed: true }], "status events");
  },

  async "a message that never started is sent again under its id, without a second reply"() {
    const server = new FakeServer();
    const chat = await connect(server);
    const reply = chat.send({ text: "once" });
    await until(() => server.last.messages().length === 1, "message sent");
    const first = server.last.messages()[0];
    server.last.drop(1006);
    await until(() => server.sockets.length === 2 && server.last.messages().length === 1,
                "message sent again");
    assertEqual(server.last.messages()[0], first, "the same message");
    server.last.emit({ type: "error", code: "duplicate_message", message: "taken",
                       ref: first.id, fatal: false });
    server.last.emit({ type: "started", id: first.id, response_id: "r-1", seq: 1 });
    server.last.emit({ type: "done", response_id: "r-1", seq: 2, text: "", finish_reason: "stop" });
    const done = await reply.finished;
    assertEqual([done.seq, reply.errors.length, reply.failure], [2, 0, null], "one reply");
  },

  async "error events: refusals reject the reply, mid-reply errors are kept, others go to the chat"() {
    const server = new FakeServer();
    const chat = await connect(server);
    const refused = chat.send({ text: "a" });
    await until(() => server.last.messages().length === 1, "first sent");
    const a = server.last.messages()[0].id;
    server.last.emit({ type: "error", code: "rate_limited", message: "slow down", ref: a, fatal: false });
    let caught = null;
    try { await collect(refused); } catch (err) { caught = err; }
    assertEqual([caught instanceof MMChatError, caught && caught.code], [true, "rate_limited"], "refusal");
    const failing = chat.send({ text: "b" });
    await until(() => server.last.messages().length === 2, "second sent");
    const b = server.last.messages()[1].id;
    server.last.emit({ type: "started", id: b, response_id: "r-2", seq: 1 });
    server.last.emit({ type: "error", code: "plugin_error", message: "boom", ref: b, fatal: false });
    server.last.emit({ type: "done", response_id: "r-2", seq: 2, text: "", finish_reason: "error" });
    const done = await failing.finished;
    assertEqual([done.finish_reason, failing.errors.map((e) => e.code)], ["error", ["plugin_error"]],
                "error during a reply");
    const others = [];
    chat.addEventListener("error", (ev) => others.push(ev.detail.code));
    server.last.emit({ type: "error", code: "malformed_json", message: "?", ref: null, fatal: false });
    assertEqual(others, ["malformed_json"], "chat errors");
  },

  async "limits from ready are checked before sending; big attachments go in binary frames"() {
    const server = new FakeServer();
    const chat = await connect(server);
    const big = new Uint8Array(250000);
    const tooLarge = chat.send({ text: "x", attachments: [{ data: big, mimeType: "image/png" }] });
    const odd = chat.send({ text: "x", attachments: [new Blob(["GIF89a"], { type: "image/gif" })] });
    const many = chat.send({ text: "x", attachments: [1, 2, 3].map(() => ({ data: new Uint8Array(3), mimeType: "image/png" })) });
    const codes = [];
    for (const reply of [tooLarge, odd, many]) {
      try { await reply.finished; } catch (err) { codes.push([err.code, err.local]); }
    }
    assertEqual(codes, [["media_too_large", true], ["unsupported_media", true],
                        ["too_many_attachments", true]], "local refusals");
    const picture = new Uint8Array(100000).fill(7);
    chat.send({ text: "look", attachments: [new Blob([picture], { type: "image/png" })] });
    chat.send({ text: "small", attachments: [{ data: new Uint8Array([1, 2, 3]), mimeType: "audio/wav" }] });
    await until(() => server.last.messages().length === 2, "sent");
    const [framed, inline] = server.last.messages();
    assertEqual(framed.attachments, [{ mime_type: "image/png", frame: 0 }], "binary attachment");
    const binary = server.last.sent[server.last.sent.indexOf(framed) + 1];
    assertEqual([binary instanceof Uint8Array, binary.length, binary[0]], [true, 100000, 7], "frame");
    assertEqual(inline.attachments, [{ mime_type: "audio/wav", data: "AQID" }], "inline attachment");
  },

  async "an unauthorized hello rejects connect and is not retried"() {
    const server = new FakeServer({ onHello: (socket) => {
      socket.emit({ type: "error", code: "unauthorized", message: "no token", ref: "hello", fatal: true });
      socket.drop(1008);
    } });
    let caught = null;
    try { await connect(server); } catch (err) { caught = err; }
    assertEqual([caught && caught.code, server.sockets.length], ["unauthorized", 1], "refused");
  },

  async "a gap the server announced with resume_unavailable is not waited for"() {
    const server = new FakeServer();
    const chat = await connect(server, { reorderMs: 60000 });
    chat.send({ text: "x" });
    await until(() => server.last.messages().length === 1, "sent");
    const id = server.last.messages()[0].id;
    server.last.emit({ type: "started", id, response_id: "r-1", seq: 1 });
    server.last.drop(1006);
    await until(() => server.hellos.length === 2, "resumed");
    const replies = [];
    chat.addEventListener("reply", (ev) => replies.push(ev.detail));
    server.last.emit({ type: "error", code: "resume_unavailable", message: "gone", ref: "hello", fatal: false });
    server.last.emit({ type: "done", response_id: "r-1", seq: 9, text: "late", finish_reason: "stop" });
    assertEqual(chat.lastSeq, 9, "took the event after the gap");
    server.last.emit({ type: "started", id: "other", response_id: "r-2", seq: 10 });
    assertEqual(replies.map((r) => r.id), ["other"], "a reply sent from elsewhere");
  },

  async "messages are paced to the rate limit, not sent to be refused"() {
    const slow = { ...LIMITS, messages_per_second: 2, burst: 1 };
    const server = new FakeServer({ onHello: (socket) => socket.emit({
      type: "ready", session_id: "s-1", version: "1", modalities: MODALITIES, resumed: false,
      limits: slow }) });
    const chat = await connect(server);
    for (const text of ["one", "two", "three"]) chat.send({ text });
    await until(() => server.last.messages().length >= 1, "first sent");
    assertEqual(server.last.messages().length, 1, "the burst only");  // the next needs ~0.55 s
    await until(() => server.last.messages().length === 3, "all sent");
    assertEqual(server.last.messages().map((m) => m.text), ["one", "two", "three"], "in order");
  },

  async "cancel and ping"() {
    const server = new FakeServer();
    const chat = await connect(server);
    const reply = chat.send({ text: "x", id: "m-1" });
    reply.cancel();
    await until(() => server.last.sent.some((f) => f.type === "cancel"), "cancel sent");
    assertEqual(server.last.sent.filter((f) => f.type !== "hello").map((f) => f.type),
                ["message", "cancel"], "order");
    assertEqual(server.last.sent.find((f) => f.type === "cancel"), { type: "cancel", id: "m-1" }, "cancel");
    const pong = chat.ping("n-1");
    server.last.emit({ type: "pong", nonce: "n-1" });
    assertEqual(await pong, { type: "pong", nonce: "n-1" }, "pong");
  },
};

export async function run() {
  const results = [];
  for (const [name, test] of Object.entries(tests)) {
    try {
      await test();
      results.push({ name, ok: true, error: null });
    } catch (err) {
      results.push({ name, ok: false, error: String(err && err.stack || err) });
    }
  }
  return results;
}
