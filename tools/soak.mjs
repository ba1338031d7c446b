// The soak behind tools/soak.sh: a 2P1D deployment on localhost (two duet-prefill instances,
// one duet-decode instance with DP2, each an mpirun job, KV over UCX) behind duet-proxy, fed a
// bounded number of random completion requests while faults are injected: client disconnects
// before the answer, aborts mid-stream, a prefill instance and the decode instance SIGKILLed and
// restarted, a prefill instance SIGSTOPped and resumed. Afterwards it checks that every process
// not killed is up, that every request no fault touched succeeded with a well-formed answer,
// that every KV pool is free again and that the survivors' RSS stayed near its warm value, and
// prints one summary line. Only 127.0.0.1; bounded in requests and in time.
import { execSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';

import { Server, freePort, metricValue, metrics, sleep } from '../tests/node/lib.mjs';

const { values: opt } = parseArgs({
  options: {
    requests: { type: 'string', default: '400' },
    concurrency: { type: 'string', default: '12' },
    'time-limit': { type: 'string', default: '240' }, // seconds for the request phase
    'rss-bound': { type: 'string', default: '50' }, // % growth over warm allowed (plus 16 MiB)
    seed: { type: 'string', default: '1' },
    verbose: { type: 'boolean', default: false },
    'n-refused-ok': { type: 'boolean', default: false },
  },
});
const N = Number(opt.requests), C = Number(opt.concurrency), LIMIT_S = Number(opt['time-limit']);
const RSS_PCT = Number(opt['rss-bound']);
for (const v of ['DUET_PREFILL', 'DUET_DECODE', 'DUET_PROXY', 'DUET_GOLDEN']) {
  if (!process.env[v]) { console.error(`soak: ${v} must be set (tools/soak.sh sets it)`); process.exit(2); }
}
const GOLDEN = process.env.DUET_GOLDEN;
const BLOCKS = 256; // per DP rank: --num-gpu-blocks-override, so leaked blocks are countable
const VOCAB = JSON.parse(fs.readFileSync(path.join(GOLDEN, 'tiny-v3', 'model', 'config.json'), 'utf8')).vocab_size;
const env = { DUET_KV_SECRET: 'soak-secret', UCX_TLS: process.env.UCX_TLS || 'shm,tcp' };

// xoshiro-free, small and seeded: mulberry32
let seed = Number(opt.seed) >>> 0;
function rand() {
  seed = (seed + 0x6d2b79f5) >>> 0;
  let t = seed;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const randInt = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));
const log = (...a) => { if (opt.verbose) console.error('soak:', ...a); };

function workerArgs(port, extra = []) {
  return ['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--num-gpu-blocks-override', String(BLOCKS),
    '--block-size', '16', '--kv-lease-timeout', '5', '--max-model-len', '1024', ...extra];
}

// ---- the deployment ----
const dep = { prefill: [], decode: null, proxy: null, pPorts: [], dPort: 0, xPort: 0 };
const startPrefill = (i) => new Server(workerArgs(dep.pPorts[i]),
  { port: dep.pPorts[i], bin: process.env.DUET_PREFILL, mpi: { np: 1 }, env }).ready();
const startDecode = () => new Server(workerArgs(dep.dPort, ['-dp', '2']),
  { port: dep.dPort, bin: process.env.DUET_DECODE, mpi: { np: 2 }, env }).ready([dep.dPort, dep.dPort + 1]);
const workerPorts = () => [...dep.pPorts, dep.dPort, dep.dPort + 1];

// Every pid of a server: mpirun and its ranks.
function pids(server) {
  const all = [];
  const walk = (pid) => {
    all.push(pid);
    let kids = [];
    try { kids = execSync(`pgrep -P ${pid} || true`).toString().trim().split(/\s+/).filter(Boolean); } catch { /* gone */ }
    for (const k of kids) walk(Number(k));
  };
  walk(server.proc.pid);
  return all;
}

function rssKiB(pid) {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch { return 0; }
}

// ---- requests ----
// A fault window: requests whose lifetime meets [t0, t1] are "touched" by that fault.
const windows = [];
const faults = { kill_prefill: 0, kill_decode: 0, stop_prefill: 0, disconnect: 0, abort: 0 };
const results = [];

