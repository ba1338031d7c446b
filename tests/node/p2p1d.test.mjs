// The product end to end: a 2P1D deployment on localhost (two duet-prefill instances, one
// duet-decode instance with DP2, each an mpirun job, KV over UCX) behind duet-proxy, driven by
// the official openai npm client:
//   - every golden case's greedy ids through the proxy, streamed and not, chat streaming too;
//   - one prefill instance killed under load: requests keep succeeding after the ejection
//     window, and the restarted instance is re-admitted;
//   - 1,000 requests at 50 concurrent streams: zero errors, every pool empty afterwards;
//   - the decode instance killed mid-stream: streams end with an error event, the proxy lives.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { GOLDEN, Server, freePort, goldenCases, metricValue, metrics, requireEnv, sleep } from './lib.mjs';

requireEnv();
const PREFILL = process.env.DUET_PREFILL;
const DECODE = process.env.DUET_DECODE;
const PROXY = process.env.DUET_PROXY;
const cases = goldenCases();
const env = { DUET_KV_SECRET: 'p2p1d-secret', UCX_TLS: 'shm' };
let prefills = [], decode = null, proxy = null, pPorts = [], dPort = 0, xPort = 0, client = null;

function workerArgs(port, extra = []) {
  return ['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '32M',
    '--block-size', '16', '--kv-lease-timeout', '5', ...extra];
}

function startPrefill(port) {
  return new Server(workerArgs(port), { port, bin: PREFILL, mpi: { np: 1 }, env }).ready();
}

before(async () => {
  pPorts = [await freePort(), await freePort()];
  dPort = await freePort(2);
  xPort = await freePort();
  prefills = await Promise.all(pPorts.map(startPrefill));
  decode = await new Server(workerArgs(dPort, ['-dp', '2']), { port: dPort, bin: DECODE, mpi: { np: 2 }, env })
    .ready([dPort, dPort + 1]);
  proxy = await new Server(['--host', '127.0.0.1', '--port', String(xPort),
    '--prefill', ...pPorts.map((p) => `127.0.0.1:${p}`),
    '--decode', `127.0.0.1:${dPort}`, `127.0.0.1:${dPort + 1}`,
    '--health-interval', '0.2', '--eject-after', '2', '--readmit-after', '2'],
  { port: xPort, bin: PROXY }).ready();
  client = new OpenAI({ baseURL: `http://127.0.0.1:${xPort}/v1`, apiKey: 'none', maxRetries: 0 });
});

after(async () => {
  for (const s of [proxy, decode, ...prefills]) if (s) await s.stop(20000);
});

async function poolsFree() {
  for (let i = 0; i < 100; i++) {
    const ports = [...pPorts, dPort, dPort + 1];
    const used = [];
    for (const p of ports) {
      try {
        used.push(metricValue(await metrics(p), 'vllm:kv_cache_usage_perc'));
      } catch { used.push(-1); }
    }
    if (used.every((u) => u === 0)) return true;
    await sleep(100);
  }
  return false;
}

test('2P1D behind duet-proxy: golden greedy ids, streamed and not', async () => {
  for (const c of cases) {
    const r = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
      max_tokens: c.greedy_ids.length, temperature: 0, ignore_eos: true, return_token_ids: true });
    assert.deepEqual(r.choices[0].token_ids, c.greedy_ids, `${c.name} (not streamed)`);
    const s = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
      max_tokens: c.greedy_ids.length, temperature: 0, ignore_eos: true, return_token_ids: true,
      stream: true, stream_options: { include_usage: true } });
    const ids = [];
    let usage = null;
    for await (const chunk of s) {
      if (chunk.choices[0]?.token_ids) ids.push(...chunk.choices[0].token_ids);
      if (chunk.usage) usage = chunk.usage;
    }
    assert.deepEqual(ids, c.greedy_ids, `${c.name} (streamed)`);
    assert.equal(usage.completion_tokens, c.greedy_ids.length);
  }
  assert.ok(await poolsFree(), 'KV blocks left in use');
});

