// duet-proxy in balancer mode (--backend): one endpoint in front of plain instances (here two
// duet-decode instances; the DP ranks of one instance work the same way). Requests go whole to
// one instance; /v1/models and /tokenize are forwarded; one instance killed under load costs no
// client error once the proxy has ejected it, and a restarted one is admitted again.
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { GOLDEN, Server, freePort, goldenCases, metricValue, metrics, requireEnv, sleep } from './lib.mjs';

requireEnv();
const DECODE = process.env.DUET_DECODE;
const PROXY = process.env.DUET_PROXY;
const cases = goldenCases();
let plain = [], ports = [], proxy, xPort, client;

function startPlain(port) {
  return new Server(['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '32M'],
  { port, bin: DECODE }).ready();
}

before(async () => {
  ports = [await freePort(), await freePort()];
  xPort = await freePort();
  plain = await Promise.all(ports.map(startPlain));
  proxy = await new Server(['--host', '127.0.0.1', '--port', String(xPort),
    '--backend', ...ports.map((p) => `127.0.0.1:${p}`), '--policy', 'round-robin',
    '--health-interval', '0.2', '--eject-after', '2', '--readmit-after', '2'],
  { port: xPort, bin: PROXY }).ready();
  client = new OpenAI({ baseURL: `http://127.0.0.1:${xPort}/v1`, apiKey: 'none', maxRetries: 0 });
});

after(async () => {
  for (const s of [proxy, ...plain]) if (s) await s.stop(20000);
});

test('balancer: whole requests on both instances, forwarded routes, health', async () => {
  for (const c of cases) {
    const r = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
      max_tokens: 4, temperature: 0, ignore_eos: true, return_token_ids: true, n: 2 });
    assert.deepEqual(r.choices.map((x) => x.token_ids), [c.greedy_ids.slice(0, 4), c.greedy_ids.slice(0, 4)]);
  }
  // a list of prompts is the instance's own business: one request, merged by the worker
  const l = await client.completions.create({ model: 'tiny', prompt: cases.map((c) => c.prompt_ids),
    max_tokens: 2, temperature: 0, ignore_eos: true, return_token_ids: true });
  assert.deepEqual(l.choices.map((x) => x.token_ids), cases.map((c) => c.greedy_ids.slice(0, 2)));
  for (const p of ports) {
    const served = metricValue(await metrics(p), 'vllm:prompt_tokens_total');
    assert.ok(served > 0, `instance on ${p} got no request`);
  }
  const models = await client.models.list();
  assert.equal(models.data[0].id, 'tiny');
  const tk = await (await fetch(`http://127.0.0.1:${xPort}/tokenize`, { method: 'POST',
    headers: { 'Content-Type': 'application/json' }, body: JSON.stringify({ prompt: 'hello' }) })).json();
  assert.ok(tk.count > 0);
  const h = await fetch(`http://127.0.0.1:${xPort}/health`);
  assert.equal(h.status, 200);
  const hj = await h.json();
  assert.equal(hj.backend.healthy, 2);
  // the admin route speaks of backends in this mode
  const bad = await fetch(`http://127.0.0.1:${xPort}/instances/add`, { method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ type: 'decode', instance: '127.0.0.1:1' }) });
  assert.equal(bad.status, 400);
});

test('balancer: an instance killed under load: no client error after the ejection window', async () => {
  const c = cases[2];
  let stop = false, failures = 0, okAfter = 0, killedAt = 0;
  const one = async (stream) => {
    if (!stream) {
      const r = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids, max_tokens: 4,
        temperature: 0, ignore_eos: true, return_token_ids: true });
      assert.deepEqual(r.choices[0].token_ids, c.greedy_ids.slice(0, 4));
      return;
    }
    const s = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids, max_tokens: 4,
      temperature: 0, ignore_eos: true, return_token_ids: true, stream: true });
    const ids = [];
    for await (const x of s) ids.push(...x.choices[0].token_ids);
    assert.deepEqual(ids, c.greedy_ids.slice(0, 4));
  };
  const workers = Array.from({ length: 8 }, async (_, w) => {
    while (!stop) {
      try {
        await one(w % 2 === 1);
        if (killedAt && Date.now() - killedAt > 2000) okAfter++;
      } catch (e) {
        if (killedAt && Date.now() - killedAt > 2000) {
          failures++;
          console.error(e.message);
        }
      }
    }
  });
  await sleep(1000);
  killedAt = Date.now();
  plain[0].killTree();
  await plain[0].exited;
  await sleep(4000);
  stop = true;
  await Promise.all(workers);
  assert.equal(failures, 0, 'requests failed after the ejection window');
  assert.ok(okAfter > 20, `only ${okAfter} requests succeeded after the kill`);
  let m = await (await fetch(`http://127.0.0.1:${xPort}/metrics`)).text();
  assert.match(m, /duet_proxy_ejections_total\{role="backend"[^}]*\} 1/);
  const h = await (await fetch(`http://127.0.0.1:${xPort}/health`)).json();
  assert.equal(h.backend.healthy, 1);

  plain[0] = await startPlain(ports[0]);
  for (let i = 0; i < 100; i++) {
    m = await (await fetch(`http://127.0.0.1:${xPort}/metrics`)).text();
    if (/duet_proxy_readmissions_total\{role="backend"[^}]*\} [1-9]/.test(m)) break;
    await sleep(100);
  }
  assert.match(m, /duet_proxy_readmissions_total\{role="backend"[^}]*\} [1-9]/);
  for (let i = 0; i < 6; i++) await one(false);
  assert.ok(metricValue(await metrics(ports[0]), 'vllm:prompt_tokens_total') > 0,
    'the restarted instance got no request');
});
