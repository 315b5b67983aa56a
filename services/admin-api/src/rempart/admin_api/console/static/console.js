// Rempart console: the only script. It ticks the password rules while the user types (a hint:
// the server checks every rule again). Everything works without it.
"use strict";

(function () {
  var tests = {
    length: function (pw, value) { return Array.from(pw).length >= Number(value); },
    digit: function (pw) { return /\p{Nd}/u.test(pw); },
    symbol: function (pw) { return /[^\p{L}\p{N}]/u.test(pw); },
    upper: function (pw) { return /\p{Lu}/u.test(pw); },
    lower: function (pw) { return /\p{Ll}/u.test(pw); },
    absent: function (pw, value) {
      var folded = pw.toLowerCase();
      return value.split(",").filter(Boolean).every(function (word) { return folded.indexOf(word) < 0; });
    }
  };

  function watch(list) {
    var input = document.getElementById(list.dataset.for);
    var confirm = document.getElementById(list.dataset.confirm);
    if (!input) { return; }
    function update() {
      var pw = input.value;
      list.querySelectorAll("li[data-check]").forEach(function (item) {
        var check = item.dataset.check;
        var met = null;
        if (check === "confirm") {
          met = confirm ? (pw.length > 0 && confirm.value === pw) : null;
        } else if (tests[check]) {
          met = tests[check](pw, item.dataset.value || "");
        }
        if (met === null || pw.length === 0) {
          item.removeAttribute("data-state");
        } else {
          item.dataset.state = met ? "met" : "unmet";
        }
      });
    }
    input.addEventListener("input", update);
    if (confirm) { confirm.addEventListener("input", update); }
  }

  document.querySelectorAll("[data-password-rules]").forEach(watch);
})();
