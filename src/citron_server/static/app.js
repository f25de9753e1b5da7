// citron's dashboard: a front (WEB: frames only) over the server's /ws.
// Everything from the server is text: it is only ever put in the page with
// textContent, never parsed as HTML.

// The token to read with: ?token= on the page's URL, else the one given in
// this tab's session (asked for when the server answers 401).
let token = new URLSearchParams(location.search).get("token") || sessionStorage.getItem("citron-token");

// -- the connection ----------------------------------------------------------

class Connection {
  constructor() {
    this.ws = null;
    this.next = 1;
    this.pending = new Map();
    this.pushHandlers = new Set();
    this.openHandlers = new Set();
    this.delay = 500;
    this.connect();
  }

  connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = token ? `?token=${encodeURIComponent(token)}` : "";
    const ws = new WebSocket(`${scheme}//${location.host}/ws${query}`);
    this.ws = ws;
    let opened = false;
    setStatus("connecting", "connecting…");
    ws.onopen = () => {
      opened = true;
      this.everOpened = true;
      this.delay = 500;
      setStatus("open", "live");
      notice(null);
      for (const handler of this.openHandlers) handler();
    };
    ws.onmessage = (event) => this.receive(event.data);
    ws.onclose = async (event) => {
      for (const [, reject] of this.pending.values()) reject(new Error("connection lost"));
      this.pending.clear();
      if (event.code === 1008) {
        setStatus("closed", "refused (1008)");
        if (event.reason.startsWith("unauthorized")) {
          askToken(token ? "The server refused this token for reading." : "This server needs a token to read.");
        } else {
          notice(`The server closed the connection (1008: ${event.reason || "policy violation"}).`);
        }
        return;
      }
      // A browser does not say why a handshake failed: a plain GET of /ws
      // answers 401 when it is the token. (Once connected, a later failure
      // is the server going away: no need to ask.)
      if (!opened && !this.everOpened && (await this.refused(query))) {
        setStatus("closed", "a token is needed");
        askToken(token ? "The server refused this token." : "This server needs a token to read.");
        return;
      }
      const wait = Math.min(this.delay, 30000) * (0.5 + Math.random() / 2);
      this.delay *= 2;
      const seconds = (wait / 1000).toFixed(1);
      setStatus("closed", `disconnected; reconnecting in ${seconds} s`);
      notice(`Cannot reach the server${opened ? " (the connection dropped)" : ""}; trying again in ${seconds} s.`);
      setTimeout(() => this.connect(), wait);
    };
  }

  async refused(query) {
    try {
      const response = await fetch(`/ws${query}`, { cache: "no-store" });
      return response.status === 401;
    } catch (error) {
      return false; // the server cannot be reached at all
    }
  }

  receive(text) {
    const colon = text.indexOf(":");
    const command = text.slice(0, colon);
    let payload = {};
    try {
      payload = colon + 1 < text.length ? JSON.parse(text.slice(colon + 1)) : {};
    } catch (error) {
      return; // not a frame this page understands
    }
    if (payload && payload.req && this.pending.has(payload.req)) {
      const [resolve, reject] = this.pending.get(payload.req);
      this.pending.delete(payload.req);
      if (command === "error") reject(new Error(`${payload.code}: ${payload.message}`));
      else resolve(payload);
      return;
    }
    for (const handler of this.pushHandlers) handler(command, payload);
  }

  request(command, body = {}) {
    return new Promise((resolve, reject) => {
      if (!this.ws || this.ws.readyState !== WebSocket.OPEN) {
        reject(new Error("not connected"));
        return;
      }
      const req = `w${this.next++}`;
      this.pending.set(req, [resolve, reject]);
      this.ws.send(`WEB:${command}:${JSON.stringify({ ...body, req })}`);
    });
  }

  get open() {
    return this.ws && this.ws.readyState === WebSocket.OPEN;
  }
}

// A message above the view (null: none): the connection's trouble.
function notice(text, ...extra) {
  const box = document.getElementById("notice");
  box.hidden = text === null;
  box.replaceChildren(...(text === null ? [] : [el("p", {}, text), ...extra]));
}

