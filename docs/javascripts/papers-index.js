// Filter and sort the papers index (papers/index.md) in the browser.
// Every row carries its facets as data-* attributes (space-separated terms);
// this script builds one <select> per facet plus a text box, and makes the
// column headings sortable. Without JavaScript the full table still shows.
(function () {
  "use strict";

  var FACETS = [
    ["modality", "Modality"], ["target", "Target"], ["stage", "Stage"],
    ["mechanism", "Mechanism"], ["training", "Training"], ["venue", "Venue"], ["year", "Year"],
  ];

  function terms(row, key) {
    var value = row.getAttribute("data-" + key) || "";
    return value ? value.split(" ") : [];
  }

  function setUp() {
    var table = document.getElementById("atc-papers");
    var filters = document.getElementById("atc-filters");
    if (!table || !filters || filters.getAttribute("data-ready")) return;
    filters.setAttribute("data-ready", "1");
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var count = document.getElementById("atc-count");
    var selects = {};

    var search = document.createElement("input");
    search.type = "search";
    search.placeholder = "Search name or title";
    search.id = "atc-filter-text";
    search.setAttribute("aria-label", "Search name or title");
    filters.appendChild(search);

    FACETS.forEach(function (facet) {
      var key = facet[0];
      var values = {};
      rows.forEach(function (row) { terms(row, key).forEach(function (t) { values[t] = true; }); });
      var select = document.createElement("select");
      select.id = "atc-filter-" + key;
      select.setAttribute("aria-label", facet[1]);
      var any = document.createElement("option");
      any.value = "";
      any.textContent = facet[1] + ": any";
      select.appendChild(any);
      Object.keys(values).sort().forEach(function (value) {
        var option = document.createElement("option");
        option.value = value;
        option.textContent = value;
        select.appendChild(option);
      });
      selects[key] = select;
      filters.appendChild(select);
    });

    function apply() {
      var text = search.value.trim().toLowerCase();
      var shown = 0;
      rows.forEach(function (row) {
        var ok = !text || (row.getAttribute("data-name") + " " + row.getAttribute("data-title"))
          .toLowerCase().indexOf(text) !== -1;
        Object.keys(selects).forEach(function (key) {
          var wanted = selects[key].value;
          if (ok && wanted && terms(row, key).indexOf(wanted) === -1) ok = false;
        });
        row.hidden = !ok;
        if (ok) shown += 1;
      });
      count.textContent = shown === rows.length
        ? rows.length + " papers"
        : shown + " of " + rows.length + " papers";
    }

    search.addEventListener("input", apply);
    Object.keys(selects).forEach(function (key) { selects[key].addEventListener("change", apply); });

    // Sorting: a heading click sorts by that column; a second click reverses.
    var headings = Array.prototype.slice.call(table.tHead.rows[0].cells);
    headings.forEach(function (th) {
      var key = th.getAttribute("data-key");
      if (!key) return;
      th.tabIndex = 0;
      th.classList.add("atc-sortable");
      function sort() {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        headings.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var attribute = key === "year" ? "data-released" : "data-" + key;
        rows.sort(function (a, b) {
          var x = (a.getAttribute(attribute) || "").toLowerCase();
          var y = (b.getAttribute(attribute) || "").toLowerCase();
          var order = x < y ? -1 : x > y ? 1 : 0;
          return ascending ? order : -order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
      }
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (event) {
        if (event.key === "Enter" || event.key === " ") { event.preventDefault(); sort(); }
      });
    });
    apply();
  }

  if (typeof document$ !== "undefined") {
    document$.subscribe(setUp);  // Material's page-change stream (instant navigation)
  } else {
    document.addEventListener("DOMContentLoaded", setUp);
  }
})();
