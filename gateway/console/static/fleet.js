// The Fleet page: the numbers again every few seconds (the server scrapes the nodes; this only places text).
"use strict";
(function () {
  const root = document.getElementById("fleet");
  if (!root) return;
  const every = Number(root.dataset.refreshMs) || 2000;

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function meter(max, value) {
    const m = el("meter");
    m.min = 0;
    m.max = max || 1;
    m.value = value || 0;
    return m;
  }

  function place(data) {
    for (const node of root.querySelectorAll("[data-cell]")) {
      const value = data.cells[node.dataset.cell];
      if (value !== undefined) node.textContent = value;
    }
    const flight = document.getElementById("inflight-meter");
    flight.max = data.in_flight.max || 1;
    flight.value = data.in_flight.used;
    const limits = document.querySelector("#limits tbody");
    if (data.limits.length) {
      limits.replaceChildren(
        ...data.limits.map((l) => {
          const row = el("tr");
          const used = el("td");
          used.append(l.used === null ? el("span", "muted small", l.note) : meter(l.max, l.used));
          row.append(el("td", "", l.name), el("td", "num", l.available), el("td", "num", l.limit), used);
          return row;
        })
      );
    }
    const tenants = document.getElementById("tenants"); // an operator's page only; no rows with one tenant and no budget
    if (tenants) {
      tenants.classList.toggle("hidden", !data.tenants.length);
      tenants.querySelector("tbody").replaceChildren(
        ...data.tenants.map((t) => {
          const row = el("tr");
          const jobs = el("td", "num", t.throughput);
          jobs.append(el("div", "muted small", t.outcomes));
          row.append(
            el("td", "", t.name),
            jobs,
            el("td", "num", t.tokens_per_min),
            el("td", "num", t.cost_per_hour),
            el("td", "", t.budget)
          );
          return row;
        })
      );
    }
    const nodes = document.getElementById("nodes"); // an operator's page only
    if (nodes) {
      nodes.replaceChildren(
        ...data.nodes.map((n) => el("li", n.up ? "up" : "down", n.url + " · " + (n.up ? "up" : "down")))
      );
    }
    document.getElementById("notes").replaceChildren(...data.notes.map((n) => el("li", "", n)));
    root.dataset.refreshed = String(Number(root.dataset.refreshed || 0) + 1);
  }

  async function refresh() {
    try {
      const resp = await fetch(root.dataset.source, { credentials: "same-origin", cache: "no-store" });
      if (resp.ok) place(await resp.json());
    } finally {
      setTimeout(refresh, every);
    }
  }

  setTimeout(refresh, every);
})();