// Ask for the token; kept for this tab's session, sent as ?token=.
function askToken(why) {
  const input = el("input", { type: "password", id: "token-input", "aria-label": "token", autocomplete: "off" });
  const form = el("form", { id: "token-form" }, input, el("button", { type: "submit" }, "Connect"));
  form.onsubmit = (event) => {
    event.preventDefault();
    if (!input.value) return;
    token = input.value;
    sessionStorage.setItem("citron-token", token);
    conn.everOpened = false; // a new token: ask again if it is refused
    notice(null);
    conn.connect();
  };
  notice(`${why} Enter the WEB token (or open this page with ?token=...).`, form);
  input.focus();
}

function setStatus(state, text) {
  const status = document.getElementById("status");
  status.dataset.state = state;
  status.textContent = text;
}

// -- small DOM helpers ---------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function loadingRow(columns) {
  return el("tr", {}, el("td", { class: "empty loading", colspan: String(columns) }, "Loading…"));
}

function serverUrl() {
  return `${location.protocol}//${location.host}/`;
}

function badge(state) {
  return el("span", { class: `badge ${state}` }, state);
}

function buildLink(id) {
  return id ? el("a", { href: `#/builds/${encodeURIComponent(id)}` }, id) : "-";
}

function time(rfc3339) {
  return rfc3339 ? new Date(rfc3339).toLocaleString() : "-";
}

