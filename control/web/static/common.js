// killswitch dashboard: helpers shared by every page. Text only ever goes in through
// textContent, so nothing a laptop reports can become markup.
"use strict";

window.Killswitch = (() => {
  function node(tag, text, cls) {
    const el = document.createElement(tag);
    if (text !== undefined && text !== null) el.textContent = String(text);
    if (cls) el.className = cls;
    return el;
  }
  function badge(state) {
    return node("span", state, "badge st-" + state);
  }
  // The live-update indicator in the header: on (a live stream) or off, and why.
  function setLive(on, text) {
    const live = document.getElementById("live-status");
    live.className = "live " + (on ? "on" : "off");
    live.textContent = text;
  }
  return { node, badge, setLive };
})();
