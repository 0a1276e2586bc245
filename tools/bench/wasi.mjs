// Runs a Rust program built for wasm32-wasip1 under Node's WASI, as V8 (the engine of
// Chromium's tabs) compiles it: the CPU kernels' and the step's benchmarks measured as a tab
// would run them, without a browser.
//
//     node tools/bench/wasi.mjs PROGRAM.wasm [ARGS...]
//
// Node 20 prints an experimental-feature warning for WASI; `--no-warnings` silences it.
import { readFile } from 'node:fs/promises';
import { WASI } from 'node:wasi';

const [file, ...args] = process.argv.slice(2);
if (!file) {
  console.error('usage: node tools/bench/wasi.mjs PROGRAM.wasm [ARGS...]');
  process.exit(2);
}
const wasi = new WASI({ version: 'preview1', args: [file, ...args], env: process.env });
const module = await WebAssembly.compile(await readFile(file));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
process.exitCode = wasi.start(instance);
