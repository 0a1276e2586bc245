// The browser participant's Web Worker: loads the WASM bundle, probes the WebGPU adapter, and
// drives the one Participant handle, and checks the receipts the page kept against the relay's
// signed ledger (checkReceipts). Training runs here so the page stays responsive; every
// event goes to the page with postMessage.
//
// Two bundles: /pkg (WebGPU, or the CPU on one thread) and /pkg/threads (CPU only, flex's
// kernels on a pool of Web Workers sharing the module's memory; needs SharedArrayBuffer, so a
// cross-origin isolated page, which the relay's headers make it). CPU training takes the
// threaded one when it loads, and the single-threaded one otherwise.
let participant = null;
let single = null;
let threaded = null;
const post = event => self.postMessage(event);

// The single-threaded bundle: WebGPU, the one-thread CPU path, and the receipts check.
function loadSingle() {
  return (single ??= import('/pkg/tessera_web.js').then(async m => { await m.default(); return m; }));
}

// The threaded bundle with a pool of `threads` workers, or null (not isolated, not built, or
// failed to start) with the reason posted.
function loadThreaded(threads) {
  return (threaded ??= (async () => {
    if (!(threads > 1)) {
      post({ type: 'threads', threads: 1, reason: 'one CPU thread (one core, or ?threads=1)' });
      return null;
    }
    if (!self.crossOriginIsolated || typeof SharedArrayBuffer === 'undefined') {
      post({ type: 'threads', threads: 1, reason: 'the page is not cross-origin isolated: one CPU thread' });
      return null;
    }
    try {
      const m = await startThreaded(threads);
      post({ type: 'threads', threads, reason: `${threads} CPU threads (Web Workers)` });
      return m;
    } catch (e) {
      post({ type: 'threads', threads: 1, reason: `no threaded bundle (${(e && e.message) || e}): one CPU thread` });
      return null;
    }
  })());
}

// The threaded bundle with a rayon pool of `threads` workers.
async function startThreaded(threads) {
  const m = await import('/pkg/threads/tessera_web.js');
  await m.default();
  await m.initThreadPool(threads);
  return m;
}

// Whether this join will train on the CPU (the same rule as the participant's own choice).
const trainsOnCpu = (backend, adapter) =>
  backend === 'cpu' || (backend !== 'webgpu' && (!adapter || adapter.isFallbackAdapter));

async function probeAdapter() {
  if (!navigator.gpu) return null;
  try {
    const adapter = await navigator.gpu.requestAdapter();
    if (!adapter) return null;
    const info = adapter.info || {};
    return {
      vendor: info.vendor || '',
      architecture: info.architecture || '',
      description: info.description || '',
      isFallbackAdapter: !!(info.isFallbackAdapter ?? adapter.isFallbackAdapter),
    };
  } catch (e) {
    return null;
  }
}

async function join(options) {
  if (!participant) {
    const t0 = performance.now();
    const adapter = await probeAdapter();
    const threads = options.threads ?? navigator.hardwareConcurrency ?? 1;
    const wasm = (trainsOnCpu(options.backend, adapter) && (await loadThreaded(threads))) || (await loadSingle());
    post({ type: 'loaded', ms: performance.now() - t0, adapter });
    participant = new wasm.Participant({ ...options, adapter }, post);
    post({ type: 'identity', secret: participant.secret, participantId: participant.participantId });
  }
  participant.resume();
  await participant.run(); // settles when the visitor leaves
}

self.onmessage = async ({ data }) => {
  try {
    switch (data.cmd) {
      case 'join': await join(data.options); break;
      case 'pause': participant?.pause(); break;
      case 'resume': participant?.resume(); break;
      case 'leave': participant?.leave(); break;
      case 'bench': {
        // The bench hook's unit (see app.js), here so that a threaded run blocks a worker, as
        // a participant does, not the page's thread (which may only spin).
        // opts.threaded: the threaded bundle with opts.threads workers (1 too: what the
        // shared-memory build costs without a second worker).
        const wasm = data.opts.threaded ? await startThreaded(data.opts.threads) : await loadSingle();
        post({ type: 'bench', result: await wasm.benchUnit(data.opts) });
        break;
      }
      case 'check-receipts':
        try {
          const wasm = await loadSingle();
          post({ type: 'receipts-check', report: await wasm.checkReceipts(data.relay, data.receipts) });
        } catch (e) {
          post({ type: 'receipts-check', error: String((e && e.message) || e) });
        }
        break;
    }
  } catch (e) {
    post({ type: 'fatal', message: String((e && e.message) || e) });
  }
};