// A line's time as the reader's clock shows it: HH:MM:SS.mmm.
function clock(rfc3339) {
  const d = new Date(rfc3339);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function duration(build) {
  if (!build.started) return "-";
  const end = build.finished ? new Date(build.finished) : new Date();
  const seconds = (end - new Date(build.started)) / 1000;
  return seconds < 60 ? `${seconds.toFixed(1)} s` : `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
}

// A step's time, short: 0.3s, 12.0s, 2m 05s.
function stepTime(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  return `${Math.floor(seconds / 60)}m ${String(Math.round(seconds % 60)).padStart(2, "0")}s`;
}

// The title of the section a script line starts (docs/protocol.md §5.8):
// "$ LINE", a line of several lines named by its first and an ellipsis.
function stepTitle(line) {
  const cut = line.indexOf("\n");
  return cut < 0 ? `$ ${line}` : `$ ${line.slice(0, cut)}${cut < line.length - 1 ? " …" : ""}`;
}

const STEP_MARK = { passed: "✓", failed: "✗", cancelled: "⊘", skipped: "–" };

function stepBadge(step) {
  return el("span", { class: `step ${step.state}`, title: step.exit_code !== null && step.exit_code !== undefined ? `exit code ${step.exit_code}` : step.state },
    `${STEP_MARK[step.state] ?? ""} ${step.state}`);
}

// -- views ---------------------------------------------------------------------

class RunnersView {
  constructor(conn, main) {
    this.conn = conn;
    this.runners = new Map();
    this.body = el("tbody");
    main.append(
      el("h1", {}, "Runners"),
      el("table", { id: "runners" },
        el("thead", {}, el("tr", {}, ...["Name", "Type", "State", "Build", "Id"].map((h) => el("th", {}, h)))),
        this.body),
    );
    this.body.append(loadingRow(5));
  }

  async load() {
    await this.conn.request("subscribe", {});
    const reply = await this.conn.request("get_runners");
    this.runners = new Map(reply.runners.map((r) => [r.id, r]));
    this.render();
  }

  push(command, payload) {
    if (command !== "runner") return;
    if (payload.gone) this.runners.delete(payload.id);
    else this.runners.set(payload.id, payload);
    this.render();
  }

  render() {
    this.body.replaceChildren(...[...this.runners.values()].map((r) =>
      el("tr", { "data-runner": r.id },
        el("td", {}, r.name ?? "-"), el("td", {}, r.type), el("td", {}, badge(r.state)),
        el("td", {}, buildLink(r.build)), el("td", {}, r.id))));
    if (!this.runners.size) {
      this.body.append(el("tr", {}, el("td", { class: "empty", colspan: "5" },
        "No runner connected. Start one with: citron-runner --url ", el("code", {}, serverUrl()))));
    }
  }
}

class BuildsView {
  constructor(conn, main) {
    this.conn = conn;
    this.builds = new Map();
    this.order = [];
    this.body = el("tbody");
    this.more = el("button", { id: "older" }, "Older builds");
    this.more.onclick = () => this.page();
    main.append(
      el("h1", {}, "Builds"),
      el("table", { id: "builds" },
        el("thead", {}, el("tr", {}, ...["State", "Build", "Repository", "Runner", "Started", "Duration"].map((h) => el("th", {}, h)))),
        this.body),
      this.more,
    );
    this.more.hidden = true;
    this.body.append(loadingRow(6));
  }

  async load() {
    await this.conn.request("subscribe", {});
    this.builds.clear();
    this.order = [];
    await this.page();
  }

  async page() {
    const before = this.order.length ? this.order[this.order.length - 1] : undefined;
    const reply = await this.conn.request("get_builds", before ? { limit: 50, before } : { limit: 50 });
    for (const build of reply.builds) {
      if (!this.builds.has(build.id)) this.order.push(build.id);
      this.builds.set(build.id, build);
    }
    this.more.hidden = reply.builds.length < 50 && !reply.more;
    this.render();
  }

  push(command, payload) {
    if (command !== "state") return;
    if (!this.builds.has(payload.id)) {
      // A new build goes on top; an old one not on the loaded pages stays off.
      const newest = this.order.length ? this.builds.get(this.order[0]) : null;
      if (newest && payload.created < newest.created) return;
      this.order.unshift(payload.id);
    }
    this.builds.set(payload.id, payload);
    this.render();
  }

  render() {
    this.body.replaceChildren(...this.order.map((id) => {
      const b = this.builds.get(id);
      return el("tr", { "data-build": b.id },
        el("td", {}, badge(b.state)), el("td", {}, buildLink(b.id)), el("td", {}, b.repo),
        el("td", {}, b.runner ?? "-"), el("td", {}, time(b.started)), el("td", {}, duration(b)));
    }));
    if (!this.order.length) {
      this.body.append(el("tr", {}, el("td", { class: "empty", colspan: "6" },
        "No build yet. Submit one with: citron submit --url ", el("code", {}, serverUrl()),
        " --repo URL --script 'make test'")));
    }
  }
}

// -- the terminal ------------------------------------------------------------------

const PALETTE16 = [
  [0, 0, 0], [205, 49, 49], [13, 188, 121], [229, 229, 16], [36, 114, 200], [188, 63, 188], [17, 168, 205], [229, 229, 229],
  [102, 102, 102], [241, 76, 76], [35, 209, 139], [245, 245, 67], [59, 142, 234], [214, 112, 214], [41, 184, 219], [255, 255, 255],
];

function color256(n) {
  if (n < 16) return `rgb(${PALETTE16[n].join(",")})`;
  if (n < 232) {
    const v = n - 16, steps = [0, 95, 135, 175, 215, 255];
    return `rgb(${steps[Math.floor(v / 36)]},${steps[Math.floor(v / 6) % 6]},${steps[v % 6]})`;
  }
  const g = 8 + (n - 232) * 10;
  return `rgb(${g},${g},${g})`;
}

// A style is a small frozen object; segments share them.
const PLAIN = Object.freeze({});

function applySgr(style, params) {
  const codes = params === "" ? [0] : params.split(";").map((p) => parseInt(p || "0", 10));
  let next = { ...style };
  for (let i = 0; i < codes.length; i++) {
    const c = codes[i];
    if (c === 0) next = {};
    else if (c === 1) next.bold = true;
    else if (c === 3) next.italic = true;
    else if (c === 4) next.underline = true;
    else if (c === 22) delete next.bold;
    else if (c === 23) delete next.italic;
    else if (c === 24) delete next.underline;
    else if ((c >= 30 && c <= 37) || (c >= 90 && c <= 97)) { next.fg = c; delete next.fgRgb; }
    else if (c === 39) { delete next.fg; delete next.fgRgb; }
    else if ((c >= 40 && c <= 47) || (c >= 100 && c <= 107)) { next.bg = c; delete next.bgRgb; }
    else if (c === 49) { delete next.bg; delete next.bgRgb; }
    else if ((c === 38 || c === 48) && codes[i + 1] === 5 && i + 2 < codes.length) {
      const rgb = color256(codes[i + 2] & 255);
      if (c === 38) { next.fgRgb = rgb; delete next.fg; } else { next.bgRgb = rgb; delete next.bg; }
      i += 2;
    } else if ((c === 38 || c === 48) && codes[i + 1] === 2 && i + 4 < codes.length) {
      const rgb = `rgb(${codes[i + 2] & 255},${codes[i + 3] & 255},${codes[i + 4] & 255})`;
      if (c === 38) { next.fgRgb = rgb; delete next.fg; } else { next.bgRgb = rgb; delete next.bg; }
      i += 4;
    }
  }
  return Object.keys(next).length ? Object.freeze(next) : PLAIN;
}

// Turns a stream of output into lines of styled segments, as a terminal
// would: SGR colours and bold, "\r" returns to the start of the line and
// overwrites, "\n" ends it. Other escape sequences are dropped.
class Terminal {
  constructor() {
    this.lines = []; // finished lines: arrays of [text, style]
    this.cells = []; // the line being written: [char, style] per column
    this.col = 0;
    this.style = PLAIN;
    this.pending = ""; // an escape sequence cut between two chunks
    this.sections = []; // {title, start, end (null: open to the end), open (null: default)}
    this.times = []; // per finished line: when its first text was received (or null)
    this.time = null;
    this.lineTime = undefined;
  }

  stamp(i) {
    return i < this.times.length ? this.times[i] : (this.lineTime ?? this.time);
  }

  // ``time``: when the server received this text (RFC 3339, or null); a
  // line is stamped with the time of the chunk that began it.
  write(text, time = null) {
    this.time = time;
    text = this.pending + text;
    this.pending = "";
    let i = 0;
    const n = text.length;
    while (i < n) {
      const ch = text[i];
      if (ch === "\x1b") {
        if (i + 1 >= n) { this.pending = text.slice(i); break; }
        if (text[i + 1] === "[") {
          let j = i + 2;
          while (j < n && !(text.charCodeAt(j) >= 0x40 && text.charCodeAt(j) <= 0x7e)) j++;
          if (j >= n) { this.pending = text.slice(i); break; }
          if (text[j] === "m") this.style = applySgr(this.style, text.slice(i + 2, j));
          else if (text[j] === "K") this.cells.length = Math.min(this.cells.length, this.col);
          i = j + 1;
        } else {
          i += 2; // a two-character escape: ignored
        }
        continue;
      }
      if (ch === "\n") {
        if (!this.marker()) {
          this.lines.push(this.segments());
          this.times.push(this.lineTime ?? this.time);
        }
        this.cells = [];
        this.col = 0;
        this.lineTime = undefined;
      } else if (ch === "\r") {
        this.col = 0;
      } else if (ch === "\b") {
        this.col = Math.max(0, this.col - 1);
      } else {
        if (this.lineTime === undefined) this.lineTime = this.time;
        this.cells[this.col++] = [ch, this.style];
      }
      i++;
    }
  }

  // A finished line that marks a section (docs/protocol.md, "Log
  // sections"): "::group::TITLE" opens one, "::endgroup::" closes it. The
  // marker itself is not a line of the log.
  marker() {
    if (this.cells.length < 12 || !this.cells[0] || this.cells[0][0] !== ":") return false;
    const text = this.cells.map((cell) => (cell ? cell[0] : " ")).join("");
    const open = this.sections.length ? this.sections[this.sections.length - 1] : null;
    if (text.startsWith("::group::")) {
      if (open && open.end === null) open.end = this.lines.length;
      this.sections.push({ title: text.slice(9), start: this.lines.length, end: null, open: null });
      return true;
    }
    if (text === "::endgroup::") {
      if (open && open.end === null) open.end = this.lines.length;
      return true;
    }
    return false;
  }

  segments(cells = this.cells) {
    const out = [];
    for (const cell of cells) {
      const [ch, style] = cell ?? [" ", PLAIN];
      const last = out[out.length - 1];
      if (last && last[1] === style) last[0] += ch;
      else out.push([ch, style]);
    }
    return out;
  }

  // Every line, the unfinished last one included when it has text.
  get count() {
    return this.lines.length + (this.cells.length ? 1 : 0);
  }

  line(i) {
    return i < this.lines.length ? this.lines[i] : this.segments();
  }
}

function styledSpan(text, style) {
  const span = document.createElement("span");
  span.textContent = text;
  if (style !== PLAIN) {
    const classes = [];
    if (style.bold) classes.push("b");
    if (style.italic) classes.push("i");
    if (style.underline) classes.push("u");
    if (style.fg) classes.push(`fg${style.fg}`);
    if (style.bg) classes.push(`bg${style.bg}`);
    span.className = classes.join(" ");
    if (style.fgRgb) span.style.color = style.fgRgb;
    if (style.bgRgb) span.style.background = style.bgRgb;
  }
  return span;
}

// Shows a Terminal's lines, only those in view, so a log of 100,000 lines
// stays responsive; follows new output unless the reader scrolled up. The
// log's sections (one per script line) fold: a header row each, its lines
// below it when open.
class LogView {
  constructor(buildId, target) {
    this.buildId = buildId;
    this.term = new Terminal();
    this.target = target;
    this.lineHeight = 18;
    this.state = null; // the build's state, for which section opens by default
    this.script = []; // the build's script lines
    this.steps = null; // what became of each line (null: the runner did not say)
    this.timestamps = localStorage.getItem("citron-timestamps") === "on";
    this.box = el("div", { class: "log", id: "log", tabindex: "0" });
    this.spacer = el("div", { class: "spacer" });
    this.rows = el("div", { class: "lines" });
    this.spacer.append(this.rows);
    this.box.append(this.spacer);
    this.follow = el("div", { class: "follow" }, "");
    this.following = target === null;
    this.scheduled = false;
    this.box.addEventListener("scroll", () => {
      const atEnd = this.box.scrollTop + this.box.clientHeight >= this.box.scrollHeight - this.lineHeight;
      this.following = atEnd;
      this.schedule();
    });
  }

  write(text, time = null) {
    this.term.write(text, time);
    this.schedule();
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => {
      this.scheduled = false;
      this.render();
    });
  }

  // Which step each section shows: the sections titled "$ LINE" of the
  // lines that ran, in order (the clone's and the log's own sections are
  // none), and the index of the section where the build failed: the
  // section of the step that ended it (the last that ran, failed or
  // cancelled); without steps, the last section of a failed build; -1:
  // none. Worked out again only when the sections, the steps or the state
  // change.
  stepInfo() {
    const sections = this.term.sections;
    const key = `${sections.length} ${this.state}`;
    if (this.info && this.info.key === key && this.info.steps === this.steps) return this.info;
    const bySection = new Map();
    let at = 0;
    (this.steps ?? []).forEach((step, i) => {
      if (step.state === "skipped" || i >= this.script.length) return;
      const title = stepTitle(this.script[i]);
      let found = at;
      while (found < sections.length && sections[found].title !== title) found++;
      if (found < sections.length) {
        bySection.set(found, step);
        at = found + 1;
      }
    });
    let failing = this.state === "failure" && sections.length ? sections.length - 1 : -1;
    const last = [...bySection].pop();
    if (last) failing = last[1].state === "failed" || last[1].state === "cancelled" ? last[0] : -1;
    this.info = { key, steps: this.steps, bySection, failing };
    return this.info;
  }

  // Whether a section shows its lines: as the reader chose; else, in a
  // build that did not succeed, only the one where it failed (if any);
  // else every one.
  isOpen(section, index) {
    if (section.open !== null) return section.open;
    if (this.state !== "failure" && this.state !== "cancelled") return true;
    const { failing } = this.stepInfo();
    return failing < 0 || index === failing;
  }

  // The log as blocks of rows: runs of lines, and section headers.
  blocks() {
    const out = [];
    const count = this.term.count;
    let at = 0;
    this.term.sections.forEach((section, index) => {
      if (section.start > at) out.push({ from: at, to: section.start });
      const end = section.end ?? count;
      out.push({ section, index, from: section.start, to: end });
      at = end;
    });
    if (count > at) out.push({ from: at, to: count });
    return out;
  }

  rowsOf(block) {
    if (!block.section) return block.to - block.from;
    return 1 + (this.isOpen(block.section, block.index) ? block.to - block.from : 0);
  }

  render() {
    const blocks = this.blocks();
    if (this.target !== null && !this.jumped) {
      const home = blocks.find((b) => b.section && this.target > b.from && this.target <= b.to);
      if (home) home.section.open = true; // a linked line is shown
    }
    let total = 0;
    for (const block of blocks) total += this.rowsOf(block);
    this.spacer.style.height = `${total * this.lineHeight}px`;
    if (this.following) this.box.scrollTop = this.box.scrollHeight;
    else if (this.target !== null && this.target <= this.term.count && !this.jumped) {
      this.box.scrollTop = Math.max(0, (this.rowOfLine(blocks, this.target - 1) - 3) * this.lineHeight);
      this.jumped = true;
    }
    const first = Math.max(0, Math.floor(this.box.scrollTop / this.lineHeight) - 20);
    const last = Math.min(total, first + Math.ceil(this.box.clientHeight / this.lineHeight) + 40);
    this.rows.style.top = `${first * this.lineHeight}px`;
    const nodes = [];
    let row = 0;
    for (const block of blocks) {
      const size = this.rowsOf(block);
      if (row + size <= first) { row += size; continue; }
      if (row >= last) break;
      if (block.section) {
        if (row >= first) nodes.push(this.header(block));
        row++;
      }
      const shown = block.section && !this.isOpen(block.section, block.index) ? block.from : block.to;
      let line = block.from;
      if (row < first) { // straight to the first row in view
        const skip = Math.min(first - row, shown - line);
        line += skip;
        row += skip;
      }
      for (; line < shown && row < last; line++, row++) {
        nodes.push(this.lineRow(line, block.section ? "line in" : "line"));
      }
    }
    this.rows.replaceChildren(...nodes);
    if (this.onrender) this.onrender();
    this.follow.textContent = this.following ? "following new output" : "scrolled up: not following (scroll to the end to follow)";
  }

  rowOfLine(blocks, i) {
    let row = 0;
    for (const block of blocks) {
      if (i >= block.from && i < block.to) return row + (block.section ? 1 : 0) + (i - block.from);
      row += this.rowsOf(block);
    }
    return row;
  }

  header(block) {
    const { section, index } = block;
    const open = this.isOpen(section, index);
    const { bySection, failing } = this.stepInfo();
    const failed = index === failing;
    const step = bySection.get(index);
    const node = el("div", {
      class: `section${open ? " open" : ""}${failed ? " failed" : ""}`,
      "data-section": String(index + 1), role: "button", tabindex: "0", "aria-expanded": String(open),
    }, el("span", { class: "fold" }, open ? "▾" : "▸"));
    if (step) {
      node.dataset.step = step.state;
      node.append(stepBadge(step));
    }
    node.append(el("span", { class: "title" }, section.title),
      el("span", { class: "count" }, `${block.to - block.from} line${block.to - block.from === 1 ? "" : "s"}`));
    if (step && step.duration !== null && step.duration !== undefined) {
      node.append(el("span", { class: "time" }, stepTime(step.duration)));
    }
    const toggle = () => { section.open = !open; this.following = false; this.schedule(); };
    node.onclick = toggle;
    node.onkeydown = (event) => { if (event.key === "Enter" || event.key === " ") { event.preventDefault(); toggle(); } };
    return node;
  }

  lineRow(i, cls) {
    const number = i + 1;
    const row = el("div", { class: number === this.target ? `${cls} target` : cls, "data-line": String(number) },
      el("a", { class: "ln", href: `#/builds/${encodeURIComponent(this.buildId)}/${number}` }, number));
    if (this.timestamps) {
      const stamp = this.term.stamp(i);
      row.append(el("span", { class: "ts", title: stamp ?? "" }, stamp ? clock(stamp) : "        "));
    }
    for (const [text, style] of this.term.line(i)) row.append(styledSpan(text, style));
    return row;
  }

  // The section where the build failed, or null.
  failedSection() {
    const { failing } = this.stepInfo();
    return this.state === "failure" && failing >= 0 ? this.term.sections[failing] : null;
  }
}

