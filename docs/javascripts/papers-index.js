// The papers index (papers/index.md): filters, text search and sorting.
//
// The page ships the whole table and the filter controls (hidden until this
// script runs; without JavaScript the full table still shows). Each row carries
// what it is filtered on as data-* attributes; the script reads them once into
// plain records (with one lowercase haystack per row for the text box), so a
// filter change is a loop over records, then rows leave or re-enter the table
// body only where the result changed. The state lives in the query string (?text=...&mechanism=merging
// &code=1&sort=-year; not "q", which Material's search box claims): a filtered
// view can be shared, and survives Back and reloads.
(function () {
  "use strict";

  var SELECTS = ["modality", "target", "stage", "mechanism", "training", "venue", "year"];
  var WHOLE = { venue: true, year: true, target: true };  // one value, spaces and all
  var FLAGS = ["code", "reference", "provisional"];
  var current = null;  // the set-up index of the page shown now

  function setUp() {
    var table = document.getElementById("atc-papers");
    var filters = document.getElementById("atc-filters");
    if (!table || !filters || table.getAttribute("data-ready")) return;
    table.setAttribute("data-ready", "1");
    if (window.performance && performance.mark) performance.mark("atc-index-start");
    current = createIndex(table, filters);
    foldFacets(document.getElementById("atc-facets"));
    filters.hidden = false;
    if (window.performance && performance.mark) performance.mark("atc-index-ready");
  }

  // On a phone the facets fold behind a "Filters" button (the stylesheet shows
  // the button, and folds them, only there).
  function foldFacets(facets) {
    var toggle = document.getElementById("atc-facets-toggle");
    if (!facets || !toggle) return;
    toggle.addEventListener("click", function () {
      var open = facets.hasAttribute("data-folded");
      if (open) facets.removeAttribute("data-folded");
      else facets.setAttribute("data-folded", "");
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    });
  }

  function createIndex(table, filters) {
    var body = table.tBodies[0];
    var count = document.getElementById("atc-count");
    var chips = document.getElementById("atc-chips");
    var search = document.getElementById("atc-filter-text");
    var toggle = document.getElementById("atc-facets-toggle");
    var path = location.pathname;
    var controls = {};
    SELECTS.concat(FLAGS).forEach(function (key) {
      var control = document.getElementById("atc-filter-" + key);
      if (control) controls[key] = control;
    });

    // One record per row, read once. Only attributes and text are read here:
    // nothing asks for layout.
    var records = [];
    var trs = body.rows;
    for (var i = 0; i < trs.length; i++) records.push(record(trs[i], i));
    // The table body holds the matching rows and nothing else (no text nodes).
    for (var node = body.firstChild, next; node; node = next) {
      next = node.nextSibling;
      if (node.nodeType !== 1) body.removeChild(node);
    }
    var total = records.length;
    var venueRank = {};
    if (controls.venue) {
      Array.prototype.forEach.call(controls.venue.options, function (option, rank) {
        venueRank[option.value] = rank;
      });
    }

    function record(tr, position) {
      var facets = {};
      var released = tr.getAttribute("data-released") || "";
      SELECTS.forEach(function (key) {
        var value = key === "year" ? released.slice(0, 4) : tr.getAttribute("data-" + key) || "";
        facets[key] = WHOLE[key] ? [value] : value ? value.split(" ") : [];
      });
      var flags = {};
      FLAGS.forEach(function (key) { flags[key] = tr.hasAttribute("data-" + key); });
      var cells = tr.cells;
      return {
        el: tr, position: position, facets: facets, flags: flags, match: true, attached: true,
        text: null,  // built on the first text search (see haystack)
        name: cells[0] ? cells[0].firstChild.textContent.toLowerCase() : "",
        released: released,
        venue: cells[2] ? cells[2].textContent.toLowerCase() : "",
        target: tr.getAttribute("data-target") || "",
      };
    }

    // What the text box searches in a row, lowercased once: the summary and
    // authors (data-text) and every cell but Code and Reference.
    function haystack(r) {
      if (r.text === null) {
        var cells = r.el.cells;
        var parts = [r.el.getAttribute("data-text") || ""];
        for (var c = 0; c < cells.length; c++) {
          var cell = cells[c];
          if (cell.className !== "atc-code" && cell.className !== "atc-ref") {
            parts.push(cell.textContent);
          }
        }
        r.text = parts.join(" ").toLowerCase();
      }
      return r.text;
    }

    // Sortable headings: a button in each, aria-sort on the one in use.
    var headings = {};
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      var key = th.getAttribute("data-key");
      if (!key) return;
      var button = document.createElement("button");
      button.type = "button";
      button.className = "atc-sort";
      while (th.firstChild) button.appendChild(th.firstChild);
      th.appendChild(button);
      th.classList.add("atc-sortable");
      headings[key] = th;
      th.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        state.sort = (ascending ? "" : "-") + key;
        update(true);
      });
    });

    var state = emptyState();

    function emptyState() {
      var s = { q: "", sort: "" };
      SELECTS.forEach(function (key) { s[key] = ""; });
      FLAGS.forEach(function (key) { s[key] = false; });
      return s;
    }

    function hasOption(select, value) {
      for (var i = 0; i < select.options.length; i++) {
        if (select.options[i].value === value) return true;
      }
      return false;
    }

    // URL -> state. Values the page does not offer are dropped.
    function readURL() {
      var params = new URLSearchParams(location.search);
      var s = emptyState();
      s.q = (params.get("text") || "").trim();
      SELECTS.forEach(function (key) {
        var value = params.get(key);
        if (value && controls[key] && hasOption(controls[key], value)) s[key] = value;
      });
      FLAGS.forEach(function (key) { s[key] = params.get(key) === "1" && !!controls[key]; });
      var sort = params.get("sort") || "";
      if (headings[sort.replace(/^-/, "")]) s.sort = sort;
      return s;
    }

    // state -> URL, without a new history entry: Back leaves the page, and
    // coming back to it (or sharing the address) restores the same view.
    // Parameters the index does not own (Material's, say) are left alone.
    function writeURL() {
      var params = new URLSearchParams(location.search);
      ["text", "sort"].concat(SELECTS, FLAGS).forEach(function (key) { params.delete(key); });
      if (state.q) params.set("text", state.q);
      SELECTS.forEach(function (key) { if (state[key]) params.set(key, state[key]); });
      FLAGS.forEach(function (key) { if (state[key]) params.set(key, "1"); });
      if (state.sort) params.set("sort", state.sort);
      var query = params.toString();
      var url = location.pathname + (query ? "?" + query : "") + location.hash;
      if (url !== location.pathname + location.search + location.hash) {
        history.replaceState(history.state, "", url);
      }
    }

    function writeControls() {
      if (search.value.trim() !== state.q) search.value = state.q;
      SELECTS.forEach(function (key) { if (controls[key]) controls[key].value = state[key]; });
      FLAGS.forEach(function (key) { if (controls[key]) controls[key].checked = state[key]; });
    }

    function readControls() {
      state.q = search.value.trim();
      SELECTS.forEach(function (key) { if (controls[key]) state[key] = controls[key].value; });
      FLAGS.forEach(function (key) { if (controls[key]) state[key] = controls[key].checked; });
    }

    // Which rows match: plain JavaScript over the records, no DOM access.
    function match() {
      var words = state.q.toLowerCase().split(/\s+/).filter(Boolean);
      var wanted = SELECTS.filter(function (key) { return state[key]; });
      var flags = FLAGS.filter(function (key) { return state[key]; });
      var shown = 0;
      for (var i = 0; i < total; i++) {
        var r = records[i];
        var ok = true;
        for (var f = 0; ok && f < wanted.length; f++) {
          if (r.facets[wanted[f]].indexOf(state[wanted[f]]) === -1) ok = false;
        }
        for (var g = 0; ok && g < flags.length; g++) if (!r.flags[flags[g]]) ok = false;
        if (ok && words.length) {
          var text = haystack(r);
          for (var w = 0; ok && w < words.length; w++) {
            if (text.indexOf(words[w]) === -1) ok = false;
          }
        }
        r.match = ok;
        if (ok) shown += 1;
      }
      return shown;
    }

    var order = records;  // display order
    var sorted = "";
    function sort() {
      if (state.sort === sorted) return;
      sorted = state.sort;
      var key = state.sort.replace(/^-/, "");
      var direction = state.sort.charAt(0) === "-" ? -1 : 1;
      order = records.slice();
      if (key) {
        order.sort(function (a, b) {
          var x = sortKey(a, key);
          var y = sortKey(b, key);
          var result = x < y ? -1 : x > y ? 1 : 0;
          return direction * result || a.position - b.position;
        });
      }
      Object.keys(headings).forEach(function (k) {
        if (k === key) headings[k].setAttribute("aria-sort", direction > 0 ? "ascending" : "descending");
        else headings[k].removeAttribute("aria-sort");
      });
    }

    // Rows that do not match leave the table (kept in their records) rather than
    // being hidden: toggling `hidden` on thousands of rows costs the browser a
    // style invalidation per row against every later sibling (Material's
    // stylesheet has `:not([hidden]) ~` selectors). Rows that stay are not
    // touched, so they keep their computed style and layout.
    function place() {
      for (var i = 0; i < total; i++) {
        var r = records[i];
        if (r.attached && !r.match) {
          body.removeChild(r.el);
          r.attached = false;
        }
      }
      var cursor = body.firstChild;
      for (var j = 0; j < total; j++) {
        var row = order[j];
        if (!row.match) continue;
        if (row.el === cursor) {
          cursor = cursor.nextSibling;
        } else {
          body.insertBefore(row.el, cursor);
          row.attached = true;
        }
      }
    }

    function sortKey(r, key) {
      if (key === "year") return r.released;
      if (key === "venue") {
        var rank = venueRank[r.facets.venue[0]] || 0;
        return ("000" + rank).slice(-4) + r.venue;
      }
      return r[key];
    }

    // One removable label per chosen filter, and "Clear all".
    function renderChips() {
      var items = [];
      if (state.q) items.push(["text", "Text: \u201c" + state.q + "\u201d"]);
      SELECTS.forEach(function (key) {
        if (state[key]) items.push([key, controls[key].getAttribute("data-label") + ": " + state[key]]);
      });
      FLAGS.forEach(function (key) {
        if (state[key]) items.push([key, controls[key].getAttribute("data-label")]);
      });
      var fragment = document.createDocumentFragment();
      items.forEach(function (item) {
        var chip = document.createElement("button");
        chip.type = "button";
        chip.className = "atc-chip";
        chip.setAttribute("data-key", item[0]);
        chip.setAttribute("aria-label", "Remove filter " + item[1]);
        chip.textContent = item[1];
        var cross = document.createElement("span");
        cross.setAttribute("aria-hidden", "true");
        cross.className = "atc-chip-x";
        cross.textContent = "\u00d7";
        chip.appendChild(cross);
        fragment.appendChild(chip);
      });
      if (items.length > 1) {
        var clear = document.createElement("button");
        clear.type = "button";
        clear.className = "atc-clear";
        clear.id = "atc-clear";
        clear.textContent = "Clear all";
        fragment.appendChild(clear);
      }
      if (toggle) {
        var chosen = items.length - (state.q ? 1 : 0);
        toggle.textContent = chosen ? "Filters (" + chosen + " chosen)" : "Filters";
      }
      chips.textContent = "";
      chips.appendChild(fragment);
      chips.hidden = items.length === 0;
    }

    function update(fromState) {
      if (!fromState) readControls();
      else writeControls();
      var shown = match();
      sort();
      place();
      count.textContent = shown === total
        ? total + " papers"
        : shown + " of " + total + " papers";
      renderChips();
      writeURL();
    }

    chips.addEventListener("click", function (event) {
      var button = event.target.closest ? event.target.closest("button") : null;
      if (!button) return;
      var focusNext = null;
      if (button.id === "atc-clear") {
        var sortBy = state.sort;
        state = emptyState();
        state.sort = sortBy;
        focusNext = search;
      } else {
        var key = button.getAttribute("data-key");
        if (key === "text") state.q = "";
        else state[key] = FLAGS.indexOf(key) !== -1 ? false : "";
        focusNext = key === "text" ? search : controls[key];
      }
      update(true);
      // The button is gone: keep the keyboard near it, on the next chip, else on
      // the control of that filter (or the text box, where the facets are folded).
      var left = chips.querySelector("button");
      if (!left && focusNext.offsetParent === null) focusNext = search;
      (left || focusNext).focus();
    });
    search.addEventListener("input", function () { update(false); });
    Object.keys(controls).forEach(function (key) {
      controls[key].addEventListener("change", function () { update(false); });
    });

    function restore() {
      state = readURL();
      update(true);
    }
    restore();
    return {
      restore: restore,
      live: function () { return table.isConnected && location.pathname === path; },
    };
  }

  // Another entry of this page's history (or a page swapped in by Material's
  // instant navigation, which runs setUp again through document$).
  window.addEventListener("popstate", function () {
    if (current && current.live()) current.restore();
  });

  if (typeof document$ !== "undefined" && document$ && document$.subscribe) {
    document$.subscribe(setUp);  // Material's page stream: every page load and swap
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", setUp);
  } else {
    setUp();
  }
})();
