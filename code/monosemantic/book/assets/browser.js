// The feature browser of the monosemantic book: static data (index.js, <set>-<k>.js shards loaded on
// demand with <script> tags, so it also works from file://), no server, no framework.
// URL hash: #topk/123 opens a unit, #q=word runs a search.
(function () {
  "use strict";
  const INDEX = window.MONO_BROWSER_INDEX;
  const root = document.getElementById("mono-browser");
  const base = (document.currentScript && document.currentScript.src.replace(/[^/]*$/, "")) || "browser/";
  const shards = {};
  const waiting = {};

  window.MonoBrowser = {
    shard(key, data) {
      shards[key] = data;
      (waiting[key] || []).forEach((fn) => fn(data));
      delete waiting[key];
    },
  };

  function loadShard(key) {
    if (shards[key]) return Promise.resolve(shards[key]);
    return new Promise((resolve, reject) => {
      const first = !waiting[key];
      (waiting[key] = waiting[key] || []).push(resolve);
      if (first) {
        const s = document.createElement("script");
        s.src = base + key + ".js";
        s.onerror = () => reject(new Error("could not load " + s.src));
        document.head.appendChild(s);
      }
    });
  }

  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "style") e.style.cssText = v;
      else e.setAttribute(k, v);
    }
    for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c.nodeType ? c : String(c));
    return e;
  }

  const fmt = (x, d = 3) => (x === null || x === undefined ? "–" : Number(x).toPrecision(d));
  const pct = (x) => (x === null || x === undefined ? "–"
    : (x > 0 && x < 0.001 ? (100 * x).toPrecision(2) : (100 * x).toFixed(1)) + "%");
  const show = (t) => t.replace(/\n/g, "⏎").replace(/ /g, "·").replace(/\t/g, "⇥");
  const negated = (meta, u) => meta.polarity && meta.polarity[u] < 0;  // old indexes have no polarity
  const setLabel = (name) => (INDEX.sets.find((s) => s.name === name) || { label: name }).label;

  // --- the controls -------------------------------------------------------------------------------
  const input = el("input", { type: "search", id: "mono-search", placeholder: "a token (e.g. {, $, the) or a unit id",
                              "aria-label": "search" });
  const setSelect = el("select", { id: "mono-set", "aria-label": "which units" },
    INDEX.sets.map((s) => el("option", { value: s.name }, `${s.label} (${s.n.toLocaleString()})`)));
  const results = el("div", { class: "mono-results", id: "mono-results" });
  const view = el("div", { class: "mono-view", id: "mono-view" });
  root.append(el("div", { class: "mono-controls" }, input, setSelect,
    el("button", { type: "button", id: "mono-go" }, "Search")), results, view);

  // A search lists the units of the selected set that fire on tokens with this text: one line per unit
  // (' the', 'the' and 'The' are one text), ranked as monosemantic.browser.rank_hits ranks them.
  function rank(hits) {
    const top = Math.max(0, ...hits.map((h) => h[3] || 0));
    const weak = (h) => ((h[3] || 0) < INDEX.rank_mass * top ? 1 : 0);
    return hits.sort((a, b) => weak(a) - weak(b) || b[2] - a[2] || b[3] - a[3] || a[1] - b[1]);
  }

  function matches(key) {  // [set, unit, share, activation, firings] per unit, over every matching text
    const entries = INDEX.tokens[key] ? [INDEX.tokens[key]]
      : Object.entries(INDEX.tokens).filter(([k]) => k.startsWith(key)).map(([, v]) => v);  // a prefix
    const units = new Map();
    for (const hits of entries) {
      for (const [s, u, share, mass, count] of hits) {
        const h = units.get(`${s}/${u}`) || [s, u, 0, 0, 0];
        h[2] += share || 0; h[3] += mass || 0; h[4] += count || 0;
        units.set(`${s}/${u}`, h);
      }
    }
    return [...units.values()];
  }

  function search(query) {
    const q = query.trim();
    const set = setSelect.value;
    const s = INDEX.sets.findIndex((x) => x.name === set);
    results.replaceChildren();
    if (!q) return;
    if (/^\d+$/.test(q)) { location.hash = `${set}/${q}`; return; }
    const all = matches(q.toLowerCase());
    const hits = rank(all.filter((h) => h[0] === s)).slice(0, 30);
    const elsewhere = INDEX.sets.filter((x, i) => i !== s && all.some((h) => h[0] === i))
      .map((x) => `${x.label}: ${all.filter((h) => INDEX.sets[h[0]] === x).length}`);
    const more = elsewhere.length ? ` (other sets, chosen above: ${elsewhere.join(", ")})` : "";
    if (!hits.length) {
      results.append(el("p", {}, `No unit of ${setLabel(set)} has "${q}" among the tokens it fires on most${more}.`));
      return;
    }
    const list = el("ul", { class: "mono-hits" });
    const meta = INDEX.units[set];
    for (const [, u, share, , count] of hits) {
      list.append(el("li", {}, el("a", { href: `#${set}/${u}` }, `#${u}`),
        (negated(meta, u) ? " (read negated)" : "") + ` — ${meta.label[u]} · `
        + (share ? `"${q}" holds ${pct(Math.min(1, share))} of its activation (${count.toLocaleString()} firings) · ` : "")
        + `density ${pct(meta.density[u])} · `
        + (meta.sim ? `simulation ${fmt(meta.sim[u], 2)} · detection ${fmt(meta.det[u], 2)}` : `score ${fmt(meta.corr[u], 2)}`)
        + (meta.family[u] ? ` · ${meta.family[u]}` : "")));
    }
    results.append(el("p", {}, `${hits.length} ${setLabel(set)} fire most on "${q}", the largest share of their `
      + `activation first${more}:`), list);
  }

  // --- one unit -----------------------------------------------------------------------------------
  function context(item, scale) {
    const p = el("p", { class: "mono-context" });
    item.t.forEach((tok, i) => {
      const a = item.v[i] || 0;
      const alpha = Math.max(0, Math.min(1, a / scale));
      const span = el("span", { class: "mono-tok" + (i === item.c ? " mono-centre" : ""),
                                 title: `${JSON.stringify(tok)}: ${fmt(a)}`,
                                 style: alpha > 0 ? `background: rgba(230, 110, 0, ${alpha.toFixed(2)})` : "" },
        show(tok));
      if (a > 0) span.dataset.act = a;
      p.append(span);
    });
    return el("div", { class: "mono-example" }, el("span", { class: "mono-act" }, fmt(item.a)), p);
  }

  function histogram(counts) {
    const w = 300, h = 60, n = counts.length, max = Math.max(1, ...counts);
    const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", `0 0 ${w} ${h + 14}`);
    svg.setAttribute("class", "mono-hist");
    counts.forEach((c, i) => {
      const r = document.createElementNS(svg.namespaceURI, "rect");
      const bh = (h * c) / max;
      r.setAttribute("x", (i * w) / n); r.setAttribute("width", w / n - 0.5);
      r.setAttribute("y", h - bh); r.setAttribute("height", bh);
      svg.append(r);
    });
    const edges = INDEX.hist_edges;
    [0, Math.floor(n / 2), n].forEach((i) => {
      const t = document.createElementNS(svg.namespaceURI, "text");
      t.setAttribute("x", Math.min(w - 20, (i * w) / n)); t.setAttribute("y", h + 12);
      t.textContent = String(Number(edges[Math.min(i, edges.length - 1)].toPrecision(1)));
      svg.append(t);
    });
    return svg;
  }

  function tokenTable(title, rows, head) {
    return el("div", { class: "mono-box" }, el("h4", {}, title),
      el("table", {}, el("thead", {}, el("tr", {}, head.map((x) => el("th", {}, x)))),
        el("tbody", {}, rows.map((r) => el("tr", {}, r.map((x, i) => el("td", { class: i ? "num" : "tok" },
          i ? (Number.isInteger(x) ? x.toLocaleString() : fmt(x)) : show(x))))))));
  }

  // the explanation and its held-out scores (tables before issue 18 have only the all-token score)
  function scores(data) {
    if (data.sim === undefined) return el("p", {}, `explain-then-predict score ${fmt(data.corr)}`);
    if (data.too_rare) {
      return el("p", {}, `too rare to score: it fires on ${data.heldout_firings.toLocaleString()} held-out tokens`);
    }
    return el("div", {},
      el("p", {}, "explanation: ", el("span", { class: "mono-explanation" }, data.explanation || "–")),
      el("p", {}, `held-out scores of it: simulation ${fmt(data.sim)} (correlation over its top, interval-sampled `
        + `and random contexts) · detection ${fmt(data.det)} (balanced accuracy; 0.5 is chance) · all-token `
        + `correlation ${fmt(data.corr)}`));
  }

  async function open(set, unit, scroll) {
    const meta = INDEX.units[set];
    if (!meta || unit < 0 || unit >= meta.density.length) {
      view.replaceChildren(el("p", {}, `There is no unit ${unit} in "${setLabel(set)}".`));
      return;
    }
    setSelect.value = set;
    view.replaceChildren(el("p", {}, "loading…"));
    const data = (await loadShard(`${set}-${Math.floor(unit / INDEX.shard)}`))[String(unit)];
    const scale = data.max || 1;
    const head = el("div", { class: "mono-head" },
      el("h3", {}, `${setLabel(set)} #${unit}` + (data.polarity < 0 ? " (read negated)" : "")),
      data.polarity < 0 ? el("p", { class: "mono-polarity" }, "This unit takes both signs and its negative "
        + "activations carry more of its mass, so every number and example here is of −a (its values below 0, "
        + `shown as positive); its positive side, ${pct(data.other_sign_share)} of its mass, is left out.`)
        : (data.other_sign_share > 0 ? el("p", { class: "mono-polarity" }, "This unit takes both signs: every "
          + `number and example here is of its positive side; its negative side, ${pct(data.other_sign_share)} `
          + "of its mass, is left out.") : null),
      el("p", {}, `density ${pct(data.density)} of tokens (held-out ${pct(data.density_val)}) · max ${fmt(data.max)}`
        + ` · median ${fmt(data.q[0])}, 90% ${fmt(data.q[1])}, 99% ${fmt(data.q[2])}`),
      scores(data),
      el("p", {}, "best family: "
        + (data.family ? `${data.family} (${INDEX.families[data.family]}): ${pct(data.family_share)} of its held-out`
          + ` activation, ${fmt(data.family_lift, 2)}× the family's share of tokens` : "none")),
      data.first_pos > 0 ? el("p", { class: "mono-polarity" }, `${pct(data.first_pos)} of its top activations `
        + "would have been on the first token of a window, which is not measured (its activations there are "
        + "outliers of the position, not of the text).") : null);
    const side = el("div", { class: "mono-side" },
      el("div", { class: "mono-box" }, el("h4", {}, "Activation histogram (log scale, non-zero)"), histogram(data.hist)),
      tokenTable("Tokens it fires on most", data.tokens, ["token", "share of activation", "count"]),
      tokenTable("Logits it promotes", data.up, ["token", "effect"]),
      tokenTable("Logits it suppresses", data.down, ["token", "effect"]),
      data.near.length ? el("div", { class: "mono-box" }, el("h4", {}, "Nearest features (decoder cosine)"),
        el("ul", {}, data.near.map(([o, c]) => el("li", {}, el("a", { href: `#${set}/${o}` }, `#${o}`),
          ` ${fmt(c, 2)} — ${meta.label[o]}`)))) : null);
    const main = el("div", { class: "mono-main" }, el("h4", {}, "Top activations (one per document)"),
      data.top.map((x) => context(x, scale)));
    for (const iv of data.intervals.slice().reverse()) {  // highest interval first
      const lo = iv.interval / INDEX.intervals, hi = (iv.interval + 1) / INDEX.intervals;
      main.append(el("h4", {}, `Samples with activation in (${fmt(lo * scale, 2)}, ${fmt(hi * scale, 2)}]`),
        ...iv.items.map((x) => context(x, scale)));
    }
    view.replaceChildren(head, el("div", { class: "mono-grid" }, main, side));
    // a unit opened from a link (a search hit, a nearest feature, an address) is brought into view: below
    // the search results, or with the page scrolled down the previous unit, it would open off screen
    if (scroll) view.scrollIntoView({ block: "start" });
  }

  function route() {
    const h = decodeURIComponent(location.hash.slice(1));
    if (h.startsWith("q=")) { input.value = h.slice(2); search(input.value); return; }
    const m = h.match(/^([\w-]+)\/(\d+)$/);
    if (m) open(m[1], Number(m[2]), true).catch((e) => view.replaceChildren(el("p", {}, String(e))));
  }

  input.addEventListener("keydown", (e) => { if (e.key === "Enter") search(input.value); });
  document.getElementById("mono-go").addEventListener("click", () => search(input.value));
  setSelect.addEventListener("change", () => search(input.value));  // the same search in the other set
  window.addEventListener("hashchange", route);
  route();
  if (!location.hash) open(INDEX.sets[0].name, 0);
})();
