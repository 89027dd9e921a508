/**
 * hubbub.js: the JavaScript client of hubbub's protocol v2 (`/ws`: one socket, many rooms).
 *
 * One ES module, no build step, no dependencies; the server serves it at `GET /hubbub.js`.
 *
 * ```js
 * import { connect } from "/hubbub.js";
 *
 * const hub = connect("/ws", { params: { user: "alice" }, onStatus: (s) => console.log(s.state) });
 * const lobby = hub.join("lobby", {
 *   meta: { device: "laptop" },
 *   onMessage: (m) => console.log(m.user, m.data),
 *   onPresence: (users) => console.log(Object.keys(users)),
 * });
 * const { id, ts } = await lobby.publish({ text: "hello" });
 * ```
 *
 * What it does for you: every request carries a `ref` and its reply settles a Promise; the socket
 * comes back by itself (exponential backoff with jitter) and rejoins every room with `since`, the
 * id of the last message it saw there, so what was missed arrives first, in order, without
 * duplicates (and when the server cannot promise that, `history` pages fill the gap); publishes
 * not yet acknowledged are sent again with the same idempotency `key`; a token function is asked
 * again for each connection and before the token expires (`refresh`); presence is kept per room
 * from `joined` and `presence_diff`.
 *
 * Runs in browsers and in Node (22+, or 20 with `--experimental-websocket`); any other WebSocket
 * class (e.g. the `ws` package's) can be given as the `WebSocket` option.
 *
 * @module hubbub
 */

const SEEN_MAX = 5000; // message ids remembered per room, to drop duplicates
const FILL_PAGE = 100; // history page size when the server could not recover a gap by itself
const FILL_PAGES = 20; // at most this many pages per gap
const OPEN = 1; // WebSocket.OPEN, without needing the global

/**
 * An `error` from the server (`code`: `not_joined`, `forbidden`, `rate_limited`, ...), or one of the
 * client's own: `disconnected` (a reply that can no longer come), `closed` (after `close()` or a
 * disconnect by the server API), `token` (the token function failed), `bad_url`, `gap` (after a
 * reconnect, more was missed than the client pages through `history`: FILL_PAGES pages).
 */
export class HubbubError extends Error {
  /**
   * @param {string} code
   * @param {string} [detail]
   * @param {object} [event] the server's error event, if any
   */
  constructor(code, detail = "", event = {}) {
    super(detail ? `${code}: ${detail}` : code);
    this.name = "HubbubError";
    /** @type {string} */ this.code = code;
    /** @type {string} */ this.detail = detail;
    /** @type {string|undefined} */ this.room = event.room;
    /** @type {object} */ this.event = event;
  }
}

/**
 * @typedef {object} Status
 * @property {"connecting"|"connected"|"reconnecting"|"closed"} state
 * @property {number} attempt connections tried since the last one that opened
 * @property {number} [delay] reconnecting: milliseconds until the next try
 * @property {number} [retryAt] reconnecting: when it is (`Date.now()` time)
 * @property {number} [code] reconnecting or closed: the close code of the socket that went away
 * @property {string} [reason] its close reason
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string|(() => string|Promise<string>)} [token] a JWT, or a function that fetches one:
 *   called for every connection and again on `token_expiring` (then sent as `refresh`)
 * @property {Record<string,string>} [params] more query parameters, e.g. `{user: "alice"}` without JWT
 * @property {(status: Status) => void} [onStatus] connecting / connected / reconnecting (with `delay`) / closed
 * @property {(error: HubbubError) => void} [onError] errors no Promise of yours receives
 *   (e.g. a refused `updateMeta`, a refused rejoin, a failed refresh)
 * @property {(attempt: number) => number} [backoff] milliseconds before reconnect attempt N (0, 1, ...);
 *   default 0.5 s doubling up to 15 s, times a random 0.8 to 1.2
 * @property {number} [rate=80] frames per second this client sends at most (a burst of one second's
 *   worth; the rest wait, in order), under the server's `--rate-limit` (default 100, over it: refused):
 *   a reconnect that rejoins 100 rooms and pages their history must not be refused; 0: no pacing
 * @property {number} [connectTimeout=10000] milliseconds a socket may take to open before it is
 *   given up and the next attempt is scheduled (a SYN into a dead network can hang for minutes)
 * @property {number} [maxMessageSize=65536] bytes per frame this client sends at most: the server's
 *   `--max-message-size`. A bigger request is refused here (`bad_field`), never sent: the server would
 *   close the socket (1009), and sending it again after the reconnect would close the next one too
 * @property {typeof WebSocket} [WebSocket] the WebSocket class (default: the global one)
 */

