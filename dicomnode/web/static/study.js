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
// A view the server cannot show (422: corrupt pixel data, a header too broken to present)
// shows the server's reason in place of the picture, not the browser's broken-image icon.
(function () {
  const section = document.getElementById("preview");
  if (!section) return; // no such study
  const place = document.getElementById("previews");
  const messageEl = document.getElementById("preview-message");
  // The 422's detail begins "<SOP Instance UID> cannot be shown as an image: " (preview.py).
  const DETAIL_PREFIX = /^\S+ cannot be shown as an image: /;

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

  // Why the PNG at url did not load: an <img> learns nothing of the answer, so ask again
  // (the server keeps no failed render; an unreadable image is decoded once more).
  async function whyNot(url) {
    let response;
    try {
      response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
    } catch (error) {
      return "the server could not be reached (" + error.message + ")";
    }
    if (response.ok) return "it did not load; reload the page to try again";
    if (response.status === 401) return "you are no longer logged in; reload the page";
    let detail = "";
    try {
      detail = String((await response.json()).detail || "");
    } catch (error) {
      detail = "";
    }
    return detail.replace(DETAIL_PREFIX, "") || "the server answered " + response.status;
  }

  function figure(image) {
    const fig = element("figure", "preview");
    fig.dataset.sopUid = image.sop_instance_uid;
    const img = element("img", "preview-image");
    // In the image's place when a view cannot be shown: what it is and why.
    const failure = element("div", "preview-failure");
    failure.hidden = true;
    const failureTitle = element("strong", "preview-failure-title");
    const failureReason = element("p", "preview-failure-reason");
    failure.append(failureTitle, failureReason);
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
    let current = 0;
    const buttons = [];
    function show(index) {
      current = index;
      const view = views[index];
      fig.dataset.state = "loading";
      failure.hidden = true;
      img.hidden = false;
      img.src = view.url;
      img.alt = caption(image) + ": " + view.alt;
      fig.dataset.view = view.ai ? "ai" : "image";
      label.textContent = view.ai
        ? (view.ai.label ? view.ai.label + " · " : "") + "AI result, not verified by a physician"
        : "";
      label.hidden = !view.ai;
      buttons.forEach(function (button, at) {
        button.setAttribute("aria-pressed", String(at === index));
      });
    }
    function failed(index, reason) {
      const view = views[index];
      const what = view.ai ? "This AI view cannot be shown" : "This image cannot be shown";
      if (buttons[index]) {
        buttons[index].classList.add("failed");
        buttons[index].title = what + ": " + reason;
      }
      if (index !== current) return; // another view was chosen meanwhile
      fig.dataset.state = "failed";
      img.hidden = true;
      failureTitle.textContent = what;
      failureReason.textContent = reason;
      failure.hidden = false;
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
        buttons.push(button);
        bar.appendChild(button);
      });
      fig.appendChild(bar);
    }
    const frame = element("div", "preview-frame");
    frame.append(img, failure);
    fig.appendChild(frame);
    fig.appendChild(label);
    img.addEventListener("load", function () {
      fig.dataset.state = "shown";
      if (buttons[current]) { // shown after all (e.g. a reload of the server in between)
        buttons[current].classList.remove("failed");
        buttons[current].removeAttribute("title");
      }
    });
    img.addEventListener("error", function () {
      const index = current;
      const url = views[index].url;
      if (!img.src.endsWith(url)) return; // not the view's PNG (e.g. the src was cleared)
      failed(index, "asking the server why…"); // at once: never the broken-image icon
      fig.dataset.state = "explaining";
      whyNot(url).then(function (reason) {
        failed(index, reason);
      });
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