function makeRequest() {
  const n = rand() < 0.2 ? randInt(2, 3) : 1;
  const body = {
    model: 'tiny',
    prompt: Array.from({ length: randInt(1, 120) }, () => randInt(0, VOCAB - 1)),
    max_tokens: randInt(1, 24),
    temperature: rand() < 0.5 ? 0 : 0.8,
    seed: randInt(0, 1000),
    ignore_eos: true,
    return_token_ids: true,
    n,
    stream: rand() < 0.5,
  };
  if (rand() < 0.3) body.logprobs = randInt(0, 3);
  if (body.stream && rand() < 0.5) body.stream_options = { include_usage: true };
  return body;
}

// What a correct answer to body looks like; returns an error string or null.
function checkChoices(body, choices, usage) {
  if (choices.size !== body.n) return `${choices.size} choices, asked ${body.n}`;
  for (const [i, c] of choices) {
    if (!(i >= 0 && i < body.n)) return `choice index ${i}`;
    if (c.ids.length !== body.max_tokens) return `choice ${i}: ${c.ids.length} tokens, asked ${body.max_tokens}`;
    if (c.ids.some((t) => !Number.isInteger(t) || t < 0 || t >= VOCAB)) return `choice ${i}: token id out of range`;
    if (c.finish !== 'length') return `choice ${i}: finish_reason ${c.finish}`;
    if (body.logprobs !== undefined && c.lps !== c.ids.length) return `choice ${i}: ${c.lps} logprobs for ${c.ids.length} tokens`;
  }
  if (usage && (usage.completion_tokens !== body.n * body.max_tokens || usage.prompt_tokens !== body.prompt.length))
    return `usage ${JSON.stringify(usage)}`;
  return null;
}

function addChoice(choices, ch) {
  const c = choices.get(ch.index) || { ids: [], finish: null, lps: 0 };
  if (Array.isArray(ch.token_ids)) c.ids.push(...ch.token_ids);
  if (ch.finish_reason) c.finish = ch.finish_reason;
  if (ch.logprobs && Array.isArray(ch.logprobs.token_logprobs)) c.lps += ch.logprobs.token_logprobs.length;
  choices.set(ch.index, c);
}

async function readStream(res, body, abortAfter) {
  const choices = new Map();
  let usage = null, done = false, events = 0, buf = '';
  const dec = new TextDecoder();
  for await (const part of res.body) {
    buf += dec.decode(part, { stream: true });
    let at;
    while ((at = buf.indexOf('\n\n')) >= 0) {
      const ev = buf.slice(0, at);
      buf = buf.slice(at + 2);
      for (const line of ev.split('\n')) {
        if (!line.startsWith('data: ')) continue;
        const data = line.slice(6);
        if (done) return { error: 'data after [DONE]' };
        if (data === '[DONE]') { done = true; continue; }
        const o = JSON.parse(data);
        if (o.error) return { error: `error event: ${JSON.stringify(o.error)}` };
        if (o.usage) usage = o.usage;
        for (const ch of o.choices || []) addChoice(choices, ch);
        events++;
      }
      if (abortAfter && events >= abortAfter) return { aborted: true };
    }
  }
  if (!done) return { error: 'stream ended without [DONE]' };
  return { error: checkChoices(body, choices, body.stream_options ? usage : null) };
}