/**
 * @typedef {object} Message
 * @property {string} room
 * @property {string} id ordered within the room (compare as strings)
 * @property {number} ts milliseconds since the epoch
 * @property {string} user
 * @property {*} [data] a v2 message's JSON value
 * @property {string} [text] a v1 (`/chat/{room}`) message's text
 */

/**
 * @typedef {Record<string, object[]>} PresenceState user -> one meta per connection of that user
 */

/**
 * @typedef {object} JoinOptions
 * @property {object} [meta] this connection's presence metadata in the room (a JSON object, <= 1 KiB)
 * @property {boolean} [presence=true] false: present, but no presence events (big rooms)
 * @property {string} [since] the last message id already seen (e.g. kept across a page reload)
 * @property {(message: Message, info: {source: "live"|"recovered"|"history"}) => void} [onMessage]
 *   every message once, in order; `source` says how it came: live, in `joined` after a reconnect,
 *   or from `history` pages filling a gap the server could not recover
 * @property {(state: PresenceState, diff: {joins: PresenceState, leaves: PresenceState}|null) => void} [onPresence]
 *   after every change (`diff` null when the whole state came with `joined`)
 * @property {(joined: object) => void} [onJoin] after every `joined` (the first and each rejoin)
 * @property {(reason: string) => void} [onLeave] the server took the room away
 *   (`"forbidden"` after a refresh, `"removed"` by the server API, or the code of a refused rejoin)
 */

/**
 * Open a client: one WebSocket to `url` (`ws:`, `wss:`, or `http(s):`/relative in a page: the
 * scheme becomes `ws(s):`), kept open until `close()`.
 * @param {string} url e.g. `"wss://chat.example.com/ws"` or `"/ws"` from a page of the same server
 * @param {ConnectOptions} [options]
 * @returns {Client}
 */
export function connect(url, options = {}) {
  return new Client(url, options);
}

const defaultBackoff = (attempt) => Math.min(15000, 500 * 2 ** attempt) * (0.8 + 0.4 * Math.random());

function randomKey() {
  const bytes = new Uint8Array(16);
  if (globalThis.crypto && globalThis.crypto.getRandomValues) globalThis.crypto.getRandomValues(bytes);
  else for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(""); // 32 bytes: PROTOCOL allows 64
}

const sameMeta = (a, b) => JSON.stringify(a) === JSON.stringify(b);
const utf8 = new TextEncoder();

/** Call one of the application's callbacks; if it throws, the error is reported as uncaught (in
 * the console, or Node's handler), but after the client's own work: one bad onMessage must not
 * leave the messages after it undelivered, or the client's state half-changed. */
function callback(fn, ...args) {
  if (!fn) return;
  try {
    fn(...args);
  } catch (err) {
    if (typeof globalThis.reportError === "function") globalThis.reportError(err);
    else setTimeout(() => {
      throw err;
    });
  }
}

