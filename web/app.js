// The page: Join / Pause / Leave for this tab's participant (which trains in web/worker.js),
// this tab's receipts (kept, downloadable, checked against the signed ledger), and the shared
// model's state from /api/status. `window.tessera` holds what the page shows,
// for tests and kiosks; `?autojoin=1` joins on load, `?backend=auto|webgpu|cpu` picks the backend,
// `?threads=N` how many CPU threads CPU training may use (default: every core; 1: one thread).
import { drawChart } from '/web/chart.js';

const $ = id => document.getElementById(id);
const params = new URLSearchParams(location.search);
const KEY = 'tessera.identity';
// The relay's signed receipts for this browser's accepted updates (JSON lines, newest last),
// and the ledger key each run was first checked under.
const RECEIPTS = 'tessera.receipts';
const RELAY_KEYS = 'tessera.relay-keys';
const MAX_RECEIPTS = 5000;

const tab = (window.tessera = {
  state: 'idle', backend: null, device: null, reason: null, participantId: null,
  unit: null, step: 0, of: 0, loss: null, tokensPerS: null, accepted: 0, rejected: 0,
  tokens: 0, losses: [], firstStepAtMs: null, joinClickedAtMs: null, loadedMs: null,
  errors: [], modelVersion: null, joined: false, receipts: 0, receiptsCheck: null,
  downloads: 0, downloadedBytes: 0, rebuilt: 0, rebuiltBytes: 0,
  uploadedBytes: 0, gpuEncoded: 0, threads: null, threadsReason: null,
});

let worker = null;

function setState(state, detail = '') {
  tab.state = state;
  const pill = $('state');
  pill.textContent = detail ? `${state}: ${detail}` : state;
  pill.className = `pill ${state}`;
  const active = !['idle', 'left'].includes(state);
  $('join').disabled = active;
  $('backend').disabled = active;
  $('pause').disabled = !active;
  $('leave').disabled = !active;
  $('pause').textContent = state === 'paused' ? 'Resume' : 'Pause';
}

function notice(text) {
  $('notice').hidden = !text;
  $('notice').textContent = text || '';
}

const fmt = n => Math.round(n).toLocaleString();

function onEvent(e) {
  switch (e.type) {
    case 'loaded':
      tab.loadedMs = e.ms;
      break;
    case 'threads':
      Object.assign(tab, { threads: e.threads, threadsReason: e.reason });
      break;
    case 'identity':
      tab.participantId = e.participantId;
      if (!localStorage.getItem(KEY)) localStorage.setItem(KEY, e.secret);
      break;
    case 'backend':
      Object.assign(tab, { backend: e.backend, device: e.device, reason: e.reason });
      $('device').textContent = e.backend === 'webgpu' ? `WebGPU — ${e.device}` : e.device;
      $('why').textContent = e.reason;
      $('why').className = e.backend === 'webgpu' ? 'muted small' : 'notice';
      break;
    case 'state':
      setState(e.state, e.detail);
      break;
    case 'joined':
      soon();
      tab.joined = true;
      tab.participantId = e.participant_id;
      tab.modelVersion = e.model_version;
      break;
    case 'unit':
      Object.assign(tab, { unit: e.unit_id, step: 0, of: e.inner_steps });
      $('unit').textContent = `#${e.unit_id} (shard ${e.shard}, from v${e.base_version})`;
      $('progress').max = e.inner_steps;
      $('progress').value = 0;
      break;
    case 'step':
      if (tab.firstStepAtMs === null) tab.firstStepAtMs = performance.now();
      Object.assign(tab, { step: e.step, loss: e.loss, tokensPerS: e.tokens_per_s });
      tab.losses.push(e.loss);
      $('progress').value = e.step;
      $('loss').textContent = e.loss.toFixed(4);
      $('tps').textContent = fmt(e.tokens_per_s);
      drawChart($('local-chart'), tab.losses.map((l, i) => [i + 1, l]), { xLabel: 'inner steps in this tab', yLabel: 'training loss', color: '#c2410c' });
      break;
    case 'result':
      soon();
      tab.uploadedBytes += e.update_bytes;
      if (e.encoded_on_gpu) tab.gpuEncoded += 1;
      $('uploads').textContent = `${(tab.uploadedBytes / 1e6).toFixed(2)} MB`
        + (tab.gpuEncoded ? ` (${tab.gpuEncoded} encoded on the GPU)` : '');
      if (e.accepted) {
        if (e.receipt) keepReceipt(e.receipt);
        tab.accepted += 1;
        tab.tokens += e.tokens;
        $('accepted').textContent = tab.accepted;
        $('stake').textContent = fmt(tab.tokens);
      } else {
        tab.rejected += 1;
        tab.errors.push(`unit ${e.unit_id} rejected: ${e.reason}`);
        notice(`unit ${e.unit_id} was rejected: ${e.reason}`);
      }
      break;
    case 'weights':
      tab.downloads += 1;
      tab.downloadedBytes += e.bytes;
      if (e.rebuilt_from !== null && e.rebuilt_from !== undefined) {
        tab.rebuilt += 1;
        tab.rebuiltBytes += e.bytes;
      }
      $('downloads').textContent = `${tab.downloads} versions, ${(tab.downloadedBytes / 1e6).toFixed(2)} MB`
        + (tab.rebuilt ? ` (${tab.rebuilt} rebuilt from encoded changes)` : '');
      break;
    case 'abandoned':
      notice(`unit ${e.unit_id} given up: ${e.reason}`);
      break;
    case 'version':
      soon();
      tab.modelVersion = e.model_version;
      break;
    case 'error':
      tab.errors.push(e.message);
      break;
    case 'receipts-check':
      showCheck(e);
      break;
    case 'fatal':
      tab.errors.push(e.message);
      setState('error', e.message);
      $('join').disabled = false;
      break;
  }
}

