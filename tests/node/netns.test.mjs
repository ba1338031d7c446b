// Three test hosts as network namespaces (tests/netns/run.sh makes them and the description):
// deploy/launch starts prefill p0 (TP2 on a), prefill p1 (DP2 over a and b), decode (DP4 + EP
// over b and c) and duet-proxy (on head, where this test runs); then, with the official openai
// client through the proxy:
//   - every golden case's greedy ids, streamed and not; KV crossed the veths; pools empty;
//   - host a lost (every process in its namespace killed) under load: after the ejection
//     window every request succeeds, p1's replica on b keeps serving, the launcher goes on;
//   - SIGTERM to the launcher stops everything left, on every host.
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { goldenCases, metricValue, requireEnv, sleep } from './lib.mjs';

requireEnv();
const LAUNCH = process.env.DUET_LAUNCH;
const PREFIX = process.env.DUET_NETNS_PREFIX;
const HOSTS = process.env.DUET_NETNS_HOSTS;
const cases = goldenCases();
const A = '198.18.0.2', B = '198.18.0.3', C = '198.18.0.4';
const endpoints = {
  p0: [`${A}:8100`], p1: [`${A}:8110`, `${B}:8111`],
  decode: [`${B}:8200`, `${B}:8201`, `${C}:8202`, `${C}:8203`],
};
const all = [...endpoints.p0, ...endpoints.p1, ...endpoints.decode];
let launcher = null, out = '', exited = null, client = null, proxyUrl = '';

async function metrics(hostPort) {
  const r = await fetch(`http://${hostPort}/metrics`, { signal: AbortSignal.timeout(5000) });
  return r.text();
}

function nsPids(host) {
  return execFileSync('ip', ['netns', 'pids', `${PREFIX}-${host}`]).toString().trim().split(/\s+/)
    .filter(Boolean);
}

function vethBytes(host, dir) {
  return Number(execFileSync('ip', ['netns', 'exec', `${PREFIX}-${host}`, 'cat',
    `/sys/class/net/duet0/statistics/${dir}_bytes`]).toString());
}

async function poolsFree(list) {
  let used = [];
  for (let i = 0; i < 100; i++) {
    used = [];
    for (const e of list) {
      try { used.push(metricValue(await metrics(e), 'vllm:kv_cache_usage_perc')); } catch { used.push(-1); }
    }
    if (used.every((u) => u === 0)) return true;
    await sleep(100);
  }
  console.error(`KV usage per endpoint: ${list.map((e, i) => `${e}=${used[i]}`).join(' ')}`);
  return false;
}

async function golden(label) {
  for (const c of cases) {
    const r = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
      max_tokens: c.greedy_ids.length, temperature: 0, ignore_eos: true, return_token_ids: true });
    assert.deepEqual(r.choices[0].token_ids, c.greedy_ids, `${c.name} (${label}, not streamed)`);
    const s = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
      max_tokens: c.greedy_ids.length, temperature: 0, ignore_eos: true, return_token_ids: true,
      stream: true });
    const ids = [];
    for await (const chunk of s) if (chunk.choices[0]?.token_ids) ids.push(...chunk.choices[0].token_ids);
    assert.deepEqual(ids, c.greedy_ids, `${c.name} (${label}, streamed)`);
  }
}

before(async () => {
  launcher = spawn(LAUNCH, ['--log-dir', process.env.DUET_NETNS_LOGS, '--ready-timeout', '200',
    '--stop-timeout', '15', process.env.DUET_NETNS_DESC], { stdio: ['ignore', 'pipe', 'pipe'] });
  launcher.stdout.on('data', (d) => { out += d; });
  launcher.stderr.on('data', (d) => { out += d; });
  launcher.on('exit', (code, signal) => { exited = { code, signal }; });
  const end = Date.now() + 240000;
  for (;;) {
    const m = /duet-launch: ready: (\S+)/.exec(out);
    if (m) { proxyUrl = m[1]; break; }
    if (exited) throw new Error(`the launcher exited: ${JSON.stringify(exited)}\n${out}`);
    if (Date.now() > end) throw new Error(`the deployment did not come up\n${out}`);
    await sleep(200);
  }
  assert.equal(proxyUrl, 'http://198.18.0.1:8000');
  client = new OpenAI({ baseURL: `${proxyUrl}/v1`, apiKey: 'none', maxRetries: 0, timeout: 60000 });
});

after(async () => {
  if (launcher && !exited) {
    launcher.kill('SIGKILL');
  }
});