async function oneRequest(k) {
  const body = makeRequest();
  const r = { k, t0: Date.now(), t1: 0, fault: null, error: null };
  const ac = new AbortController();
  const roll = rand();
  let abortAfter = 0;
  if (roll < 0.04) { // a client that leaves before the answer
    r.fault = 'disconnect';
    setTimeout(() => ac.abort(), randInt(0, 40));
  } else if (roll < 0.08 && body.stream) { // a client that leaves mid-stream
    r.fault = 'abort';
    body.max_tokens = Math.max(body.max_tokens, 8);
    abortAfter = randInt(1, 3);
  }
  const timer = setTimeout(() => { r.error = r.error || 'client timeout (60 s)'; ac.abort(); }, 60000);
  try {
    const res = await fetch(`http://127.0.0.1:${dep.xPort}/v1/completions`, {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify(body), signal: ac.signal,
    });
    if (res.status !== 200) {
      const text = await res.text();
      r.error = `HTTP ${res.status}: ${text.slice(0, 200)}`;
      // The disaggregated path refuses n > 1 for now (a 400 naming kv_transfer_params): with
      // --n-refused-ok that well-formed refusal is counted apart instead of as a failure.
      if (opt['n-refused-ok'] && body.n > 1 && res.status === 400 &&
          JSON.parse(text)?.error?.param === 'kv_transfer_params') {
        r.error = null;
        r.refusedN = true;
      }
    } else if (body.stream) {
      const s = await readStream(res, body, abortAfter);
      if (s.aborted) ac.abort();
      else r.error = s.error;
    } else {
      const o = await res.json();
      const choices = new Map();
      for (const ch of o.choices || []) addChoice(choices, ch);
      r.error = o.object !== 'text_completion' ? `object ${o.object}` : checkChoices(body, choices, o.usage);
    }
  } catch (e) {
    if (!r.fault && !r.error) r.error = `${e.name}: ${e.message}`;
  }
  clearTimeout(timer);
  r.t1 = Date.now();
  if (r.fault) faults[r.fault]++;
  results.push(r);
}

// ---- faults, scheduled by the share of requests sent ----
async function killAndRestart(which) {
  const t0 = Date.now();
  const w = { what: which, t0, t1: Infinity };
  windows.push(w);
  if (which === 'kill_prefill') {
    dep.prefill[0].killTree();
    await dep.prefill[0].exited;
    await sleep(500);
    dep.prefill[0] = await startPrefill(0);
  } else {
    dep.decode.killTree();
    await dep.decode.exited;
    await sleep(500);
    dep.decode = await startDecode();
  }
  faults[which]++;
  w.t1 = Date.now() + 3000; // the proxy's probes re-admit within ~1 s; margin for requests in flight
  log(`${which}: back after ${((Date.now() - t0) / 1000).toFixed(1)} s`);
}

async function stopAndResume() {
  const w = { what: 'stop_prefill', t0: Date.now(), t1: Infinity };
  windows.push(w);
  const ps = pids(dep.prefill[1]);
  for (const p of ps) try { process.kill(p, 'SIGSTOP'); } catch { /* gone */ }
  await sleep(3000);
  for (const p of ps) try { process.kill(p, 'SIGCONT'); } catch { /* gone */ }
  faults.stop_prefill++;
  w.t1 = Date.now() + 3000;
  log('stop_prefill: resumed');
}

const touched = (r) => r.fault || windows.some((w) => r.t0 <= w.t1 && r.t1 >= w.t0);

