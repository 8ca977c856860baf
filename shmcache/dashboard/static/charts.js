/* charts.js - two small canvas charts for the shmcache dashboard (no dependencies).
 *
 * LineChart: time series, one line per named series, a rolling window of points;
 * a null value is a gap (no reads in that interval means no hit ratio, not zero).
 * BarChart: categories on the x axis, one bar per series, stacked or side by side.
 * Both redraw fully on every update (a few hundred points: cheaper than bookkeeping),
 * scale for devicePixelRatio, and record on the canvas how much data they hold
 * (data-points) so a test, or a curious operator, can see that data arrived.
 */
"use strict";

const PALETTE = ["#3366cc", "#dc7633", "#28a745", "#8e44ad", "#c0392b", "#17a2b8",
                 "#b7950b", "#566573", "#e84393", "#2e86c1"];

function setupCanvas(canvas) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 400, h = canvas.clientHeight || 200;
  if (canvas.width !== Math.round(w * ratio) || canvas.height !== Math.round(h * ratio)) {
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  return { ctx, w, h };
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 4, 6, 8, 10]) if (m * p >= v) return m * p;  // quarters stay round
  return 10 * p;
}

function fmtNumber(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(1) + "G";
  if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (v / 1e3).toFixed(0) + "k";
  if (a >= 1e3) return (v / 1e3).toFixed(1) + "k";
  if (a >= 10 || Number.isInteger(v)) return v.toFixed(0);
  return v.toPrecision(2);
}

function fmtBytes(v) {
  if (!(v > 0)) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : v.toFixed(0)) + " " + units[i];
}

function fmtPercent(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"; }

function drawAxes(ctx, area, yMax, yFormat, w) {
  ctx.strokeStyle = "#e2e5eb";
  ctx.fillStyle = "#6b7385";
  ctx.lineWidth = 1;
  ctx.font = "11px system-ui, sans-serif";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = area.top + area.height * (1 - i / 4);
    ctx.beginPath();
    ctx.moveTo(area.left, Math.round(y) + 0.5);
    ctx.lineTo(w - 8, Math.round(y) + 0.5);
    ctx.stroke();
    ctx.fillText(yFormat(yMax * i / 4), area.left - 6, y);
  }
}

function renderLegend(canvas, series) {
  const el = document.querySelector('.legend[data-for="' + canvas.id + '"]');
  if (!el) return;
  const key = series.map((s) => s.name).join("\u0000");
  if (el.dataset.key === key) return;
  el.dataset.key = key;
  el.textContent = "";
  for (const s of series) {
    const item = document.createElement("span");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = s.color;
    item.appendChild(sw);
    item.appendChild(document.createTextNode(s.name));
    el.appendChild(item);
  }
}

class LineChart {
  /* options: yFormat(value) -> label, yMax (fixed; else from the data), window (points) */
  constructor(canvas, options) {
    this.canvas = canvas;
    this.opts = Object.assign({ yFormat: fmtNumber, yMax: null, window: 180 }, options || {});
    this.times = [];
    this.series = new Map();   // name -> {name, color, values[]}
    this.count = 0;
  }

  /* Append one point: values maps series name -> number or null. */
  push(time, values) {
    this.times.push(time);
    for (const s of this.series.values()) s.values.push(null);
    for (const [name, v] of Object.entries(values)) {
      let s = this.series.get(name);
      if (!s) {
        s = { name, color: PALETTE[this.series.size % PALETTE.length],
              values: new Array(this.times.length).fill(null) };
        this.series.set(name, s);
      }
      s.values[this.times.length - 1] = (v === null || v === undefined || !isFinite(v)) ? null : v;
    }
    if (this.times.length > this.opts.window) {
      this.times.shift();
      for (const s of this.series.values()) s.values.shift();
    }
    this.count++;
    this.canvas.dataset.points = String(this.count);
    this.canvas.dataset.series = String(this.series.size);
    this.draw();
  }

  last(name) {
    const s = this.series.get(name);
    return s ? s.values[s.values.length - 1] : null;
  }