test('2P1D over three hosts: golden ids through the proxy; KV and MPI cross the veths', async () => {
  const aTx = vethBytes('a', 'tx'), cRx = vethBytes('c', 'rx');
  await golden('all hosts up');
  let pulled = 0, pulls = 0;
  for (const e of endpoints.decode) {
    const m = await metrics(e);
    pulled += metricValue(m, 'duet_kv_pull_bytes_total') || 0;
    pulls += metricValue(m, 'duet_kv_pulls_total') || 0;
  }
  assert.ok(pulls >= cases.length && pulled > 0, `decode pulled ${pulls} times, ${pulled} bytes`);
  // every prefill worker is on a or b, every decode rank on b or c: KV and EP traffic left a
  // and reached c through their veths
  assert.ok(vethBytes('a', 'tx') - aTx > 0, 'nothing left host a through its veth');
  assert.ok(vethBytes('c', 'rx') - cRx > 0, 'nothing reached host c through its veth');
  for (const e of all) {
    const served = metricValue(await metrics(e), 'vllm:request_success_total');
    assert.ok(served !== undefined, `${e} has no request counter`);
  }
  assert.ok(await poolsFree(all), 'KV blocks left in use');
});

test('host a lost under load: the survivors keep serving, p1 on host b among them', async () => {
  const c = cases[1];
  const want = c.greedy_ids.slice(0, 4);
  const bBefore = metricValue(await metrics(endpoints.p1[1]), 'vllm:prompt_tokens_total') || 0;
  let stop = false, killedAt = 0, failures = 0, okAfter = 0, okBefore = 0;
  const errors = [];
  const worker = async () => {
    while (!stop) {
      try {
        const r = await client.completions.create({ model: 'tiny', prompt: c.prompt_ids,
          max_tokens: 4, temperature: 0, ignore_eos: true, return_token_ids: true });
        assert.deepEqual(r.choices[0].token_ids, want);
        if (!killedAt) okBefore++;
        else if (Date.now() - killedAt > 3000) okAfter++;
      } catch (e) {
        if (!killedAt || Date.now() - killedAt > 3000) {
          failures++;
          if (errors.length < 5) errors.push(String(e.message || e));
        }
      }
    }
  };
  const workers = Array.from({ length: 4 }, worker);
  await sleep(1500);
  killedAt = Date.now();
  execFileSync('bash', [HOSTS, 'kill', `${PREFIX}-a`]);
  assert.deepEqual(nsPids('a'), [], 'processes left on host a');
  await sleep(9000);
  stop = true;
  await Promise.all(workers);
  assert.ok(okBefore > 0, 'no request succeeded before the kill');
  assert.equal(failures, 0, `requests failed after the ejection window: ${errors.join('; ')}`);
  assert.ok(okAfter > 0, 'no request succeeded after the kill');
  // mpirun needs several seconds to end an instance over a lost daemon: look again well after
  while (Date.now() - killedAt < 20000) await sleep(200);
  await golden('host a lost');
  const bAfter = metricValue(await metrics(endpoints.p1[1]), 'vllm:prompt_tokens_total');
  assert.ok(bAfter > bBefore, `p1's replica on host b served nothing after the kill (${bBefore} -> ${bAfter})`);
  assert.equal(exited, null, `the launcher exited: ${out}`);
  assert.match(out, /p0 exited/);
  assert.doesNotMatch(out, /p1 exited/);
  const pm = await (await fetch(`${proxyUrl}/metrics`)).text();
  assert.match(pm, new RegExp(`ejections_total\\{[^}]*${A.replace(/\./g, '\\.')}:8100[^}]*\\} [1-9]`));
  assert.ok(await poolsFree([endpoints.p1[1], ...endpoints.decode]), 'KV blocks left in use');
});

test('SIGTERM to the launcher stops every instance and the proxy on every host', async () => {
  launcher.kill('SIGTERM');
  const end = Date.now() + 40000;
  while (!exited && Date.now() < end) await sleep(100);
  assert.ok(exited, `the launcher did not stop\n${out}`);
  assert.equal(exited.code, 0, out);
  for (const h of ['a', 'b', 'c']) assert.deepEqual(nsPids(h), [], `processes left on host ${h}`);
  // on head only this test and its own children are left
  const left = nsPids('head').filter((p) => Number(p) !== process.pid);
  const names = left.map((p) => { try { return execFileSync('ps', ['-o', 'comm=', '-p', p]).toString().trim(); } catch { return ''; } });
  assert.deepEqual(names.filter((n) => /duet|mpirun|orted/.test(n)), [], 'processes left on head');
});