/** One connection to a hubbub server and the rooms joined over it. Made by {@link connect}. */
export class Client {
  /**
   * @param {string} url
   * @param {ConnectOptions} [options]
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = options;
    /** @type {Map<string, Room>} the rooms joined, by name */
    this.rooms = new Map();
    /** @type {Status} */
    this.status = { state: "connecting", attempt: 0 };
    this._ws = null;
    this._epoch = 0; // one per connection attempt: stale sockets and callbacks check it
    this._ref = 0;
    this._pending = new Map(); // ref -> request sent on this socket, waiting for its reply
    this._queue = []; // requests waiting for the next connection
    this._outbox = []; // requests for this connection, waiting for the pacing (`rate`)
    this._tokens = this._rate();
    this._stamp = Date.now();
    this._pacer = 0;
    this._attempt = 0;
    this._timer = 0;
    this._closed = false;
    // after connect() returns: an onStatus that names the client must find it assigned
    queueMicrotask(() => this._open());
  }

  /** @returns {boolean} the socket is open (the rooms' rejoins may still be under way) */
  get connected() {
    return this.status.state === "connected";
  }

  /**
   * Join a room (or get the handle of one already joined). The handle works at once: what you
   * publish before the `joined` reply, or while disconnected, is sent in order once possible.
   * @param {string} name 1-200 bytes of UTF-8
   * @param {JoinOptions} [options]
   * @returns {Room}
   */
  join(name, options = {}) {
    const existing = this.rooms.get(name);
    if (existing) return existing;
    const room = new Room(this, name, options);
    this.rooms.set(name, room);
    if (this.connected) room._sendJoin();
    return room;
  }

  /** Try to connect now instead of waiting for the backoff (e.g. on the browser's `online` event). */
  reconnect() {
    if (this._closed || this.status.state !== "reconnecting") return;
    clearTimeout(this._timer);
    this._open();
  }

  /** Close for good: no reconnect; every Promise still waiting rejects with `closed`. */
  close() {
    if (this._closed) return;
    this._closed = true;
    this._epoch += 1; // the socket's own close event is of no interest now
    clearTimeout(this._timer);
    const ws = this._ws;
    this._ws = null;
    if (ws) ws.close(1000);
    clearTimeout(this._pacer);
    const waiting = [...this._pending.values(), ...this._outbox.filter((entry) => entry.reply), ...this._queue];
    this._pending.clear();
    this._outbox = [];
    this._queue = [];
    for (const entry of waiting) entry.fail(new HubbubError("closed", "the client was closed"));
    for (const room of this.rooms.values()) room._fail(new HubbubError("closed", "the client was closed"));
    this._setStatus({ state: "closed", attempt: 0 });
  }

  // -- the socket ---------------------------------------------------------------------------

  async _open() {
    if (this._closed) return;
    const epoch = ++this._epoch;
    this._setStatus({ state: "connecting", attempt: this._attempt });
    let token = this.options.token;
    try {
      if (typeof token === "function") token = await token();
    } catch (err) {
      if (epoch !== this._epoch || this._closed) return;
      this._report(new HubbubError("token", String((err && err.message) || err)));
      this._retry({});
      return;
    }
    if (epoch !== this._epoch || this._closed) return;
    const Impl = this.options.WebSocket || globalThis.WebSocket;
    let ws;
    try {
      ws = new Impl(this._address(token));
    } catch (err) {
      this._report(new HubbubError("bad_url", String((err && err.message) || err)));
      this._retry({});
      return;
    }
    this._ws = ws;
    const limit = this.options.connectTimeout === undefined ? 10000 : this.options.connectTimeout;
    const timer = setTimeout(() => {
      if (epoch !== this._epoch || ws.readyState === OPEN) return;
      this._epoch += 1; // this socket is given up: nothing it does from now on counts
      this._ws = null;
      ws.close(); // (not every implementation reports a close for a socket still connecting)
      this._lost({ code: 1006, reason: "connect timeout" });
    }, limit);
    ws.onopen = () => {
      clearTimeout(timer);
      if (epoch === this._epoch) this._opened();
      else ws.close(1000); // opened too late, or after close(): not ours any more
    };
    ws.onmessage = (e) => epoch === this._epoch && this._receive(e.data);
    ws.onclose = (e) => {
      clearTimeout(timer);
      if (epoch === this._epoch) this._lost(e);
    };
  }

  _address(token) {
    const base = globalThis.location && /^https?:$/.test(globalThis.location.protocol) ? globalThis.location.href : undefined;
    const url = new URL(this.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    for (const [name, value] of Object.entries(this.options.params || {})) url.searchParams.set(name, value);
    if (token) url.searchParams.set("token", token);
    return url.href;
  }

  _opened() {
    this._attempt = 0;
    this.status = { state: "connected", attempt: 0 };
    for (const room of this.rooms.values()) room._sendJoin(); // joins first: what follows may need them
    const queue = this._queue;
    this._queue = [];
    for (const entry of queue) this._transmit(entry);
    this._setStatus(this.status); // only now: what onStatus sends goes after the joins
  }

  _lost(event) {
    this._ws = null;
    clearTimeout(this._pacer);
    this._pacer = 0;
    // what went and what was still waiting to go, in order; joins are made again at the next open
    const pending = [...this._pending.values(), ...this._outbox.filter((entry) => entry.reply && !entry.join)];
    this._pending.clear();
    this._outbox = [];
    const again = [];
    for (const entry of pending) {
      if (entry.room && entry.room.left) entry.fail(new HubbubError("not_joined", "left the room before the reply"));
      else if (entry.resend) again.push(entry);
      else entry.fail(new HubbubError("disconnected", "the connection closed before the reply"));
    }
    this._queue = again.concat(this._queue); // in the order they were first sent
    if (this._closed) return;
    if (event.code === 4001) {
      // the server API disconnected this user: do not come back by ourselves
      this._closed = true;
      const waiting = this._queue;
      this._queue = [];
      for (const entry of waiting) entry.fail(new HubbubError("closed", "disconnected by the server"));
      this._setStatus({ state: "closed", attempt: 0, code: event.code, reason: event.reason });
      return;
    }
    this._retry(event);
  }

  _retry(event) {
    const delay = Math.max(0, (this.options.backoff || defaultBackoff)(this._attempt));
    const status = { state: "reconnecting", attempt: this._attempt, delay, retryAt: Date.now() + delay };
    if (event.code !== undefined) Object.assign(status, { code: event.code, reason: event.reason });
    this._attempt += 1;
    this._timer = setTimeout(() => this._open(), delay);
    this._setStatus(status);
  }

  _setStatus(status) {
    this.status = status;
    callback(this.options.onStatus, status);
  }

  _report(error) {
    callback(this.options.onError, error);
  }

  // -- requests and replies -----------------------------------------------------------------

  /**
   * Send a request now if connected, else at the next connection.
   * @param {object} entry `{frame, reply(event), fail(error), resend, room}`
   */
  _request(entry) {
    if (this._closed) entry.fail(new HubbubError("closed", "the client was closed"));
    else if (this.connected) this._transmit(entry);
    else this._queue.push(entry);
  }

  /** A request as a Promise of its reply. */
  _ask(frame, { resend = true, room = null } = {}) {
    return new Promise((resolve, reject) => this._request({ frame, reply: resolve, fail: reject, resend, room }));
  }

  /** Send on this connection, now or, over the `rate`, after what already waits. */
  _transmit(entry) {
    if (this._outbox.length || !this._take()) {
      this._outbox.push(entry);
      this._pace();
    } else {
      this._send(entry);
    }
  }

  _rate() {
    return this.options.rate === undefined ? 80 : this.options.rate;
  }

  /** A token bucket: `rate` per second, holding at most one second's worth. */
  _take() {
    const rate = this._rate();
    if (!rate) return true;
    const now = Date.now();
    this._tokens = Math.min(rate, this._tokens + ((now - this._stamp) * rate) / 1000);
    this._stamp = now;
    if (this._tokens < 1) return false;
    this._tokens -= 1;
    return true;
  }

  _pace() {
    if (this._pacer) return;
    const wait = Math.max(1, Math.ceil(((1 - this._tokens) * 1000) / this._rate()));
    this._pacer = setTimeout(() => {
      this._pacer = 0;
      if (!this._ws || !this.connected) return; // _lost has taken the outbox
      while (this._outbox.length && this._take()) this._send(this._outbox.shift());
      if (this._outbox.length) this._pace();
    }, wait);
  }

  _send(entry) {
    const ref = ++this._ref;
    const text = JSON.stringify({ ...entry.frame, ref });
    const limit = this.options.maxMessageSize === undefined ? 65536 : this.options.maxMessageSize;
    // UTF-8 takes at most 3 bytes per UTF-16 unit: only a long text is worth encoding to measure
    const size = text.length * 3 <= limit ? 0 : utf8.encode(text).length;
    if (size > limit) {
      const { event, room } = entry.frame;
      const error = new HubbubError("bad_field", `the ${event} would be ${size} bytes, over the ${limit} the server takes: not sent`, { room });
      if (entry.fail) entry.fail(error);
      else this._report(error);
      return;
    }
    entry.ref = ref;
    entry.tries = (entry.tries || 0) + 1;
    if (entry.reply) this._pending.set(ref, entry);
    this._ws.send(text);
  }

  _receive(data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      return;
    }
    if (!event || typeof event.event !== "string") return;
    const entry = event.ref !== undefined ? this._pending.get(event.ref) : undefined;
    if (entry) {
      this._pending.delete(event.ref);
      if (event.event === "error") entry.fail(new HubbubError(event.code, event.detail, event));
      else entry.reply(event);
      return;
    }
    const room = typeof event.room === "string" ? this.rooms.get(event.room) : undefined;
    switch (event.event) {
      case "message":
        if (room) room._receive(event);
        break;
      case "presence_diff":
        if (room) room._diff(event);
        break;
      case "left": // the server took the room away (a reply to our own leave has its ref)
        if (room) room._gone(event.reason || "left");
        break;
      case "token_expiring":
        this._refresh();
        break;
      case "error":
        this._report(new HubbubError(event.code, event.detail, event));
        break;
      default:
        break;
    }
  }

  async _refresh() {
    if (typeof this.options.token !== "function") return; // a fixed token cannot be renewed
    const epoch = this._epoch;
    try {
      const token = await this.options.token();
      if (epoch !== this._epoch || !this.connected) return; // a new connection fetched its own
      await this._ask({ event: "refresh", token }, { resend: false });
    } catch (err) {
      if (err instanceof HubbubError && err.code === "disconnected") return;
      this._report(err instanceof HubbubError ? err : new HubbubError("token", String((err && err.message) || err)));
    }
  }
}

