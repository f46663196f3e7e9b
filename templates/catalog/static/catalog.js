// Filters for the catalog index: search and select over the rows' data attributes. Optional: without
// JavaScript the form stays hidden and every model is listed. Values are only compared, never inserted
// as markup (textContent only), so card text cannot turn into code here.
(function () {
  "use strict";
  var form = document.getElementById("filters");
  var list = document.getElementById("models");
  if (!form || !list) return;
  var count = document.getElementById("count");
  var rows = Array.prototype.map.call(list.children, function (li) {
    var d = li.dataset;
    return { el: li, text: d.search, tags: JSON.parse(d.tags), parents: JSON.parse(d.parents),
             method: d.method, license: d.license, smoke: d.smoke, family: d.family };
  });
  var f = form.elements;

  function apply() {
    var words = f.q.value.toLowerCase().split(/\s+/).filter(Boolean);
    var tag = f.tag.value, method = f.method.value, parent = f.parent.value,
        license = f.license.value, smoke = f.smoke.value, family = f.family ? f.family.value : "", shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      var ok = (!tag || r.tags.indexOf(tag) >= 0) && (!parent || r.parents.indexOf(parent) >= 0) &&
               (!method || r.method === method) && (!license || r.license === license) &&
               (!smoke || r.smoke === smoke) && (!family || r.family === family) &&
               words.every(function (w) { return r.text.indexOf(w) >= 0; });
      // A class, not display:none: see .model.out in catalog.css for why.
      r.el.classList.toggle("out", !ok);
      if (ok) shown++;
    }
    count.textContent = shown === rows.length
      ? rows.length + (rows.length === 1 ? " model" : " models")
      : shown + " of " + rows.length + " models";
  }

  // A link such as index.html?tag=toy (from a model page) opens the index filtered.
  var params = new URLSearchParams(location.search);
  ["q", "tag", "method", "parent", "license", "smoke", "family"].forEach(function (name) {
    if (params.has(name) && f[name]) f[name].value = params.get(name);
  });
  form.addEventListener("input", apply);
  form.addEventListener("change", apply);
  form.addEventListener("reset", function () { setTimeout(apply, 0); });
  form.addEventListener("submit", function (e) { e.preventDefault(); });
  form.hidden = false;
  apply();
})();
