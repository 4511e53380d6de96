// mmchat.js: the reference JavaScript client for the mmchat WebSocket protocol
// (docs/protocol.md, version 1). A plain ES module: no build step, no dependencies.
//
//   import { MMChat } from "./mmchat.js";
//   const chat = await MMChat.connect("ws://127.0.0.1:8765/", { token });
//   const reply = chat.send({ text: "what colour is the circle?", attachments: [file] });
//   for await (const delta of reply) out.append(delta.text);
//   const done = await reply.finished;   // full text, finish_reason, attention, timings
//
// A dropped connection is resumed on its own, with backoff, from the last seq seen:
// replies carry on and nothing is delivered twice. Messages that had not started are
// sent again under the same id, so the server never answers one twice.

export const PROTOCOL_VERSION = "1";
/** Attachments bigger than this (all together) go in binary frames. */
export const BINARY_THRESHOLD = 64 * 1024;
/** Close codes after which reconnecting would be refused again (policy violation). */
const NO_RECONNECT = new Set([1008]);
/** How many times a message that never started is sent before it fails. */
const MAX_SENDS = 4;

/**
 * @typedef {object} Limits
 * @property {number} max_event_bytes
 * @property {number} max_attachments
 * @property {number} max_attachment_bytes
 * @property {number} max_message_bytes
 * @property {number} messages_per_second
 * @property {number} burst
 *
 * @typedef {{name: string, mime_types: string[], max_bytes: number}} Modality
 * @typedef {{type: "ready", session_id: string, version: string, modalities: Modality[],
 *            resumed: boolean, limits: Limits, coalesce?: number}} ReadyEvent
 * @typedef {{type: "started", id: string, response_id: string, seq: number}} StartedEvent
 * @typedef {{type: "delta", response_id: string, seq: number, text: string,
 *            first_seq?: number}} DeltaEvent a coalesced delta stands for first_seq..seq
 * @typedef {{type: "done", response_id: string, seq: number, text: string,
 *            finish_reason: "stop"|"length"|"cancelled"|"error",
 *            usage?: {prompt_tokens: number, completion_tokens: number},
 *            attention?: Object<string, number>, timings?: Object<string, number>}} DoneEvent
 * @typedef {{type: "error", code: string, message: string, ref?: string|null,
 *            fatal?: boolean}} ErrorEvent
 *
 * @typedef {object} AttachmentInput A picture or a sound: a Blob (a File) or bytes.
 * @property {Blob|ArrayBuffer|Uint8Array} data
 * @property {string} [mimeType] defaults to the Blob's type
 * @property {string} [modality] the modality that should take it (optional)
 *
 * @typedef {object} ConnectOptions
 * @property {string|null} [token] access token, when the server asks for one
 * @property {string|null} [sessionId] reattach this session
 * @property {number} [lastSeq] with sessionId: replay what came after this seq
 * @property {boolean} [reconnect=true] resume on its own after a dropped connection
 * @property {{initialMs?: number, maxMs?: number, factor?: number}} [backoff]
 * @property {number} [openTimeoutMs=10000]
 * @property {number} [reorderMs=2000] how long an event after a gap in seq waits
 * @property {number|null} [coalesce] the most tokens one delta may carry after a reply's
 *   first (fewer frames; docs/protocol.md, "Coalesced deltas"); null: the server's default
 * @property {typeof WebSocket} [WebSocket] a WebSocket class (tests pass a fake)
 */

/** An error event from the server, or a problem found before sending. */
export class MMChatError extends Error {
  /**
   * @param {string} code a protocol error code, or connection_lost / cannot_connect
   * @param {string} message
   * @param {{ref?: string|null, fatal?: boolean, local?: boolean}} [more]
   */
  constructor(code, message, { ref = null, fatal = false, local = false } = {}) {
    super(message);
    this.name = "MMChatError";
    this.code = code;
    this.ref = ref;
    this.fatal = fatal;
    /** True when the client refused it before sending (limits, empty message). */
    this.local = local;
  }

  /** @param {ErrorEvent} event */
  static fromEvent(event) {
    return new MMChatError(event.code, event.message, { ref: event.ref ?? null,
                                                         fatal: !!event.fatal });
  }
}

/** A random id from the protocol's alphabet (works outside secure contexts too). */
export function newId(prefix = "m-") {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return prefix + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/** @param {Uint8Array} bytes */
export function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(text);
}

