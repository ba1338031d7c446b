// A prompt at the context limit with prompt logprobs must not stall the other streams: 100
// streamed requests run alone, then again while another client posts a prompt of
// --max-model-len - 1 tokens with echo + logprobs 20 (the worker computes the logprobs of every
// prompt row on the engine thread, chunk by chunk beside the decodes). The p99 of the streams'
// inter-token gaps with that request must stay under 5x its value without it. CPU backend,
// golden tiny-v3 model (see docs/hardening.md).
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, test } from 'node:test';

import { requireEnv, startGolden } from './lib.mjs';

requireEnv();
const MAX_LEN = 512;
const STREAMS = 100;
const TOKENS = 48;
const CHUNK = 128; // --max-num-batched-tokens: the long prompt runs in chunks beside the decodes
let server;
const agent = new http.Agent({ keepAlive: true, maxSockets: 256 });

before(async () => {
  server = await startGolden(['--max-model-len', String(MAX_LEN), '--max-num-seqs', '256',
    '--max-num-batched-tokens', String(CHUNK)]);
});

after(async () => {
  agent.destroy();
  const x = await server.stop();
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
});

function post(body, onData = null) {
  return new Promise((resolve, reject) => {
    const data = JSON.stringify(body);
    const req = http.request({
      host: '127.0.0.1', port: server.port, path: '/v1/completions', method: 'POST', agent,
      headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) },
    }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { text += d; if (onData) onData(d); });
      res.on('end', () => resolve({ status: res.statusCode, text, t: performance.now() }));
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(data);
  });
}

// One stream: the arrival time of every token event.
async function stream(i) {
  const times = [];
  const prompt = Array.from({ length: 8 }, (_, k) => 1 + ((i * 37 + k * 11) % 2000));
  const r = await post({ model: 'tiny', prompt, max_tokens: TOKENS, ignore_eos: true,
    temperature: 0, stream: true }, (d) => {
    const now = performance.now();
    for (const ev of d.split('\n\n')) if (ev.startsWith('data: {')) times.push(now);
  });
  assert.equal(r.status, 200, r.text);
  assert.ok(r.text.includes('data: [DONE]'), r.text.slice(-200));
  return times;
}

function p99(values) {
  const v = [...values].sort((a, b) => a - b);
  return v[Math.min(v.length - 1, Math.floor(v.length * 0.99))];
}

// The gaps between consecutive tokens of every stream (the first token's wait not counted).
async function round(during = null) {
  const all = Array.from({ length: STREAMS }, (_, i) => stream(i));
  const extra = during ? during() : null;
  const streams = await Promise.all(all);
  const gaps = [];
  for (const t of streams) for (let k = 2; k < t.length; k++) gaps.push(t[k] - t[k - 1]);
  return { gaps, streams, extra: extra ? await extra : null };
}

test('a prompt at the context limit with prompt logprobs keeps the streams\' gap p99 under 5x', async () => {
  const longPrompt = Array.from({ length: MAX_LEN - 1 }, (_, k) => 1 + ((k * 7919) % 2040));
  const longBody = { model: 'tiny', prompt: longPrompt, max_tokens: 1, echo: true, logprobs: 20,
    temperature: 0 };
  // warm-up: allocations, page faults and the first steps' caches, for the streams and for a
  // context-long prompt (the first one costs the CPU backend seconds; later ones do not)
  await round();
  const first = await post(longBody);
  assert.equal(first.status, 200, first.text.slice(0, 300));
  const alone = await round();
  const loaded = await round(async () => {
    await new Promise((r) => setTimeout(r, 150)); // the streams are under way
    const t0 = performance.now();
    const r = await post(longBody);
    return { ...r, t0 };
  });
  const base = p99(alone.gaps), withLong = p99(loaded.gaps);
  const long = loaded.extra;
  assert.equal(long.status, 200, long.text.slice(0, 300));
  const body = JSON.parse(long.text);
  const lp = body.choices[0].logprobs;
  assert.equal(lp.token_logprobs.length, MAX_LEN, 'a logprob entry per prompt token and the new one');
  assert.equal(lp.token_logprobs[0], null);
  assert.ok(lp.token_logprobs.slice(1).every((x) => typeof x === 'number' && x < 0));
  // computed again, not taken from the prefix cache the first one filled: the same numbers
  const want = JSON.parse(first.text).choices[0].logprobs.token_logprobs;
  const off = lp.token_logprobs.findIndex((x, k) => k > 0 && Math.abs(x - want[k]) > 1e-4);
  assert.equal(off, -1, `prompt logprob ${off}: ${lp.token_logprobs[off]} vs ${want[off]}`);
  // keyed by token text, so tokens that decode alike share one key
  assert.ok(lp.top_logprobs.slice(1).every((o) => o && Object.keys(o).length >= 1));
  // the long request ran while the streams did: it ended before the last of them
  const lastEnd = Math.max(...loaded.streams.map((t) => t[t.length - 1]));
  assert.ok(long.t < lastEnd, `the long request ended ${(long.t - lastEnd).toFixed(0)} ms after the streams`);
  const msg = `gap p99 ${withLong.toFixed(1)} ms with the long request, ${base.toFixed(1)} ms without ` +
    `(${(withLong / base).toFixed(2)}x; long request ${(long.t - long.t0).toFixed(0)} ms; ` +
    `${alone.gaps.length} and ${loaded.gaps.length} gaps)`;
  console.log(msg);
  assert.ok(withLong < 5 * base, msg);
});
