// n > 1 and lists of prompts through duet-proxy, against a single instance of the same model:
// the proxy sends one prefill leg per prompt (n = 1) and the decode worker forks the pulled KV
// into the n choices (ENG_KV_FORK). With the same seeds every choice's ids must be the single
// instance's, streamed or not, and no KV block may stay in use on any worker afterwards.
// Usage: pd-fanout.test.mjs 1p1d | 2p1d  (2p1d: two prefill instances, a DP2 decode instance)
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { GOLDEN, Server, freePort, goldenCases, metricValue, metrics, requireEnv, sleep } from './lib.mjs';

requireEnv();
const layout = process.argv[2] || '1p1d';
const PREFILL = process.env.DUET_PREFILL;
const DECODE = process.env.DUET_DECODE;
const PROXY = process.env.DUET_PROXY;
const cases = goldenCases();
const env = { DUET_KV_SECRET: 'fanout-secret', UCX_TLS: 'shm' };
let single, prefills = [], decode, proxy, sPort, pPorts = [], dPorts = [], xPort;
let viaProxy, viaSingle;

// Block size 16: the prompts (1, 7, 33, 64, 130, 20 tokens) leave 0..15 tokens in a partly
// filled last block, so forks both share whole blocks and copy a partial one.
function workerArgs(port, extra = []) {
  return ['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '32M',
    '--block-size', '16', '--kv-lease-timeout', '5', ...extra];
}

before(async () => {
  sPort = await freePort();
  single = new Server(workerArgs(sPort), { port: sPort, bin: DECODE }).ready();
  const nPrefill = layout === '2p1d' ? 2 : 1;
  const dp = layout === '2p1d' ? 2 : 1;
  for (let i = 0; i < nPrefill; i++) pPorts.push(await freePort());
  const d0 = await freePort(dp);
  dPorts = Array.from({ length: dp }, (_, i) => d0 + i);
  xPort = await freePort();
  prefills = await Promise.all(pPorts.map((p) =>
    new Server(workerArgs(p), { port: p, bin: PREFILL, mpi: { np: 1 }, env }).ready()));
  decode = await new Server(workerArgs(d0, dp > 1 ? ['-dp', String(dp)] : []),
    { port: d0, bin: DECODE, mpi: { np: dp }, env }).ready(dPorts);
  single = await single;
  proxy = await new Server(['--host', '127.0.0.1', '--port', String(xPort),
    '--prefill', ...pPorts.map((p) => `127.0.0.1:${p}`),
    '--decode', ...dPorts.map((p) => `127.0.0.1:${p}`)], { port: xPort, bin: PROXY }).ready();
  viaProxy = new OpenAI({ baseURL: `http://127.0.0.1:${xPort}/v1`, apiKey: 'none', maxRetries: 0 });
  viaSingle = new OpenAI({ baseURL: `http://127.0.0.1:${sPort}/v1`, apiKey: 'none', maxRetries: 0 });
});

after(async () => {
  for (const s of [proxy, decode, ...prefills, single]) if (s) await s.stop(20000);
});

async function poolsFree() {
  const ports = [...pPorts, ...dPorts, sPort];
  for (let i = 0; i < 100; i++) {
    const used = [];
    for (const p of ports) used.push(metricValue(await metrics(p), 'vllm:kv_cache_usage_perc'));
    if (used.every((u) => u === 0)) return true;
    await sleep(100);
  }
  return false;
}

const byIndex = (choices) => [...choices].sort((a, b) => a.index - b.index).map((c) => c.token_ids);

async function streamed(client, args) {
  const s = await client.completions.create({ ...args, stream: true,
    stream_options: { include_usage: true } });
  const ids = {};
  let usage = null, chunks = 0;
  const seen = new Set();
  for await (const c of s) {
    chunks++;
    if (c.usage && c.choices.length === 0) usage = c.usage;
    seen.add(c.id);
    for (const ch of c.choices) (ids[ch.index] ||= []).push(...ch.token_ids);
  }
  const keys = Object.keys(ids).map(Number).sort((a, b) => a - b);
  return { ids: keys.map((k) => ids[k]), keys, usage, ids_seen: seen, chunks };
}

