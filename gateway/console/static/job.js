// The job page: the job's events over SSE (EventSource resumes with Last-Event-ID by itself),
// the answer assembled as it streams, the timeline, and the summary when the job ends.
// Everything the model wrote goes in with textContent: it is shown as text, never parsed as HTML.
"use strict";
(function () {
  const root = document.getElementById("job");
  if (!root) return;
  const final = root.dataset.final === "yes"; // the server rendered the finished answer already
  const answer = document.getElementById("answer");
  const timeline = document.getElementById("timeline");
  const empty = document.getElementById("timeline-empty");
  const live = document.getElementById("live");
  const status = document.getElementById("status");
  const choices = new Map();
  const attempts = new Map();
  const ENDED = { completed: "succeeded", failed: "failed", cancelled: "cancelled" };

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function setStatus(value) {
    status.textContent = value;
    status.className = "status " + value;
    root.dataset.status = value;
  }

  function choice(index) {
    let c = choices.get(index);
    if (c) return c;
    const box = el("div", "choice");
    box.dataset.index = String(index);
    const reasoningBox = el("details", "reasoning hidden");
    reasoningBox.open = true;
    reasoningBox.append(el("summary", "", "reasoning"));
    const reasoning = el("pre", "text reasoning-text", "");
    reasoningBox.append(reasoning);
    const content = el("pre", "text content", "");
    const calls = el("div", "calls");
    box.append(reasoningBox, content, calls);
    answer.append(box);
    c = { reasoningBox, reasoning, content, calls, toolCalls: new Map() };
    choices.set(index, c);
    return c;
  }

  function toolCall(c, fragment) {
    const key = fragment.index === undefined ? 0 : fragment.index;
    let call = c.toolCalls.get(key);
    if (!call) {
      call = { id: "", name: "", args: "", node: el("pre", "code tool-call", "") };
      c.calls.append(call.node);
      c.toolCalls.set(key, call);
    }
    const fn = fragment.function || {};
    if (fragment.id) call.id = fragment.id;
    if (fn.name) call.name += fn.name;
    if (fn.arguments) call.args += fn.arguments;
    call.node.textContent = call.name + "(" + call.args + ")" + (call.id ? " [" + call.id + "]" : "");
  }

  function clock(ts) {
    const d = new Date(ts * 1000);
    return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
  }

  function entry(event, kind, text) {
    const item = el("li", "event " + kind);
    item.append(el("span", "when", clock(event.ts)), el("span", "seq", "#" + event.seq), el("span", "what", text));
    timeline.append(item);
    empty.classList.add("hidden");
    return item;
  }

  function onDelta(event) {
    const n = event.attempt || 1;
    let a = attempts.get(n);
    if (!a) {
      a = { count: 0, node: entry(event, "attempt", "") };
      a.first = event.seq;
      attempts.set(n, a);
    }
    a.count += 1;
    a.node.lastChild.textContent =
      "attempt " + n + " streaming from seq " + a.first + " (" + a.count + " delta" + (a.count > 1 ? "s" : "") + ")";
    setStatus("running");
    if (final) return;
    const d = event.delta || {};
    const c = choice(event.index || 0);
    if (d.reasoning_content) {
      c.reasoning.textContent += d.reasoning_content;
      c.reasoningBox.classList.remove("hidden");
    }
    if (d.content) c.content.textContent += d.content;
    for (const fragment of d.tool_calls || []) toolCall(c, fragment);
  }

  function onEvent(event) {
    if (event.type === "delta") return onDelta(event);
    if (event.type === "retry") {
      const delay = event.delay_s ? ", after " + event.delay_s.toFixed(2) + " s" : "";
      entry(event, "retry", "retry: attempt " + event.attempt + " (" + event.reason + delay + ")");
      setStatus("retrying");
      // The deltas of an attempt that restarts are superseded; a resumed attempt continues them.
      if (!final && !event.resume) {
        choices.clear();
        answer.replaceChildren();
      }
      return;
    }
    if (event.type === "completed") {
      const reasons = ((event.result || {}).choices || []).map((c) => c.finish_reason).join(", ");
      entry(event, "completed", "completed" + (reasons ? " (" + reasons + ")" : ""));
    } else if (event.type === "failed") {
      const err = event.error || {};
      entry(event, "failed", "failed: " + err.type + ": " + err.message);
    } else if (event.type === "cancelled") {
      entry(event, "cancelled", "cancelled");
    } else {
      entry(event, "other", event.type);
    }
    if (ENDED[event.type]) setStatus(ENDED[event.type]);
  }

  function onSummary(s) {
    setStatus(s.status);
    document.getElementById("attempts").textContent = String(s.attempt);
    document.getElementById("latency").textContent = s.latency;
    document.getElementById("cost").textContent = s.cost;
    if (s.tokens) {
      const t = s.tokens;
      document.getElementById("tokens").textContent =
        s.total_tokens + " (" + t.prompt + " prompt, " + t.cached + " cached, " + t.completion + " completion, " +
        t.reasoning + " reasoning)";
    }
    if (s.error) {
      const box = document.getElementById("error");
      box.textContent = s.error.type + ": " + s.error.message;
      box.classList.remove("hidden");
    }
    document.getElementById("ended").textContent = s.ended;
    const cancel = document.getElementById("cancel");
    if (cancel) cancel.closest("form").remove();
    if (s.status === "failed" || s.status === "cancelled") document.getElementById("retry-form").classList.remove("hidden");
    if (!timeline.children.length) empty.textContent = "no events kept";
    live.classList.add("hidden");
    root.dataset.state = "ended";
  }

  if (!root.dataset.status) root.dataset.status = status.textContent;
  if (!final && !["succeeded", "failed", "cancelled"].includes(status.textContent)) live.classList.remove("hidden");
  const source = new EventSource(root.dataset.events);
  source.onmessage = (message) => onEvent(JSON.parse(message.data));
  source.addEventListener("summary", (message) => {
    source.close();
    onSummary(JSON.parse(message.data));
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {
      live.textContent = "the live stream stopped (signed out?): reload the page";
      live.classList.remove("hidden");
    }
  };
})();
