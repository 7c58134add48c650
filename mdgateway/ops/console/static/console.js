// mdgateway console: small, optional conveniences. Every page works
// without this file; it adds the dashboard's auto-refresh and the
// quarantine list's select-all box. No inline script anywhere (the pages'
// Content-Security-Policy forbids it).
"use strict";

(function () {
  function autoRefresh() {
    var seconds = parseInt(document.body.getAttribute("data-refresh") || "", 10);
    if (!seconds || seconds < 5) {
      return;
    }
    var key = "mdgateway.autorefresh";
    var label = document.createElement("label");
    label.className = "autorefresh";
    var box = document.createElement("input");
    box.type = "checkbox";
    box.id = "autorefresh";
    box.checked = window.localStorage.getItem(key) !== "off";
    label.appendChild(box);
    label.appendChild(document.createTextNode(" refresh every " + seconds + " s"));
    var title = document.querySelector("main h1");
    if (title) {
      title.appendChild(label);
    }
    var timer = null;
    function schedule() {
      if (timer) {
        window.clearTimeout(timer);
        timer = null;
      }
      if (box.checked) {
        timer = window.setTimeout(function () {
          window.location.reload();
        }, seconds * 1000);
      }
    }
    box.addEventListener("change", function () {
      window.localStorage.setItem(key, box.checked ? "on" : "off");
      schedule();
    });
    schedule();
  }

  function selectAll() {
    var all = document.getElementById("select-all");
    if (!all) {
      return;
    }
    var boxes = document.querySelectorAll("input.select-item");
    all.hidden = false;
    all.addEventListener("change", function () {
      for (var i = 0; i < boxes.length; i++) {
        boxes[i].checked = all.checked;
      }
    });
    for (var i = 0; i < boxes.length; i++) {
      boxes[i].addEventListener("change", function () {
        var checked = 0;
        for (var j = 0; j < boxes.length; j++) {
          if (boxes[j].checked) {
            checked++;
          }
        }
        all.checked = checked === boxes.length;
        all.indeterminate = checked > 0 && checked < boxes.length;
      });
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    autoRefresh();
    selectAll();
  });
})();
