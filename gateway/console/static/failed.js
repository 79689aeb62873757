// Dead letters: the header checkbox selects every row.
"use strict";
(function () {
  const all = document.getElementById("all");
  if (!all) return;
  all.addEventListener("change", () => {
    for (const box of document.querySelectorAll("input.pick")) box.checked = all.checked;
  });
})();