class BuildView {
  constructor(conn, main, id, line) {
    this.conn = conn;
    this.id = id;
    this.seq = 0; // the last chunk shown: a resubscription starts after it
    this.build = null;
    this.facts = el("dl", { class: "facts", id: "facts" }, el("p", { class: "empty" }, "Loading…"));
    this.banner = el("div", { class: "banner failure", id: "banner", role: "alert" });
    this.banner.hidden = true;
    this.log = new LogView(id, line);
    this.log.onrender = () => this.showBanner();
    const raw = `/builds/${encodeURIComponent(id)}/log${token ? `?token=${encodeURIComponent(token)}` : ""}`;
    main.append(
      el("h1", {}, "Build ", el("span", { id: "build-id" }, id)),
      this.banner,
      this.facts,
      el("p", { class: "actions" },
        el("a", { id: "raw-log", href: raw, target: "_blank", rel: "noopener" }, "Raw log"),
        this.timestampToggle()),
      this.log.box,
      this.log.follow,
    );
  }

  async load() {
    const build = await this.conn.request("get_build", { build: this.id });
    this.show(build);
    await this.conn.request("subscribe", { build: this.id, from: this.seq });
  }

  leave() {
    if (this.conn.open) this.conn.request("unsubscribe", { build: this.id }).catch(() => {});
  }

