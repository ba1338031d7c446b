// Helpers for the worker-server integration tests: free ports, starting duet-decode (or an
// mpirun instance of it) with a deadline, raw HTTP over net sockets, SSE parsing, and the
// golden cases. Paths come from the environment meson sets (see tests/integration/meson.build).
import { execSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export const DECODE = process.env.DUET_DECODE;
export const GOLDEN = process.env.DUET_GOLDEN;
export const MPIRUN = process.env.DUET_MPIRUN || 'mpirun';

export function requireEnv() {
  if (!DECODE || !GOLDEN) {
    console.error('DUET_DECODE and DUET_GOLDEN must be set (meson sets them)');
    process.exit(1);
  }
}

export function goldenCases(name = 'tiny-v3') {
  return JSON.parse(fs.readFileSync(path.join(GOLDEN, name, 'cases.json'), 'utf8')).cases;
}

// A port free now (the kernel's choice); count consecutive ones when a DP instance needs them.
export async function freePort(count = 1) {
  for (let attempt = 0; attempt < 50; attempt++) {
    const base = await new Promise((resolve, reject) => {
      const s = net.createServer();
      s.on('error', reject);
      s.listen(0, '127.0.0.1', () => {
        const p = s.address().port;
        s.close(() => resolve(p));
      });
    });
    if (base + count > 65535) continue;
    let ok = true;
    for (let i = 1; i < count && ok; i++) {
      ok = await new Promise((resolve) => {
        const s = net.createServer();
        s.on('error', () => resolve(false));
        s.listen(base + i, '127.0.0.1', () => s.close(() => resolve(true)));
      });
    }
    if (ok) return base;
  }
  throw new Error('no free port');
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A server process: args after the program; mpi = {np} runs it under mpirun, mpi = {apps:
// [{np, args}, ...]} as one mpirun job of several command lines.
export class Server {
  constructor(args, { mpi = null, env = {}, port, bin = DECODE } = {}) {
    this.port = port;
    this.log = '';
    const childEnv = {
      ...process.env,
      OMP_NUM_THREADS: '1',
      OPENBLAS_NUM_THREADS: '1',
      OMP_WAIT_POLICY: 'passive',
      ...env,
    };
    if (mpi) {
      childEnv.OMPI_ALLOW_RUN_AS_ROOT = '1';
      childEnv.OMPI_ALLOW_RUN_AS_ROOT_CONFIRM = '1';
      // mpi.apps: one command line per group of ranks, as 'mpirun -np A prog x : -np B prog y'
      const apps = mpi.apps || [{ np: mpi.np, args }];
      const argv = ['--oversubscribe'];
      apps.forEach((a, i) => argv.push(...(i ? [':'] : []), '-np', String(a.np), bin, ...a.args));
      this.proc = spawn(MPIRUN, argv, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    } else {
      this.proc = spawn(bin, args, { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] });
    }
    this.proc.stdout.on('data', (d) => { this.log += d; });
    this.proc.stderr.on('data', (d) => { this.log += d; });
    this.exited = new Promise((resolve) => {
      this.proc.on('exit', (code, signal) => resolve({ code, signal }));
    });
    this.exitInfo = null;
    this.exited.then((x) => { this.exitInfo = x; });
  }

  get url() { return `http://127.0.0.1:${this.port}`; }

  // Polls /health on every port given until all answer 200.
  async ready(ports = [this.port], timeoutMs = 60000) {
    const end = Date.now() + timeoutMs;
    for (const p of ports) {
      for (;;) {
        if (this.exitInfo) throw new Error(`server exited early: ${JSON.stringify(this.exitInfo)}\n${this.log}`);
        try {
          const r = await fetch(`http://127.0.0.1:${p}/health`);
          if (r.status === 200) break;
        } catch { /* not listening yet */ }
        if (Date.now() > end) throw new Error(`server not ready on ${p}\n${this.log}`);
        await sleep(100);
      }
    }
    return this;
  }

  // SIGTERM (to the process, or for mpirun to every rank) and the exit status within ms.
  async stop(ms = 30000, signal = 'SIGTERM') {
    if (this.exitInfo) return this.exitInfo;
    this.proc.kill(signal);
    return this.waitExit(ms);
  }

  // SIGKILL to the process and every descendant (mpirun's ranks too: killing mpirun alone can
  // leave a rank running with its sockets open).
  killTree() {
    this.killed = true;
    const all = [];
    const walk = (pid) => {
      let kids = [];
      try {
        kids = execSync(`pgrep -P ${pid} || true`).toString().trim().split(/\s+/).filter(Boolean);
      } catch { /* gone */ }
      for (const k of kids) walk(Number(k));
      all.push(pid);
    };
    walk(this.proc.pid);
    for (const pid of all) {
      try { process.kill(pid, 'SIGKILL'); } catch { /* already gone */ }
    }
  }

  async waitExit(ms) {
    const t = setTimeout(() => this.proc.kill('SIGKILL'), ms);
    const x = await this.exited;
    clearTimeout(t);
    return x;
  }
}

// Starts duet-decode on the golden model with a free port.
export async function startGolden(extra = [], opts = {}) {
  const port = await freePort();
  const args = ['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'),
    '--served-model-name', 'tiny', '--host', '127.0.0.1', '--port', String(port),
    '--kv-cache-memory', '64M', ...extra];
  const s = new Server(args, { port, ...opts });
  await s.ready();
  return s;
}

// A model made from the golden one with DeepSeek's real vocabulary size and random weights,
// so chat prompts (ids up to 128k) are in range.
export function largeVocabModel() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-api-'));
  const cfg = JSON.parse(fs.readFileSync(path.join(GOLDEN, 'tiny-v3', 'model', 'config.json'), 'utf8'));
  cfg.vocab_size = 129280;
  fs.writeFileSync(path.join(dir, 'config.json'), JSON.stringify(cfg, null, 2));
  return dir;
}

// ---- raw HTTP ----

// Sends bytes, collects everything until the server closes or `until(buf)` says done.
export function rawExchange(port, data, { until = null, timeoutMs = 10000, writes = null, localAddress = undefined } = {}) {
  return new Promise((resolve, reject) => {
    const sock = net.connect({ port, host: '127.0.0.1', localAddress });
    let buf = Buffer.alloc(0);
    const timer = setTimeout(() => { sock.destroy(); resolve({ data: buf.toString('latin1'), timedOut: true }); }, timeoutMs);
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (until && until(buf.toString('latin1'))) {
        clearTimeout(timer);
        sock.destroy();
        resolve({ data: buf.toString('latin1'), timedOut: false });
      }
    });
    sock.on('error', (e) => { clearTimeout(timer); if (e.code === 'ECONNRESET') resolve({ data: buf.toString('latin1'), reset: true }); else reject(e); });
    sock.on('close', () => { clearTimeout(timer); resolve({ data: buf.toString('latin1'), timedOut: false }); });
    sock.on('connect', async () => {
      if (writes) {
        for (const [chunk, delay] of writes) {
          sock.write(chunk);
          await sleep(delay);
        }
      } else {
        sock.write(data);
      }
    });
  });
}