/**
 * One reply: an async iterator of its deltas, and an EventTarget ("started", "delta",
 * "done", "error"). `finished` resolves with the done event, or rejects with an
 * MMChatError when the message was refused. Errors during a reply are kept in `errors`
 * (a done with finish_reason "error" follows them).
 */
export class Reply extends EventTarget {
  /** @param {MMChat} chat @param {string|null} id */
  constructor(chat, id) {
    super();
    this.chat = chat;
    /** The message id (null for a reply this client did not ask for). */
    this.id = id;
    /** @type {string|null} */ this.responseId = null;
    /** @type {StartedEvent|null} */ this.started = null;
    /** @type {DeltaEvent[]} */ this.deltas = [];
    /** @type {DoneEvent|null} */ this.done = null;
    /** @type {MMChatError[]} */ this.errors = [];
    /** @type {MMChatError|null} the error that refused the message */
    this.failure = null;
    this._queue = [];
    this._wake = null;
    /** @type {Promise<DoneEvent>} */
    this.finished = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.finished.catch(() => {});
  }

  /** The text streamed so far (all of it once done). */
  get text() {
    return this.done ? this.done.text : this.deltas.map((d) => d.text).join("");
  }

  /** Ask the server to stop this reply; it still ends with a done ("cancelled"). */
  cancel() {
    if (this.id !== null) this.chat.cancel(this.id);
  }

  /** @param {StartedEvent|DeltaEvent|DoneEvent|MMChatError} item */
  _feed(item) {
    if (this.done || this.failure) return;
    if (item instanceof MMChatError) {
      if (this.started && !item.fatal) {
        this.errors.push(item);
        this.dispatchEvent(new CustomEvent("error", { detail: item }));
        return;
      }
      if (this.started && item.code !== "connection_lost") {
        this.errors.push(item);  // a fatal error mid-reply: the resume brings its done
        this.dispatchEvent(new CustomEvent("error", { detail: item }));
        return;
      }
      this.failure = item;
      this._reject(item);
    } else if (item.type === "started") {
      this.started = item;
      this.responseId = item.response_id;
    } else if (item.type === "delta") {
      this.deltas.push(item);
    } else if (item.type === "done") {
      this.done = item;
      this._resolve(item);
    }
    const name = item instanceof MMChatError ? "error" : item.type;
    this.dispatchEvent(new CustomEvent(name, { detail: item }));
    this._queue.push(item);
    if (this._wake) this._wake();
  }

  /** @returns {AsyncGenerator<DeltaEvent, DoneEvent, void>} */
  async *[Symbol.asyncIterator]() {
    for (;;) {
      while (this._queue.length === 0) {
        await new Promise((resolve) => { this._wake = resolve; });
        this._wake = null;
      }
      const item = this._queue.shift();
      if (item instanceof MMChatError) throw item;
      if (item.type === "delta") yield item;
      if (item.type === "done") return item;
    }
  }
}

/**
 * One conversation with an mmchat server. Events: "status" ({state, resumed}),
 * "ready" (the ready event), "error" (an MMChatError that belongs to no reply),
 * "notice" (a non-fatal error that came with a hello, such as unknown_session),
 * "reply" (a Reply this client did not ask for: sent by another connection).
 */
export class MMChat extends EventTarget {
  /**
   * Connect and say hello. Rejects with an MMChatError when the server cannot be
   * reached (cannot_connect) or refuses the hello (unauthorized, forbidden ...).
   * @param {string} url ws:// or wss:// URL of `mmchat serve`
   * @param {ConnectOptions} [options]
   * @returns {Promise<MMChat>}
   */
  static async connect(url, options = {}) {
    const chat = new MMChat(url, options);
    await chat._open();
    chat._setState("connected", false);
    return chat;
  }