function startWorker() {
  if (worker) return;
  worker = new Worker('/web/worker.js', { type: 'module' });
  worker.onmessage = ({ data }) => onEvent(data);
  worker.onerror = e => onEvent({ type: 'fatal', message: `worker failed: ${e.message || 'could not load /pkg (is the bundle built?)'}` });
}

function join() {
  tab.joinClickedAtMs ??= performance.now();
  startWorker();
  setState('starting');
  worker.postMessage({
    cmd: 'join',
    options: {
      relay: location.origin, backend: $('backend').value, secret: localStorage.getItem(KEY),
      ...(params.has('threads') ? { threads: Number(params.get('threads')) } : {}),
    },
  });
}

// Receipts: kept in localStorage (the newest MAX_RECEIPTS), downloadable as the JSON lines
// `tessera-host ledger verify --relay URL --receipts FILE` checks, and checked here in the
// worker against the relay's signed checkpoint and inclusion proofs.
const receipts = () => JSON.parse(localStorage.getItem(RECEIPTS) || '[]');

function keepReceipt(line) {
  const all = receipts();
  all.push(line);
  const kept = all.slice(-MAX_RECEIPTS);
  localStorage.setItem(RECEIPTS, JSON.stringify(kept));
  showReceipts(kept);
}

let downloadUrl = null;
function showReceipts(all = receipts()) {
  tab.receipts = all.length;
  const tokens = all.reduce((a, l) => a + (JSON.parse(l).tokens || 0), 0);
  $('receipts').textContent = all.length ? `${fmt(all.length)} receipts for ${fmt(tokens)} tokens` : 'none yet';
  $('check-receipts').disabled = !all.length;
  $('download-receipts').hidden = !all.length;
  if (downloadUrl) URL.revokeObjectURL(downloadUrl);
  downloadUrl = URL.createObjectURL(new Blob([all.map(l => l + '\n').join('')], { type: 'application/x-ndjson' }));
  $('download-receipts').href = downloadUrl;
}

function checkReceipts() {
  startWorker();
  $('receipts-check').textContent = 'checking…';
  worker.postMessage({ cmd: 'check-receipts', relay: location.origin, receipts: receipts() });
}

