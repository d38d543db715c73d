// Wardpost console: live refresh over server-sent events, keyboard shortcuts, escalation tone.
// Plain JavaScript, no build step, nothing fetched from outside the console.
"use strict";
(function () {
  const csrf = document.querySelector('meta[name="csrf"]')?.content || "";
  let selected = sessionStorage.getItem("selected") || null;
  let muted = new Set(JSON.parse(sessionStorage.getItem("muted") || "[]"));
  let audio = null;
  let toneTimer = null;

  function toast(text) {
    const box = document.getElementById("toast");
    if (!box) return;
    box.textContent = text;
    box.style.display = "block";
    setTimeout(() => { box.style.display = "none"; }, 5000);
  }

  // One refresh per topic at a time; changes meanwhile make one more, so an older answer
  // never lands after a newer one.
  const busy = {};
  const again = {};
  async function refresh(topic) {
    if (busy[topic]) { again[topic] = true; return; }
    busy[topic] = true;
    try { await load(topic); } finally {
      busy[topic] = false;
      if (again[topic]) { again[topic] = false; refresh(topic); }
    }
  }

  // Re-fetch this page and swap every element marked data-live for the topic that changed.
  async function load(topic) {
    const parts = document.querySelectorAll(`[data-live~="${topic}"]`);
    if (!parts.length) return;
    const response = await fetch(location.pathname + location.search, { headers: { "X-Live": "1" } });
    if (response.status === 401) { location.href = "/login?expired=1&next=" + encodeURIComponent(location.pathname); return; }
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    parts.forEach((part) => {
      const fresh = page.getElementById(part.id);
      if (!fresh) return;
      if ("keyed" in part.dataset) mergeRows(part, fresh); else part.replaceWith(fresh);
    });
    afterRender();
  }

  // Keep the rows that did not change (same data-id and data-v): with hundreds of open
  // alarms, a new one costs one row of work, not a whole table.
  function mergeRows(list, fresh) {
    const mine = new Map(Array.from(list.children).map((row) => [row.dataset.id, row]));
    const wanted = Array.from(fresh.children).map((row) => {
      const kept = mine.get(row.dataset.id);
      return kept && kept.dataset.v === row.dataset.v ? kept : row;
    });
    wanted.forEach((row, i) => { if (list.children[i] !== row) list.insertBefore(row, list.children[i] || null); });
    while (list.children.length > wanted.length) list.lastElementChild.remove();
  }

  function age(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 120) return `${seconds} s`;
    if (seconds < 7200) return `${Math.floor(seconds / 60)} min`;
    return `${Math.floor(seconds / 3600)} h ${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}`;
  }

  function tickAges() {
    const now = Date.now() / 1000;
    document.querySelectorAll("td.age[data-since]").forEach((cell) => {
      const text = age(now - Number(cell.dataset.since));
      if (cell.textContent !== text) cell.textContent = text;
    });
  }

  function rows() { return Array.from(document.querySelectorAll("tr.alarm")); }

  function select(row) {
    rows().forEach((r) => r.classList.toggle("selected", r === row));
    selected = row ? row.dataset.id : null;
    if (selected) sessionStorage.setItem("selected", selected);
    if (row) row.scrollIntoView({ block: "nearest" });
  }

  function current() { return rows().find((r) => r.dataset.id === selected) || null; }

  function afterRender() {
    const row = current() || rows()[0] || null;
    select(row);
    const escalated = Array.from(document.querySelectorAll("tr.alarm.escalated")).map((r) => r.dataset.id);
    const loud = escalated.filter((id) => !muted.has(id));
    if (loud.length && !toneTimer) { tone(); toneTimer = setInterval(tone, 2000); }
    if (!loud.length && toneTimer) { clearInterval(toneTimer); toneTimer = null; }
    document.body.dataset.tone = toneTimer ? "on" : "off";
    document.body.dataset.rendered = String(Date.now());
  }

  function tone() {
    try {
      audio = audio || new AudioContext();
      const osc = audio.createOscillator();
      const gain = audio.createGain();
      osc.frequency.value = 880;
      gain.gain.value = 0.2;
      osc.connect(gain).connect(audio.destination);
      osc.start();
      osc.stop(audio.currentTime + 0.25);
    } catch (e) { /* no audio device: the blinking row still shows it */ }
  }

  async function post(url, fields) {
    const body = new FormData();
    Object.entries(fields || {}).forEach(([k, v]) => body.append(k, v));
    const response = await fetch(url, {
      method: "POST", body, headers: { "X-CSRF-Token": csrf, "X-Requested-With": "fetch" },
    });
    if (response.status === 401) { location.href = "/login?expired=1"; return false; }
    if (!response.ok) {
      let message = response.statusText;
      try { message = (await response.json()).error; } catch (e) { message = await response.text(); }
      toast(message);
      return false;
    }
    return true;
  }

  function act(action, row) {
    row = row || current();
    if (!row) return;
    if (action === "resolve") { openResolve(row.dataset.id); return; }
    post(`/alarms/${row.dataset.id}/${action}`);
  }

  function openResolve(id) {
    const dialog = document.getElementById("resolve-dialog");
    if (!dialog) return;
    dialog.querySelector("form").action = `/alarms/${id}/resolve`;
    dialog.showModal();
    dialog.querySelector("textarea").focus();
  }

  // Forms marked data-fetch post in the background; the live stream redraws the page.
  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (!form.matches("form[data-fetch]")) return;
    event.preventDefault();
    const fields = Object.fromEntries(new FormData(form).entries());
    if (await post(form.action, fields)) {
      form.closest("dialog")?.close();
      form.reset();
    }
  });

  document.addEventListener("click", (event) => {
    const button = event.target.closest("[data-action]");
    if (button) { event.stopPropagation(); act(button.dataset.action, button.closest("tr.alarm")); return; }
    const row = event.target.closest("tr.alarm");
    if (row && !event.target.closest("a, button, form")) select(row);
  });

  document.addEventListener("dblclick", (event) => {
    const row = event.target.closest("tr.alarm");
    if (row) location.href = `/alarms/${row.dataset.id}`;
  });

  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, textarea, select, dialog") || event.ctrlKey || event.altKey || event.metaKey) return;
    const list = rows();
    const index = list.indexOf(current());
    const keys = {
      j: () => select(list[Math.min(list.length - 1, index + 1)]),
      ArrowDown: () => select(list[Math.min(list.length - 1, index + 1)]),
      k: () => select(list[Math.max(0, index - 1)]),
      ArrowUp: () => select(list[Math.max(0, index - 1)]),
      a: () => act("acknowledge"),
      r: () => act("resolve"),
      s: () => act("silence"),
      Enter: () => { const row = current(); if (row) location.href = `/alarms/${row.dataset.id}`; },
      m: () => {
        document.querySelectorAll("tr.alarm.escalated").forEach((r) => muted.add(r.dataset.id));
        sessionStorage.setItem("muted", JSON.stringify([...muted]));
        afterRender();
      },
      1: () => { location.href = "/"; },
      2: () => { location.href = "/devices"; },
      3: () => { location.href = "/reports"; },
      4: () => { location.href = "/audit"; },
      Escape: () => { if (location.pathname !== "/") location.href = "/"; },
    };
    const run = keys[event.key];
    if (run) { event.preventDefault(); run(); }
  });

  function listen() {
    const stream = new EventSource("/stream");
    ["alarms", "devices"].forEach((topic) => stream.addEventListener(topic, () => refresh(topic)));
    stream.addEventListener("hello", () => { document.body.dataset.live = "connected"; });
    stream.addEventListener("logout", () => { stream.close(); location.href = "/login?expired=1"; });
    stream.onerror = () => {
      document.body.dataset.live = "reconnecting";
      // The stream may have ended because the session did: ask the page itself.
      fetch(location.pathname, { headers: { "X-Live": "1" } }).then((r) => {
        if (r.status === 401) { stream.close(); location.href = "/login?expired=1"; }
      }).catch(() => {});
    };
  }

  if (csrf) { afterRender(); listen(); setInterval(tickAges, 5000); }
})();