  push(command, payload) {
    if (command === "log" && payload.build === this.id) {
      if (payload.seq <= this.seq) return; // already shown
      this.seq = payload.seq;
      this.log.write(payload.log, payload.time ?? null);
    } else if (command === "state" && payload.id === this.id) {
      this.show(payload);
    }
  }

  timestampToggle() {
    const box = el("input", { type: "checkbox", id: "timestamps" });
    box.checked = this.log.timestamps;
    box.onchange = () => {
      this.log.timestamps = box.checked;
      localStorage.setItem("citron-timestamps", box.checked ? "on" : "off");
      this.log.schedule();
    };
    return el("label", { class: "toggle" }, box, " Timestamps");
  }

  // What failed, where: the failing section's title (the script line, as
  // the runner named it) and the exit code the runner reported.
  showBanner() {
    const b = this.build;
    if (!b || b.state !== "failure") {
      this.banner.hidden = true;
      return;
    }
    const section = this.log.failedSection();
    const known = b.exit_code !== null && b.exit_code !== undefined;
    const text = section
      ? el("span", {}, "Failed: ", el("code", {}, section.title), known ? ` exited with code ${b.exit_code}.` : " failed.")
      : el("span", {}, `The build failed${known ? ` (exit code ${b.exit_code})` : ""}.`);
    if (this.banner.textContent !== text.textContent) this.banner.replaceChildren(text);
    this.banner.hidden = false;
  }