/** A room joined over a {@link Client}. Made by {@link Client#join}. */
export class Room {
  /**
   * @param {Client} client
   * @param {string} name
   * @param {JoinOptions} options
   */
  constructor(client, name, options) {
    /** @type {string} */ this.name = name;
    /** @type {object} this connection's presence metadata here */ this.meta = options.meta || {};
    /** @type {PresenceState} who is here (kept from `joined` and `presence_diff`) */ this.presence = {};
    /** @type {string|undefined} the id of the last message delivered (sent as `since` on rejoin) */
    this.lastId = options.since;
    /** @type {boolean} */ this.left = false;
    this._client = client;
    this._options = options;
    this._watch = options.presence !== false;
    this._seen = new Set();
    this._unacked = new Set(); // publishes not yet settled (acked or refused)
    this._gate = null; // while (re)joining: messages wait here until the gap before them is filled
    this._first = true;
    this._empty = false; // the room had no stored message when first joined
    /** @type {Promise<object>} resolves with the first `joined` reply, rejects if the join is refused */
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // a refusal also reaches onError: never an unhandled rejection
  }

  /**
   * Publish any JSON value to the room's other members. Sent with a random idempotency key, and
   * sent again with the same key after a reconnect until acknowledged.
   * @param {*} data
   * @param {{key?: string}} [options] your own key (a string of at most 64 bytes)
   * @returns {Promise<{id: string, ts: number}>} resolves once the server stored it (its `ack`),
   *   rejects with a {@link HubbubError} (`not_joined`, `forbidden`, `unavailable`, ...)
   */
  publish(data, { key } = {}) {
    if (this.left) return Promise.reject(new HubbubError("not_joined", "this room was left", { room: this.name }));
    return new Promise((resolve, reject) => {
      const entry = {
        frame: { event: "publish", room: this.name, data, key: key || randomKey() },
        resend: true,
        room: this,
        reply: (ack) => {
          this._remember(ack.id);
          this._settled(entry);
          resolve({ id: ack.id, ts: ack.ts });
        },
        fail: (error) => {
          this._settled(entry);
          reject(error);
        },
      };
      this._unacked.add(entry);
      this._client._request(entry);
    });
  }