test(`${layout}: n = 3 of one prompt, seeded: the single instance's ids`, async () => {
  for (const c of cases) {
    const args = { model: 'tiny', prompt: c.prompt_ids, n: 3, max_tokens: 6, temperature: 1.0,
      seed: 4321, ignore_eos: true, return_token_ids: true };
    const want = await viaSingle.completions.create(args);
    const got = await viaProxy.completions.create(args);
    assert.equal(got.choices.length, 3, c.name);
    assert.deepEqual(got.choices.map((x) => x.index), [0, 1, 2]);
    assert.deepEqual(byIndex(got.choices), byIndex(want.choices), `${c.name} (not streamed)`);
    // three different seeds: the choices must not all be the same sample
    assert.ok(new Set(byIndex(got.choices).map(String)).size > 1, `${c.name}: forks sampled alike`);
    assert.deepEqual(got.usage, want.usage);
    const s = await streamed(viaProxy, args);
    assert.deepEqual(s.ids, byIndex(want.choices), `${c.name} (streamed)`);
    assert.equal(s.usage.completion_tokens, 18);
  }
  assert.ok(await poolsFree(), 'KV blocks left in use');
});

test(`${layout}: a list of 4 prompts, n = 1 and n = 2: merged in vLLM's order, usage summed`, async () => {
  const prompts = cases.slice(1, 5).map((c) => c.prompt_ids);
  for (const n of [1, 2]) {
    const args = { model: 'tiny', prompt: prompts, n, max_tokens: 5, temperature: 0.8, seed: 99,
      ignore_eos: true, return_token_ids: true };
    const want = await viaSingle.completions.create(args);
    const got = await viaProxy.completions.create(args);
    assert.equal(got.choices.length, 4 * n);
    assert.deepEqual(got.choices.map((x) => x.index), [...Array(4 * n).keys()]);
    assert.deepEqual(byIndex(got.choices), byIndex(want.choices), `n=${n} (not streamed)`);
    assert.deepEqual(got.usage, want.usage, `n=${n} usage`);
    assert.equal(got.object, 'text_completion');
    const s = await streamed(viaProxy, args);
    assert.deepEqual(s.keys, [...Array(4 * n).keys()]);
    assert.deepEqual(s.ids, byIndex(want.choices), `n=${n} (streamed)`);
    assert.deepEqual({ ...s.usage, prompt_tokens_details: null },
      { ...want.usage, prompt_tokens_details: null }, `n=${n} streamed usage`);
    assert.equal(s.ids_seen.size, 1, 'every chunk carries the one response id');
  }
  // greedy: the golden ids of each prompt, in prompt order
  const g = await viaProxy.completions.create({ model: 'tiny', prompt: cases.map((c) => c.prompt_ids),
    max_tokens: 4, temperature: 0, ignore_eos: true, return_token_ids: true });
  assert.deepEqual(byIndex(g.choices), cases.map((c) => c.greedy_ids.slice(0, 4)));
  assert.ok(await poolsFree(), 'KV blocks left in use');
});

test(`${layout}: a bad prompt in a list fails the whole request with the worker's 400`, async () => {
  const r = await fetch(`http://127.0.0.1:${xPort}/v1/completions`, { method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'tiny', prompt: [[1, 2, 3], [1, 999999]], max_tokens: 2 }) });
  assert.equal(r.status, 400);
  const j = await r.json();
  assert.match(j.error.message, /vocabulary/);
  assert.ok(await poolsFree(), 'KV blocks left in use');
});

test(`${layout}: a client that leaves a split stream early frees every block`, async () => {
  const ctl = new AbortController();
  const s = await viaProxy.completions.create({ model: 'tiny', prompt: cases.map((c) => c.prompt_ids),
    n: 2, max_tokens: 2000, temperature: 1, ignore_eos: true, stream: true }, { signal: ctl.signal });
  let n = 0;
  try {
    for await (const c of s) { if (c.choices.length && ++n === 20) ctl.abort(); }
  } catch { /* aborted */ }
  assert.ok(n >= 20);
  assert.ok(await poolsFree(), 'KV blocks left in use after the client left');
});
