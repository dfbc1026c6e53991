// dicomnode study page: the study's actions (actions.js, as on its worklist row; Reopen once
// reported). After a call the page reloads to show the study as it is now; an error (e.g.
// claimed by someone else in the meantime) is shown in the message area after the reload.
"use strict";

(function () {
  const actions = window.dicomnodeActions;
  const rowEl = document.getElementById("study-row");
  if (!rowEl) return; // no such study
  const row = JSON.parse(rowEl.textContent);
  const body = document.body;
  const me = body.dataset.user;
  const isAdmin = body.dataset.role === "admin";
  const place = document.getElementById("study-actions");
  const messageEl = document.getElementById("message");
  const messageKey = "dicomnode-study-message:" + row.study_instance_uid;

  function showMessage(text) {
    messageEl.textContent = text;
    messageEl.hidden = !text;
  }

  async function acted(error) {
    if (error) sessionStorage.setItem(messageKey, error);
    location.reload();
  }

  showMessage(sessionStorage.getItem(messageKey) || "");
  sessionStorage.removeItem(messageKey);
  place.appendChild(actions.actionButtons(row, me, isAdmin));
  place.addEventListener("click", function (event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    showMessage("");
    actions.handle(button, row, acted);
  });
})();

// Image previews: each image the node chose (one per CT stack, every radiograph) as presented,
// with buttons to switch to the node's overlays of it (the AI view: heat map, boxes), labelled
// as a research demo where the model is one. The PNGs come from /api/studies/<uid>/...
(function () {
  const section = document.getElementById("preview");
  if (!section) return; // no such study
  const place = document.getElementById("previews");
  const messageEl = document.getElementById("preview-message");

  function element(tag, className, text) {
    const made = document.createElement(tag);
    if (className) made.className = className;
    if (text) made.textContent = text;
    return made;
  }

  function caption(image) {
    const parts = [image.modality, image.series_description];
    if (image.instance_number !== null) parts.push("image " + image.instance_number);
    if (image.chosen) parts.push(image.chosen);
    return parts.filter(Boolean).join(" · ");
  }

  function figure(image) {
    const fig = element("figure", "preview");
    fig.dataset.sopUid = image.sop_instance_uid;
    const img = element("img", "preview-image");
    const label = element("p", "preview-ai-label");
    label.hidden = true;
    const views = [{ name: "Image", url: image.url, alt: "image as presented", ai: null }];
    for (const ai of image.ai_views) {
      views.push({
        name: "AI: " + ai.model + " " + ai.version,
        url: ai.url,
        alt: "AI result of " + ai.model + " " + ai.version + " burned into the image",
        ai: ai,
      });
    }
    function show(index) {
      const view = views[index];
      img.src = view.url;
      img.alt = caption(image) + ": " + view.alt;
      fig.dataset.view = view.ai ? "ai" : "image";
      label.textContent = view.ai
        ? (view.ai.label ? view.ai.label + " · " : "") + "AI result, not verified by a physician"
        : "";
      label.hidden = !view.ai;
      fig.querySelectorAll(".preview-views button").forEach(function (button, at) {
        button.setAttribute("aria-pressed", String(at === index));
      });
    }
    if (views.length > 1) {
      const bar = element("div", "preview-views");
      bar.setAttribute("role", "group");
      bar.setAttribute("aria-label", "View");
      views.forEach(function (view, index) {
        const button = element("button", "button ghost", view.name);
        button.type = "button";
        button.dataset.view = view.ai ? "ai" : "image";
        button.addEventListener("click", function () { show(index); });
        bar.appendChild(button);
      });
      fig.appendChild(bar);
    }
    const frame = element("div", "preview-frame");
    frame.appendChild(img);
    fig.appendChild(frame);
    fig.appendChild(label);
    img.addEventListener("error", function () {
      label.hidden = false;
      label.textContent = "This view could not be shown.";
    });
    fig.appendChild(element("figcaption", "", caption(image)));
    show(0);
    return fig;
  }

  fetch(section.dataset.url, { credentials: "same-origin", cache: "no-store" })
    .then(function (response) {
      if (!response.ok) throw new Error("the server answered " + response.status);
      return response.json();
    })
    .then(function (previews) {
      previews.images.forEach(function (image) { place.appendChild(figure(image)); });
      messageEl.textContent = previews.images.length ? "" : "No images to preview.";
      messageEl.hidden = previews.images.length > 0;
    })
    .catch(function (error) {
      messageEl.textContent = "The image previews could not be loaded: " + error.message;
    });
})();
