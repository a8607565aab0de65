/* Curves of the run report (lightning_cs336.report): a small SVG plotter, inlined into the page, no dependencies.
 * Data (JSON in #report-data): {runs: [{label, color}], panels: [{title, keys, series: [{run, key, x, y, n}]}]};
 * y holds null where a value was NaN/inf; n is the series' length before downsampling.
 * Every string from the data reaches the page through textContent or setAttribute, never as HTML. */
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var DASHES = ["", "6 3", "2 3", "8 3 2 3", "12 4", "1 3"];
  var H = 260;
  var M = { l: 60, r: 14, t: 10, b: 26 };
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var hiddenRuns = {};
  var smoothing = 0;
  var charts = [];

  function svgEl(tag, attrs, parent) {
    var node = document.createElementNS(NS, tag);
    for (var k in attrs) node.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(node);
    return node;
  }

  function htmlEl(tag, cls, parent, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  // The debiased EMA of W&B (lightning_cs336.runs.ema); a null stays null and does not disturb the average.
  function ema(ys, w) {
    if (!w) return ys;
    var out = [], last = 0, n = 0;
    for (var i = 0; i < ys.length; i++) {
      if (ys[i] === null) { out.push(null); continue; }
      n++;
      last = last * w + (1 - w) * ys[i];
      out.push(last / (1 - Math.pow(w, n)));
    }
    return out;
  }

  function fmt(v, digits) {
    if (v === null || v === undefined || !isFinite(v)) return "NaN/inf";
    var a = Math.abs(v);
    if (a !== 0 && (a >= 1e6 || a < 1e-3)) {
      return v.toExponential(Math.max(0, (digits || 5) - 2)).replace(/\.?0+e/, "e");
    }
    return String(Number(v.toPrecision(digits || 5)));
  }

  function niceStep(span, n) {
    var raw = span / n, p = Math.pow(10, Math.floor(Math.log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10) * p;
  }

  function linTicks(lo, hi, n) {
    var s = niceStep(hi - lo || Math.abs(hi) || 1, n), out = [];
    for (var v = Math.ceil(lo / s) * s; v <= hi + s * 1e-9; v += s) out.push(Math.abs(v) < s * 1e-9 ? 0 : v);
    return out;
  }

  // Ticks of a log axis whose ends are lo, hi (log10 values), returned as log10 values.
  function logTicks(lo, hi) {
    var out = [], every = Math.max(1, Math.ceil((hi - lo) / 6));
    var mults = hi - lo > 2 ? [1] : [1, 2, 5];
    for (var e = Math.floor(lo); e <= Math.ceil(hi); e++) {
      if (e % every) continue;
      mults.forEach(function (m) {
        var v = e + Math.log10(m);
        if (v >= lo - 1e-9 && v <= hi + 1e-9) out.push(v);
      });
    }
    if (out.length >= 2) return out;
    return linTicks(Math.pow(10, lo), Math.pow(10, hi), 4).filter(function (v) { return v > 0; }).map(Math.log10);
  }

  // The index of the point of sorted xs nearest to x.
  function nearest(xs, x) {
    var lo = 0, hi = xs.length - 1;
    while (hi - lo > 1) {
      var mid = (lo + hi) >> 1;
      if (xs[mid] < x) lo = mid; else hi = mid;
    }
    return Math.abs(xs[lo] - x) <= Math.abs(xs[hi] - x) ? lo : hi;
  }

  function Chart(panel, parent) {
    var self = this;
    this.panel = panel;
    this.log = false;
    this.hiddenKeys = {};
    this.box = htmlEl("div", "chart", parent);
    var head = htmlEl("div", "chart-head", this.box);
    htmlEl("h3", "", head, panel.title);
    var label = htmlEl("label", "", head);
    var box = htmlEl("input", "", label);
    box.type = "checkbox";
    label.appendChild(document.createTextNode(" log y"));
    box.addEventListener("change", function () { self.log = box.checked; self.draw(); });
    this.svg = svgEl("svg", { height: H, role: "img" }, this.box);
    this.tip = htmlEl("div", "tooltip", this.box);
    this.legend = htmlEl("div", "legend", this.box);
    this.buildLegend();
    this.svg.addEventListener("mousemove", function (e) { self.hover(e); });
    this.svg.addEventListener("mouseleave", function () { self.unhover(); });
  }

  Chart.prototype.buildLegend = function () {
    var self = this, panel = this.panel, seen = {}, thinned = false;
    this.items = [];
    panel.series.forEach(function (s) {
      seen[s.run] = true;
      if (s.n > s.x.length) thinned = true;
    });
    data.runs.forEach(function (run, i) {
      if (!seen[i]) return;
      var item = htmlEl("span", "", self.legend);
      htmlEl("span", "swatch", item).style.background = run.color;
      item.appendChild(document.createTextNode(run.label));
      item.title = "click to hide or show this run in every panel";
      item.addEventListener("click", function () {
        hiddenRuns[i] = !hiddenRuns[i];
        charts.forEach(function (c) { c.draw(); });
      });
      self.items.push({ node: item, off: function () { return hiddenRuns[i]; } });
    });
    if (panel.keys.length > 1) {
      panel.keys.forEach(function (key, k) {
        var item = htmlEl("span", "", self.legend);
        var sample = svgEl("svg", { viewBox: "0 0 22 8" }, item);
        svgEl("line", { x1: 0, y1: 4, x2: 22, y2: 4, stroke: "#4b5563", "stroke-width": 1.6,
          "stroke-dasharray": DASHES[k % DASHES.length] }, sample);
        item.appendChild(document.createTextNode(key));
        item.title = "click to hide or show this metric";
        item.addEventListener("click", function () { self.hiddenKeys[key] = !self.hiddenKeys[key]; self.draw(); });
        self.items.push({ node: item, off: function () { return self.hiddenKeys[key]; } });
      });
    }
    if (thinned) htmlEl("small", "", this.legend, "(long series downsampled, min/max kept)");
  };

  Chart.prototype.draw = function () {
    var self = this, svg = this.svg, panel = this.panel, log = this.log;
    this.items.forEach(function (it) { it.node.className = it.off() ? "off" : ""; });
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    this.view = null;
    var W = Math.max(200, Math.round(svg.getBoundingClientRect().width) || 560);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    var tr = log ? function (v) { return v !== null && v > 0 ? Math.log10(v) : null; } : function (v) { return v; };
    var shown = [], x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    panel.series.forEach(function (s) {
      if (hiddenRuns[s.run] || self.hiddenKeys[s.key] || !s.x.length) return;
      var sm = ema(s.y, smoothing);
      var dash = DASHES[panel.keys.indexOf(s.key) % DASHES.length];
      var d = { s: s, sm: sm, raw: s.y.map(tr), ys: sm.map(tr), dash: dash };
      shown.push(d);
      x0 = Math.min(x0, s.x[0]);
      x1 = Math.max(x1, s.x[s.x.length - 1]);
      d.raw.concat(d.ys).forEach(function (v) {
        if (v !== null && isFinite(v)) { y0 = Math.min(y0, v); y1 = Math.max(y1, v); }
      });
    });
    if (!shown.length || !isFinite(y0)) {
      svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, svg).textContent =
        shown.length ? "no finite (positive) values to draw" : "every run or metric of this panel is hidden";
      return;
    }
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    var pad = y1 > y0 ? (y1 - y0) * 0.05 : Math.abs(y0) * 0.1 || 1;
    y0 -= pad;
    y1 += pad;
    var pw = W - M.l - M.r, ph = H - M.t - M.b;
    function sx(x) { return M.l + ((x - x0) / (x1 - x0)) * pw; }
    function sy(y) { return M.t + (1 - (y - y0) / (y1 - y0)) * ph; }
    var grid = svgEl("g", { class: "grid" }, svg);
    linTicks(x0, x1, Math.max(2, Math.floor(pw / 90))).forEach(function (x) {
      svgEl("line", { x1: sx(x), x2: sx(x), y1: M.t, y2: M.t + ph }, grid);
      svgEl("text", { x: sx(x), y: H - 8, "text-anchor": "middle" }, svg).textContent = fmt(x, 4);
    });
    (log ? logTicks(y0, y1) : linTicks(y0, y1, 5)).forEach(function (y) {
      svgEl("line", { x1: M.l, x2: M.l + pw, y1: sy(y), y2: sy(y) }, grid);
      svgEl("text", { x: M.l - 6, y: sy(y) + 4, "text-anchor": "end" }, svg).textContent =
        fmt(log ? Math.pow(10, y) : y, 3);
    });
    svgEl("path", { class: "axis", d: "M" + M.l + " " + M.t + "V" + (M.t + ph) + "H" + (M.l + pw), fill: "none" }, svg);
    svgEl("text", { x: 2, y: H - 8 }, svg).textContent = "step";
    var lines = svgEl("g", {}, svg);
    shown.forEach(function (d) {
      var color = data.runs[d.s.run].color;
      var attrs = { stroke: color, "stroke-dasharray": d.dash, "data-run": d.s.run, "data-key": d.s.key };
      var layers = smoothing ? [[d.raw, "line raw"], [d.ys, "line"]] : [[d.ys, "line"]];
      layers.forEach(function (layer) {
        var path = "", pen = false;
        layer[0].forEach(function (y, i) {
          if (y === null || !isFinite(y)) { pen = false; return; }
          path += (pen ? "L" : "M") + sx(d.s.x[i]).toFixed(1) + " " + sy(y).toFixed(1);
          pen = true;
        });
        if (path) svgEl("path", Object.assign({ class: layer[1], d: path }, attrs), lines);
      });
      if (d.s.x.length <= 25) { // sparse series (val/loss): mark the points, a lone one would not show as a line
        d.ys.forEach(function (y, i) {
          if (y !== null && isFinite(y)) svgEl("circle", { cx: sx(d.s.x[i]), cy: sy(y), r: 2.5, fill: color }, lines);
        });
      }
    });
    this.cursor = svgEl("line", { class: "cursor", y1: M.t, y2: M.t + ph, visibility: "hidden" }, svg);
    this.dots = svgEl("g", {}, svg);
    this.view = { W: W, x0: x0, x1: x1, pw: pw, sx: sx, sy: sy, shown: shown };
  };

  Chart.prototype.hover = function (e) {
    var v = this.view;
    if (!v) return;
    var rect = this.svg.getBoundingClientRect(), scale = v.W / rect.width;
    var px = (e.clientX - rect.left) * scale;
    if (px < M.l || px > M.l + v.pw) { this.unhover(); return; }
    var step = v.x0 + ((px - M.l) / v.pw) * (v.x1 - v.x0), multi = this.panel.keys.length > 1;
    var tip = this.tip, dots = this.dots;
    while (dots.firstChild) dots.removeChild(dots.firstChild);
    tip.textContent = "";
    htmlEl("div", "", tip).appendChild(htmlEl("b", "", null, "step ≈ " + Math.round(step)));
    v.shown.forEach(function (d) {
      var i = nearest(d.s.x, step), run = data.runs[d.s.run], y = d.ys[i];
      if (y !== null && isFinite(y)) {
        svgEl("circle", { cx: v.sx(d.s.x[i]), cy: v.sy(y), r: 3.5, fill: run.color }, dots);
      }
      var row = htmlEl("div", "", tip);
      htmlEl("span", "swatch", row).style.background = run.color;
      var text = run.label + (multi ? " · " + d.s.key : "") + ": " + fmt(d.sm[i]) + " @ " + d.s.x[i];
      row.appendChild(document.createTextNode(text + (smoothing ? " (raw " + fmt(d.s.y[i]) + ")" : "")));
    });
    this.cursor.setAttribute("x1", px);
    this.cursor.setAttribute("x2", px);
    this.cursor.setAttribute("visibility", "visible");
    tip.style.display = "block";
    var boxRect = this.box.getBoundingClientRect(), left = e.clientX - boxRect.left + 14;
    if (left + tip.offsetWidth > boxRect.width) left = Math.max(0, e.clientX - boxRect.left - tip.offsetWidth - 14);
    tip.style.left = left + "px";
    tip.style.top = Math.max(0, e.clientY - boxRect.top - tip.offsetHeight / 2) + "px";
  };

  Chart.prototype.unhover = function () {
    this.tip.style.display = "none";
    if (this.cursor) this.cursor.setAttribute("visibility", "hidden");
    if (this.dots) while (this.dots.firstChild) this.dots.removeChild(this.dots.firstChild);
  };

  var parent = document.getElementById("charts");
  if (parent) {
    data.panels.forEach(function (panel) { charts.push(new Chart(panel, parent)); });
    charts.forEach(function (c) { c.draw(); });
    var slider = document.getElementById("smoothing"), shownValue = document.getElementById("smoothing-value");
    slider.addEventListener("input", function () {
      smoothing = Math.min(0.99, Math.max(0, Number(slider.value) || 0));
      shownValue.textContent = smoothing.toFixed(2);
      charts.forEach(function (c) { c.draw(); });
    });
    var pending = null;
    window.addEventListener("resize", function () {
      clearTimeout(pending);
      pending = setTimeout(function () { charts.forEach(function (c) { c.draw(); }); }, 100);
    });
  }

  // The sweep view: parallel coordinates, one axis per parameter and one for the metric, one line per trial.
  // Data: {metric, mode, axes: [{name, kind: "number"|"category", log, choices}], rows: [{label, run, state, values,
  // value, step}]}.
  function SweepPlot(sweep, parent) {
    var W = Math.max(420, Math.round(parent.getBoundingClientRect().width) || 900), PH = 300;
    var m = { l: 30, r: 90, t: 26, b: 30 };
    var axes = sweep.axes.concat([{ name: sweep.metric, kind: "number", metric: true }]);
    var svg = svgEl("svg", { viewBox: "0 0 " + W + " " + PH, height: PH, role: "img" }, parent);
    var tip = htmlEl("div", "tooltip", parent);
    var n = axes.length, pw = W - m.l - m.r, ph = PH - m.t - m.b;
    function ax(i) { return m.l + (n > 1 ? (i / (n - 1)) * pw : pw / 2); }
    var metricValues = sweep.rows.map(function (r) { return r.value; }).filter(function (v) { return v !== null; });
    var best = Math.min.apply(null, metricValues), worst = Math.max.apply(null, metricValues);
    if (sweep.mode === "max") { var t = best; best = worst; worst = t; }
    // Each axis maps a value to [0, 1] (1 at the top).
    var scales = axes.map(function (a, i) {
      if (a.kind === "category") {
        var k = a.choices.length;
        return { f: function (v) { var j = a.choices.indexOf(String(v)); return j < 0 ? null : k > 1 ? j / (k - 1) : 0.5; },
          ticks: a.choices.map(function (c, j) { return [k > 1 ? j / (k - 1) : 0.5, c]; }) };
      }
      var vs = a.metric ? metricValues : sweep.rows.map(function (r) { return r.values[i]; });
      vs = vs.filter(function (v) { return v !== null && isFinite(v) && (!a.log || v > 0); });
      var tr = a.log ? Math.log10 : function (v) { return v; };
      var lo = Math.min.apply(null, vs.map(tr)), hi = Math.max.apply(null, vs.map(tr));
      if (!vs.length) { lo = 0; hi = 1; }
      if (lo === hi) { lo -= 0.5; hi += 0.5; }
      var f = function (v) { return v === null || !isFinite(v) || (a.log && v <= 0) ? null : (tr(v) - lo) / (hi - lo); };
      var ticks = (a.log ? logTicks(lo, hi) : linTicks(lo, hi, 4)).map(function (t) {
        return [(t - lo) / (hi - lo), fmt(a.log ? Math.pow(10, t) : t, 3)];
      });
      return { f: f, ticks: ticks };
    });
    axes.forEach(function (a, i) {
      var g = svgEl("g", { class: "pc-axis", "data-axis": a.name }, svg);
      svgEl("line", { x1: ax(i), x2: ax(i), y1: m.t, y2: m.t + ph, stroke: "#9ca3af" }, g);
      svgEl("text", { x: ax(i), y: m.t - 10, "text-anchor": i === 0 ? "start" : i === n - 1 ? "end" : "middle",
        "font-weight": "600" }, g).textContent = a.name + (a.log ? " (log)" : "");
      scales[i].ticks.forEach(function (t) {
        svgEl("text", { x: ax(i) + 4, y: m.t + (1 - t[0]) * ph + 4 }, g).textContent = t[1];
      });
    });
    function color(v) {
      if (v === null) return "#9ca3af";
      if (!(best !== worst && isFinite(worst - best))) return "#1f77b4";
      var q = Math.abs(v - best) / Math.abs(worst - best); // 0 best, 1 worst
      return "hsl(" + Math.round(220 - 180 * q) + ", 70%, " + Math.round(30 + 35 * q) + "%)";
    }
    var lines = svgEl("g", {}, svg);
    sweep.rows.forEach(function (r) {
      var vals = r.values.concat([r.value]), d = "", pen = false;
      vals.forEach(function (v, i) {
        var y = scales[i].f(v);
        if (y === null) { pen = false; return; }
        d += (pen ? "L" : "M") + ax(i).toFixed(1) + " " + (m.t + (1 - y) * ph).toFixed(1);
        pen = true;
      });
      if (!d) return;
      var failed = r.state === "fail" || r.state === "failed";
      var path = svgEl("path", { class: "pc-line", d: d, fill: "none", stroke: failed ? "#9ca3af" : color(r.value),
        "stroke-width": 2, "stroke-dasharray": r.state === "pruned" ? "5 3" : "", "data-state": r.state,
        "data-label": r.label }, lines);
      path.addEventListener("mousemove", function (e) {
        tip.textContent = "";
        htmlEl("b", "", htmlEl("div", "", tip), r.label + " (" + r.state + (r.step !== null && r.step !== undefined ?
          " at step " + r.step : "") + ")");
        axes.forEach(function (a, i) {
          var v = i < r.values.length ? r.values[i] : r.value;
          htmlEl("div", "", tip, a.name + ": " + (typeof v === "number" ? fmt(v) : v === null ? "–" : String(v)));
        });
        var box = parent.getBoundingClientRect();
        tip.style.display = "block";
        tip.style.left = (e.clientX - box.left + 14) + "px";
        tip.style.top = (e.clientY - box.top + 8) + "px";
        path.setAttribute("stroke-width", 4);
      });
      path.addEventListener("mouseleave", function () { tip.style.display = "none"; path.setAttribute("stroke-width", 2); });
    });
  }

  var sweepParent = document.getElementById("sweep-plot");
  if (sweepParent && data.sweep) SweepPlot(data.sweep, sweepParent);
  document.body.dataset.rendered = "ok";
})();
