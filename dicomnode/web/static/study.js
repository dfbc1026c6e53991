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
