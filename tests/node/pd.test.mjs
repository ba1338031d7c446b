// Disaggregated prefill -> decode on localhost with the real KV transfer (side channel + UCX):
// a duet-prefill instance and a duet-decode instance, each an mpirun job. The layout argument
// picks the transport and the instances' shapes:
//   shm   UCX_TLS=shm: every golden case's greedy ids across the hand-over, 64 concurrent
//         requests, both pools free afterwards, and the faults (wrong secret, other block size,
//         decode killed -> prefill frees after the lease, prefill hung -> decode errors in time)
//   staged  as shm (golden cases, concurrency, faults), with both workers moving the KV through
//         their host staging areas (--kv-staging on) as a pipeline of 2-block chunks, 2 in flight
//         (streamed pins, protocol version 2)
//   tcp   UCX_TLS=tcp: the golden cases
//   ptp2  prefill TP2 -> decode TP1: the golden cases
//   ddp2  prefill DP1 -> decode DP2 (both DP ports): the golden cases
// shm and staged also hand the KV over early: a streamed prefill request announces its lease
// in its first event and the decode pulls while the prefill computes (protocol version 3).
import assert from 'node:assert/strict';
import path from 'node:path';
import { after, test } from 'node:test';

import { GOLDEN, Server, freePort, goldenCases, metricValue, metrics, requireEnv, sleep } from './lib.mjs';

requireEnv();
const PREFILL = process.env.DUET_PREFILL;
const DECODE = process.env.DUET_DECODE;
const layout = process.argv[2] || 'shm';
const cases = goldenCases();
const SECRET = 'pd-test-secret';
const servers = [];

const ucx = { shm: 'shm', staged: 'shm', tcp: 'tcp', ptp2: 'shm', ddp2: 'shm' }[layout];
assert.ok(ucx, `unknown layout ${layout}`);
// blocks of the tiny model are 10 KiB: 2-block chunks, so a prompt is many chunks
const staging = layout === 'staged'
  ? ['--kv-staging', 'on', '--kv-chunk-bytes', '20K', '--kv-chunks-in-flight', '2'] : [];
const shmLike = layout === 'shm' || layout === 'staged';

function common(port, extra = []) {
  return ['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '32M',
    '--block-size', '16', '--no-enable-prefix-caching', ...staging, ...extra];
}

async function start(bin, port, { np = 1, extra = [], secret = SECRET, ports = [port] } = {}) {
  const s = new Server(common(port, extra), {
    port, bin, mpi: { np }, env: { UCX_TLS: ucx, DUET_KV_SECRET: secret, DUET_COMM_TIMEOUT: '30' },
  });
  servers.push(s);
  await s.ready(ports);
  return s;
}

after(async () => {
  for (const s of servers) {
    const x = await s.stop(20000);
    if (!s.killed) assert.equal(x.code === 0 || x.signal === 'SIGTERM' || x.code === 1, true, s.log);
  }
});

async function post(port, body, headers = {}) {
  const r = await fetch(`http://127.0.0.1:${port}/v1/completions`, {
    method: 'POST', headers: { 'Content-Type': 'application/json', ...headers }, body: JSON.stringify(body),
  });
  return { status: r.status, json: await r.json() };
}

async function prefill(port, c, id) {
  const p = await post(port, { model: 'tiny', prompt: c.prompt_ids, max_tokens: 1, temperature: 0,
    kv_transfer_params: { do_remote_decode: true } }, { 'X-Request-Id': id });
  assert.equal(p.status, 200, JSON.stringify(p.json));
  const kv = p.json.kv_transfer_params;
  assert.equal(kv.do_remote_prefill, true);
  assert.equal(kv.remote_host, '127.0.0.1');
  return kv;
}

async function decode(port, c, kv) {
  return post(port, { model: 'tiny', prompt: c.prompt_ids, max_tokens: c.greedy_ids.length,
    temperature: 0, ignore_eos: true, return_token_ids: true, kv_transfer_params: kv });
}

// KV usage of an instance reaches 0 (every lease released or expired, every block free).
async function poolFree(port, ms = 8000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = metricValue(await metrics(port), 'vllm:kv_cache_usage_perc');
    if (v === 0) return true;
    if (Date.now() > end) return false;
    await sleep(100);
  }
}

async function goldenAcross(pPort, dPorts) {
  let i = 0;
  for (const c of cases) {
    const dPort = dPorts[i++ % dPorts.length];
    const kv = await prefill(pPort, c, `pd-${layout}-${c.name}`);
    const d = await decode(dPort, c, kv);
    assert.equal(d.status, 200, JSON.stringify(d.json));
    assert.deepEqual(d.json.choices[0].token_ids, c.greedy_ids, `${c.name} via ${dPort}`);
  }
  assert.ok(await poolFree(pPort), 'prefill pool not free: leases left');
  for (const p of dPorts) assert.ok(await poolFree(p), `decode pool on ${p} not free`);
}