function showCheck(e) {
  const r = e.report;
  if (r) {
    // A run's ledger key must not change between checks.
    const keys = JSON.parse(localStorage.getItem(RELAY_KEYS) || '{}');
    keys[r.run] ??= r.relay_key;
    localStorage.setItem(RELAY_KEYS, JSON.stringify(keys));
    if (keys[r.run] !== r.relay_key) r.failures.unshift(`the relay now signs run ${r.run} with key ${r.relay_key}, not ${keys[r.run]} as before`);
  }
  tab.receiptsCheck = r || { error: e.error };
  const el = $('receipts-check');
  el.className = r && !r.failures.length ? 'muted' : 'notice';
  el.textContent = !r ? `could not check: ${e.error}` :
    `${r.proven} of ${r.checked} proven in the relay's signed ledger (version ${r.version}, ${fmt(r.log_size)} units), ` +
    `earning ${fmt(r.credit)} credit; ${r.not_yet} not granted yet` +
    (r.other_runs ? `; ${r.other_runs} from other runs` : '') +
    (r.failures.length ? `. FAILED: ${r.failures.join('; ')}` : '');
}

$('check-receipts').onclick = checkReceipts;
$('join').onclick = join;
$('pause').onclick = () => worker?.postMessage({ cmd: tab.state === 'paused' ? 'resume' : 'pause' });
$('leave').onclick = () => worker?.postMessage({ cmd: 'leave' });

// Printable text: bytes an untrained model emits that are not valid UTF-8 or are control
// characters show as a middle dot.
const printable = t => t.replace(/[\uFFFD\u0000-\u0008\u000B-\u001F\u007F]/g, '·');

// Refreshes soon after an event that changes the ledger (at most every 300 ms).
let pending = null;
function soon() {
  pending ??= setTimeout(() => { pending = null; refresh(); }, 300);
}

