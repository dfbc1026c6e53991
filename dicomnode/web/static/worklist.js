// dicomnode reading worklist: renders /api/worklist, polls it for live updates, and sends
// the study actions through actions.js (loaded before it). No other dependencies.
"use strict";

(function () {
  const actions = window.dicomnodeActions;
  const el = actions.el;
  const body = document.body;
  const pollMs = Number(body.dataset.pollMs) || 3000;
  const pageSize = Number(body.dataset.pageSize) || 100;
  const me = body.dataset.user;
  const isAdmin = body.dataset.role === "admin";

  const rowsEl = document.getElementById("rows");
  const countEl = document.getElementById("count");
  const liveEl = document.getElementById("live");
  const liveText = document.getElementById("live-text");
  const messageEl = document.getElementById("message");
  const pageInfo = document.getElementById("page-info");
  const prevButton = document.getElementById("prev");
  const nextButton = document.getElementById("next");
  const filters = {
    modality: document.getElementById("filter-modality"),
    tier: document.getElementById("filter-tier"),
    status: document.getElementById("filter-status"),
  };

  const STATUS_TEXT = {
    waiting: "Waiting for AI",
    ready: "Ready",
    in_progress: "In progress",
    reported: "Reported",
  };
  const KIND_TEXT = { sr: "SR", overlay: "Overlay", seg: "SEG", gsps: "GSPS", derived: "Derived", kos: "KOS", rejection: "Rejection note" };
  const KIND_ORDER = ["sr", "overlay", "seg", "gsps", "derived", "kos", "rejection"];

  let offset = 0;
  let skewMs = 0; // server clock minus this browser's clock
  let latest = null;
  let inFlight = false;
  const expandedBelow = new Set(); // rows whose below-threshold findings are open (survives polls)

  function duration(ms) {
    const minutes = Math.max(0, Math.floor(ms / 60000));
    if (minutes < 60) return minutes + " min";
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return hours + " h " + String(minutes % 60).padStart(2, "0") + " min";
    return Math.floor(hours / 24) + " d " + (hours % 24) + " h";
  }

  function showMessage(text) {
    messageEl.textContent = text;
    messageEl.hidden = !text;
  }

  function query() {
    const params = new URLSearchParams();
    for (const [name, select] of Object.entries(filters)) {
      if (select.value) params.set(name, select.value);
    }
    params.set("limit", String(pageSize));
    params.set("offset", String(offset));
    return params;
  }

  function keepFiltersInUrl() {
    const params = new URLSearchParams();
    for (const [name, select] of Object.entries(filters)) {
      if (select.value) params.set(name, select.value);
    }
    const search = params.toString();
    history.replaceState(null, "", search ? "?" + search : location.pathname);
  }

  function tierCell(row) {
    const td = el("td", "priority");
    td.appendChild(el("span", "chip tier-" + row.priority, row.priority));
    td.appendChild(el("span", "ups", "UPS " + row.ups_priority));
    if (row.override_tier) {
      const tag = el("span", "override-tag", "manual");
      tag.title = "Set by " + row.override_by + ": " + row.override_reason;
      td.appendChild(tag);
    }
    return td;
  }

  // The same text as probability_text in dicomnode/findings.py (the rows' reasons and
  // the study page): "<1%" and ">99%" near the ends, so that no output reads as certain.
  function percent(probability) {
    if (probability > 0 && probability < 0.01) return "<1%";
    if (probability > 0.99 && probability < 1) return ">99%";
    const hundredths = probability * 100;
    let whole = Math.round(hundredths);
    if (whole - hundredths === 0.5 && whole % 2) whole -= 1; // a tie goes to even, as Python's
    return whole + "%";
  }

  // One finding (a label, highest probability first); others: the same label from other models.
  function findingSpan(finding, others) {
    const classes = ["finding", finding.present ? "present" : "absent"];
    classes.push(finding.critical ? "critical" : "noncritical");
    const span = el("span", classes.join(" "));
    // The finding and its probability stay together; the model's name may go to the next line.
    const head = el("span", "finding-head");
    if (finding.present && finding.critical) {
      head.appendChild(el("span", "crit-tag", "critical"));
      head.appendChild(document.createTextNode(" "));
    }
    head.appendChild(document.createTextNode(finding.meaning + " "));
    head.appendChild(el("span", "prob", percent(finding.probability)));
    span.appendChild(head);
    span.appendChild(document.createTextNode(" "));
    span.appendChild(el("span", "model", "· " + finding.model));
    let title = finding.scheme + " " + finding.code + (finding.present ? " (above threshold)" : " (below threshold)");
    if (others && others.length) {
      span.appendChild(document.createTextNode(" "));
      span.appendChild(el("span", "model also", "+" + others.length + (others.length === 1 ? " model" : " models")));
      title += "; also " + others.map(function (f) { return f.model + " " + percent(f.probability); }).join(", ");
    }
    span.title = title;
    return span;
  }

  // Present findings first, critical ones first, one entry per label (the models that agree on
  // it are named in its tooltip); the rest collapsed: with a whole model zoo a study carries a
  // dozen findings, most of them below threshold.
  function reasonCell(row) {
    const td = el("td", "reason");
    const reason = el("div", "reason-text", row.reason);
    reason.title = row.reason;
    td.appendChild(reason);
    if (!row.findings.length) return td;
    const line = el("div", "findings");
    const tag = el("span", "ai-tag", "AI");
    tag.title = "From a research demo model, not for clinical use";
    line.appendChild(tag);
    const byProbability = function (a, b) { return b.probability - a.probability; };
    const labels = new Map();
    for (const finding of row.findings.filter(function (f) { return f.present; }).sort(byProbability)) {
      const key = finding.scheme + ":" + finding.code;
      if (!labels.has(key)) labels.set(key, []);
      labels.get(key).push(finding);
    }
    const present = Array.from(labels.values()).sort(function (a, b) {
      return (b[0].critical - a[0].critical) || byProbability(a[0], b[0]);
    });
    const below = row.findings.filter(function (f) { return !f.present; }).sort(byProbability);
    // The chips flow beside the AI tag, each moved to the next line whole (worklist.css).
    const chips = el("span", "finding-chips");
    for (const group of present) chips.appendChild(findingSpan(group[0], group.slice(1)));
    if (below.length) {
      const details = el("details", "below");
      details.dataset.uid = row.study_instance_uid;
      details.open = expandedBelow.has(row.study_instance_uid);
      const summary = el("summary", null, "+" + below.length + " below threshold");
      summary.title = "Findings the models scored below their thresholds (absent)";
      details.appendChild(summary);
      const list = el("span", "below-list");
      for (const finding of below) list.appendChild(findingSpan(finding, []));
      details.appendChild(list);
      chips.appendChild(details);
    }
    line.appendChild(chips);
    td.appendChild(line);
    return td;
  }

  function waitCell(row, now) {
    const td = el("td", "wait");
    td.appendChild(document.createTextNode(duration(now - Date.parse(row.received_at))));
    const due = Date.parse(row.due_at) - now;
    if (row.status !== "reported") {
      const dueEl = el("span", due < 0 ? "due overdue" : "due", due < 0 ? "overdue " + duration(-due) : "due in " + duration(due));
      dueEl.title = "Read by " + new Date(Date.parse(row.due_at)).toLocaleString();
      td.appendChild(dueEl);
    }
    return td;
  }

  function patientCell(row) {
    const td = el("td", "patient");
    const name = el("span", "patient-name", row.patient_name.replaceAll("^", " ").trim() || "—");
    name.title = name.textContent;
    td.appendChild(name);
    const id = el("span", "patient-id", row.patient_id);
    id.title = row.patient_id;
    td.appendChild(id);
    return td;
  }

  function statusCell(row) {
    const td = el("td", "status");
    td.appendChild(el("span", "status-badge " + row.status, STATUS_TEXT[row.status] || row.status));
    if (row.status === "in_progress") td.appendChild(el("span", "by", row.claimed_by));
    if (row.status === "reported") td.appendChild(el("span", "by", "by " + row.reported_by));
    // Images no report covers (worklist.policy.new_images_text): after a report the study is
    // back, unread, for an addendum; in a claimed study its reader is told.
    if (row.new_images > 0) {
      const flag = el("span", "new-images", row.new_images_text);
      flag.title = row.reported_by && row.status !== "reported"
        ? "Arrived after the report of " + row.reported_by + "; read them and report again"
        : "Arrived while the study was claimed";
      td.appendChild(flag);
    }
    // Why, in the worklist policy's words (worklist.policy.FAILURE_TEXT): could not read the
    // images, or failed.
    if (row.analysis_status === "failed") {
      td.appendChild(el("span", "by", row.analysis_failure_text || "AI analysis failed"));
    }
    // A dead-lettered export ("VNA: association rejected"), or objects being retried after a
    // failed attempt ("pacs: retrying (2 failed: ...)"), which have not failed for good.
    if (row.export_error) {
      const retrying = /^[^:]*: retrying \(/.test(row.export_error);
      const failed = el(
        "span",
        "by export-failed",
        (retrying ? "export " : "export failed: ") + row.export_error,
      );
      failed.title = failed.textContent;
      td.appendChild(failed);
    }
    if (row.results_incomplete) td.appendChild(resultsMarker(row));
    return td;
  }

  // "model SEG", "model (run failed)", "model (not run)": what a done results job left out.
  // A model the worker left out (its file cannot be loaded) did not run: its error starts
  // with the words the priority's reason names it with (worklist.policy.NOT_RUN).
  function missingText(entry) {
    if (entry.kind === "run" && entry.error.startsWith("not run:")) return entry.model + " (not run)";
    if (entry.kind === "run") return entry.model + " (run failed)";
    if (entry.kind === "all") return entry.model + " (all objects)";
    return entry.model + " " + (KIND_TEXT[entry.kind] || entry.kind);
  }

  // AI result objects that are missing: some (the others were written and sent) or all of
  // them (the results job is dead; the priority stands). The reasons are in the tooltip.
  function resultsMarker(row) {
    const marker = el("span", "by results-failed");
    marker.dataset.resultsState = row.results_state;
    if (row.results_state === "dead") {
      marker.textContent = "AI results not written";
      marker.title = "The results job failed, no result objects were written (an admin can retry it): " + row.results_error;
    } else {
      const names = row.results_missing.map(missingText).join(", ");
      marker.textContent = "AI results incomplete" + (names ? ": " + names : "");
      // The names may be cut after a few lines; each is in the reasons too.
      marker.title = "Not written (the others were written and sent): " + row.results_error;
    }
    return marker;
  }

  function studyPage(uid) {
    return "/worklist/study/" + encodeURIComponent(uid);
  }

  // One link per kind, compact chips that wrap: a lone object downloads, several go to the
  // study page's list.
  function resultsCell(row) {
    const td = el("td", "results");
    const chips = el("div", "result-chips");
    const byKind = new Map();
    for (const result of row.results) {
      if (!byKind.has(result.kind)) byKind.set(result.kind, []);
      byKind.get(result.kind).push(result);
    }
    const kinds = Array.from(byKind.keys()).sort(function (a, b) {
      const rank = function (k) { const i = KIND_ORDER.indexOf(k); return i < 0 ? KIND_ORDER.length : i; };
      return rank(a) - rank(b) || a.localeCompare(b);
    });
    for (const kind of kinds) {
      const results = byKind.get(kind);
      const label = KIND_TEXT[kind] || kind;
      let link;
      if (results.length === 1) {
        link = el("a", "result-chip", label);
        link.href = results[0].url;
        link.title = results[0].model + " · download DICOM " + results[0].sop_instance_uid;
      } else {
        link = el("a", "result-chip", label + " ");
        link.appendChild(el("span", "count-tag", "×" + results.length));
        link.href = studyPage(row.study_instance_uid) + "#results-" + kind;
        link.title = results.length + " " + label + " objects: " + results.map(function (r) { return r.model; }).join(", ");
      }
      link.dataset.kind = kind;
      chips.appendChild(link);
    }
    const details = el("a", "result-chip details", "Details");
    details.href = studyPage(row.study_instance_uid);
    details.title = "All findings per model and the result objects with their export state";
    chips.appendChild(details);
    td.appendChild(chips);
    return td;
  }

  function actionsCell(row) {
    const td = el("td", "actions");
    td.appendChild(actions.actionButtons(row, me, isAdmin));
    return td;
  }

  function render(data) {
    latest = data;
    skewMs = Date.parse(data.server_time) - Date.now();
    const now = Date.now() + skewMs;
    const fragment = document.createDocumentFragment();
    data.rows.forEach(function (row, index) {
      const tr = el("tr", "tier-" + row.priority + " status-" + row.status);
      tr.dataset.studyUid = row.study_instance_uid;
      tr.dataset.tier = row.priority;
      tr.appendChild(el("td", "strip"));
      tr.appendChild(el("td", "rank", data.offset + index + 1));
      tr.appendChild(tierCell(row));
      tr.appendChild(reasonCell(row));
      tr.appendChild(waitCell(row, now));
      tr.appendChild(el("td", "modality", row.modality));
      const accession = el("td", "accession", row.accession_number);
      accession.title = row.accession_number;
      tr.appendChild(accession);
      tr.appendChild(patientCell(row));
      tr.appendChild(statusCell(row));
      tr.appendChild(resultsCell(row));
      tr.appendChild(actionsCell(row));
      fragment.appendChild(tr);
    });
    if (!data.rows.length) {
      const tr = el("tr", "empty");
      const td = el("td", null, "No studies match these filters.");
      td.colSpan = 11;
      tr.appendChild(td);
      fragment.appendChild(tr);
    }
    rowsEl.replaceChildren(fragment);
    countEl.textContent = data.total + (data.total === 1 ? " study" : " studies");
    const last = Math.min(data.offset + data.rows.length, data.total);
    pageInfo.textContent = data.total ? data.offset + 1 + "–" + last + " of " + data.total : "";
    prevButton.disabled = data.offset === 0;
    nextButton.disabled = last >= data.total;
    liveEl.classList.remove("stale");
    liveText.textContent = "Live · updated " + new Date().toLocaleTimeString();
  }

  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    try {
      const response = await fetch("/api/worklist?" + query().toString(), {
        credentials: "same-origin",
        headers: { Accept: "application/json" },
      });
      if (response.status === 401) {
        location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
        return;
      }
      if (!response.ok) throw new Error("worklist request failed: HTTP " + response.status);
      render(await response.json());
    } catch (error) {
      liveEl.classList.add("stale");
      liveText.textContent = "Not updating: " + error.message;
    } finally {
      inFlight = false;
    }
  }

  // After a call: its error in the message area, the list as it is now.
  async function acted(error) {
    showMessage(error);
    await refresh();
  }

  // "toggle" does not bubble: listen in the capture phase for every row's details.
  rowsEl.addEventListener("toggle", function (event) {
    const details = event.target;
    if (!details.matches || !details.matches("details.below")) return;
    if (details.open) expandedBelow.add(details.dataset.uid);
    else expandedBelow.delete(details.dataset.uid);
  }, true);

  rowsEl.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    const uid = button.dataset.uid;
    const row = latest.rows.find(function (r) { return r.study_instance_uid === uid; });
    showMessage("");
    actions.handle(button, row, acted);
  });

  for (const select of Object.values(filters)) {
    select.addEventListener("change", function () {
      offset = 0;
      keepFiltersInUrl();
      refresh();
    });
  }
  prevButton.addEventListener("click", function () {
    offset = Math.max(0, offset - pageSize);
    refresh();
  });
  nextButton.addEventListener("click", function () {
    offset += pageSize;
    refresh();
  });

  // Filters from the address bar (a bookmarked or reloaded view).
  const fromUrl = new URLSearchParams(location.search);
  let filtered = false;
  for (const [name, select] of Object.entries(filters)) {
    const value = fromUrl.get(name);
    if (value && Array.from(select.options).some(function (o) { return o.value === value; })) {
      select.value = value;
      filtered = true;
    }
  }

  const initial = JSON.parse(document.getElementById("initial-worklist").textContent);
  if (filtered) refresh();
  else render(initial);
  setInterval(refresh, pollMs);
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden) refresh();
  });
})();