if (layout === 'tcp' || shmLike) {
  test(`1P1D over UCX_TLS=${ucx}: golden greedy ids across the KV hand-over`, async () => {
    const pPort = await freePort(), dPort = await freePort();
    const p = await start(PREFILL, pPort);
    const d = await start(DECODE, dPort);
    await goldenAcross(pPort, [dPort]);
    if (layout === 'staged') {
      assert.match(d.log, /KV path: staged \(--kv-staging on\).*chunks of 2 blocks, 2 in flight/);
      assert.ok(metricValue(await metrics(dPort), 'duet_kv_pull_reads_total') > cases.length);
    }
    if (layout === 'tcp') return;

    // 64 concurrent disaggregated requests
    const jobs = [];
    for (let k = 0; k < 64; k++) {
      const c = cases[k % cases.length];
      jobs.push((async () => {
        const kv = await prefill(pPort, c, `conc-${k}`);
        const r = await decode(dPort, c, kv);
        assert.equal(r.status, 200, JSON.stringify(r.json));
        assert.deepEqual(r.json.choices[0].token_ids, c.greedy_ids);
      })());
    }
    await Promise.all(jobs);
    assert.ok(await poolFree(pPort) && await poolFree(dPort), 'pools not free after 64 requests');

    // a decode worker with the wrong secret gets nothing
    const badPort = await freePort();
    await start(DECODE, badPort, { secret: 'not-the-secret' });
    let kv = await prefill(pPort, cases[2], 'bad-secret');
    let r = await decode(badPort, cases[2], kv);
    assert.notEqual(r.status, 200);
    assert.match(r.json.error.message, /authentication/);
    assert.ok(await poolFree(badPort));

    // a decode worker with another KV block size is refused at the handshake, saying so
    const otherPort = await freePort();
    await start(DECODE, otherPort, { extra: ['--block-size', '32'] });
    kv = await prefill(pPort, cases[2], 'bad-dims');
    r = await decode(otherPort, cases[2], kv);
    assert.notEqual(r.status, 200);
    assert.match(r.json.error.message, /block size 32 on decode, 16 on prefill/);
    assert.ok(await poolFree(otherPort));
    void p;
    void d;
  });

  if (shmLike) {
    test('decode killed after the prefill: the prefill frees the blocks when the lease expires', async () => {
      const pPort = await freePort(), dPort = await freePort();
      await start(PREFILL, pPort, { extra: ['--kv-lease-timeout', '2'] });
      const d = await start(DECODE, dPort);
      const c = cases[4];
      const kv = await prefill(pPort, c, 'orphan');
      assert.ok(!(await poolFree(pPort, 300)), 'the lease should hold blocks');
      const req = decode(dPort, c, kv).catch(() => null);
      await sleep(5);
      d.killTree();
      await req;
      const t0 = Date.now();
      assert.ok(await poolFree(pPort, 10000), 'prefill blocks never freed');
      assert.ok(Date.now() - t0 < 9000);
    });

    test('prefill hung mid-transfer: the decode request fails within the timeout, nothing stuck', async () => {
      const pPort = await freePort(), dPort = await freePort();
      const p = await start(PREFILL, pPort);
      await start(DECODE, dPort, { extra: ['--kv-transfer-timeout', '2'] });
      const c = cases[3];
      const kv = await prefill(pPort, c, 'hung');
      // stop every prefill rank (mpirun's children): its side channel goes silent
      const { execSync } = await import('node:child_process');
      const pids = execSync(`pgrep -P ${p.proc.pid} || true`).toString().trim().split(/\s+/).filter(Boolean);
      for (const pid of pids) process.kill(Number(pid), 'SIGSTOP');
      const t0 = Date.now();
      const r = await decode(dPort, c, kv);
      const dt = Date.now() - t0;
      for (const pid of pids) { process.kill(Number(pid), 'SIGKILL'); }
      p.killed = true;
      assert.notEqual(r.status, 200);
      assert.match(r.json.error.message, /timed out after 2 s|lost the connection/);
      assert.ok(dt < 6000, `took ${dt} ms`);
      const m = await metrics(dPort);
      assert.equal(metricValue(m, 'vllm:num_requests_running'), 0);
      assert.ok(await poolFree(dPort), 'decode blocks not freed');
    });
  }
}