  /**
   * Leave the room: no more messages or presence from it, and no rejoin. Publishes still waiting
   * for a connection reject with `not_joined`.
   * @returns {Promise<void>}
   */
  leave() {
    const client = this._client;
    if (client.rooms.get(this.name) === this) client.rooms.delete(this.name);
    this.left = true;
    this._gate = null;
    const mine = client._queue.filter((entry) => entry.room === this);
    client._queue = client._queue.filter((entry) => entry.room !== this);
    for (const entry of mine) entry.fail(new HubbubError("not_joined", "left the room before it was sent"));
    this._rejectReady(new HubbubError("not_joined", "left the room"));
    if (!client.connected) return Promise.resolve();
    return new Promise((resolve) =>
      client._request({ frame: { event: "leave", room: this.name }, resend: false, reply: () => resolve(), fail: () => resolve() }),
    );
  }

  /**
   * Replace this connection's presence metadata here; the others get a `presence_diff`. Kept for
   * rejoins. A refusal reaches the client's `onError`.
   * @param {object} meta a JSON object of at most 1 KiB
   */
  updateMeta(meta) {
    this.meta = meta;
    const client = this._client;
    if (client.connected) client._transmit({ frame: { event: "presence_update", room: this.name, meta } });
    // not connected: the next join carries it
  }

