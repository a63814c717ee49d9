// tproxyd's built-in dashboard: plain JS against the same-origin Clash-style
// API (no framework, no build step, nothing fetched from elsewhere, so it
// works on a router without internet).
'use strict';

(function () {
  const $ = (id) => document.getElementById(id);
  const SECRET_KEY = 'tproxyd.secret';
  const THEME_KEY = 'tproxyd.theme';
  const HISTORY = 60; // seconds of traffic the chart keeps

  // ---- formatting -------------------------------------------------------

  function bytes(n) {
    const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    let i = 0;
    n = Number(n) || 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + ' ' + units[i];
  }
  const rate = (n) => bytes(n) + '/s';

  function age(startMs, now) {
    let s = Math.max(0, Math.floor((now - startMs) / 1000));
    if (s < 60) return s + 's';
    const m = Math.floor(s / 60); s %= 60;
    if (m < 60) return m + 'm' + String(s).padStart(2, '0') + 's';
    const h = Math.floor(m / 60);
    if (h < 24) return h + 'h' + String(m % 60).padStart(2, '0') + 'm';
    return Math.floor(h / 24) + 'd' + String(h % 24).padStart(2, '0') + 'h';
  }

  // "[v6]:port" like a socket address, so the same text works for both
  // families in the filter, the sort and the data-dst attribute.
  function hostPort(ip, port) {
    if (!ip) return '';
    return (ip.includes(':') ? '[' + ip + ']' : ip) + ':' + port;
  }

  // ---- the API ----------------------------------------------------------

  let secret = localStorage.getItem(SECRET_KEY) || '';
  let authWaiters = [];

  class AuthError extends Error {}

  async function api(method, path, body) {
    const headers = {};
    if (secret) headers.Authorization = 'Bearer ' + secret;
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: 'no-store',
    });
    if (res.status === 401 || res.status === 403) {
      askSecret(secret ? 'That secret was refused.' : '');
      throw new AuthError('unauthorized');
    }
    if (!res.ok) {
      let msg = res.status + ' ' + res.statusText;
      try { const j = await res.json(); if (j && j.message) msg = j.message; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    if (res.status === 204) return null;
    const text = await res.text();
    return text ? JSON.parse(text) : null;
  }

  // Resolves once a working secret has been entered.
  function authorized() {
    return new Promise((resolve) => authWaiters.push(resolve));
  }

  function askSecret(error) {
    const dlg = $('auth');
    setStatus('needs the API secret', 'bad');
    // Polls keep failing while the dialog is up: leave what is being
    // typed alone.
    if (dlg.open) return;
    $('auth-error').textContent = error || '';
    $('secret').value = '';
    if (dlg.showModal) dlg.showModal(); else dlg.setAttribute('open', '');
    $('secret').focus();
  }

  $('auth-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const candidate = $('secret').value;
    try {
      const res = await fetch('/version', {
        headers: { Authorization: 'Bearer ' + candidate },
        cache: 'no-store',
      });
      if (res.status === 401 || res.status === 403) {
        $('auth-error').textContent = 'That secret was refused.';
        return;
      }
    } catch (e) {
      $('auth-error').textContent = 'tproxyd cannot be reached: ' + e.message;
      return;
    }
    secret = candidate;
    localStorage.setItem(SECRET_KEY, secret);
    $('auth').close();
    const waiters = authWaiters;
    authWaiters = [];
    waiters.forEach((w) => w());
  });

  $('forget').addEventListener('click', () => {
    localStorage.removeItem(SECRET_KEY);
    secret = '';
    askSecret('');
  });

  // A WebSocket stream that reconnects (browsers cannot send headers on a
  // WebSocket: the secret goes in ?token=). A stream that fails before it
  // opens may be a 401, which the browser hides, so /version is asked.
  function stream(path, params, onMessage) {
    let ws = null;
    let stopped = false;
    let timer = null;
    const open = () => {
      if (stopped) return;
      const q = new URLSearchParams(params());
      if (secret) q.set('token', secret);
      const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const qs = q.toString();
      ws = new WebSocket(proto + '//' + location.host + path + (qs ? '?' + qs : ''));
      let opened = false;
      ws.onopen = () => { opened = true; setStatus('live', 'ok'); };
      ws.onmessage = (ev) => {
        let msg;
        try { msg = JSON.parse(ev.data); } catch (_) { return; }
        onMessage(msg);
      };
      ws.onclose = async () => {
        ws = null;
        if (stopped) return;
        if (!opened) {
          try { await api('GET', '/version'); } catch (e) {
            if (e instanceof AuthError) { await authorized(); open(); return; }
            setStatus('tproxyd unreachable, retrying', 'bad');
          }
        } else {
          setStatus('reconnecting…', 'warn');
        }
        timer = setTimeout(open, 3000);
      };
    };
    open();
    return {
      restart() { clearTimeout(timer); if (ws) { ws.onclose = null; ws.close(); ws = null; } open(); },
    };
  }

  function setStatus(text, cls) {
    const el = $('status');
    el.textContent = text;
    el.className = 'status ' + (cls || '');
  }

  // ---- traffic chart ----------------------------------------------------

  const samples = []; // {up, down}, oldest first, one per second
  let lastTotals = null;

  function onTraffic(msg) {
    const up = Number(msg.up) || 0;
    const down = Number(msg.down) || 0;
    samples.push({ up, down });
    while (samples.length > HISTORY) samples.shift();
    $('rate-up').textContent = rate(up);
    $('rate-down').textContent = rate(down);
    drawChart();
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function drawChart() {
    const canvas = $('chart');
    const dpr = window.devicePixelRatio || 1;
    const w = canvas.clientWidth;
    const h = canvas.clientHeight;
    if (!w || !h) return;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const g = canvas.getContext('2d');
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, w, h);
    const max = Math.max(1024, ...samples.map((s) => Math.max(s.up, s.down)));
    const top = niceCeil(max);
    const padL = 64;
    const padB = 16;
    const plotW = w - padL - 4;
    const plotH = h - padB - 6;
    // Grid lines and their labels: a quarter of the scale each.
    g.strokeStyle = cssVar('--grid');
    g.fillStyle = cssVar('--muted');
    g.font = '11px system-ui, sans-serif';
    g.lineWidth = 1;
    g.textAlign = 'right';
    g.textBaseline = 'middle';
    for (let i = 0; i <= 4; i++) {
      const y = 6 + plotH - (plotH * i) / 4;
      g.beginPath(); g.moveTo(padL, Math.round(y) + 0.5); g.lineTo(w - 4, Math.round(y) + 0.5); g.stroke();
      g.fillText(rate((top * i) / 4), padL - 6, y);
    }
    g.textAlign = 'left';
    g.textBaseline = 'bottom';
    g.fillText('-60 s', padL, h);
    g.textAlign = 'right';
    g.fillText('now', w - 4, h);
    const xOf = (i) => padL + plotW - ((samples.length - 1 - i) * plotW) / (HISTORY - 1);
    const yOf = (v) => 6 + plotH - (plotH * v) / top;
    for (const [key, color] of [['down', cssVar('--down')], ['up', cssVar('--up')]]) {
      if (samples.length < 2) break;
      g.beginPath();
      samples.forEach((s, i) => (i ? g.lineTo(xOf(i), yOf(s[key])) : g.moveTo(xOf(i), yOf(s[key]))));
      g.strokeStyle = color;
      g.lineWidth = 2;
      // Up is dashed: with equal rates (an echo) both lines stay visible.
      g.setLineDash(key === 'up' ? [6, 4] : []);
      g.stroke();
      g.setLineDash([]);
      // Only the download area is filled: two fills over each other
      // would muddy both colours.
      if (key !== 'down') continue;
      g.lineTo(xOf(samples.length - 1), yOf(0));
      g.lineTo(xOf(0), yOf(0));
      g.closePath();
      g.globalAlpha = 0.15;
      g.fillStyle = color;
      g.fill();
      g.globalAlpha = 1;
    }
  }

  // A round top for the scale in the unit the labels use (1, 2, 5 or 10
  // KiB/s, MiB/s, ...), so the grid lines read as round numbers.
  function niceCeil(v) {
    let unit = 1;
    while (v >= unit * 1024) unit *= 1024;
    const x = v / unit;
    const p = Math.pow(10, Math.floor(Math.log10(x)));
    for (const m of [1, 2, 4, 5, 8, 10]) if (m * p >= x) return m * p * unit;
    return 10 * p * unit;
  }

  window.addEventListener('resize', drawChart);

  // ---- flows --------------------------------------------------------------

  const flows = new Map(); // id -> {data, prev download+upload, speed, row}
  let sortKey = 'start';
  let sortDir = -1; // newest first
  let filterText = '';

  function flowFields(c) {
    const m = c.metadata || {};
    const chains = Array.isArray(c.chains) ? c.chains : [];
    return {
      id: String(c.id),
      network: m.network || '',
      src: hostPort(m.sourceIP, m.sourcePort),
      dst: hostPort(m.destinationIP, m.destinationPort),
      host: m.host || m.sniffHost || '',
      rule: c.rulePayload ? c.rule + ' ' + c.rulePayload : (c.rule || ''),
      // chains[0] is the outbound that carries the flow; the groups it was
      // reached through follow, so the path reads group → … → outbound.
      chain: chains.slice().reverse().join(' → '),
      outbound: chains[0] || '',
      up: Number(c.upload) || 0,
      down: Number(c.download) || 0,
      start: Date.parse(c.start) || Date.now(),
    };
  }

  function onConnections(msg) {
    $('total-up').textContent = bytes(msg.uploadTotal);
    $('total-down').textContent = bytes(msg.downloadTotal);
    const list = Array.isArray(msg.connections) ? msg.connections : [];
    const now = Date.now();
    const seen = new Set();
    for (const c of list) {
      const f = flowFields(c);
      seen.add(f.id);
      const old = flows.get(f.id);
      if (old) {
        const dt = Math.max(0.001, (now - old.at) / 1000);
        f.speed = Math.max(0, (f.up + f.down - old.data.up - old.data.down) / dt);
        old.data = f;
        old.at = now;
      } else {
        f.speed = 0;
        flows.set(f.id, { data: f, at: now, row: null });
      }
    }
    for (const [id, entry] of flows) {
      if (!seen.has(id)) {
        if (entry.row) entry.row.remove();
        flows.delete(id);
      }
    }
    renderFlows();
  }

  function makeRow(f) {
    const tr = document.createElement('tr');
    tr.id = 'flow-' + f.id;
    tr.dataset.flowId = f.id;
    for (const key of ['network', 'src', 'dst', 'host', 'rule', 'chain', 'up', 'down', 'speed', 'start']) {
      const td = document.createElement('td');
      td.dataset.col = key;
      if (['up', 'down', 'speed', 'start'].includes(key)) td.className = 'num';
      tr.appendChild(td);
    }
    const td = document.createElement('td');
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'close small';
    btn.dataset.action = 'close';
    btn.dataset.flowId = f.id;
    btn.textContent = 'Close';
    td.appendChild(btn);
    tr.appendChild(td);
    return tr;
  }

  function fillRow(tr, f, now) {
    // Attributes the test (and anyone scripting the page) finds a flow by.
    tr.dataset.dst = f.dst;
    tr.dataset.src = f.src;
    tr.dataset.network = f.network;
    tr.dataset.outbound = f.outbound;
    const set = (key, text) => {
      const td = tr.querySelector('td[data-col="' + key + '"]');
      if (td.textContent !== text) td.textContent = text;
    };
    set('network', f.network);
    set('src', f.src);
    set('dst', f.dst);
    set('host', f.host);
    set('rule', f.rule);
    set('chain', f.chain);
    set('up', bytes(f.up));
    set('down', bytes(f.down));
    set('speed', f.speed ? rate(f.speed) : '');
    set('start', age(f.start, now));
    tr.querySelector('button[data-action="close"]').setAttribute('aria-label', 'Close flow to ' + (f.host || f.dst));
  }

  function renderFlows() {
    const now = Date.now();
    const needle = filterText.toLowerCase();
    const visible = [];
    for (const entry of flows.values()) {
      const f = entry.data;
      const hay = [f.network, f.src, f.dst, f.host, f.rule, f.chain].join(' ').toLowerCase();
      const show = !needle || hay.includes(needle);
      if (!entry.row) entry.row = makeRow(f);
      fillRow(entry.row, f, now);
      if (show) visible.push(entry); else entry.row.remove();
    }
    visible.sort((a, b) => {
      const x = a.data[sortKey];
      const y = b.data[sortKey];
      const c = typeof x === 'number' ? x - y : String(x).localeCompare(String(y), undefined, { numeric: true });
      return c * sortDir || a.data.id.localeCompare(b.data.id, undefined, { numeric: true });
    });
    // Re-append in order: moving a row keeps its elements (and a focused
    // close button) instead of rebuilding the table every second.
    const body = $('flow-rows');
    visible.forEach((entry, i) => {
      if (body.children[i] !== entry.row) body.insertBefore(entry.row, body.children[i] || null);
    });
    $('flow-count').textContent = flows.size === visible.length ? String(flows.size) : visible.length + ' of ' + flows.size;
    $('flows-empty').hidden = visible.length > 0;
    $('close-all').disabled = flows.size === 0;
  }

  function showSort() {
    for (const th of document.querySelectorAll('#flow-table th[data-key]')) {
      th.setAttribute('aria-sort', th.dataset.key === sortKey ? (sortDir > 0 ? 'ascending' : 'descending') : 'none');
    }
  }

  document.querySelector('#flow-table thead').addEventListener('click', (ev) => {
    const th = ev.target.closest('th[data-key]');
    if (!th) return;
    if (sortKey === th.dataset.key) sortDir = -sortDir;
    else { sortKey = th.dataset.key; sortDir = ['up', 'down', 'speed', 'start'].includes(sortKey) ? -1 : 1; }
    showSort();
    renderFlows();
  });

  $('filter').addEventListener('input', (ev) => { filterText = ev.target.value.trim(); renderFlows(); });

  $('flow-rows').addEventListener('click', async (ev) => {
    const btn = ev.target.closest('button[data-action="close"]');
    if (!btn) return;
    btn.disabled = true;
    btn.textContent = 'Closing…';
    try {
      await api('DELETE', '/connections/' + encodeURIComponent(btn.dataset.flowId));
    } catch (e) {
      btn.disabled = false;
      btn.textContent = 'Close';
      if (!(e instanceof AuthError)) setStatus('close failed: ' + e.message, 'bad');
    }
  });

  $('close-all').addEventListener('click', async () => {
    if (!confirm('Close all ' + flows.size + ' flows? Their clients see a reset.')) return;
    try { await api('DELETE', '/connections'); } catch (e) {
      if (!(e instanceof AuthError)) setStatus('close all failed: ' + e.message, 'bad');
    }
  });

  // ---- outbounds ----------------------------------------------------------

  const GROUP_TYPES = ['Selector', 'Fallback', 'URLTest', 'LoadBalance', 'Relay'];

  async function loadProxies() {
    let data;
    try { data = await api('GET', '/proxies'); } catch (e) {
      if (!(e instanceof AuthError)) setStatus('outbounds: ' + e.message, 'bad');
      return;
    }
    const proxies = (data && data.proxies) || {};
    // GLOBAL exists for other dashboards' ordering; tproxyd routes by
    // rules only, so it is not shown as a group of its own.
    const order = (proxies.GLOBAL && Array.isArray(proxies.GLOBAL.all)) ? proxies.GLOBAL.all : Object.keys(proxies);
    const names = order.filter((n) => proxies[n]);
    for (const n of Object.keys(proxies)) if (!names.includes(n) && n !== 'GLOBAL') names.push(n);

    const groups = $('groups');
    groups.textContent = '';
    const rows = $('outbound-rows');
    rows.textContent = '';
    for (const name of names) {
      const p = proxies[name];
      const isGroup = GROUP_TYPES.includes(p.type) || Array.isArray(p.all);
      if (isGroup) groups.appendChild(groupCard(name, p));
      rows.appendChild(outboundRow(name, p, isGroup));
    }
  }

  function groupCard(name, p) {
    const div = document.createElement('div');
    div.className = 'group';
    div.dataset.group = name;
    const id = 'group-' + name.replace(/[^A-Za-z0-9_-]/g, '_');
    const label = document.createElement('label');
    label.htmlFor = id;
    label.textContent = name + ' ';
    const kind = document.createElement('span');
    kind.className = 'muted';
    kind.textContent = '(' + p.type + ')';
    label.appendChild(kind);
    const sel = document.createElement('select');
    sel.id = id;
    for (const member of p.all || []) {
      const o = document.createElement('option');
      o.value = member;
      o.textContent = member;
      o.selected = member === p.now;
      sel.appendChild(o);
    }
    // Only a selector is steered by hand; a failover group chooses itself.
    sel.disabled = p.type !== 'Selector';
    sel.addEventListener('change', async () => {
      try {
        await api('PUT', '/proxies/' + encodeURIComponent(name), { name: sel.value });
        setStatus(name + ': new flows go to ' + sel.value, 'ok');
      } catch (e) {
        if (!(e instanceof AuthError)) setStatus(name + ': ' + e.message, 'bad');
      }
      loadProxies();
    });
    div.append(label, sel);
    return div;
  }

  function lastDelay(p) {
    const h = Array.isArray(p.history) ? p.history : [];
    return h.length ? h[h.length - 1].delay : null;
  }

  function outboundRow(name, p, isGroup) {
    const tr = document.createElement('tr');
    tr.dataset.outbound = name;
    const cells = [name, p.type + (isGroup && p.now ? ' → ' + p.now : '')];
    for (const text of cells) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.appendChild(td);
    }
    const health = document.createElement('td');
    const alive = p.alive !== false;
    const badge = document.createElement('span');
    badge.className = 'badge ' + (alive ? 'ok' : 'bad');
    badge.textContent = alive ? 'healthy' : 'down';
    health.appendChild(badge);
    tr.appendChild(health);
    const delay = document.createElement('td');
    delay.className = 'num';
    const d = lastDelay(p);
    delay.textContent = d ? d + ' ms' : (d === 0 ? 'timeout' : '–');
    tr.appendChild(delay);
    const act = document.createElement('td');
    const btn = document.createElement('button');
    btn.type = 'button';
    btn.className = 'small';
    btn.textContent = 'Test';
    btn.setAttribute('aria-label', 'Test the delay of ' + name);
    btn.addEventListener('click', async () => {
      btn.disabled = true;
      delay.textContent = '…';
      try {
        // tproxyd times the outbound's own probe (for a proxy, its
        // handshake); it fetches no URL, so none is named.
        const q = new URLSearchParams({ timeout: '5000' });
        const r = await api('GET', '/proxies/' + encodeURIComponent(name) + '/delay?' + q);
        delay.textContent = r && r.delay ? r.delay + ' ms' : 'timeout';
      } catch (e) {
        delay.textContent = e instanceof AuthError ? '–' : e.message;
      }
      btn.disabled = false;
    });
    act.appendChild(btn);
    tr.appendChild(act);
    return tr;
  }

  // ---- rules --------------------------------------------------------------

  async function loadRules() {
    let data;
    try { data = await api('GET', '/rules'); } catch (e) {
      if (!(e instanceof AuthError)) setStatus('rules: ' + e.message, 'bad');
      return;
    }
    const body = $('rule-rows');
    body.textContent = '';
    ((data && data.rules) || []).forEach((r, i) => {
      const tr = document.createElement('tr');
      const extra = r.extra || {};
      const hits = extra.hitCount ?? r.hitCount ?? r.hits ?? '';
      const index = r.index ?? i;
      tr.dataset.ruleIndex = String(index);
      for (const [text, cls] of [[String(index), 'num'], [r.type, ''], [r.payload, ''], [r.proxy, ''], [String(hits), 'num']]) {
        const td = document.createElement('td');
        td.textContent = text;
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      body.appendChild(tr);
    });
  }

  // ---- logs ---------------------------------------------------------------

  const MAX_LOG = 300;
  let logPaused = false;

  function onLog(msg) {
    if (logPaused) return;
    const ol = $('log-lines');
    const li = document.createElement('li');
    const level = String(msg.type || 'info');
    li.className = 'lvl-' + level;
    const time = document.createElement('time');
    time.textContent = new Date().toLocaleTimeString();
    const lvl = document.createElement('span');
    lvl.className = 'lvl';
    lvl.textContent = level;
    const text = document.createElement('span');
    text.textContent = String(msg.payload ?? '');
    li.append(time, lvl, text);
    // Stay at the bottom only if the reader already was there.
    const atBottom = ol.scrollTop + ol.clientHeight >= ol.scrollHeight - 4;
    ol.appendChild(li);
    $('log-empty').hidden = true;
    while (ol.children.length > MAX_LOG) ol.firstChild.remove();
    if (atBottom) ol.scrollTop = ol.scrollHeight;
  }

  $('log-pause').addEventListener('click', (ev) => {
    logPaused = !logPaused;
    ev.target.setAttribute('aria-pressed', String(logPaused));
    ev.target.textContent = logPaused ? 'Resume' : 'Pause';
  });
  $('log-clear').addEventListener('click', () => {
    $('log-lines').textContent = '';
    $('log-empty').hidden = false;
  });

  // ---- theme --------------------------------------------------------------

  function applyTheme(t) {
    if (t === 'light' || t === 'dark') document.documentElement.dataset.theme = t;
    else delete document.documentElement.dataset.theme;
    $('theme').textContent = 'Theme: ' + (t || 'auto');
    drawChart();
  }
  $('theme').addEventListener('click', () => {
    const now = localStorage.getItem(THEME_KEY) || 'auto';
    const next = { auto: 'light', light: 'dark', dark: 'auto' }[now] || 'auto';
    localStorage.setItem(THEME_KEY, next);
    applyTheme(next);
  });
  applyTheme(localStorage.getItem(THEME_KEY) || 'auto');
  window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', drawChart);

  // ---- start --------------------------------------------------------------

  async function start() {
    try {
      const v = await api('GET', '/version');
      $('version').textContent = (v && v.version) || '';
    } catch (e) {
      if (e instanceof AuthError) { await authorized(); return start(); }
      setStatus('tproxyd unreachable: ' + e.message, 'bad');
      setTimeout(start, 3000);
      return;
    }
    showSort();
    renderFlows();
    loadProxies();
    loadRules();
    // Health, delays and hit counts change slowly: a poll is enough.
    // Not while a selector is in use: rebuilding it would close it.
    setInterval(() => {
      const busy = document.activeElement && document.activeElement.closest('#groups');
      if (!busy) loadProxies();
      loadRules();
    }, 5000);
    stream('/connections', () => ({}), onConnections);
    stream('/traffic', () => ({}), onTraffic);
    const logs = stream('/logs', () => ({ level: $('log-level').value }), onLog);
    $('log-level').addEventListener('change', () => logs.restart());
    // Ages keep counting between snapshots.
    setInterval(() => renderFlows(), 1000);
  }

  start();
})();
