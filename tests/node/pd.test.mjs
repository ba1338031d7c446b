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