async function refresh() {
  let s;
  try {
    s = await (await fetch('/api/status')).json();
  } catch (e) {
    return; // relay restarting
  }
  $('version').textContent = s.model_version;
  $('val').textContent = s.val_loss == null ? '—' : s.val_loss.toFixed(4);
  $('tokens').textContent = fmt(s.tokens_trained);
  $('updates').textContent = `${s.accepted_updates} / ${s.rejected_updates}`;
  $('round').textContent = `${s.round.updates} / ${s.round.target}`;
  const rbs = s.guard.rollbacks;
  $('rollbacks').textContent = s.guard.enabled ? String(rbs.length) : 'guard off';
  const last = rbs[rbs.length - 1];
  $('guard-notice').hidden = !last;
  if (last) {
    $('guard-notice').textContent = `The guard rolled back version ${last.bad_version} (validation loss ${last.bad_loss.toFixed(3)}, ` +
      `above ${last.threshold.toFixed(3)}) to version ${last.restored_version} (${last.restored_loss.toFixed(3)}), as version ${last.new_version}; ` +
      `outer steps are damped while it recovers (outer lr now ${s.outer_lr.toFixed(3)}).` + (rbs.length > 1 ? ` ${rbs.length} rollbacks in all.` : '');
  }
  drawChart($('val-chart'), s.val_loss_history, { xLabel: 'model version', yLabel: 'validation loss', marks: rbs.map(r => r.new_version) });
  if (s.sample) {
    $('sample').textContent = printable(s.sample.text);
    $('sample-version').textContent = `(version ${s.sample.model_version})`;
  }
  const me = s.participants.find(p => p.id === tab.participantId);
  if (me) {
    // The relay's ledger is the authority on this tab's stake.
    $('accepted').textContent = me.accepted_updates;
    const share = s.ledger.credit ? ` (${(100 * me.tokens_granted / s.ledger.credit).toFixed(2)}% of all credit)` : '';
    $('stake').textContent = `${fmt(me.tokens_granted)} / ${fmt(me.tokens_pending)}${share}`;
    $('my-rejection').textContent = me.banned ? `banned: ${me.last_rejection}` : (me.last_rejection || '—');
  }
  const l = s.ledger;
  $('ledger').textContent = `${fmt(l.leaves)} granted units, ${fmt(l.credit)} credit; signed at version ${l.checkpoint_version ?? '—'} (${fmt(l.checkpoint_leaves)} units)`;
  // With this tab's receipts downloaded, the same command checks them too.
  $('ledger-verify').textContent = `tessera-host ledger verify --relay ${location.origin}/` + (tab.receipts ? ' --receipts tessera-receipts.jsonl' : '');
  refreshRevenue();
  const v = s.verification;
  $('verification').textContent = v.enabled ? `${v.held} / ${v.reexecutions} + ${v.verifier_checks} / ${v.banned}` : 'off';
  const esc = t => String(t).replace(/[&<>]/g, c => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;' })[c]);
  $('participants').innerHTML =
    '<tr><th>id</th><th>kind</th><th>backend</th><th>device</th><th>tokens/s</th><th>unit steps</th><th>accepted / rejected</th><th>granted</th><th>pending</th><th>units verified: own / checked for others</th><th>last rejection</th><th></th></tr>' +
    s.participants.map(p => `<tr><td>${esc(p.id)}${p.id === tab.participantId ? ' (you)' : ''}</td><td>${esc(p.kind)}</td>` +
      `<td>${esc(p.backend)}</td><td>${esc(p.device)}</td><td>${p.tokens_per_s ? fmt(p.tokens_per_s) : '—'}</td>` +
      `<td>${p.unit_steps || '—'}</td><td>${p.accepted_updates} / ${p.rejected_updates}</td>` +
      `<td>${fmt(p.tokens_granted)}</td><td>${fmt(p.tokens_pending)}</td>` +
      `<td>${p.verified_units} / ${p.verifications}</td>` +
      `<td class="small">${p.banned ? 'banned: ' : ''}${esc(p.last_rejection || '')}</td>` +
      `<td>${p.connected ? 'online' : ''}</td></tr>`).join('');
}

// What the model's usage earned, and this visitor's part of it (the relay's signed statement,
// split by each version's stake), at most every 10 s.
let revenueAt = 0;
async function refreshRevenue() {
  if (Date.now() - revenueAt < 10000) return;
  revenueAt = Date.now();
  let st;
  try {
    st = await (await fetch('/api/revenue')).json();
  } catch (e) {
    return; // relay restarting
  }
  const served = st.versions.reduce((a, v) => a + v.tokens, 0);
  const mine = Object.entries(st.totals)
    .filter(([k]) => tab.participantId && k.startsWith(tab.participantId))
    .reduce((a, [, v]) => a + v, 0);
  tab.revenue = { served, revenue: st.revenue, mine };
  $('usage').textContent = `${fmt(served)} tokens served, ${fmt(st.revenue)} earned` +
    (tab.participantId ? `; yours: ${fmt(mine)}` : '');
}

// The bench hook (?bench=1): trains one named unit in a worker and returns its
// pseudo-gradient (base64 of little-endian f32) and step times; see tests/src/bin.
if (params.get('bench') === '1') {
  window.tesseraBench = async opts => {
    // In a worker of its own, as a participant trains (opts.threaded: the threaded CPU
    // bundle with a pool of opts.threads workers).
    const w = new Worker('/web/worker.js', { type: 'module' });
    const r = await new Promise((resolve, reject) => {
      w.onmessage = ({ data }) => {
        if (data.type === 'bench') resolve(data.result);
        if (data.type === 'fatal') reject(new Error(data.message));
      };
      w.postMessage({ cmd: 'bench', opts: { relay: location.origin, ...opts } });
    });
    w.terminate();
    const info = (await navigator.gpu?.requestAdapter())?.info;
    const adapter = info ? [info.description, info.vendor, info.architecture].filter(Boolean).join(' / ') : null;
    const bytes = new Uint8Array(r.delta.buffer);
    let bin = '';
    for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return JSON.stringify({ backend: r.backend, device: r.backend === 'webgpu' ? adapter : r.device, losses: r.losses, stepMs: r.stepMs, codecs: r.codecs ?? null, delta: btoa(bin) });
  };
}

const wanted = params.get('backend');
if (wanted && [...$('backend').options].some(o => o.value === wanted)) $('backend').value = wanted;
setState('idle');
showReceipts();
refresh();
setInterval(refresh, 2000);
if (params.get('autojoin') === '1') join();
