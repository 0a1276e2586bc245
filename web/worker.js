// The browser participant's Web Worker: loads the WASM bundle, probes the WebGPU adapter, and
// drives the one Participant handle, and checks the receipts the page kept against the relay's
// signed ledger (checkReceipts). Training runs here so the page stays responsive; every
// event goes to the page with postMessage.
import init, { Participant, checkReceipts } from '/pkg/tessera_web.js';

let participant = null;
let loading = null;
const post = event => self.postMessage(event);
const load = () => (loading ??= init());

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
    await load();
    const adapter = await probeAdapter();
    post({ type: 'loaded', ms: performance.now() - t0, adapter });
    participant = new Participant({ ...options, adapter }, post);
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
      case 'check-receipts':
        await load();
        try {
          post({ type: 'receipts-check', report: await checkReceipts(data.relay, data.receipts) });
        } catch (e) {
          post({ type: 'receipts-check', error: String((e && e.message) || e) });
        }
        break;
    }
  } catch (e) {
    post({ type: 'fatal', message: String((e && e.message) || e) });
  }
};
