// The KV transfer plug-in's call sites, through duet-loopback-server (a worker whose plug-in
// copies leased blocks inside the process): prefill with do_remote_decode answers the plug-in's
// kv_transfer_params; decode with do_remote_prefill fetches those blocks and continues with the
// golden greedy ids; a failing lease hook is a 500 with the lease released; malformed params
// are 400; an unread lease expires; the plug-in's flags are parsed and shown in --help.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { GOLDEN, Server, freePort, goldenCases, metricValue, metrics, requireEnv, sleep } from './lib.mjs';

requireEnv();
const BIN = process.env.DUET_LOOPBACK;
const cases = goldenCases();
let server;

before(async () => {
  const port = await freePort();
  // no prefix caching: the decode side must fetch every block, not find them cached
  server = new Server(['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '32M',
    '--block-size', '16', '--no-enable-prefix-caching', '--kv-lease-timeout', '1',
    '--loopback-tag', 'lb-7'], { port, bin: BIN });
  await server.ready();
});

after(async () => {
  const x = await server.stop();
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
  assert.match(server.log, /loopback: \d+ leases, \d+ fetches/);
});

async function post(body, headers = {}) {
  const r = await fetch(`${server.url}/v1/completions`, {
    method: 'POST', headers: { 'Content-Type': 'application/json', ...headers }, body: JSON.stringify(body),
  });
  return { status: r.status, headers: r.headers, json: await r.json() };
}

async function kvIdle() {
  for (let i = 0; i < 50; i++) {
    const m = await metrics(server.port);
    if (metricValue(m, 'vllm:kv_cache_usage_perc') === 0) return true;
    await sleep(100);
  }
  return false;
}

test('prefill leases, decode fetches: golden greedy ids across the hand-over', async () => {
  for (const c of cases) {
    const p = await post({ model: 'tiny', prompt: c.prompt_ids, max_tokens: 1, temperature: 0,
      return_token_ids: true, kv_transfer_params: { do_remote_decode: true } },
    { 'X-Request-Id': `pd-${c.name}` });
    assert.equal(p.status, 200, JSON.stringify(p.json));
    assert.equal(p.headers.get('x-request-id'), `pd-${c.name}`);
    const kv = p.json.kv_transfer_params;
    assert.equal(kv.do_remote_prefill, true);
    assert.equal(kv.remote_engine_id, 'lb-7');
    assert.match(kv.remote_request_id, /^[0-9]+$/, 'the lease id');
    assert.equal(kv.remote_host, '127.0.0.1');
    assert.equal(kv.remote_port, server.port);
    assert.equal(kv.tp_size, 1);
    assert.equal(kv.remote_block_ids.length, Math.ceil(c.prompt_ids.length / 16));
    assert.deepEqual(p.json.choices[0].token_ids, [c.greedy_ids[0]]);
    const d = await post({ model: 'tiny', prompt: c.prompt_ids, max_tokens: c.greedy_ids.length,
      temperature: 0, ignore_eos: true, return_token_ids: true, kv_transfer_params: kv });
    assert.equal(d.status, 200, JSON.stringify(d.json));
    assert.deepEqual(d.json.choices[0].token_ids, c.greedy_ids, c.name);
    assert.equal(d.json.kv_transfer_params, null);
  }
  assert.ok(await kvIdle(), 'leases released by the fetches');
});

test('streamed prefill carries kv_transfer_params in its last chunk', async () => {
  const c = cases[1];
  const r = await fetch(`${server.url}/v1/completions`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt: c.prompt_ids, max_tokens: 1, stream: true,
      kv_transfer_params: { do_remote_decode: true } }),
  });
  const events = (await r.text()).split('\n\n').filter((e) => e.startsWith('data: ')).map((e) => e.slice(6));
  assert.equal(events[events.length - 1], '[DONE]');
  const last = JSON.parse(events[events.length - 2]);
  assert.ok(Array.isArray(last.kv_transfer_params.remote_block_ids));
  // this lease is never read: it expires (next test)
});

test('lease failing: 500 and the lease released; malformed params: 400', async () => {
  await sleep(1500); // the unread lease of the previous test expires (--kv-lease-timeout 1)
  assert.ok(await kvIdle(), 'an unread lease expires');
  const c = cases[2];
  const f = await post({ prompt: c.prompt_ids, max_tokens: 1, kv_transfer_params: { do_remote_decode: true } },
    { 'X-Request-Id': 'fail-1' });
  assert.equal(f.status, 500);
  assert.match(f.json.error.message, /KV transfer/);
  assert.ok(await kvIdle(), 'released at once, not after the lease timeout');
  const bad = await post({ prompt: c.prompt_ids, max_tokens: 2, kv_transfer_params: { do_remote_prefill: true } });
  assert.equal(bad.status, 400);
  assert.equal(bad.json.error.param, 'kv_transfer_params');
  assert.match(bad.json.error.message, /remote_host/);
  const port = await post({ prompt: c.prompt_ids, max_tokens: 2, kv_transfer_params: {
    do_remote_prefill: true, remote_host: 'h', remote_port: 70000, remote_engine_id: 'e', remote_request_id: '1' } });
  assert.equal(port.status, 400);
  assert.match(port.json.error.message, /remote_port/);
  const lease = await post({ prompt: c.prompt_ids, max_tokens: 2, kv_transfer_params: {
    do_remote_prefill: true, remote_host: 'h', remote_port: 7, remote_engine_id: 'e', remote_request_id: 'x-1' } });
  assert.equal(lease.status, 400);
  assert.match(lease.json.error.message, /remote_request_id/);
  const two = await post({ prompt: c.prompt_ids, n: 2, max_tokens: 2, kv_transfer_params: { do_remote_decode: true } });
  assert.equal(two.status, 400);
  const typ = await post({ prompt: c.prompt_ids, kv_transfer_params: { do_remote_decode: 'yes' } });
  assert.equal(typ.status, 400);
});

test('plug-in flags: parsed by the plug-in, listed in --help, bad values exit 2', () => {
  const h = spawnSync(BIN, ['--help'], { encoding: 'utf8' });
  assert.equal(h.status, 0);
  assert.match(h.stdout, /--loopback-tag/);
  assert.match(h.stdout, /--max-model-len/);
  const b = spawnSync(BIN, ['--model', 'x', '--loopback-tag'], { encoding: 'utf8' });
  assert.equal(b.status, 2);
  assert.match(b.stderr, /--loopback-tag needs a value/);
  const u = spawnSync(BIN, ['--model', 'x', '--no-such-flag'], { encoding: 'utf8' });
  assert.equal(u.status, 2);
  assert.equal(u.stderr.trim().split('\n').length, 1, u.stderr);
  assert.match(u.stderr, /unknown option --no-such-flag/);
  const t = spawnSync(BIN, ['--model', 'x', '--max-model-lenn', '8'], { encoding: 'utf8' });
  assert.equal(t.status, 2);
  assert.match(t.stderr, /unknown option --max-model-lenn \(did you mean --max-model-len\?\)/);
});