  // The script, a line each; with steps, each line's state and time (the
  // lines that did not run too), like a CI's step list.
  scriptList(b) {
    const steps = b.steps && b.steps.length === b.script.length ? b.steps : null;
    return el("ol", { class: "script" }, ...b.script.map((line, i) => {
      const item = el("li", {}, el("code", {}, line));
      if (steps) {
        item.dataset.step = steps[i].state;
        item.prepend(stepBadge(steps[i]), " ");
        if (steps[i].duration !== null && steps[i].duration !== undefined) {
          item.append(el("span", { class: "time" }, stepTime(steps[i].duration)));
        }
      }
      return item;
    }));
  }

  show(b) {
    this.build = b;
    this.log.state = b.state;
    this.log.script = b.script;
    this.log.steps = b.steps ?? null;
    this.log.schedule();
    this.showBanner();
    const rows = [
      ["State", badge(b.state)], ["Repository", b.repo], ["Ref", b.ref ?? "-"],
      ["Commit", b.commit ? el("code", { title: b.commit }, b.commit) : "-"], ["Type", b.type ?? "-"],
      ["Runner", b.runner ?? "-"], ["Attempt", b.attempt], ["Created", time(b.created)],
      ["Started", time(b.started)], ["Finished", time(b.finished)], ["Duration", duration(b)],
      ["Exit code", b.exit_code ?? "-"],
      ["Script", this.scriptList(b)],
      ["Log", `${b.log_seq} chunks, ${b.log_bytes} bytes${b.truncated ? " (truncated)" : ""}`],
    ];
    this.facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-fact": k.toLowerCase() }, v)]));
  }
}

