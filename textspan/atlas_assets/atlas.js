/* textspan head atlas: recolour the overview by a measure and search the heads' labels, all in the page. */
(function () {
  "use strict";
  var A = window.ATLAS;
  if (!A) { return; }
  // perceptual colour maps as a few stops: viridis for sequential measures; for signed effects matplotlib's RdBu,
  // the figures' own (negative, "the head matters", red; zero white; positive blue)
  var SEQ = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  var DIV = [[178, 24, 43], [244, 165, 130], [247, 247, 247], [146, 197, 222], [33, 102, 172]];
  function lerp(stops, t) {
    t = Math.max(0, Math.min(1, t));
    var x = t * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
    var a = stops[i], b = stops[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); }).join(",") + ")";
  }
  function ink(stops, t) {  // dark text on light cells
    var c = lerp(stops, t).match(/\d+/g).map(Number);
    return (0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]) > 140 ? "#111" : "#fff";
  }
  function paint(name) {
    var m = A.measures[name];
    if (!m) { return; }
    var stops = m.diverging ? DIV : SEQ;
    document.querySelectorAll("td[data-head]").forEach(function (td) {
      var v = m.values[td.getAttribute("data-head")];
      if (v === undefined || v === null) { td.style.background = "#eee"; td.style.color = "#999"; td.title = "no value"; return; }
      var t = m.diverging ? 0.5 + v / (2 * (m.scale || 1)) : (v - m.min) / ((m.max - m.min) || 1);
      td.style.background = lerp(stops, t);
      td.style.color = ink(stops, t);
      var extra = m.notes && m.notes[td.getAttribute("data-head")] ? " (" + m.notes[td.getAttribute("data-head")] + ")" : "";
      var top = td.getAttribute("data-top");
      td.title = td.getAttribute("data-head") + (top ? " (" + top + ")" : "") + ": " + m.label + " " +
        v.toFixed(m.digits || 2) + extra;
    });
    var legend = document.getElementById("legend");
    if (legend) {
      var bar = legend.querySelector(".bar");
      var cols = []; for (var i = 0; i <= 10; i++) { cols.push(lerp(stops, i / 10)); }
      bar.style.background = "linear-gradient(to right," + cols.join(",") + ")";
      legend.querySelector(".lo").textContent = m.diverging ? (-(m.scale || 1)).toFixed(m.digits || 2) : m.min.toFixed(m.digits || 2);
      legend.querySelector(".hi").textContent = m.diverging ? (m.scale || 1).toFixed(m.digits || 2) : m.max.toFixed(m.digits || 2);
      legend.querySelector(".what").textContent = m.label;
    }
  }
  // which heads do X: every head with a label containing the query, ranked by the share of the head's variance its
  // matching texts explain (their TextSpan variance fractions summed), the share shown
  function search(query) {
    var q = query.trim().toLowerCase(), out = document.getElementById("results");
    out.innerHTML = "";
    document.querySelectorAll("td[data-head]").forEach(function (td) { td.classList.remove("hit"); td.style.outline = ""; });
    if (!q) { document.getElementById("count").textContent = ""; return; }
    var hits = [];
    A.heads.forEach(function (h) {
      var texts = A.labels[h] || [], shares = (A.shares || {})[h] || [], share = 0, matched = [];
      texts.forEach(function (t, i) {
        if (t.toLowerCase().indexOf(q) >= 0) { share += shares[i] || 0; matched.push(t); }
      });
      if (matched.length) { hits.push({head: h, share: share, texts: matched}); }
    });
    hits.sort(function (a, b) { return b.share - a.share; });
    var best = hits.length ? hits[0].share || 1 : 1;
    hits.forEach(function (hit) {
      var li = document.createElement("li"), a = document.createElement("a");
      a.href = "heads/" + hit.head + ".html"; a.textContent = hit.head;
      li.appendChild(a);
      var share = document.createElement("span");
      share.className = "share";
      share.textContent = " " + (100 * hit.share).toFixed(1) + "% of its variance";
      li.appendChild(share);
      li.appendChild(document.createTextNode(": " + hit.texts.slice(0, 3).join("; ") +
        (hit.texts.length > 3 ? " (+" + (hit.texts.length - 3) + ")" : "")));
      li.setAttribute("data-head", hit.head);
      li.setAttribute("data-share", hit.share.toFixed(6));
      out.appendChild(li);
      var td = document.querySelector('td[data-head="' + hit.head + '"]');
      if (td) {
        td.classList.add("hit");
        td.style.outline = Math.max(1, Math.round(4 * hit.share / best)) + "px solid #111";
      }
    });
    document.getElementById("count").textContent = hits.length + " of " + A.heads.length +
      " heads have a matching text, ranked by the share of their variance it explains";
  }
  document.addEventListener("DOMContentLoaded", function () {
    var sel = document.getElementById("measure");
    if (sel) { sel.addEventListener("change", function () { paint(sel.value); }); paint(sel.value); }
    var box = document.getElementById("search");
    // a link can carry a search: index.html#search=water
    var hash = decodeURIComponent((window.location.hash || "").replace(/^#/, ""));
    if (box && hash.indexOf("search=") === 0) { box.value = hash.slice(7); }
    if (box) { box.addEventListener("input", function () { search(box.value); }); search(box.value); }
  });
})();
