/* The explorer page: sends the prompt to /api/decode, draws the grid, and asks /api/attention on a click. */
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const state = { info: null, grid: null, position: 0, head: null, requested: 0 };

  async function api(path, body) {
    const response = await fetch(path, body === undefined ? {} : {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    return answer;
  }

  function setStatus(text, isError = false) {
    $("status").textContent = text;
    $("status").className = isError ? "error" : "muted";
  }

  async function loadInfo() {
    state.info = await api("/api/info");
    const { lens, model } = state.info;
    $("subtitle").textContent = `${lens.kind} lens on ${model.name || model.model_type} · ${model.model_type}, ` +
      `${state.info.n_layers} layers × ${state.info.n_heads} heads · lens covers ${lens.layers.length} layers`;
    $("k").max = state.info.limits.max_k;
    $("reading").replaceChildren(...Object.entries(state.info.readings).map(([name, label]) =>
      LensView.el("option", { value: name, text: name, title: label })));
    $("reading").value = state.info.reading.name;
    drawResults();
  }

  async function runDecode(event) {
    if (event) event.preventDefault();
    const request = ++state.requested;  // only the latest answer is drawn
    const started = performance.now();
    $("run").disabled = true;
    setStatus("decoding…");
    try {
      const doc = await api("/api/decode", { text: $("prompt").value, k: Number($("k").value), position: "all",
        reading: $("reading").value });
      if (request !== state.requested) return;
      $("reading-label").textContent = state.info.readings[doc.reading];
      $("colour-note").textContent = `(${LensView.colourNote(doc.reading)})`;
      state.grid = LensView.fromDecode(doc);
      state.position = doc.tokens.length - 1;
      state.head = null;
      $("head-panel").hidden = true;
      $("result").hidden = false;
      $("concept-box").hidden = false;
      drawGrid();
      setStatus(`${doc.tokens.length} tokens × ${state.grid.layers.length * state.grid.heads.length} heads ` +
        `in ${Math.round(performance.now() - started)} ms`);
    } catch (error) {
      setStatus(error.message, true);
    } finally {
      $("run").disabled = false;
    }
  }

  function drawGrid() {
    LensView.chips($("positions"), state.grid.tokens, state.position, (p) => { state.position = p; refresh(); });
    LensView.tokenGrid($("grid"), state.grid, state.position, { selected: state.head, onClick: selectHead });
  }

  function refresh() {
    drawGrid();
    if (state.head) selectHead(...state.head.split(",").map(Number));
  }

  async function selectHead(l, h) {
    state.head = `${l},${h}`;
    drawGrid();
    drawResults();
    $("head-panel").hidden = false;
    $("head-title").textContent = `Layer ${l}, head ${h} at position ${state.position} ` +
      `(${LensView.visible(state.grid.tokens[state.position])})`;
    LensView.topk($("topk"), state.grid.top(state.position, l, h));
    drawHeadResults(l, h);
    try {
      const answer = await api("/api/attention", { text: state.grid.text, layer: l, head: h });
      if (state.head !== `${l},${h}`) return;
      const row = answer.pattern[state.position];
      LensView.chips($("attention-chips"), answer.tokens, state.position, null, row);
      LensView.attention($("attention"), answer.tokens, answer.pattern, state.position);
    } catch (error) {
      $("attention").replaceChildren(LensView.el("p", { class: "error", text: error.message }));
    }
  }

  function drawHeadResults(l, h) {
    const results = state.info && state.info.results;
    const rows = LensView.headRows(results, l, h);
    if (!rows.length) rows.push(["fidelity", "no results loaded (serve --eval results.json)"]);
    LensView.keyValues($("head-results"), rows);
  }

  function effectsOf(results) {
    return (results && results.effects) || {};
  }

  /** Heatmap of the loaded results (fidelity, specialization), when the server was given any. */
  function drawResults() {
    const results = state.info && state.info.results;
    if (!results || !Object.keys(results.metrics).length) return;
    $("fidelity").hidden = false;
    if (!$("metric").options.length) {
      $("metric").replaceChildren(...Object.keys(results.metrics).map((n) => LensView.el("option", { value: n, text: n })));
      $("metric").value = results.default_metric;
      $("metric").addEventListener("change", drawResults);
    }
    const tooltip = (name, values) => (l, h) => {
      const tokens = results.tokens[`${l},${h}`] || (state.grid ? LensView.promoted(state.grid, l, h) : []);
      const effect = LensView.effectRows(effectsOf(results)[`${l},${h}`], 5).map(([k, v]) => `\n${k}: ${v}`);
      return `layer ${l}, head ${h}\n${name}: ${LensView.format(values[`${l},${h}`])}` +
        (tokens.length ? `\npromoted: ${tokens.map(LensView.visible).join("  ")}` : "") + effect.join("");
    };
    const onClick = (l, h) => { if (state.grid) selectHead(l, h); };
    const values = results.metrics[$("metric").value];
    LensView.heatmap($("heatmap"), { nLayers: state.info.n_layers, nHeads: state.info.n_heads, values,
      selected: state.head, tooltip: tooltip($("metric").value, values), onClick });
    const maps = LensView.effectMetrics(effectsOf(results));
    if (!Object.keys(maps).length) return;
    $("effect-box").hidden = false;
    if (!$("effect-metric").options.length) {
      $("effect-metric").replaceChildren(...Object.keys(maps).map((n) => LensView.el("option", { value: n, text: n })));
      $("effect-metric").addEventListener("change", drawResults);
    }
    const name = $("effect-metric").value;
    LensView.heatmap($("effect-heatmap"), { nLayers: state.info.n_layers, nHeads: state.info.n_heads,
      values: maps[name], selected: state.head, tooltip: tooltip(name, maps[name]), onClick });
    $("effect-note").textContent = LensView.effectNote(name);
  }

  /** The concept box: per-head lift of the concept's tokens on the decoded prompt, as a heatmap. */
  async function runConcept(event) {
    event.preventDefault();
    if (!state.grid) return;
    $("concept-status").textContent = "searching…";
    $("concept-status").className = "muted";
    try {
      const answer = await api("/api/concept", { text: state.grid.text, concept: $("concept").value });
      const tokens = answer.concept.tokens.map(LensView.visible).join("  ");
      $("concept-status").textContent = `tokens: ${tokens}` +
        (answer.concept.dropped.length ? ` · dropped: ${answer.concept.dropped.join(", ")}` : "");
      LensView.heatmap($("concept-heatmap"), { nLayers: state.info.n_layers, nHeads: state.info.n_heads,
        values: answer.scores, selected: state.head,
        tooltip: (l, h) => `layer ${l}, head ${h}\nlift: ${LensView.format(answer.scores[`${l},${h}`])}`,
        onClick: (l, h) => selectHead(l, h) });
      LensView.keyValues($("concept-top"), answer.top.map((t) => [`head ${t.layer}.${t.head}`, LensView.format(t.lift)]));
    } catch (error) {
      $("concept-status").textContent = error.message;
      $("concept-status").className = "error";
    }
  }

  $("form").addEventListener("submit", runDecode);
  $("reading").addEventListener("change", () => { if (state.grid) runDecode(); });
  $("concept-form").addEventListener("submit", runConcept);
  loadInfo().catch((error) => setStatus(error.message, true));
})();
