// BunPulse dashboard: the live log, the channel list, the charts and the event creator.
// Everything shown comes from the server as data and goes into the page as text
// (textContent, SVG attributes), never as HTML.
"use strict";
(function () {
  var root = document.getElementById("dashboard");
  if (!root) return;
  var csrf = root.getAttribute("data-csrf");
  var base = root.getAttribute("data-base");
  var KEEP = 500;          // log records kept in the page
  var HOUR = 3600;
  var POLL_MS = 2000;

  function el(tag, text, cls) {
    var node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function json(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  // ------------------------------------------------------------------ live log
  var logList = document.getElementById("log");
  var filterChannel = document.getElementById("filter-channel");
  var filterType = document.getElementById("filter-type");
  var pauseButton = document.getElementById("pause");
  var logCount = document.getElementById("log-count");
  var records = [];
  var held = [];
  var paused = false;

  function channelsOf(r) {
    return r.channels ? r.channels : (r.channel ? [r.channel] : []);
  }

  function shown(r) {
    var type = filterType.value, part = filterChannel.value.trim();
    if (type && r.type !== type) return false;
    if (part && !channelsOf(r).some(function (c) { return c.indexOf(part) !== -1; })) return false;
    return true;
  }

  function details(r) {
    var parts = [];
    if (r.socket_id) parts.push("socket " + r.socket_id);
    if (r.channel) parts.push("channel " + r.channel);
    if (r.channels && r.type !== "api_message" && r.type.indexOf("webhook_") !== 0) parts.push("channels " + r.channels.join(", "));
    if (r.type === "api_message") parts.push("channels " + r.channels.join(", "));
    if (r.event) parts.push("event " + r.event);
    if (r.size !== undefined) parts.push(r.size + " B");
    if (r.user_id) parts.push("user " + r.user_id);
    if (r.user_info !== undefined) parts.push("user_info " + json(r.user_info));
    if (r.code !== undefined) parts.push("code " + r.code);
    if (r.reason) parts.push("reason " + r.reason);
    if (r.closed_by) parts.push("closed by " + r.closed_by);
    if (r.events) parts.push(r.count + " event(s): " + r.events.join(", "));
    if (r.type.indexOf("webhook_") === 0 && r.channels && r.channels.length) parts.push("channels " + r.channels.join(", "));
    return parts.join(" · ");
  }

  function row(r) {
    var li = el("li", null, "entry type-" + r.type);
    var time = new Date(r.time * 1000), two = function (n) { return (n < 10 ? "0" : "") + n; };
    li.appendChild(el("time", two(time.getHours()) + ":" + two(time.getMinutes()) + ":" +
                      two(time.getSeconds()), "when"));
    li.appendChild(el("span", r.type, "type"));
    li.appendChild(el("span", details(r), "details"));
    if (r.data !== undefined) li.appendChild(el("code", r.data, "data"));
    return li;
  }

  function render() {
    logList.textContent = "";
    var visible = 0;
    for (var i = records.length - 1; i >= 0; i--) {
      if (shown(records[i])) { logList.appendChild(row(records[i])); visible++; }
    }
    logCount.textContent = visible + " of " + records.length + (paused ? " · paused, " + held.length + " waiting" : "");
  }

  function add(batch) {
    if (paused) {
      held = held.concat(batch).slice(-KEEP);
      logCount.textContent = records.length + " kept · paused, " + held.length + " waiting";
      return;
    }
    records = records.concat(batch);
    if (records.length > KEEP) records = records.slice(-KEEP);
    var fresh = batch.filter(shown);
    if (fresh.length > 20 || logList.childElementCount > KEEP) { render(); return; }
    fresh.forEach(function (r) { logList.insertBefore(row(r), logList.firstChild); });
    while (logList.childElementCount > KEEP) logList.removeChild(logList.lastChild);
    render();
  }

  pauseButton.addEventListener("click", function () {
    paused = !paused;
    pauseButton.textContent = paused ? "Resume" : "Pause";
    if (!paused && held.length) { var waiting = held; held = []; add(waiting); }
    else render();
  });
  document.getElementById("clear").addEventListener("click", function () {
    records = []; held = []; render();
  });
  filterChannel.addEventListener("input", render);
  filterType.addEventListener("change", render);

  var status = document.getElementById("stream-status");
  var stream = new EventSource(base + "events");
  stream.addEventListener("ready", function () { status.textContent = "Live"; });
  stream.addEventListener("end", function () {
    stream.close();
    status.textContent = "Stream ended: signed out";
  });
  stream.onmessage = function (message) { add(JSON.parse(message.data)); };
  stream.onerror = function () {
    status.textContent = stream.readyState === EventSource.CLOSED ? "Stream closed: sign in again" : "Reconnecting…";
  };

  // ------------------------------------------------------------------ polling
  function get(path, done) {
    fetch(path, {credentials: "same-origin", cache: "no-store"}).then(function (response) {
      if (response.status === 401) { status.textContent = "Signed out"; return null; }
      return response.json();
    }).then(function (body) { if (body) done(body); }).catch(function (error) { console.error(error); });
  }

  // ------------------------------------------------------------------ channels
  var channelBody = document.querySelector("#channels tbody");
  var noChannels = document.getElementById("no-channels");

  function channelCell(c) {
    var td = el("td");
    if (c.members) {
      var list = el("ul", null, "members");
      c.members.forEach(function (m) {
        list.appendChild(el("li", m.id + ": " + json(m.user_info)));
      });
      td.appendChild(el("span", c.user_count + " member(s)"));
      td.appendChild(list);
    }
    if (c.cache) td.appendChild(el("span", "cached " + c.cache.event + ": " + c.cache.data + " (" + c.cache.ttl + " s left)", "cache"));
    return td;
  }

  function showChannels(body) {
    channelBody.textContent = "";
    body.channels.forEach(function (c) {
      var tr = el("tr");
      tr.appendChild(el("th", c.name)).setAttribute("scope", "row");
      tr.appendChild(el("td", c.subscription_count));
      tr.appendChild(channelCell(c));
      channelBody.appendChild(tr);
    });
    noChannels.hidden = body.channels.length > 0;
    document.getElementById("channel-total").textContent =
      "(" + body.total + " occupied, " + body.connections + " connection(s))";
  }

  // ------------------------------------------------------------------ charts
  var samples = {};   // second -> [second, connections, in, out, api]
  var lastSecond = 0;
  var SVG = "http://www.w3.org/2000/svg";
  var H = 130, PAD = 6, BOTTOM = 18, MIN_SPAN = 300;

  function svgEl(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function minutes(seconds) {
    return seconds >= 120 ? "−" + Math.round(seconds / 60) + " min" : "−" + seconds + " s";
  }

  // The span shown grows with the samples kept, from five minutes up to the hour.
  function span(now) {
    var first = now;
    Object.keys(samples).forEach(function (s) { first = Math.min(first, Number(s)); });
    return Math.min(HOUR, Math.max(MIN_SPAN, now - first));
  }

  function draw(id, now, series) {   // series: [{index, cls}]
    var svg = document.getElementById(id);
    var W = Math.max(200, Math.round(svg.getBoundingClientRect().width) || 600);
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.textContent = "";
    var seconds = span(now), start = now - seconds, peak = 1;
    Object.keys(samples).forEach(function (s) {
      series.forEach(function (line) { peak = Math.max(peak, samples[s][line.index]); });
    });
    var plotH = H - BOTTOM - PAD;
    svg.appendChild(svgEl("line", {x1: 0, x2: W, y1: PAD + plotH, y2: PAD + plotH, "class": "axis"}));
    svg.appendChild(svgEl("line", {x1: 0, x2: W, y1: PAD, y2: PAD, "class": "grid"}));
    svg.appendChild(svgEl("text", {x: 4, y: PAD + 12, "class": "label"}, "max " + peak));
    svg.appendChild(svgEl("text", {x: 2, y: H - 4, "class": "label"}, minutes(seconds)));
    svg.appendChild(svgEl("text", {x: W / 2, y: H - 4, "class": "label", "text-anchor": "middle"}, minutes(Math.round(seconds / 2))));
    svg.appendChild(svgEl("text", {x: W - 2, y: H - 4, "class": "label", "text-anchor": "end"}, "now"));
    series.forEach(function (line) {
      var points = [];
      // One point per second; a worker writes a sample whenever it has connections or
      // traffic, so a second without one had neither.
      for (var t = start; t <= now; t++) {
        var sample = samples[t], v = sample ? sample[line.index] : 0;
        points.push(((t - start) / seconds * W).toFixed(1) + "," + (PAD + plotH - v / peak * plotH).toFixed(1));
      }
      svg.appendChild(svgEl("polyline", {points: points.join(" "), "class": "series " + line.cls}));
    });
  }

  function showStats(body) {
    body.samples.forEach(function (s) { samples[s[0]] = s; lastSecond = Math.max(lastSecond, s[0]); });
    var now = body.now;
    Object.keys(samples).forEach(function (s) { if (s < now - HOUR) delete samples[s]; });
    draw("chart-connections", now, [{index: 1, cls: "connections"}]);
    draw("chart-messages", now, [{index: 2, cls: "in"}, {index: 3, cls: "out"}]);
    draw("chart-api", now, [{index: 4, cls: "api"}]);
    var latest = samples[lastSecond] || [0, 0, 0, 0, 0];
    document.getElementById("now-connections").textContent = "now " + latest[1];
    document.getElementById("now-messages").textContent = "now " + latest[2] + " / " + latest[3];
    document.getElementById("now-api").textContent = "now " + latest[4];
  }

  function poll() {
    get(base + "api/channels", showChannels);
    // A few seconds back: another worker's sample of a second may land after ours.
    get(base + "api/stats?since=" + Math.max(0, lastSecond - 5), showStats);
  }
  poll();
  setInterval(poll, POLL_MS);

  // ------------------------------------------------------------------ event creator
  var creator = document.getElementById("event-creator");
  var result = document.getElementById("ec-result");
  creator.addEventListener("submit", function (submit) {
    submit.preventDefault();
    var body = {
      channels: document.getElementById("ec-channel").value,
      event: document.getElementById("ec-event").value,
      data: document.getElementById("ec-data").value
    };
    result.textContent = "Sending…";
    result.className = "";
    fetch(base + "api/publish", {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(body)
    }).then(function (response) {
      return response.json().then(function (answer) { return [response.status, answer]; });
    }).then(function (pair) {
      if (pair[0] === 200) {
        result.textContent = "Sent to " + pair[1].channels.join(", ");
      } else {
        result.textContent = "Error " + pair[0] + ": " + pair[1].error;
        result.className = "error";
      }
    }).catch(function (error) {
      result.textContent = "Error: " + error;
      result.className = "error";
    });
  });
})();