// A streamed prefill request with do_remote_decode: its first SSE event (no choices) carries
// the kv_transfer_params as soon as the prefill admitted the prompt; the rest of the stream
// is read in the background. Returns { first, kv, rest } (rest: a promise of every later
// event, [DONE] excluded).
async function prefillStreamed(port, prompt, id) {
  const r = await fetch(`http://127.0.0.1:${port}/v1/completions`, {
    method: 'POST', headers: { 'Content-Type': 'application/json', 'X-Request-Id': id },
    body: JSON.stringify({ model: 'tiny', prompt, max_tokens: 1, temperature: 0, stream: true,
      kv_transfer_params: { do_remote_decode: true } }),
  });
  assert.equal(r.status, 200);
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = '';
  const events = [];
  let wake = null;
  let ended = false;
  const pump = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let k;
      while ((k = buf.indexOf('\n\n')) >= 0) {
        const line = buf.slice(0, k).trim();
        buf = buf.slice(k + 2);
        if (line.startsWith('data: ') && line !== 'data: [DONE]') events.push(JSON.parse(line.slice(6)));
        if (wake) wake();
      }
    }
    ended = true;
    if (wake) wake();
  })();
  while (events.length === 0 && !ended) await new Promise((res) => { wake = res; });
  assert.ok(events.length > 0, 'the prefill stream ended without an event');
  const first = events[0];
  return { first, kv: first.kv_transfer_params, rest: pump.then(() => events.slice(1)) };
}

if (shmLike) {
  test('streamed prefill: the decode pulls while the prefill computes the prompt', async () => {
    // 32-token chunks: a 2,500-token prompt is ~80 prefill steps, long enough that the decode,
    // started on the first event, pins the lease while the prompt is still being computed
    const pPort = await freePort(), dPort = await freePort();
    await start(PREFILL, pPort, { extra: ['--max-num-batched-tokens', '32'] });
    await start(DECODE, dPort);
    // the golden cases through the early hand-over: golden ids
    for (const c of cases) {
      const { first, kv, rest } = await prefillStreamed(pPort, c.prompt_ids, `early-${c.name}`);
      assert.deepEqual(first.choices, [], JSON.stringify(first));
      assert.equal(kv.do_remote_prefill, true);
      const d = await decode(dPort, c, kv);
      assert.equal(d.status, 200, JSON.stringify(d.json));
      assert.deepEqual(d.json.choices[0].token_ids, c.greedy_ids, `${c.name}, early hand-over`);
      const tail = await rest;
      assert.deepEqual(tail.at(-1).kv_transfer_params, kv, 'the last event names the same lease');
    }
    // a long prompt: the same ids as the decode worker computing it alone
    const long = [];
    while (long.length < 2500) for (const c of cases) long.push(...c.prompt_ids);
    long.length = 2500;
    const ref = await post(dPort, { model: 'tiny', prompt: long, max_tokens: 8, temperature: 0,
      ignore_eos: true, return_token_ids: true });
    assert.equal(ref.status, 200, JSON.stringify(ref.json));
    const before = metricValue(await metrics(pPort), 'duet_kv_lease_pins_computing_total') || 0;
    const { kv, rest } = await prefillStreamed(pPort, long, 'early-long');
    const d = await post(dPort, { model: 'tiny', prompt: long, max_tokens: 8, temperature: 0,
      ignore_eos: true, return_token_ids: true, kv_transfer_params: kv });
    assert.equal(d.status, 200, JSON.stringify(d.json));
    assert.deepEqual(d.json.choices[0].token_ids, ref.json.choices[0].token_ids);
    await rest;
    const pinned = metricValue(await metrics(pPort), 'duet_kv_lease_pins_computing_total');
    assert.equal(pinned, before + 1, 'the decode should have pinned the lease mid-prefill');
    assert.ok(await poolFree(pPort) && await poolFree(dPort), 'pools not free');
  });
}

if (layout === 'ptp2') {
  test('prefill TP2 -> decode TP1: golden greedy ids', async () => {
    const pPort = await freePort(), dPort = await freePort();
    await start(PREFILL, pPort, { np: 2, extra: ['-tp', '2'] });
    await start(DECODE, dPort);
    await goldenAcross(pPort, [dPort]);
  });
}

if (layout === 'ddp2') {
  test('prefill DP1 -> decode DP2 (both DP ranks): golden greedy ids', async () => {
    const pPort = await freePort(), dPort = await freePort(2);
    await start(PREFILL, pPort);
    await start(DECODE, dPort, { np: 2, extra: ['-dp', '2'], ports: [dPort, dPort + 1] });
    await goldenAcross(pPort, [dPort, dPort + 1]);
  });
}
