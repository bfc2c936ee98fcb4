/* Drawing shared by the HTML report and the web explorer: heatmaps, token grids, top-k bars, attention.
   Plain DOM + SVG, no libraries, so the report stays one small offline file. */
"use strict";

const LensView = (() => {
  const SVG_NS = "http://www.w3.org/2000/svg";

  /** Spaces and newlines shown, so " the" and "the" differ on screen (same marks as the CLI). */
  function visible(token) {
    if (token === "") return "∅";
    return token.replace(/ /g, "·").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "text") node.textContent = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  function svg(tag, attrs = {}) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    return node;
  }

  // ----- colour ----------------------------------------------------------------------------------
  const SEQUENTIAL = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];  // viridis stops

  function mix(stops, t) {
    const x = Math.min(Math.max(t, 0), 1) * (stops.length - 1);
    const i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    const c = stops[i].map((v, j) => Math.round(v + f * (stops[i + 1][j] - v)));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  function quantile(sorted, q) {
    return sorted[Math.min(sorted.length - 1, Math.max(0, Math.round(q * (sorted.length - 1))))];
  }

  /** A colour scale for a set of values: diverging around 0 when they have both signs. The domain
      stops at the 2nd/98th percentiles, so one outlier head (logit-lens KL reaches 180 nats where most
      heads sit near 20) does not wash every other head into one colour; `clipped` marks the legend. */
  function scaleFor(values) {
    const sorted = values.filter(Number.isFinite).sort((a, b) => a - b);
    if (!sorted.length) return { min: 0, max: 0, stops: SEQUENTIAL, color: () => "#eceff3", clipped: [false, false] };
    const robust = sorted.length >= 20;
    const min = robust ? quantile(sorted, 0.02) : sorted[0];
    const max = robust ? quantile(sorted, 0.98) : sorted[sorted.length - 1];
    const clipped = [sorted[0] < min, sorted[sorted.length - 1] > max];
    if (min < 0 && max > 0) {
      const bound = Math.max(-min, max);
      const stops = [[33, 102, 172], [247, 247, 247], [178, 24, 43]];
      return { min: -bound, max: bound, stops, clipped, color: (v) => mix(stops, (v + bound) / (2 * bound)) };
    }
    const span = max - min || 1;
    return { min, max, stops: SEQUENTIAL, clipped, color: (v) => mix(SEQUENTIAL, (v - min) / span) };
  }

  /** A probability as a percentage that stays informative for the tiny values of flat lenses (DLA). */
  function percent(prob) {
    const p = 100 * prob;
    return p >= 1 || p === 0 ? `${p.toFixed(1)}%` : p >= 0.01 ? `${p.toFixed(2)}%` : `${p.toExponential(0)}%`;
  }

  /** Background for a lens probability: white (unsure) to blue (confident), text stays readable. */
  function confidence(prob) {
    const t = Math.sqrt(Math.min(Math.max(prob, 0), 1));
    return `rgba(47,111,222,${(0.06 + 0.54 * t).toFixed(3)})`;
  }

  function format(value) {
    if (!Number.isFinite(value)) return "–";
    if (Number.isInteger(value)) return String(value);
    const size = Math.abs(value);
    return size >= 100 ? value.toFixed(0) : size >= 1 ? value.toFixed(2) : value.toPrecision(3);
  }

  // ----- tooltip ---------------------------------------------------------------------------------
  let tip = null;
  function showTip(event, text) {
    if (!tip) { tip = el("div", { id: "lv-tooltip" }); document.body.append(tip); }
    tip.textContent = text;
    tip.style.display = "block";
    tip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 330)}px`;
    tip.style.top = `${event.clientY + 14}px`;
  }
  function hideTip() { if (tip) tip.style.display = "none"; }

  // ----- heatmap of one number per (layer, head) -------------------------------------------------
  /** opts: {nLayers, nHeads, values: {"l,h": number}, tooltip(l, h) -> text, onClick(l, h), selected: "l,h"} */
  function heatmap(container, opts) {
    container.replaceChildren();
    const cellW = 26, cellH = Math.max(8, Math.min(16, Math.floor(480 / opts.nLayers)));
    const left = 34, top = 16;
    const width = left + opts.nHeads * cellW + 4, height = top + opts.nLayers * cellH + 4;
    const root = svg("svg", { class: "heatmap", width, height, viewBox: `0 0 ${width} ${height}` });
    const scale = scaleFor(Object.values(opts.values));
    for (let h = 0; h < opts.nHeads; h++) {
      const label = svg("text", { x: left + h * cellW + cellW / 2, y: 11, "text-anchor": "middle" });
      label.textContent = `H${h}`;
      root.append(label);
    }
    for (let l = 0; l < opts.nLayers; l++) {
      if (opts.nLayers <= 32 || l % 2 === 0) {
        const label = svg("text", { x: left - 4, y: top + l * cellH + cellH - 3, "text-anchor": "end" });
        label.textContent = `L${l}`;
        root.append(label);
      }
      for (let h = 0; h < opts.nHeads; h++) {
        const key = `${l},${h}`, value = opts.values[key];
        const rect = svg("rect", { class: "cell", x: left + h * cellW, y: top + l * cellH, width: cellW, height: cellH,
          fill: Number.isFinite(value) ? scale.color(value) : "#eceff3", "data-layer": l, "data-head": h });
        if (key === opts.selected) rect.classList.add("selected");
        rect.addEventListener("mousemove", (e) => showTip(e, opts.tooltip(l, h)));
        rect.addEventListener("mouseleave", hideTip);
        if (opts.onClick) rect.addEventListener("click", () => opts.onClick(l, h));
        root.append(rect);
      }
    }
    container.append(root, legend(scale));
  }

  function legend(scale) {
    const ramp = el("span", { class: "ramp" });
    ramp.style.background = `linear-gradient(to right, ${scale.stops.map((c) => `rgb(${c})`).join(",")})`;
    const low = (scale.clipped[0] ? "≤ " : "") + format(scale.min), high = (scale.clipped[1] ? "≥ " : "") + format(scale.max);
    return el("div", { class: "legend" }, el("span", { text: low }), ramp, el("span", { text: high }));
  }

  // ----- decoded tokens --------------------------------------------------------------------------
  /** A grid from the `decode --json` document (the explorer's API answer). */
  function fromDecode(doc) {
    const cells = {};
    for (const r of doc.heads) cells[`${r.position},${r.layer},${r.head}`] = r.top;
    const unread = (doc.unread || []).map(([l, h]) => `${l},${h}`);
    return makeGrid(doc.reading || "raw", doc.text, doc.tokens, doc.positions, doc.heads, cells, unread,
                    doc.unread_below);
  }

  /** A grid from the report's compact form, where each token string is stored once: [id, prob] (raw),
      [id, prob, promoted] or [id, null, change] (effect). */
  function fromCompact(c) {
    const reading = c.reading || "raw";
    const cells = {};
    for (const [key, top] of Object.entries(c.cells)) {
      cells[key] = top.map(([id, prob, value]) => {
        const entry = { id, prob, token: c.strings[id] };
        if (reading === "promoted") entry.promoted = value;
        if (reading === "effect") entry.change = value;
        return entry;
      });
    }
    const records = c.layers.flatMap((layer) => c.heads.map((head) => ({ layer, head })));
    return makeGrid(reading, c.text, c.tokens, c.positions, records, cells, c.unread || [], c.unread_below);
  }

  /** `unread`: "layer,head" of the heads whose effect reading predicted under `unreadBelow` of their measured
      effect on held-back text (decode's `unread`, `unread_below`): their cells are marked "?". */
  function makeGrid(reading, text, tokens, positions, records, cells, unread = [], unreadBelow = 0) {
    const layers = [...new Set(records.map((r) => r.layer))].sort((a, b) => a - b);
    const heads = [...new Set(records.map((r) => r.head))].sort((a, b) => a - b);
    const unreadSet = new Set(unread);
    return { reading, text, tokens, positions, layers, heads, top: (p, l, h) => cells[`${p},${l},${h}`] || [],
             unread: (l, h) => unreadSet.has(`${l},${h}`), unreadBelow };
  }

  /** The number a token shows: its promoted nats (it was ranked by q log(q/prior)), its predicted logit change, or
   * its probability. */
  function score(entry) {
    return entry.promoted != null ? entry.promoted : entry.change != null ? entry.change : entry.prob;
  }

  /** That number as a cell shows it: "+3.2" nats over the prior, "+0.45" logit change, or "12%". */
  function shown(entry, short = false) {
    if (entry.promoted != null) return `${entry.promoted >= 0 ? "+" : ""}${entry.promoted.toFixed(1)}`;
    if (entry.change != null) return `${entry.change >= 0 ? "+" : ""}${entry.change.toFixed(2)}`;
    if (short) return entry.prob < 0.01 ? "<1%" : `${Math.round(100 * entry.prob)}%`;
    return percent(entry.prob);
  }

  /** What a grid cell's colour means under a reading. */
  function colourNote(reading) {
    return reading === "raw" || !reading ? "colour = lens probability"
      : `colour = the cell's ${reading === "promoted" ? "nats over the prior" : "logit change"}, relative to the ` +
        "largest at this position";
  }

  /** Per head: its most promoted tokens over all decoded positions (summed probability, or summed positive
      score under the promoted and effect readings), best first. */
  function promoted(grid, l, h, count = 5) {
    const mass = new Map();
    for (const p of grid.positions) {
      for (const e of grid.top(p, l, h)) {
        const weight = grid.reading === "raw" ? e.prob : Math.max(score(e), 0);
        mass.set(e.token, (mass.get(e.token) || 0) + weight);
      }
    }
    return [...mass.entries()].sort((a, b) => b[1] - a[1]).slice(0, count).map(([token]) => token);
  }

  /** Layers x heads table of each head's top token at one position; colour = the lens's probability. */
  function tokenGrid(container, grid, position, opts = {}) {
    container.replaceChildren();
    // Promoted nats and logit changes have no fixed scale: shade them against this position's largest.
    let largest = 0;
    if (grid.reading !== "raw") {
      for (const l of grid.layers) for (const h of grid.heads) {
        const best = grid.top(position, l, h)[0];
        if (best) largest = Math.max(largest, score(best));
      }
    }
    const shade = (entry) => confidence(grid.reading === "raw" ? entry.prob : largest > 0 ? score(entry) / largest : 0);
    const head = el("tr", {}, el("th", { text: "layer" }), ...grid.heads.map((h) => el("th", { text: `H${h}` })));
    const rows = grid.layers.map((l) => el("tr", {}, el("th", { text: `${l}` }), ...grid.heads.map((h) => {
      const best = grid.top(position, l, h)[0];
      const unread = grid.unread(l, h);
      const caveat = unread ? ` (?: this reading predicted under ${percent(grid.unreadBelow)} of the head's ` +
        "measured effect on held-back text; `attention-lens effects` measures what removing it does)" : "";
      const cell = el("td", { class: "cell", "data-layer": l, "data-head": h,
        title: best ? `L${l} H${h}: ${visible(best.token)} ${shown(best)}${caveat}` : "" });
      if (best) {
        cell.style.background = shade(best);
        cell.append(el("span", { class: "tok", text: visible(best.token) }),
          el("span", { class: "p", text: shown(best, true) }));
        if (unread) cell.append(el("span", { class: "unread", text: " ?" }));
      }
      if (opts.selected === `${l},${h}`) cell.classList.add("selected");
      if (opts.onClick) cell.addEventListener("click", () => opts.onClick(l, h));
      return cell;
    })));
    container.append(el("table", { class: "grid" }, el("thead", {}, head), el("tbody", {}, ...rows)));
  }

  /** Clickable prompt tokens; `weights` (one per token) tints them, e.g. by attention. */
  function chips(container, tokens, selected, onClick, weights = null) {
    container.replaceChildren(...tokens.map((token, i) => {
      const chip = el("span", { class: "chip", "data-position": i, title: `position ${i}`, text: visible(token) });
      if (i === selected) chip.classList.add("selected");
      if (weights) chip.style.background = confidence(weights[i]);
      if (onClick) chip.addEventListener("click", () => onClick(i));
      return chip;
    }));
  }

  /** A head's top-k as bars: probability (raw reading), or the ranked-by number relative to the largest. */
  function topk(container, entries) {
    const raw = entries.every((e) => e.promoted == null && e.change == null);
    const largest = Math.max(0, ...entries.map(score));
    container.replaceChildren(el("div", { class: "topk" }, ...entries.flatMap((e) => {
      const bar = el("div", { class: "bar" });
      const share = raw ? e.prob : largest > 0 ? Math.max(score(e), 0) / largest : 0;
      bar.style.width = `${Math.max(1, 110 * share)}px`;
      return [el("span", { class: "tok", text: visible(e.token) }), el("div", {}, bar),
        el("span", { class: "pct", text: shown(e) })];
    })));
  }

  // ----- measured effects ------------------------------------------------------------------------
  function interval(record, name, digits) {
    const low = record[`${name}_low`], high = record[`${name}_high`];
    return Number.isFinite(low) && Number.isFinite(high) ? ` [${low.toFixed(digits)}, ${high.toFixed(digits)}]` : "";
  }

  function changes(list, count) {
    return list.slice(0, count).map((e) => `${visible(e.token)} ${e.change >= 0 ? "+" : ""}${e.change.toFixed(3)}`)
      .join("  ");
  }

  /** [name, text] rows of a head's measured effect (results.effects["l,h"]): effect size, the share of it the
      evaluated lens's reading recovers (with 95% intervals), and the tokens its removal lowers and raises. */
  function effectRows(record, tokens = 10) {
    if (!record) return [];
    const rows = [];
    if (Number.isFinite(record.effect_kl)) {
      rows.push(["effect size", `KL ${format(record.effect_kl)} nats when removed${interval(record, "effect_kl", 4)}`]);
    }
    if (Number.isFinite(record.recovered)) {
      rows.push(["effect recovered", `${record.recovered.toFixed(3)}${interval(record, "recovered", 3)}` +
        (Number.isFinite(record.dla_recovered) ? ` (dla ${record.dla_recovered.toFixed(3)})` : "")]);
    }
    if (Number.isFinite(record.corr)) rows.push(["effect correlation", record.corr.toFixed(3)]);
    if (Number.isFinite(record.top10_agreement)) rows.push(["top-10 agreement", record.top10_agreement.toFixed(3)]);
    if (Number.isFinite(record.ceiling_recovered)) rows.push(["linear ceiling", record.ceiling_recovered.toFixed(3)]);
    if (record.raises && record.raises.length) rows.push(["raises (true reading)", changes(record.raises, tokens)]);
    if (record.lowers && record.lowers.length) rows.push(["lowers (true reading)", changes(record.lowers, tokens)]);
    return rows;
  }

  /** [name, value] rows of everything the results say about head l.h, its measured effect first (whose numbers
      are then not repeated as the `effect.*` metrics they also are). */
  function headRows(results, l, h) {
    const key = `${l},${h}`;
    const effect = results && results.effects && results.effects[key];
    const rows = effectRows(effect);
    if (!results) return rows;
    for (const [name, values] of Object.entries(results.metrics)) {
      if (effect && /^effect(\.|_kl$)/.test(name)) continue;
      if (key in values) rows.push([name, values[key]]);
    }
    const promoted = results.tokens[key];
    if (promoted) rows.push(["promoted", promoted.map(visible).join("  ")]);
    for (const [k, v] of Object.entries(results.notes[key] || {})) rows.push([k, v]);
    return rows;
  }

  function effectNote(name) {
    return name === "effect recovered"
      ? "(share of the head's measured effect the evaluated lens's reading predicts: 1 = all, 0 = none)"
      : "(KL(P ‖ P without the head), nats: how much the head matters)";
  }

  /** name -> {"l,h": value} of the effects worth a heatmap: recovered (eval --effects) and effect size. */
  function effectMetrics(effects) {
    const maps = {};
    for (const [name, field] of [["effect recovered", "recovered"], ["effect size (KL)", "effect_kl"]]) {
      const values = {};
      for (const [key, record] of Object.entries(effects || {})) {
        if (Number.isFinite(record[field])) values[key] = record[field];
      }
      if (Object.keys(values).length) maps[name] = values;
    }
    return maps;
  }

  /** The head's attention matrix (query rows x key columns) with the chosen query row outlined. */
  function attention(container, tokens, pattern, query) {
    container.replaceChildren();
    const n = tokens.length, cell = Math.max(6, Math.min(18, Math.floor(360 / n)));
    const size = n * cell + 2;
    const root = svg("svg", { class: "attention", width: size, height: size, viewBox: `0 0 ${size} ${size}` });
    for (let q = 0; q < n; q++) {
      for (let k = 0; k <= q; k++) {
        const rect = svg("rect", { x: 1 + k * cell, y: 1 + q * cell, width: cell, height: cell,
          fill: mix([[255, 255, 255], [47, 111, 222], [20, 40, 110]], Math.sqrt(pattern[q][k])) });
        rect.addEventListener("mousemove", (e) => showTip(e,
          `${visible(tokens[q])} (pos ${q}) → ${visible(tokens[k])} (pos ${k}): ${(100 * pattern[q][k]).toFixed(1)}%`));
        rect.addEventListener("mouseleave", hideTip);
        root.append(rect);
      }
    }
    root.append(svg("rect", { x: 1, y: 1 + query * cell, width: n * cell, height: cell, fill: "none",
      stroke: "#e8590c", "stroke-width": 2 }));
    container.append(root);
  }

  function keyValues(container, entries) {
    container.replaceChildren(el("table", { class: "kv" }, el("tbody", {}, ...entries.map(([k, v]) =>
      el("tr", {}, el("td", { text: k }), el("td", { text: typeof v === "number" ? format(v) : String(v) }))))));
  }

  return { attention, chips, colourNote, confidence, effectMetrics, effectNote, effectRows, el, format, fromCompact,
    fromDecode, headRows, heatmap, keyValues, percent, promoted, score, shown, tokenGrid, topk, visible };
})();
