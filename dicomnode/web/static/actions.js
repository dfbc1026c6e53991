// dicomnode study actions, shared by the worklist and the study page: which buttons a study
// offers this user (Claim, Complete, Release, Priority…, Reopen once reported), the calls to the REST API with the
// page's CSRF token, Complete's confirm step and the priority dialog. No dependencies; loaded
// before the page's own script, it leaves one global: dicomnodeActions.
"use strict";

window.dicomnodeActions = (function () {
  // Complete asks once more in place: the button turns into "Confirm complete" for a few
  // seconds, a second click sends it. No modal confirm(): a reader who completes a hundred
  // studies a day learns to press Enter on it blind. A second click sooner than a double
  // click's is not taken as the confirmation, so a double click does not complete.
  const CONFIRM_MS = 5000;
  const DOUBLE_CLICK_MS = 500;
  let armed = null; // {uid, at, timer}: the study whose Complete waits for its confirmation

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function csrf() {
    return document.querySelector('meta[name="csrf-token"]').content;
  }

  function studyPath(uid, action) {
    return "/api/studies/" + encodeURIComponent(uid) + "/" + action;
  }

  // POST JSON; throws an Error with the API's detail (e.g. "... is being read by dr_grey").
  async function post(path, payload) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), Accept: "application/json" },
      body: JSON.stringify(payload || {}),
    });
    if (!response.ok) {
      let detail = "HTTP " + response.status;
      try {
        const body = await response.json();
        detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (ignored) {
        // keep the status line
      }
      throw new Error(detail);
    }
    return response.json();
  }

  function isArmed(uid) {
    return armed !== null && armed.uid === uid;
  }

  function showArmed(button, on) {
    button.textContent = on ? "Confirm complete" : "Complete";
    button.classList.toggle("confirming", on);
    button.title = on ? "Click again to mark the study reported; it leaves the worklist" : "";
  }

  function disarm() {
    if (armed === null) return;
    clearTimeout(armed.timer);
    const uid = armed.uid;
    armed = null;
    for (const button of document.querySelectorAll('button[data-action="complete"]')) {
      if (button.dataset.uid === uid) showArmed(button, false);
    }
  }

  function arm(button) {
    disarm();
    armed = { uid: button.dataset.uid, at: Date.now(), timer: setTimeout(disarm, CONFIRM_MS) };
    showArmed(button, true);
  }

  function actionButton(label, action, uid, primary) {
    const button = el("button", primary ? "button primary" : "button", label);
    button.type = "button";
    button.dataset.action = action;
    button.dataset.uid = uid;
    return button;
  }

  // The buttons a study offers ``me`` (an admin may release anyone's claim); once reported, only
  // Reopen, to its reporter and admins. A re-render (the worklist's poll) keeps a Complete
  // that waits for its confirmation.
  function actionButtons(row, me, isAdmin) {
    const buttons = el("div", "action-buttons"); // wrap within the column, never past it
    const uid = row.study_instance_uid;
    if (row.status === "reported") {
      if (row.reported_by === me || isAdmin) {
        buttons.appendChild(actionButton("Reopen", "reopen", uid, false));
      }
      return buttons;
    }
    if (row.status === "in_progress" && row.claimed_by === me) {
      const complete = actionButton("Complete", "complete", uid, true);
      if (isArmed(uid)) showArmed(complete, true);
      buttons.appendChild(complete);
      buttons.appendChild(actionButton("Release", "release", uid, false));
    } else if (row.status === "in_progress") {
      if (isAdmin) buttons.appendChild(actionButton("Release", "release", uid, false));
    } else {
      buttons.appendChild(actionButton("Claim", "claim", uid, true));
    }
    buttons.appendChild(actionButton("Priority…", "override", uid, false));
    return buttons;
  }

  // A click on an action button: Priority… opens the dialog for ``row``, Complete arms on the
  // first click, the rest call the API. ``done(errorText)`` follows every call sent ("" when
  // it worked) and the dialog's save.
  async function handle(button, row, done) {
    const action = button.dataset.action;
    const uid = button.dataset.uid;
    if (action === "override") {
      openOverride(row, done);
      return;
    }
    if (action === "complete") {
      if (!isArmed(uid)) {
        arm(button);
        return;
      }
      if (Date.now() - armed.at < DOUBLE_CLICK_MS) return;
      disarm();
    }
    button.disabled = true;
    let error = "";
    try {
      await post(studyPath(uid, action));
    } catch (failure) {
      error = failure.message;
    }
    await done(error);
  }

  let overrideDone = null;

  function openOverride(row, done) {
    const dialog = document.getElementById("override-dialog");
    overrideDone = done;
    dialog.dataset.uid = row.study_instance_uid;
    document.getElementById("override-study").textContent =
      "Accession " + (row.accession_number || "—") + " · now " + row.priority;
    document.getElementById("override-tier").value = row.override_tier ? "" : "stat";
    document.getElementById("override-reason").value = "";
    dialog.showModal();
  }

  // The priority dialog (templates/override_dialog.html), where the page has one.
  document.addEventListener("DOMContentLoaded", function () {
    const dialog = document.getElementById("override-dialog");
    if (!dialog) return;
    document.getElementById("override-form").addEventListener("submit", async function (event) {
      event.preventDefault();
      const reason = document.getElementById("override-reason").value.trim();
      const tier = document.getElementById("override-tier").value || null;
      dialog.close();
      let error = "";
      try {
        await post(studyPath(dialog.dataset.uid, "override"), { tier: tier, reason: reason });
      } catch (failure) {
        error = failure.message;
      }
      if (overrideDone) await overrideDone(error);
    });
    document.getElementById("override-cancel").addEventListener("click", function () {
      dialog.close();
    });
  });

  return { el: el, post: post, actionButtons: actionButtons, handle: handle };
})();