  /**
   * A page of the room's stored messages, oldest first.
   * @param {{limit?: number, before?: string, after?: string}} [options] `after` pages forward,
   *   `before` backward, both: between them (default: the newest 50)
   * @returns {Promise<{messages: Message[], truncated: boolean}>} `truncated`: older ones in the
   *   range were left out to keep the reply within the server's limit (page on with `before`)
   */
  history({ limit, before, after } = {}) {
    const frame = { event: "history", room: this.name };
    if (limit !== undefined) frame.limit = limit;
    if (before !== undefined) frame.before = before;
    if (after !== undefined) frame.after = after;
    return this._client._ask(frame).then((reply) => ({ messages: reply.messages || [], truncated: !!reply.truncated }));
  }

  // -- joining, recovery ----------------------------------------------------------------------

  /** Send `join` (with `since` once a message was seen). Messages wait in the gate until `joined`,
   * until whatever fills the gap before them has come, and until every publish of ours not yet
   * acked (those sent again after a reconnect among them) is: a recovered copy of our own message
   * is then recognised by the id of its ack and dropped. */
  _sendJoin() {
    const gate = { since: this.lastId, joined: null, filled: false, fill: [], buffer: [] };
    this._gate = gate;
    const frame = { event: "join", room: this.name, meta: this.meta };
    if (!this._watch) frame.presence = false;
    if (gate.since !== undefined) frame.since = gate.since;
    this._client._transmit({
      frame,
      resend: false,
      join: true,
      reply: (joined) => this._joined(joined, gate),
      fail: (error) => {
        if (error.code === "disconnected" || gate !== this._gate) return; // the next open joins again
        if (error.code !== "rate_limited") return this._refused(error);
        // over a server's --rate-limit lower than our pacing: try again in a second, not give up
        setTimeout(() => gate === this._gate && this._client.connected && this._sendJoin(), 1000);
      },
    });
  }

  _joined(joined, gate) {
    if (gate !== this._gate) return;
    gate.joined = joined;
    if (joined.presence) {
      this.presence = joined.presence;
      callback(this._options.onPresence, this.presence, null);
    }
    const first = this._first;
    this._first = false;
    if (first) this._resolveReady(joined);
    callback(this._options.onJoin, joined);
    if (gate.since !== undefined && joined.recovered !== true) this._fill(gate, gate.since);
    else if (gate.since === undefined && !first && this._empty) this._fill(gate, ""); // "": before any id
    else gate.filled = true;
    if (gate.since === undefined && this.lastId === undefined) this._baseline();
    this._tryOpen(gate);
  }

