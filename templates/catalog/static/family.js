// Sorting for a family page's table: a click on a header orders the points by that column, ascending,
// a second click descending. Cells with a number (data-value) compare as numbers, others as text; an
// empty or "n/a" cell goes last either way. Rows are only moved, never rebuilt, so no text becomes markup.
(function () {
  "use strict";
  var table = document.getElementById("family-table");
  if (!table) return;
  var body = table.querySelector("tbody.points");
  var buttons = table.querySelectorAll("thead button.sort");
  var current = { col: -1, dir: 1 };

  function key(row, col) {
    var cell = row.cells[col];
    var value = cell.getAttribute("data-value");
    if (value !== null) return { missing: false, num: parseFloat(value), text: "" };
    var text = cell.textContent.trim();
    return { missing: text === "" || text === "n/a", num: null, text: text };
  }

  function compare(a, b, dir) {
    if (a.missing || b.missing) return a.missing === b.missing ? 0 : a.missing ? 1 : -1;
    if (a.num !== null && b.num !== null) return dir * (a.num - b.num);
    if (a.num !== null || b.num !== null) return a.num !== null ? -1 : 1;
    return dir * a.text.localeCompare(b.text);
  }

  function sortBy(col) {
    var dir = current.col === col ? -current.dir : 1;
    current = { col: col, dir: dir };
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      // Ties keep the sweep's order.
      return compare(key(a, col), key(b, col), dir) || (+a.dataset.order - +b.dataset.order);
    });
    rows.forEach(function (row) { body.appendChild(row); });
    Array.prototype.forEach.call(buttons, function (button) {
      var th = button.parentNode;
      if (+button.dataset.col === col) th.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    });
  }

  Array.prototype.forEach.call(buttons, function (button) {
    button.addEventListener("click", function () { sortBy(+button.dataset.col); });
  });
})();
