// mqttalk watch: keeps the page live. Rows, members and specs come as element trees (see mqttalk/_view.py)
// and are built with createElement / createTextNode only: nothing a peer wrote is ever parsed as HTML.
(() => {
  "use strict";
  const body = document.body;
  const token = body.dataset.token;
  let cursor = body.dataset.cursor;
  const TAGS = new Set(body.dataset.tags.split(" "));
  const ATTRS = new Set(body.dataset.attrs.split(" "));
  const $ = (id) => document.getElementById(id);

  function build(node) {
    if (typeof node === "string") return document.createTextNode(node);
    const [tag, attrs, ...kids] = node;
    if (!TAGS.has(tag)) return document.createTextNode("");
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (!ATTRS.has(key)) continue;
      if (key === "href" && !(value.startsWith("#") || value.startsWith("/body/"))) continue;
      el.setAttribute(key, value);
    }
    for (const kid of kids) el.appendChild(build(kid));
    return el;
  }

  function nearBottom() {
    return window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
  }

  function place(tree) {
    const el = build(tree);
    const old = el.id && $(el.id);
    // A row is replaced only by a newer rendering of the same sender's message: another peer reusing
    // its id must not take its place (both stay, the second without the id).
    if (old && old.dataset.from === el.dataset.from) { old.replaceWith(el); return; }
    if (old) el.removeAttribute("id");
    const rows = $("rows");
    const key = el.dataset.key || "";
    let at = rows.lastElementChild;
    while (at && (at.dataset.key || "") > key) at = at.previousElementSibling;
    if (at) at.after(el); else rows.prepend(el);
  }

  function swap(id, tree) {
    const old = $(id);
    if (old) old.replaceWith(build(tree));
  }

  function setLink(text) { $("link").textContent = text; }

  let source = null;
  let lastSeen = Date.now();
  function connect() {
    if (source) source.close();
    const url = `/events?token=${encodeURIComponent(token)}&after=${encodeURIComponent(cursor)}`;
    source = new EventSource(url);
    const seen = () => { lastSeen = Date.now(); };
    source.addEventListener("rows", (e) => {
      seen();
      const data = JSON.parse(e.data);
      const follow = nearBottom();
      data.rows.forEach(place);
      cursor = data.cursor;
      if (follow && data.rows.length) window.scrollTo(0, document.body.scrollHeight);
    });
    source.addEventListener("members", (e) => { seen(); swap("member-list", JSON.parse(e.data)); });
    source.addEventListener("specs", (e) => { seen(); swap("spec-list", JSON.parse(e.data)); });
    source.addEventListener("link", (e) => { seen(); setLink(JSON.parse(e.data).text); });
    source.addEventListener("beat", seen);
    source.onopen = () => { seen(); };
    source.onerror = () => { setLink("page: reconnecting to mqttalk watch…"); };
  }
  // A machine that slept may hold a dead connection nobody noticed: the server beats every 10 s.
  setInterval(() => { if (Date.now() - lastSeen > 30000) { lastSeen = Date.now(); connect(); } }, 3000);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && Date.now() - lastSeen > 12000) connect();
  });
  connect();

  // Older messages, a page at a time.
  const older = $("older");
  if (older) older.addEventListener("click", async () => {
    const first = $("rows").querySelector("article.msg");
    const before = first ? first.dataset.key : "";
    const res = await fetch(`/api/older?before=${encodeURIComponent(before)}`, { headers: { "X-Mqttalk-Token": token } });
    if (!res.ok) return;
    const data = await res.json();
    data.rows.forEach(place);
    $("earlier").textContent = data.left ? `${data.left.toLocaleString()} earlier messages not shown` : "";
    if (!data.left) older.remove();
  });

  // Taking part: a note, a question, or an answer to the selected message.
  let selected = null;
  const kind = $("kind"), text = $("text"), replying = $("replying"), result = $("result");
  function select(row) {
    if (selected) selected.classList.remove("selected");
    selected = (row && row !== selected) ? row : null;
    if (selected) {
      selected.classList.add("selected");
      const who = selected.querySelector(".from").textContent;
      const what = selected.querySelector(".body").textContent.split("\n")[0].slice(0, 80);
      replying.textContent = `answering ${who}: ${what} (click it again to stop)`;
      kind.value = "answer";
    } else {
      replying.textContent = "";
      if (kind.value === "answer") kind.value = "note";
    }
  }
  $("rows").addEventListener("click", (e) => {
    if (e.target.closest("a, details")) return;
    const row = e.target.closest("article.msg");
    if (row) select(row);
  });
  async function send(e) {
    e.preventDefault();
    if (!text.value.trim()) return;
    const message = { kind: kind.value, text: text.value, re: selected ? selected.dataset.id : null };
    if (message.kind !== "answer" && !selected) message.re = null;
    result.textContent = "sending…";
    try {
      const res = await fetch("/api/send", {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-Mqttalk-Token": token },
        body: JSON.stringify(message),
      });
      const data = await res.json();
      if (res.ok) { result.textContent = data.text; text.value = ""; select(null); }
      else result.textContent = `not sent: ${data.error}`;
    } catch (err) {
      result.textContent = `not sent: ${err}`;
    }
  }
  $("compose").addEventListener("submit", send);
  text.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) send(e); });
})();