  draw() {
    const { ctx, w, h } = setupCanvas(this.canvas);
    const area = { left: 48, top: 8, width: w - 56, height: h - 26 };
    let max = this.opts.yMax;
    if (max === null) {
      max = 0;
      for (const s of this.series.values()) for (const v of s.values) if (v !== null && v > max) max = v;
      max = niceMax(max);
    }
    drawAxes(ctx, area, max, this.opts.yFormat, w);
    const n = this.times.length;
    if (n > 1) {
      const t0 = this.times[0], t1 = this.times[n - 1];
      ctx.fillStyle = "#6b7385";
      ctx.textAlign = "left";
      ctx.fillText("-" + Math.round(t1 - t0) + " s", area.left, h - 8);
      ctx.textAlign = "right";
      ctx.fillText("now", w - 8, h - 8);
      const xOf = (t) => area.left + (t1 === t0 ? area.width : area.width * (t - t0) / (t1 - t0));
      const yOf = (v) => area.top + area.height * (1 - Math.min(v, max) / max);
      ctx.lineWidth = 1.8;
      for (const s of this.series.values()) {
        ctx.strokeStyle = s.color;
        ctx.beginPath();
        let pen = false;
        for (let i = 0; i < n; i++) {
          const v = s.values[i];
          if (v === null) { pen = false; continue; }
          const x = xOf(this.times[i]), y = yOf(v);
          if (pen) ctx.lineTo(x, y); else ctx.moveTo(x, y);
          pen = true;
        }
        ctx.stroke();
      }
    }
    renderLegend(this.canvas, [...this.series.values()]);
  }
}

class BarChart {
  /* options: stacked (bool), yFormat, series: [{name, color?}] in drawing order */
  constructor(canvas, options) {
    this.canvas = canvas;
    this.opts = Object.assign({ stacked: false, yFormat: fmtNumber }, options || {});
    this.series = (this.opts.series || []).map((s, i) => ({
      name: s.name, color: s.color || PALETTE[i % PALETTE.length] }));
    this.labels = [];
    this.data = {};
    this.updates = 0;
  }

  /* labels: category names; data maps series name -> array of values per label. */
  set(labels, data) {
    this.labels = labels;
    this.data = data;
    this.updates++;
    this.canvas.dataset.points = String(this.updates);
    this.canvas.dataset.bars = String(labels.length);
    this.draw();
  }

  draw() {
    const { ctx, w, h } = setupCanvas(this.canvas);
    const area = { left: 68, top: 8, width: w - 76, height: h - 30 };
    const n = this.labels.length;
    let max = 0;
    for (let i = 0; i < n; i++) {
      if (this.opts.stacked) {
        let sum = 0;
        for (const s of this.series) sum += (this.data[s.name] || [])[i] || 0;
        max = Math.max(max, sum);
      } else {
        for (const s of this.series) max = Math.max(max, (this.data[s.name] || [])[i] || 0);
      }
    }
    max = niceMax(max);
    drawAxes(ctx, area, max, this.opts.yFormat, w);
    if (n === 0) {
      ctx.fillStyle = "#6b7385";
      ctx.textAlign = "center";
      ctx.fillText("no data", area.left + area.width / 2, area.top + area.height / 2);
    }
    const slot = area.width / Math.max(n, 1);
    const barW = Math.max(2, slot * 0.7);
    const perSeries = this.opts.stacked ? barW : barW / Math.max(this.series.length, 1);
    ctx.font = "10px system-ui, sans-serif";
    for (let i = 0; i < n; i++) {
      const x0 = area.left + slot * i + (slot - barW) / 2;
      let base = 0;
      this.series.forEach((s, j) => {
        const v = (this.data[s.name] || [])[i] || 0;
        const hgt = area.height * v / max;
        const x = this.opts.stacked ? x0 : x0 + perSeries * j;
        const y = area.top + area.height * (1 - base / max) - hgt;
        ctx.fillStyle = s.color;
        ctx.fillRect(x, y, Math.max(1, perSeries - 1), hgt);
        if (this.opts.stacked) base += v;
      });
      if (n <= 24 || i % Math.ceil(n / 24) === 0) {
        ctx.save();
        ctx.fillStyle = "#6b7385";
        ctx.textAlign = "center";
        ctx.fillText(this.labels[i], x0 + barW / 2, h - 10);
        ctx.restore();
      }
    }
    renderLegend(this.canvas, this.series);
  }
}

window.ShmCharts = { LineChart, BarChart, fmtNumber, fmtBytes, fmtPercent };
