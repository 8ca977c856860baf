/* app.js - polls api/snapshot and feeds the charts.
 *
 * The server keeps no history: rates are computed here from the difference between two
 * snapshots (counters are totals since the segment was created), and the charts keep
 * a rolling window.  The refresh period is ?interval=SECONDS, else the server's default
 * (data-interval on <body>).  After each update <body data-points> counts the samples
 * the charts received.
 */
"use strict";

(function () {
  const { LineChart, BarChart, fmtNumber, fmtBytes, fmtPercent } = window.ShmCharts;
  const body = document.body;
  const params = new URLSearchParams(location.search);
  const intervalMs = Math.max(100, Number(params.get("interval")) * 1000 ||
                                   Number(body.dataset.interval) || 1000);
  const OPS = ["hits", "misses", "sets", "deletes", "touches", "incrs"];

  const charts = {
    hitratio: new LineChart(document.getElementById("chart-hitratio"),
                            { yMax: 1, yFormat: fmtPercent }),
    ops: new LineChart(document.getElementById("chart-ops")),
    memory: new BarChart(document.getElementById("chart-memory"), {
      stacked: true, yFormat: fmtBytes,
      series: [{ name: "payload", color: "#3366cc" }, { name: "slack in chunks", color: "#f0b27a" },
               { name: "free in class pages", color: "#d5dbe5" }] }),
    frag: new LineChart(document.getElementById("chart-frag"), { yMax: 1, yFormat: fmtPercent }),
    removals: new LineChart(document.getElementById("chart-removals")),
    workers: new BarChart(document.getElementById("chart-workers"), {
      stacked: true, series: [{ name: "reads", color: "#3366cc" }, { name: "writes", color: "#dc7633" }] }),
    sidecar: new LineChart(document.getElementById("chart-sidecar")),
  };

  let prev = null;
  let samples = 0;

  function status(text, ok) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.className = "status " + (ok ? "ok" : "bad");
  }

  function delta(cur, old, key) {
    const a = (cur || {})[key] || 0, b = (old || {})[key] || 0;
    return Math.max(0, a - b);   // a restarted segment starts from zero again
  }

  function ratio(h, m) { return h + m > 0 ? h / (h + m) : null; }

  /* Numeric statistics whose name says "lag" (the sidecar's), wherever they appear. */
  function lagFigures(snap) {
    const out = {};
    for (const [k, v] of Object.entries(snap.stats)) if (/lag/.test(k) && typeof v === "number") out[k] = v;
    for (const [k, v] of Object.entries(snap.sidecar || {})) if (/lag/.test(k) && typeof v === "number") out["sidecar " + k] = v;
    for (const p of snap.cache.processes) {
      for (const [k, v] of Object.entries(p.gauges || {})) if (/lag/.test(k)) out[k + " (pid " + p.pid + ")"] = v;
    }
    return out;
  }

  function slotKey(s) { return s.slot + ":" + s.pid + ":" + s.generation; }

  function updateRates(snap, old) {
    const dt = snap.time - old.time;
    if (!(dt > 0)) return false;
    const c = snap.counters, o = old.counters;
    // Hit ratio over the last interval, per level.
    const hr = { "C_MEMORY (engine, all processes)": ratio(delta(c, o, "hits"), delta(c, o, "misses")) };
    const lv = (snap.cache.groups || {}).levels || {}, lvOld = (old.cache.groups || {}).levels || {};
    for (const [name, figs] of Object.entries(lv)) {
      hr[name + " (publishing processes)"] = ratio(delta(figs, lvOld[name], "hits"), delta(figs, lvOld[name], "misses"));
    }
    charts.hitratio.push(snap.time, hr);

    const ops = {};
    let total = 0;
    for (const k of OPS) { ops[k] = delta(c, o, k) / dt; total += ops[k]; }
    ops.total = total;
    charts.ops.push(snap.time, ops);

    const rem = {};
    for (const k of Object.keys(c)) {
      if (!k.startsWith("evicted_")) continue;
      const name = k.startsWith("evicted_expired_") ? "expired (" + k.slice(16) + ")" : "evicted (" + k.slice(8) + ")";
      rem[name] = delta(c, o, k) / dt;
    }
    charts.removals.push(snap.time, rem);

    const oldSlots = new Map(old.slots.map((s) => [slotKey(s), s]));
    const labels = [], reads = [], writes = [];
    for (const s of snap.slots) {
      const before = oldSlots.get(slotKey(s));
      const sc = s.counters || {}, bc = before ? before.counters : {};
      labels.push("pid " + s.pid + (s.slot === snap.self_slot ? " (dash)" : "") + (s.state !== "live" ? " †" : ""));
      reads.push((delta(sc, bc, "hits") + delta(sc, bc, "misses")) / dt);
      writes.push((delta(sc, bc, "sets") + delta(sc, bc, "deletes") + delta(sc, bc, "touches") + delta(sc, bc, "incrs")) / dt);
    }
    charts.workers.set(labels, { reads, writes });

    const side = Object.assign({ "journal depth (records)": snap.stats.journal_records || 0,
                                 "journal drops/s": delta(snap.stats, old.stats, "journal_dropped") / dt },
                               lagFigures(snap));
    charts.sidecar.push(snap.time, side);
    const note = document.getElementById("sidecar-note");
    note.textContent = Object.keys(lagFigures(snap)).length ? "" :
      (snap.stats.journal_bytes ? "No sidecar lag reported yet: showing the journal only." :
                                  "The write journal is off for this segment and no sidecar reports a lag.");

    document.getElementById("sum-ops").textContent = fmtNumber(total);
    return true;
  }

  function updateMemory(snap) {
    const st = snap.stats;
    charts.frag.push(snap.time, {
      fragmentation: st.fragmentation,
      "memory used": st.data_bytes ? st.used_bytes / st.data_bytes : 0,
    });
    const classes = snap.classes.filter((k) => k.pages > 0 || k.entries > 0);
    charts.memory.set(classes.map((k) => k.chunk_bytes ? fmtBytes(k.chunk_bytes) : "large"), {
      payload: classes.map((k) => k.payload_bytes),
      "slack in chunks": classes.map((k) => Math.max(0, k.used_bytes - k.payload_bytes)),
      "free in class pages": classes.map((k) => k.free_bytes),
    });
  }

  function updateTop(snap) {
    const tbody = document.querySelector("#top-table tbody");
    const funcs = Object.entries(((snap.cache.groups || {}).functions) || {});
    funcs.sort((a, b) => (b[1].hits || 0) - (a[1].hits || 0));
    tbody.textContent = "";
    for (const [name, f] of funcs.slice(0, 15)) {
      const tr = document.createElement("tr");
      const avg = f.computes ? (1000 * f.compute_seconds / f.computes).toFixed(2) + " ms" : "–";
      for (const v of [name, fmtNumber(f.hits || 0), fmtNumber(f.misses || 0),
                       fmtPercent(ratio(f.hits || 0, f.misses || 0)), avg]) {
        const td = document.createElement("td");
        td.textContent = v;   // textContent: names are data, never markup
        tr.appendChild(td);
      }
      tbody.appendChild(tr);
    }
    document.getElementById("top-table").dataset.rows = String(Math.min(funcs.length, 15));
    document.getElementById("top-note").textContent = funcs.length ? "" :
      "No process publishes Python-level figures yet (shmcache.metrics.enable(cache)).";
  }

  function updateSummary(snap) {
    const st = snap.stats;
    document.getElementById("sum-hit").textContent = fmtPercent(st.hit_ratio);
    document.getElementById("sum-entries").textContent = fmtNumber(st.entries);
    document.getElementById("sum-mem").textContent = fmtBytes(st.used_bytes) + " / " + fmtBytes(st.data_bytes);
    document.getElementById("sum-frag").textContent = fmtPercent(st.fragmentation);
    const live = snap.slots.filter((s) => s.state === "live").length;
    document.getElementById("sum-procs").textContent = String(live);
  }

  async function tick() {
    try {
      const r = await fetch("api/snapshot", { cache: "no-store" });
      if (!r.ok) {
        const err = await r.json().catch(() => ({}));
        status(err.error || ("HTTP " + r.status), false);
        body.dataset.state = "waiting";
      } else {
        const snap = await r.json();
        if (prev && updateRates(snap, prev)) samples++;
        updateMemory(snap);
        updateTop(snap);
        updateSummary(snap);
        prev = snap;
        body.dataset.points = String(samples);
        body.dataset.state = "live";
        status("updated " + new Date(snap.time * 1000).toLocaleTimeString() + " · every " + intervalMs / 1000 + " s", true);
      }
    } catch (e) {
      status("cannot reach the dashboard server: " + e, false);
      body.dataset.state = "error";
    } finally {
      setTimeout(tick, intervalMs);
    }
  }

  window.shmcacheDashboard = { charts, intervalMs };
  tick();
})();