async function main() {
  const tStart = Date.now();
  dep.pPorts = [await freePort(), await freePort()];
  dep.dPort = await freePort(2);
  dep.xPort = await freePort();
  dep.prefill = await Promise.all([0, 1].map(startPrefill));
  dep.decode = await startDecode();
  dep.proxy = await new Server(['--host', '127.0.0.1', '--port', String(dep.xPort),
    '--prefill', ...dep.pPorts.map((p) => `127.0.0.1:${p}`),
    '--decode', `127.0.0.1:${dep.dPort}`, `127.0.0.1:${dep.dPort + 1}`,
    '--health-interval', '0.2', '--eject-after', '2', '--readmit-after', '2'],
  { port: dep.xPort, bin: process.env.DUET_PROXY }).ready();
  log(`deployment up in ${((Date.now() - tStart) / 1000).toFixed(1)} s`);

  // Warm-up, then the survivors' RSS: the proxy and the prefill instance that is only stopped.
  for (let i = 0; i < 3 * C; i += C) await Promise.all(Array.from({ length: C }, (_, j) => oneRequest(-1 - i - j)));
  const warmErrors = results.filter((r) => r.error && !r.fault).length;
  results.length = 0;
  const survivors = () => [...pids(dep.proxy), ...pids(dep.prefill[1])];
  const warm = new Map(survivors().map((p) => [p, rssKiB(p)]));

  const schedule = [[0.2, () => killAndRestart('kill_prefill')], [0.45, stopAndResume],
    [0.65, () => killAndRestart('kill_decode')]];
  const faultTasks = [];
  let next = 0, timedOut = false;
  const deadline = Date.now() + LIMIT_S * 1000;
  const worker = async () => {
    while (next < N) {
      if (Date.now() > deadline) { timedOut = true; return; }
      const k = next++;
      while (schedule.length && k >= schedule[0][0] * N) faultTasks.push(schedule.shift()[1]());
      await oneRequest(k);
    }
  };
  await Promise.all(Array.from({ length: C }, worker));
  await Promise.all(faultTasks);
  // the last fault's window closes (the proxy re-admits the restarted instance) before checking
  const lastWindow = Math.max(0, ...windows.map((w) => w.t1));
  if (lastWindow > Date.now()) await sleep(lastWindow - Date.now());

  // After the run: every process up, every pool free (leases of cut requests expire in 5 s).
  const down = [];
  for (const [name, s, ports] of [['proxy', dep.proxy, [dep.xPort]], ['prefill0', dep.prefill[0], [dep.pPorts[0]]],
    ['prefill1', dep.prefill[1], [dep.pPorts[1]]], ['decode', dep.decode, [dep.dPort, dep.dPort + 1]]]) {
    if (s.exitInfo) { down.push(`${name} exited ${JSON.stringify(s.exitInfo)}`); continue; }
    for (const p of ports) {
      let h = 0, text = '';
      for (let i = 0; i < 50 && h !== 200; i++) {
        if (i) await sleep(200);
        [h, text] = await fetch(`http://127.0.0.1:${p}/health`)
          .then(async (x) => [x.status, await x.text()]).catch(() => [0, '']);
      }
      if (h !== 200) down.push(`${name}:${p} /health ${h} ${text.slice(0, 300)}`);
    }
  }
  let leaked = 0;
  for (let i = 0; i < 150; i++) {
    leaked = 0;
    for (const p of workerPorts()) {
      const u = await metrics(p).then((t) => metricValue(t, 'vllm:kv_cache_usage_perc')).catch(() => NaN);
      leaked += Number.isNaN(u) ? BLOCKS : Math.round(u * BLOCKS);
    }
    if (leaked === 0) break;
    await sleep(100);
  }
  let growth = 0, worst = '';
  for (const [p, w] of warm) {
    const now = rssKiB(p);
    if (!w || !now) continue;
    const g = (now - w) / w;
    if (g > growth) { growth = g; worst = `pid ${p}: ${w} -> ${now} KiB`; }
    if (now - w > w * RSS_PCT / 100 + 16384) down.push(`RSS of pid ${p} grew from ${w} to ${now} KiB`);
  }

  const failures = results.filter((r) => r.error && !touched(r));
  const untouched = results.filter((r) => !touched(r));
  const nFaults = Object.values(faults).reduce((a, b) => a + b, 0);
  for (const f of failures.slice(0, 10)) console.error(`soak: request ${f.k} failed: ${f.error}`);
  for (const d of down) console.error(`soak: ${d}`);
  if (warmErrors) console.error(`soak: ${warmErrors} warm-up requests failed`);
  const ok = failures.length === 0 && leaked === 0 && down.length === 0 && !timedOut && !warmErrors &&
    faults.kill_prefill && faults.kill_decode && faults.stop_prefill && untouched.length > 0;
  console.log(`soak: requests=${results.length} untouched=${untouched.length} faults=${nFaults} ` +
    `(${Object.entries(faults).map(([k, v]) => `${k}=${v}`).join(' ')}) failures=${failures.length} ` +
    `${opt['n-refused-ok'] ? `n_refused=${results.filter((r) => r.refusedN).length} ` : ''}` +
    `leaked_blocks=${leaked} rss_growth=${(growth * 100).toFixed(1)}%${worst ? ` (${worst})` : ''} ` +
    `time=${((Date.now() - tStart) / 1000).toFixed(0)}s${timedOut ? ' TIME LIMIT' : ''} ${ok ? 'PASS' : 'FAIL'}`);
  for (const s of [dep.proxy, dep.decode, ...dep.prefill]) await s.stop(20000);
  process.exit(ok ? 0 : 1);
}

main().catch(async (e) => {
  console.error(`soak: ${e.stack || e}`);
  for (const s of [dep.proxy, dep.decode, ...dep.prefill]) if (s) s.killTree();
  process.exit(1);
});