test('a prefill instance killed under load: no failures after ejection, re-admitted on restart', async () => {
  const c = cases[1];
  const one = () => client.completions.create({ model: 'tiny', prompt: c.prompt_ids, max_tokens: 4,
    temperature: 0, ignore_eos: true, return_token_ids: true });
  let stop = false, failures = 0, okAfter = 0;
  let killedAt = 0;
  const workers = Array.from({ length: 8 }, async () => {
    while (!stop) {
      try {
        const r = await one();
        assert.deepEqual(r.choices[0].token_ids, c.greedy_ids.slice(0, 4));
        if (killedAt && Date.now() - killedAt > 2000) okAfter++;
      } catch (e) {
        if (killedAt && Date.now() - killedAt > 2000) failures++;
      }
    }
  });
  await sleep(1000);
  killedAt = Date.now();
  prefills[0].killTree();
  await prefills[0].exited;
  await sleep(4000);
  stop = true;
  await Promise.all(workers);
  assert.equal(failures, 0, 'requests failed after the ejection window');
  assert.ok(okAfter > 0, 'no request succeeded after the kill');
  let m = await (await fetch(`http://127.0.0.1:${xPort}/metrics`)).text();
  assert.match(m, /ejections?_total\{[^}]*\} [1-9]/);

  // restart on the same port: the proxy's probes re-admit it, and it serves again
  prefills[0] = await startPrefill(pPorts[0]);
  for (let i = 0; i < 100; i++) {
    m = await (await fetch(`http://127.0.0.1:${xPort}/metrics`)).text();
    if (/readmissions?_total\{[^}]*\} [1-9]/.test(m)) break;
    await sleep(100);
  }
  assert.match(m, /readmissions?_total\{[^}]*\} [1-9]/, 'the restarted prefill was not re-admitted');
  for (let i = 0; i < 12; i++) await one();
  const pm = await metrics(pPorts[0]);
  const served = metricValue(pm, 'vllm:prompt_tokens_total');
  assert.ok(served > 0, `the re-admitted prefill got no requests:\n${m}`);
});

test('1,000 requests at 50 concurrent streams: zero errors, every pool empty afterwards', async () => {
  let next = 0, errors = 0, done = 0;
  const worker = async () => {
    while (next < 1000) {
      const k = next++;
      const c = cases[k % cases.length];
      try {
        const s = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
          max_tokens: 3, temperature: 0, ignore_eos: true, return_token_ids: true, stream: true });
        const ids = [];
        for await (const chunk of s) if (chunk.choices[0]?.token_ids) ids.push(...chunk.choices[0].token_ids);
        assert.deepEqual(ids, c.greedy_ids.slice(0, 3));
        done++;
      } catch (e) {
        errors++;
        if (errors < 5) console.error(e.message);
      }
    }
  };
  await Promise.all(Array.from({ length: 50 }, worker));
  assert.equal(errors, 0);
  assert.equal(done, 1000);
  assert.ok(await poolsFree(), 'KV blocks left in use after the load');
});

test('the decode instance killed mid-stream: an SSE error event, and the proxy stays up', async () => {
  const c = cases[4];
  const long = Array.from({ length: 4 }, async () => {
    const s = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
      max_tokens: 3000, temperature: 0, ignore_eos: true, stream: true });
    let n = 0;
    try {
      for await (const chunk of s) { if (chunk.choices?.length) n++; }
      return { n, error: null };
    } catch (e) {
      return { n, error: e };
    }
  });
  await sleep(1500);
  decode.killTree();
  const results = await Promise.all(long);
  for (const r of results) {
    assert.ok(r.error, `a stream ended without an error after ${r.n} chunks`);
    assert.match(String(r.error.message || r.error), /error|fail|decode|502|upstream/i);
  }
  const h = await fetch(`http://127.0.0.1:${xPort}/v1/models`);
  assert.ok(h.status < 500 || h.status === 503, 'proxy not answering');
  const health = await fetch(`http://127.0.0.1:${xPort}/health`);
  assert.ok([200, 503].includes(health.status));
});