// Splits a buffer holding whole responses (Content-Length or chunked) into parsed ones.
export function parseResponses(text) {
  const out = [];
  let rest = text;
  while (rest.length) {
    const he = rest.indexOf('\r\n\r\n');
    if (he < 0) break;
    const head = rest.slice(0, he);
    const lines = head.split('\r\n');
    const status = parseInt(lines[0].split(' ')[1], 10);
    const headers = {};
    for (const l of lines.slice(1)) {
      const i = l.indexOf(':');
      headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    rest = rest.slice(he + 4);
    let body = '';
    if (headers['content-length'] !== undefined) {
      const n = parseInt(headers['content-length'], 10);
      body = rest.slice(0, n);
      rest = rest.slice(n);
    } else if ((headers['transfer-encoding'] || '').includes('chunked')) {
      for (;;) {
        const le = rest.indexOf('\r\n');
        if (le < 0) { rest = ''; break; }
        const n = parseInt(rest.slice(0, le), 16);
        rest = rest.slice(le + 2);
        if (n === 0) { rest = rest.slice(2); break; }
        body += rest.slice(0, n);
        rest = rest.slice(n + 2);
      }
    } else {
      body = rest;
      rest = '';
    }
    out.push({ status, headers, body });
  }
  return out;
}

export function httpRequest(method, pathName, { body = null, headers = {}, close = false } = {}) {
  const h = { Host: 'localhost', ...headers };
  if (body !== null) h['Content-Length'] = Buffer.byteLength(body);
  if (close) h.Connection = 'close';
  let s = `${method} ${pathName} HTTP/1.1\r\n`;
  for (const [k, v] of Object.entries(h)) s += `${k}: ${v}\r\n`;
  return Buffer.concat([Buffer.from(s + '\r\n', 'latin1'), body === null ? Buffer.alloc(0) : Buffer.from(body)]);
}

// One request, one parsed response (connection closed after it).
export async function raw(port, method, pathName, opts = {}) {
  const r = await rawExchange(port, httpRequest(method, pathName, { ...opts, close: true }), { timeoutMs: opts.timeoutMs || 20000 });
  const [resp] = parseResponses(r.data);
  if (!resp) throw new Error(`no response to ${method} ${pathName}: ${JSON.stringify(r)}`);
  return resp;
}

// SSE body → list of data payloads (strings).
export function sseData(body) {
  return body.split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6));
}

