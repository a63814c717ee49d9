// Placeholder: the dashboard itself comes from the ui branch.
'use strict';
fetch('/version').then((r) => r.json()).then((v) => {
  document.getElementById('status').textContent = v.version;
}).catch(() => {});
