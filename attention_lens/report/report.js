/* The report page: draws the embedded JSON with LensView (grid.js). */
"use strict";

(() => {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const results = data.results;
  const grid = data.prompt ? LensView.fromCompact(data.prompt) : null;
  const $ = (id) => document.getElementById(id);
  const PROMPT_METRIC = { raw: "prompt: mean top-1 probability", promoted: "prompt: mean top promoted nats",
    effect: "prompt: mean top logit change" }[grid ? grid.reading : "raw"];
  const effects = (results && results.effects) || {};
  const state = { position: grid ? grid.positions[grid.positions.length - 1] : 0, head: null };

  /** metric name -> {"l,h": value}: the results files' numbers, then what the prompt alone tells. */
  function metrics() {
    const all = Object.assign({}, results ? results.metrics : {});
    if (grid) {
      const values = {};
      for (const l of grid.layers) for (const h of grid.heads) {
        const tops = grid.positions.map((p) => LensView.score(grid.top(p, l, h)[0] || { prob: 0 }));
        values[`${l},${h}`] = tops.reduce((a, b) => a + b, 0) / tops.length;
      }
      all[PROMPT_METRIC] = values;
    }
    return all;
  }

  function promotedTokens(l, h) {
    const listed = results && results.tokens[`${l},${h}`];
    if (listed) return { tokens: listed, source: "results" };
    if (grid && grid.layers.includes(l) && grid.heads.includes(h)) {
      return { tokens: LensView.promoted(grid, l, h), source: "prompt" };
    }
    return { tokens: [], source: "" };
  }

  function tooltip(name, values) {
    return (l, h) => {
      const lines = [`layer ${l}, head ${h}`, `${name}: ${LensView.format(values[`${l},${h}`])}`];
      const promoted = promotedTokens(l, h);
      if (promoted.tokens.length) {
        const source = promoted.source === "prompt" ? `prompt, ${grid.reading} reading` : promoted.source;
        lines.push(`promoted (${source}): ${promoted.tokens.map(LensView.visible).join("  ")}`);
      }
      for (const [k, v] of LensView.effectRows(effects[`${l},${h}`], 5)) lines.push(`${k}: ${v}`);
      const notes = results && results.notes[`${l},${h}`];
      if (notes) for (const [k, v] of Object.entries(notes)) lines.push(`${k}: ${v}`);
      return lines.join("\n");
    };
  }

  function drawHeatmaps() {
    const all = metrics();
    const names = Object.keys(all);
    if (!names.length) {
      $("heatmaps").append(LensView.el("p", { class: "muted",
        text: "No per-head numbers: pass --eval results.json (from `attention-lens eval`) or --prompt." }));
      $("metric").parentElement.remove();
      return;
    }
    const preferred = (results && results.default_metric) || names[0];
    $("metric").replaceChildren(...names.map((n) => LensView.el("option", { value: n, text: n })));
    $("metric").value = preferred;
    const draw = () => {
      const name = $("metric").value;
      LensView.heatmap($("heatmap"), { nLayers: data.n_layers, nHeads: data.n_heads, values: all[name],
        tooltip: tooltip(name, all[name]), onClick: selectHead, selected: state.head });
      $("metric-note").textContent = /^kl($|_)/.test(name) && name !== "kl_gain_vs_logit"
        ? "(KL in nats: lower = closer to the model)" : name === "kl_gain_vs_logit"
        ? "(logit-lens KL minus lens KL: > 0 = better than the logit lens)" : "";
    };
    $("metric").addEventListener("change", draw);
    const drawEffects = effectHeatmap();
    state.redrawHeatmap = () => { draw(); drawEffects(); };
    state.redrawHeatmap();
    const summary = results ? Object.entries(results.summary) : [];
    if (results && results.sources.length) summary.unshift(["files", results.sources.join(", ")]);
    if (summary.length) LensView.keyValues($("summary"), summary);
    else $("summary-panel").remove();
  }

  /** Next to the metric's heatmap: each head's measured effect (recovered, effect size), when the files have it. */
  function effectHeatmap() {
    const maps = LensView.effectMetrics(effects);
    const names = Object.keys(maps);
    if (!names.length) return () => {};
    $("effect-box").hidden = false;
    $("effect-metric").replaceChildren(...names.map((n) => LensView.el("option", { value: n, text: n })));
    const draw = () => {
      const name = $("effect-metric").value;
      LensView.heatmap($("effect-heatmap"), { nLayers: data.n_layers, nHeads: data.n_heads, values: maps[name],
        tooltip: tooltip(name, maps[name]), onClick: selectHead, selected: state.head });
      $("effect-note").textContent = LensView.effectNote(name);
    };
    $("effect-metric").addEventListener("change", draw);
    return draw;
  }

  function selectHead(l, h) {
    state.head = `${l},${h}`;
    $("head-title").textContent = `Layer ${l}, head ${h}`;
    if (grid) {
      const top = grid.top(state.position, l, h);
      if (top.length) LensView.topk($("topk"), top);
      else $("topk").replaceChildren(LensView.el("p", { class: "muted", text: "not covered by this lens" }));
    }
    const rows = LensView.headRows(results, l, h);
    LensView.keyValues($("head-results"), rows);
    drawGrid();
    if (state.redrawHeatmap) state.redrawHeatmap();
  }

  function drawGrid() {
    $("reading-label").textContent = data.reading.label;
    $("colour-note").textContent = `(${LensView.colourNote(grid.reading)})`;
    LensView.chips($("positions"), grid.tokens, state.position, (p) => {
      state.position = p;
      if (state.head) selectHead(...state.head.split(",").map(Number));
      else drawGrid();
    });
    LensView.tokenGrid($("grid"), grid, state.position, { selected: state.head, onClick: selectHead });
  }

  function drawIdentity() {
    const lens = data.lens;
    $("subtitle").textContent = `${lens.kind} lens · layers ${span(lens.layers)} × heads ${span(lens.heads)} · ` +
      `${data.model.model_type} (${data.n_layers} layers × ${data.n_heads} heads) · attention-lens ${data.version}`;
    LensView.keyValues($("lens-config"), Object.entries(lens).filter(([k]) => k !== "model")
      .map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : v]));
    LensView.keyValues($("fingerprint"), Object.entries(data.model));
  }

  function span(values) {
    const contiguous = values.every((v, i) => i === 0 || v === values[i - 1] + 1);
    return contiguous && values.length > 2 ? `${values[0]}-${values[values.length - 1]}` : values.join(",");
  }

  drawIdentity();
  drawHeatmaps();
  if (grid) drawGrid();
  else $("prompt").remove();
})();