export async function metrics(port) {
  const r = await fetch(`http://127.0.0.1:${port}/metrics`);
  return r.text();
}

export function metricValue(text, name) {
  const line = text.split('\n').find((l) => l.startsWith(name + '{') || l.startsWith(name + ' '));
  return line === undefined ? undefined : parseFloat(line.slice(line.lastIndexOf(' ') + 1));
}

// A "scripted" checkpoint: duet-mkmodel's tiny preset with every weight zero but the norms (1),
// the embedding and lm_head, arranged so the model's greedy next token after token a is b for
// each [a, b] of chain. With zero attention and MLPs the last hidden state is the input token's
// embedding, a one-hot column k(a); lm_head's row b holds 1 in that column, so b wins every
// other token by the norm's sqrt(hidden) margin. A real checkpoint (no hook in the engine or
// the sampler) whose answers are known, for end-to-end parser tests. Returns the directory.
// With { mtp: true } it also has an MTP module (duet-mkmodel --mtp) scripted the same way: its
// embedding and head are the model's, eh_proj passes the embedding half through (1 on the
// diagonal of its first hidden-size columns) and its decoder layer is zero, so it drafts the
// successor of the token it is given, which is what the model itself predicts next: greedy
// decoding along a chain accepts every draft.
export function scriptedModel(chain, tokenizerDir, { mtp = false } = {}) {
  const mk = process.env.DUET_MKMODEL;
  if (!mk) throw new Error('DUET_MKMODEL must be set (meson sets it)');
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-scripted-'));
  execSync(`${mk} --preset tiny ${mtp ? '--mtp ' : ''}--tokenizer ${tokenizerDir} --out ${dir} --force`,
    { stdio: 'ignore' });
  const file = path.join(dir, 'model.safetensors');
  const raw = fs.readFileSync(file);
  const n = Number(raw.readBigUInt64LE(0));
  const header = JSON.parse(raw.subarray(8, 8 + n).toString('utf8'));
  const data = Buffer.alloc(raw.length - 8 - n); // zeros
  const at = (name) => header[name].data_offsets[0];
  const hidden = header['model.norm.weight'].shape[0];
  const one = 0x3f80; // bfloat16 1.0
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__' || !/norm\.weight$/.test(name)) continue;
    for (let i = 0; i < t.shape[0]; i++) data.writeUInt16LE(one, t.data_offsets[0] + 2 * i);
  }
  const col = new Map();
  for (const [a] of chain) if (!col.has(a)) col.set(a, col.size);
  if (col.size > hidden) throw new Error('chain longer than the hidden size');
  for (const [a, b] of chain) {
    const k = col.get(a);
    data.writeUInt16LE(one, at('model.embed_tokens.weight') + 2 * (a * hidden + k));
    data.writeUInt16LE(one, at('lm_head.weight') + 2 * (b * hidden + k));
    if (mtp) {
      const L = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')).num_hidden_layers;
      data.writeUInt16LE(one, at(`model.layers.${L}.embed_tokens.weight`) + 2 * (a * hidden + k));
      data.writeUInt16LE(one, at(`model.layers.${L}.shared_head.head.weight`) + 2 * (b * hidden + k));
    }
  }
  if (mtp) {
    const L = JSON.parse(fs.readFileSync(path.join(dir, 'config.json'), 'utf8')).num_hidden_layers;
    const eh = at(`model.layers.${L}.eh_proj.weight`); // [hidden, 2 * hidden]
    for (let j = 0; j < hidden; j++) data.writeUInt16LE(one, eh + 2 * (j * 2 * hidden + j));
  }
  fs.writeFileSync(file, Buffer.concat([raw.subarray(0, 8 + n), data]));
  return dir;
}