  /** The server could not promise a gap-free recovery: page `history` forward from `after` up to
   * the first message `joined` brought (or to the end), at most FILL_PAGES pages; what is still
   * missing then is reported (`gap`). Ids already delivered are dropped later, in `_deliver`. */
  async _fill(gate, after) {
    const stop = gate.joined.messages && gate.joined.messages.length ? gate.joined.messages[0].id : undefined;
    let limit = FILL_PAGE;
    let complete = false;
    for (let asked = 0; asked < FILL_PAGES * 2; asked++) {
      let page;
      try {
        page = await this._client._ask({ event: "history", room: this.name, after, limit }, { resend: false });
      } catch (err) {
        if (gate !== this._gate || err.code === "disconnected") return; // the next join starts over
        this._client._report(err);
        break;
      }
      if (gate !== this._gate) return;
      const messages = page.messages || [];
      if (page.truncated && limit > 1 && messages.length < limit) {
        limit = Math.max(1, messages.length); // the oldest ones did not fit: ask for fewer
        continue;
      }
      // a short page is not the end: the server may cap `limit` (--history-max); an empty one is
      complete = !messages.length;
      for (const message of messages) {
        if (stop !== undefined && message.id >= stop) {
          complete = true;
          break;
        }
        gate.fill.push(message);
      }
      if (complete) break;
      after = messages[messages.length - 1].id;
      limit = FILL_PAGE;
    }
    if (!complete) this._client._report(new HubbubError("gap", `more than ${FILL_PAGES} pages missed in ${this.name}`, { room: this.name }));
    gate.filled = true;
    this._tryOpen(gate);
  }

  /** First join without `since`: the room's newest stored id, so that a reconnect before any
   * message arrived still recovers what it missed. */
  async _baseline() {
    try {
      const page = await this._client._ask({ event: "history", room: this.name, limit: 1 }, { resend: false });
      const newest = page.messages && page.messages[page.messages.length - 1];
      if (this.lastId !== undefined || this.left) return;
      if (newest) this.lastId = newest.id;
      else this._empty = true; // nothing stored yet: a rejoin before any message pages from the start
    } catch {
      // no baseline: a reconnect before the first message rejoins without `since`
    }
  }

  _settled(entry) {
    this._unacked.delete(entry);
    if (this._gate) this._tryOpen(this._gate);
  }

  _tryOpen(gate) {
    if (gate !== this._gate || !gate.joined || !gate.filled || this._unacked.size) return;
    this._gate = null;
    for (const message of gate.fill) this._deliver(message, "history");
    for (const message of gate.joined.messages || []) this._deliver(message, "recovered");
    for (const message of gate.buffer) this._deliver(message, "live");
  }

  _receive(message) {
    if (this._gate) this._gate.buffer.push(message);
    else this._deliver(message, "live");
  }

  _deliver(message, source) {
    if (message.id !== undefined) {
      if (this._seen.has(message.id)) return;
      this._remember(message.id);
      this.lastId = message.id;
    }
    callback(this._options.onMessage, message, { source });
  }

  _remember(id) {
    this._seen.add(id);
    if (this._seen.size > SEEN_MAX) this._seen.delete(this._seen.values().next().value);
  }

  _refused(error) {
    this._gone(error.code);
    this._rejectReady(error);
    this._client._report(error);
  }

  _gone(reason) {
    const client = this._client;
    if (client.rooms.get(this.name) === this) client.rooms.delete(this.name);
    this.left = true;
    this._gate = null;
    callback(this._options.onLeave, reason);
  }

  _fail(error) {
    this._rejectReady(error);
  }

  // -- presence ---------------------------------------------------------------------------------

  _diff(event) {
    const state = { ...this.presence };
    for (const [user, metas] of Object.entries(event.joins || {})) state[user] = (state[user] || []).concat(metas);
    for (const [user, metas] of Object.entries(event.leaves || {})) {
      let left = state[user] || [];
      for (const meta of metas) {
        const at = left.findIndex((each) => sameMeta(each, meta));
        if (at >= 0) left = left.slice(0, at).concat(left.slice(at + 1));
      }
      if (left.length) state[user] = left;
      else delete state[user];
    }
    this.presence = state;
    callback(this._options.onPresence, state, { joins: event.joins || {}, leaves: event.leaves || {} });
  }
}