// -- routing ------------------------------------------------------------------------

const conn = new Connection();
let view = null;

function route() {
  const main = document.getElementById("main");
  main.replaceChildren();
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (view && view.leave) view.leave();
  if (parts[0] === "builds" && parts[1]) {
    const line = parts[2] ? parseInt(parts[2], 10) : NaN;
    view = new BuildView(conn, main, parts[1], Number.isFinite(line) ? line : null);
  } else if (parts[0] === "builds") {
    view = new BuildsView(conn, main);
  } else if (parts[0] === "runners") {
    view = new RunnersView(conn, main);
  } else {
    view = new BuildsView(conn, main); // the default: what a CI's users come for
  }
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.dataset.view === (parts[0] === "runners" ? "runners" : "builds"));
  }
  if (conn.open) view.load().catch(showError);
}

function showError(error) {
  const message = String(error.message || error);
  if (message.startsWith("unauthorized")) { // a WEB token is needed, other roles are open
    askToken(token ? "The server refused this token for reading." : "This server needs a token to read.");
    return;
  }
  const main = document.getElementById("main");
  if (!main.querySelector(".error")) main.append(el("p", { class: "error empty" }, String(error.message || error)));
}

conn.pushHandlers.add((command, payload) => view && view.push(command, payload));
conn.openHandlers.add(() => view && view.load().catch(showError));
window.addEventListener("hashchange", route);
route();