  /** @param {string} url @param {ConnectOptions} [options] */
  constructor(url, options = {}) {
    super();
    this.url = url;
    this.token = options.token ?? null;
    /** @type {string|null} keep it to reattach the session later */
    this.sessionId = options.sessionId ?? null;
    /** The highest reply-event seq received; a resume asks for what follows it. */
    this.lastSeq = options.lastSeq ?? 0;
    this.reconnect = options.reconnect ?? true;
    this.backoff = { initialMs: 250, maxMs: 8000, factor: 2, ...options.backoff };
    this.openTimeoutMs = options.openTimeoutMs ?? 10000;
    this.reorderMs = options.reorderMs ?? 2000;
    this.coalesce = options.coalesce ?? null;
    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    /** @type {"connecting"|"connected"|"reconnecting"|"closed"} */
    this.state = "connecting";
    /** @type {ReadyEvent|null} */ this.ready = null;
    /** @type {MMChatError[]} */ this.notices = [];
    /** @type {WebSocket|null} */ this._ws = null;
    /** @type {Map<string, Reply>} by message id, until done */
    this._pending = new Map();
    /** @type {Map<string, Reply>} by response id, until done */
    this._byResponse = new Map();
    this._finished = new Set();
    this._held = new Map();  // (first) seq -> event that came after a gap
    this._gapOk = true;
    this._reorderTimer = null;
    this._pings = new Map();
    this._cancels = [];
    this._sendChain = Promise.resolve();
    this._closing = false;
    this._tokens = 0;  // the rate limit's token bucket, filled by each ready
    this._tokensAt = 0;
  }

  /** @returns {Limits|null} */
  get limits() { return this.ready ? this.ready.limits : null; }

  /** @returns {Modality[]} */
  get modalities() { return this.ready ? this.ready.modalities : []; }

  get connected() { return this.state === "connected"; }

  // -- connecting ---------------------------------------------------------------------

  _setState(state, resumed) {
    this.state = state;
    this.dispatchEvent(new CustomEvent("status", { detail: { state, resumed } }));
  }

  /** Open a socket, say hello (resuming when there is a session), wait for ready. */
  _open() {
    return new Promise((resolve, reject) => {
      let ws;
      try {
        ws = new this._WebSocket(this.url);
      } catch (err) {
        reject(new MMChatError("cannot_connect", `cannot connect to ${this.url}: ${err}`));
        return;
      }
      ws.binaryType = "arraybuffer";
      const notices = [];
      let settled = false;
      const fail = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        try { ws.close(); } catch { /* already closed */ }
        reject(err);
      };
      const timer = setTimeout(() => fail(new MMChatError(
        "cannot_connect", `no answer from ${this.url}`)), this.openTimeoutMs);
      ws.onopen = () => {
        const hello = { type: "hello", version: PROTOCOL_VERSION };
        if (this.token) hello.token = this.token;
        if (this.coalesce !== null) hello.coalesce = this.coalesce;
        if (this.sessionId) {
          hello.session_id = this.sessionId;
          hello.last_seq = this.lastSeq;
        }
        ws.send(JSON.stringify(hello));
      };
      ws.onclose = (ev) => fail(new MMChatError(
        "cannot_connect", `cannot connect to ${this.url} (close ${ev.code})`));
      ws.onmessage = (msg) => {
        const event = parseEvent(msg.data);
        if (event === null) return;
        if (event.type === "error") {
          const err = MMChatError.fromEvent(event);
          // unknown_session comes with a new session; other hello errors
          // (store_unavailable, say) mean there is no session yet.
          if (event.fatal || (event.ref === "hello" && event.code !== "unknown_session")) {
            fail(err);
          } else {
            notices.push(err);
          }
          return;
        }
        if (event.type !== "ready") return;
        settled = true;
        clearTimeout(timer);
        if (event.session_id !== this.sessionId) {
          this.lastSeq = 0;  // a new session numbers from 1
          this._loseStartedReplies();
        }
        this.sessionId = event.session_id;
        this.ready = event;
        this._tokens = event.limits.burst;  // the server's bucket is per connection
        this._tokensAt = performance.now();
        this.notices = notices;
        this._ws = ws;
        ws.onmessage = (m) => this._receive(ws, m.data);
        ws.onclose = (ev) => this._lost(ws, ev.code, ev.reason);
        this.dispatchEvent(new CustomEvent("ready", { detail: event }));
        for (const notice of notices) {
          this.dispatchEvent(new CustomEvent("notice", { detail: notice }));
        }
        this._resendPending();
        resolve(event);
      };
    });
  }

  _lost(ws, code, reason) {
    if (ws !== this._ws) return;
    this._ws = null;
    for (const [nonce, ping] of this._pings) {
      ping.reject(new MMChatError("connection_lost", "connection closed"));
      this._pings.delete(nonce);
    }
    if (this._closing || !this.reconnect || NO_RECONNECT.has(code)) {
      this._giveUp(new MMChatError("connection_lost",
                                   `connection closed (${code} ${reason || ""})`.trim()));
      return;
    }
    this._setState("reconnecting", false);
    this._reconnectLoop();
  }

  async _reconnectLoop() {
    const { initialMs, maxMs, factor } = this.backoff;
    for (let attempt = 0; !this._closing; attempt++) {
      const delay = Math.min(maxMs, initialMs * factor ** attempt);
      await new Promise((resolve) => setTimeout(resolve, delay * (0.5 + Math.random() / 2)));
      if (this._closing) return;
      try {
        const ready = await this._open();
        this._setState("connected", ready.resumed);
        return;
      } catch (err) {
        if (err.code !== "cannot_connect" && !RETRY_CODES.has(err.code)) {
          this._giveUp(err);
          return;
        }
      }
    }
  }

  /** No more reconnecting: replies still waiting fail, pings fail. */
  _giveUp(err) {
    this._setState("closed", false);
    for (const reply of new Set([...this._pending.values(), ...this._byResponse.values()])) {
      reply._feed(new MMChatError("connection_lost", err.message));
    }
    this._pending.clear();
    this._byResponse.clear();
    if (err.code !== "connection_lost" || !this._closing) {
      this.dispatchEvent(new CustomEvent("error", { detail: err }));
    }
  }

  /** A new session after a resume: replies of the old one will not go on. */
  _loseStartedReplies() {
    for (const reply of this._byResponse.values()) {
      reply._feed(new MMChatError("reply_lost", "the session was lost; the reply stopped"));
      if (reply.id !== null) this._pending.delete(reply.id);
    }
    this._byResponse.clear();
    this._held.clear();
    this._gapOk = true;
  }

  /** Close the connection for good. */
  close() {
    this._closing = true;
    const ws = this._ws;
    this._ws = null;
    this._giveUp(new MMChatError("connection_lost", "closed by the client"));
    if (ws) ws.close(1000, "bye");
  }

  // -- sending ------------------------------------------------------------------------

  /**
   * Send a message. Returns its Reply at once; iterate it for deltas. Messages go out in
   * order, paced to the server's rate limit (its ready's messages_per_second and burst).
   * Attachments go in binary frames when together over 64 KiB (or when `binary` is
   * true), else inline as base64. Attachments over the server's announced limits fail
   * the reply with too_many_attachments, unsupported_media or media_too_large, without
   * sending.
   * @param {{text?: string, attachments?: (AttachmentInput|Blob)[], id?: string,
   *          binary?: boolean}} message
   * @returns {Reply}
   */
  send({ text = "", attachments = [], id = newId(), binary } = {}) {
    if (this._pending.has(id)) throw new Error(`message ${id} is already waiting for its reply`);
    const reply = new Reply(this, id);
    this._pending.set(id, reply);
    reply._sends = 0;
    this._sendChain = this._sendChain.then(async () => {
      try {
        reply._frames = await this._encode(id, text, attachments, binary);
      } catch (err) {
        this._pending.delete(id);
        reply._feed(err instanceof MMChatError ? err
          : new MMChatError("bad_input", String(err), { ref: id, local: true }));
        return;
      }
      await this._paced();
      this._transmit(reply);
    });
    return reply;
  }

  /** Wait for the rate limit's bucket (ready's messages_per_second and burst, with a
   * margin) to hold a token, and take it: a busy sender is slowed, not refused. */
  async _paced() {
    const limits = this.limits;
    if (!limits) return;
    const rate = limits.messages_per_second * 0.9 / 1000;  // tokens per ms
    for (;;) {
      const now = performance.now();
      this._tokens = Math.min(limits.burst, this._tokens + (now - this._tokensAt) * rate);
      this._tokensAt = now;
      if (this._tokens >= 1) break;
      await new Promise((resolve) => setTimeout(resolve, (1 - this._tokens) / rate));
    }
    this._tokens -= 1;
  }

  /** The frames of a message: its JSON, then its binary frames (checked against limits). */
  async _encode(id, text, attachments, binary) {
    const items = [];
    for (const a of attachments) {
      const att = a instanceof Blob ? { data: a } : a;
      const data = att.data instanceof Blob ? new Uint8Array(await att.data.arrayBuffer())
        : new Uint8Array(att.data instanceof ArrayBuffer ? att.data : att.data.buffer,
                         att.data.byteOffset ?? 0, att.data.byteLength);
      const mimeType = att.mimeType || (att.data instanceof Blob ? att.data.type : "");
      items.push({ data, mimeType, modality: att.modality });
    }
    this._check(id, text, items);
    const total = items.reduce((n, a) => n + a.data.length, 0);
    const limit = this.limits ? this.limits.max_event_bytes : Infinity;
    const inline = text.length * 3 + Math.ceil(total / 3) * 4 + 1024 * (items.length + 1);
    const useFrames = binary ?? (total > BINARY_THRESHOLD || inline > limit);
    const message = { type: "message", id, text };
    if (items.length) {
      message.attachments = items.map((a, i) => {
        const wire = { mime_type: a.mimeType };
        if (a.modality) wire.modality = a.modality;
        if (useFrames) wire.frame = i; else wire.data = toBase64(a.data);
        return wire;
      });
    }
    return [JSON.stringify(message), ...(useFrames ? items.map((a) => a.data) : [])];
  }

  /** Refuse locally what the server's ready says it would refuse. */
  _check(id, text, items) {
    const fail = (code, message) => { throw new MMChatError(code, message, { ref: id, local: true }); };
    if (!text && items.length === 0) fail("empty_message", "the message has neither text nor attachments");
    const limits = this.limits;
    if (!limits) return;
    if (items.length > limits.max_attachments) {
      fail("too_many_attachments", `at most ${limits.max_attachments} attachments per message`);
    }
    let total = 0;
    for (const a of items) {
      total += a.data.length;
      const modality = this.modalities.find((m) => (a.modality ? m.name === a.modality
        : m.mime_types.includes(a.mimeType)));
      if (!modality || !modality.mime_types.includes(a.mimeType)) {
        fail("unsupported_media", `the server takes no ${a.mimeType || "untyped"} attachments`);
      }
      const max = Math.min(modality.max_bytes || Infinity, limits.max_attachment_bytes);
      if (a.data.length > max) {
        fail("media_too_large", `a ${a.mimeType} attachment of ${a.data.length} bytes is over ` +
             `the server's limit of ${max} bytes`);
      }
    }
    if (total > limits.max_message_bytes) {
      fail("media_too_large", `attachments of ${total} bytes together are over the server's ` +
           `limit of ${limits.max_message_bytes} bytes`);
    }
  }

  /** Send a prepared message now if connected (else the reconnect sends it). */
  _transmit(reply) {
    if (this.state === "closed" && !reply.started) {
      this._pending.delete(reply.id);
      reply._feed(new MMChatError("connection_lost", "not connected", { ref: reply.id }));
      return;
    }
    const ws = this._ws;
    if (!ws || !reply._frames || reply.started || reply.failure) return;
    if (reply._sends >= MAX_SENDS) {
      this._pending.delete(reply.id);
      reply._feed(new MMChatError("connection_lost", "the message could not be delivered",
                                  { ref: reply.id }));
      return;
    }
    reply._sends += 1;
    for (const frame of reply._frames) ws.send(frame);
  }

  /** After a reconnect: messages that never started go again (same ids), then cancels. */
  _resendPending() {
    for (const reply of this._pending.values()) this._transmit(reply);
    const cancels = this._cancels;
    this._cancels = [];
    for (const id of cancels) this.cancel(id);
  }

  /**
   * Stop the reply to message `id` (whatever runs when absent).
   * @param {string} [id]
   */
  cancel(id) {
    if (!this._ws) {
      if (!this._closing) this._cancels.push(id);
      return;
    }
    // after the message itself, which may still be reading its attachments
    this._sendChain = this._sendChain.then(() => {
      if (!this._ws) { this._cancels.push(id); return; }
      this._ws.send(JSON.stringify(id ? { type: "cancel", id } : { type: "cancel" }));
    });
  }

  /**
   * A protocol ping; resolves with the pong.
   * @param {string} [nonce] @param {number} [timeoutMs]
   * @returns {Promise<{type: "pong", nonce: string}>}
   */
  ping(nonce = newId("p-"), timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      if (!this._ws) { reject(new MMChatError("connection_lost", "not connected")); return; }
      const timer = setTimeout(() => {
        this._pings.delete(nonce);
        reject(new MMChatError("timeout", "no pong"));
      }, timeoutMs);
      this._pings.set(nonce, {
        resolve: (pong) => { clearTimeout(timer); resolve(pong); },
        reject: (err) => { clearTimeout(timer); reject(err); },
      });
      this._ws.send(JSON.stringify({ type: "ping", nonce }));
    });
  }

  // -- receiving ----------------------------------------------------------------------

  _receive(ws, data) {
    if (ws !== this._ws) return;
    const event = parseEvent(data);
    if (event === null) return;
    if (event.type === "started" || event.type === "delta" || event.type === "done") {
      this._ordered(event);
    } else if (event.type === "error") {
      this._error(event);
    } else if (event.type === "pong") {
      const ping = this._pings.get(event.nonce);
      if (ping) { this._pings.delete(event.nonce); ping.resolve(event); }
    }
  }

  /** Hand seq events over in seq order: drop ones already had, hold ones after a gap.
   * A coalesced delta stands for the seqs first_seq..seq: it follows lastSeq when its
   * first_seq does, and is held under its first_seq. */
  _ordered(event) {
    const rid = event.response_id;
    const first = event.first_seq ?? event.seq;
    if (event.seq <= this.lastSeq) {
      if (this._byResponse.has(rid) || this._finished.has(rid)) return;  // had it already
      // a lower seq of a reply never seen: the session's stream started over
      this._deliver(event);
      return;
    }
    if (first > this.lastSeq + 1 && this.lastSeq > 0 && !this._gapOk) {
      this._held.set(first, event);
      if (!this._reorderTimer) {
        this._reorderTimer = setTimeout(() => this._skipGap(), this.reorderMs);
      }
      return;
    }
    this._gapOk = false;
    this._deliver(event);
    this._releaseHeld();
  }

  _releaseHeld() {
    let next;
    while ((next = this._held.get(this.lastSeq + 1))) {
      this._held.delete(this.lastSeq + 1);
      this._deliver(next);
    }
    for (const seq of this._held.keys()) if (seq <= this.lastSeq) this._held.delete(seq);
    if (this._held.size === 0 && this._reorderTimer) {
      clearTimeout(this._reorderTimer);
      this._reorderTimer = null;
    }
  }

  /** A gap that never filled: go on from the lowest held seq. */
  _skipGap() {
    this._reorderTimer = null;
    if (this._held.size === 0) return;
    const lowest = Math.min(...this._held.keys());
    const event = this._held.get(lowest);
    this._held.delete(lowest);
    this._deliver(event);
    this._releaseHeld();
    if (this._held.size) this._skipGap();
  }

  _deliver(event) {
    this.lastSeq = event.seq;
    const rid = event.response_id;
    let reply = this._byResponse.get(rid);
    if (!reply) {
      if (event.type === "started" && this._pending.has(event.id)) {
        reply = this._pending.get(event.id);
      } else {
        reply = new Reply(this, event.type === "started" ? event.id : null);
        reply.responseId = rid;
        this.dispatchEvent(new CustomEvent("reply", { detail: reply }));
      }
      this._byResponse.set(rid, reply);
    }
    reply._feed(event);
    if (event.type === "started") reply._frames = null;  // taken: never sent again
    if (event.type === "done") {
      this._byResponse.delete(rid);
      this._finished.add(rid);
      if (this._finished.size > 1024) this._finished.delete(this._finished.values().next().value);
      if (reply.id !== null && this._pending.get(reply.id) === reply) this._pending.delete(reply.id);
    }
  }

  _error(event) {
    const err = MMChatError.fromEvent(event);
    const reply = event.ref ? this._pending.get(event.ref) : undefined;
    if (event.code === "resume_unavailable") this._gapOk = true;
    if (reply && event.code === "duplicate_message" && reply._sends > 1) {
      return;  // a resent message the server already had: its reply is replayed
    }
    if (reply) {
      if (!reply.started) this._pending.delete(event.ref);
      reply._feed(err);
      return;
    }
    this.dispatchEvent(new CustomEvent("error", { detail: err }));
  }
}

/** Errors refusing a hello after which trying again later may work. */
const RETRY_CODES = new Set(["store_unavailable", "too_many_connections", "going_away",
                             "internal_error", "session_busy"]);

/** A server event from a text frame, or null for binary frames and unreadable text. */
function parseEvent(data) {
  if (typeof data !== "string") return null;
  let event;
  try {
    event = JSON.parse(data);
  } catch {
    return null;
  }
  return event && typeof event === "object" && typeof event.type === "string" ? event : null;
}
