// HTTPS (--ssl-keyfile/--ssl-certfile through OpenSSL, client certificates with --ssl-cert-reqs)
// and CORS (--allowed-origins and friends, vLLM's defaults) on a worker, with certificates made
// here by the openssl command: whole and streamed answers over TLS (the official openai client
// in a child process trusting the test CA), plain HTTP refused on the TLS port, preflights.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import https from 'node:https';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { GOLDEN, Server, freePort, goldenCases, raw, requireEnv, sleep, startGolden } from './lib.mjs';

requireEnv();
const cases = goldenCases();
let dir, tls, mtls, plain;

function openssl(...args) {
  execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-tls-'));
  // a CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it
  openssl('req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca.key', '-out', 'ca.pem',
    '-days', '2', '-subj', '/CN=duet test CA');
  fs.writeFileSync(path.join(dir, 'san.ext'), 'subjectAltName=IP:127.0.0.1\n');
  for (const who of ['server', 'client']) {
    openssl('req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${who}.key`, '-out', `${who}.csr`,
      '-subj', `/CN=${who === 'server' ? '127.0.0.1' : 'duet client'}`);
    openssl('x509', '-req', '-in', `${who}.csr`, '-CA', 'ca.pem', '-CAkey', 'ca.key',
      '-CAcreateserial', '-out', `${who}.pem`, '-days', '2',
      ...(who === 'server' ? ['-extfile', 'san.ext'] : []));
  }
  const f = (n) => path.join(dir, n);
  [tls, mtls, plain] = await Promise.all([
    startTls(['--ssl-keyfile', f('server.key'), '--ssl-certfile', f('server.pem'),
      '--allowed-origins', '["https://app.example"]', '--allowed-methods', '["GET", "POST"]',
      '--allowed-headers', '["authorization"]', '--allow-credentials']),
    startTls(['--ssl-keyfile', f('server.key'), '--ssl-certfile', f('server.pem'),
      '--ssl-ca-certs', f('ca.pem'), '--ssl-cert-reqs', '2']),
    startGolden([]),
  ]);
});

// startGolden's server, its readiness polled over HTTPS.
async function startTls(extra) {
  const port = await freePort();
  const s = new Server(['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '64M', ...extra], { port });
  for (let i = 0; i < 600; i++) {
    if (s.exitInfo) throw new Error(`server exited early\n${s.log}`);
    try {
      if ((await get(port, 'GET', '/health', { cert: true })).status === 200) return s;
    } catch { /* not listening yet */ }
    await sleep(100);
  }
  throw new Error(`server not ready\n${s.log}`);
}

after(async () => {
  for (const s of [tls, mtls, plain]) if (s) assert.deepEqual(await s.stop(), { code: 0, signal: null }, s.log);
  fs.rmSync(dir, { recursive: true, force: true });
});

// One HTTPS exchange trusting the test CA; resolves {status, headers, body} or rejects.
function get(port, method, route, { body = null, headers = {}, cert = false } = {}) {
  return new Promise((resolve, reject) => {
    const opts = { host: '127.0.0.1', port, method, path: route, ca: fs.readFileSync(path.join(dir, 'ca.pem')),
      headers: { ...headers, ...(body ? { 'Content-Type': 'application/json' } : {}) } };
    if (cert) {
      opts.key = fs.readFileSync(path.join(dir, 'client.key'));
      opts.cert = fs.readFileSync(path.join(dir, 'client.pem'));
    }
    const req = https.request(opts, (res) => {
      let data = '';
      res.on('data', (d) => { data += d; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
    });
    req.on('error', reject);
    req.setTimeout(20000, () => req.destroy(new Error('timeout')));
    if (body) req.write(JSON.stringify(body));
    req.end();
  });
}

test('HTTPS: whole and streamed answers, the golden ids, through the openai client', async () => {
  const c = cases[2];
  const r = await get(tls.port, 'POST', '/v1/completions', { body: { prompt: c.prompt_ids,
    max_tokens: 8, temperature: 0, ignore_eos: true, return_token_ids: true } });
  assert.equal(r.status, 200, r.body);
  assert.deepEqual(JSON.parse(r.body).choices[0].token_ids, c.greedy_ids.slice(0, 8));
  // the openai client, in a node that trusts the test CA (NODE_EXTRA_CA_CERTS is read at start)
  const script = `
    import OpenAI from 'openai';
    const c = new OpenAI({ baseURL: 'https://127.0.0.1:${tls.port}/v1', apiKey: 'none', maxRetries: 0 });
    const s = await c.completions.create({ model: 'tiny', prompt: ${JSON.stringify(c.prompt_ids)},
      max_tokens: 16, temperature: 0, ignore_eos: true, return_token_ids: true, stream: true });
    const ids = [];
    for await (const x of s) ids.push(...x.choices[0].token_ids);
    console.log(JSON.stringify(ids));`;
  const p = spawnSync(process.execPath, ['--input-type=module', '-e', script], { encoding: 'utf8',
    cwd: path.dirname(new URL(import.meta.url).pathname),
    env: { ...process.env, NODE_EXTRA_CA_CERTS: path.join(dir, 'ca.pem') }, timeout: 60000 });
  assert.equal(p.status, 0, p.stderr);
  assert.deepEqual(JSON.parse(p.stdout.trim()), c.greedy_ids.slice(0, 16));
  // a large answer crosses many TLS records
  const m = await get(tls.port, 'GET', '/metrics');
  assert.equal(m.status, 200);
  assert.match(m.body, /vllm:generation_tokens_total/);
});

test('HTTPS: plain HTTP on the TLS port gets no answer; the server lives on', async () => {
  const r = await raw(tls.port, 'GET', '/health').catch((e) => e);
  assert.ok(r instanceof Error || !(r.status >= 200), `plain HTTP answered ${JSON.stringify(r)}`);
  assert.equal((await get(tls.port, 'GET', '/health')).status, 200);
});

test('HTTPS: --ssl-cert-reqs 2 refuses a client without a certificate', async () => {
  await assert.rejects(get(mtls.port, 'GET', '/health'));
  const ok = await get(mtls.port, 'GET', '/health', { cert: true });
  assert.equal(ok.status, 200);
});

test('CORS: allowed origin answered, others not; preflights', async () => {
  const body = { prompt: [1, 2, 3], max_tokens: 2 };
  const a = await get(tls.port, 'POST', '/v1/completions', { body, headers: { Origin: 'https://app.example' } });
  assert.equal(a.status, 200);
  assert.equal(a.headers['access-control-allow-origin'], 'https://app.example');
  assert.equal(a.headers['access-control-allow-credentials'], 'true');
  assert.equal(a.headers.vary, 'Origin');
  const b = await get(tls.port, 'POST', '/v1/completions', { body, headers: { Origin: 'https://evil.example' } });
  assert.equal(b.status, 200);
  assert.equal(b.headers['access-control-allow-origin'], undefined);
  const pre = await get(tls.port, 'OPTIONS', '/v1/chat/completions', { headers: {
    Origin: 'https://app.example', 'Access-Control-Request-Method': 'POST',
    'Access-Control-Request-Headers': 'Authorization, Content-Type' } });
  assert.equal(pre.status, 200);
  assert.equal(pre.headers['access-control-allow-methods'], 'GET, POST');
  assert.match(pre.headers['access-control-allow-headers'], /authorization/);
  assert.equal(pre.headers['access-control-allow-origin'], 'https://app.example');
  for (const [h, what] of [[{ Origin: 'https://evil.example', 'Access-Control-Request-Method': 'POST' }, /origin/],
    [{ Origin: 'https://app.example', 'Access-Control-Request-Method': 'DELETE' }, /method/],
    [{ Origin: 'https://app.example', 'Access-Control-Request-Method': 'POST',
      'Access-Control-Request-Headers': 'X-Secret' }, /headers/]]) {
    const r = await get(tls.port, 'OPTIONS', '/v1/completions', { headers: h });
    assert.equal(r.status, 400);
    assert.match(r.body, what);
  }
  // vLLM's defaults: any origin, method and header
  const d = await raw(plain.port, 'OPTIONS', '/v1/completions', { headers: { Origin: 'http://x.example',
    'Access-Control-Request-Method': 'PUT', 'Access-Control-Request-Headers': 'X-Anything' } });
  assert.equal(d.status, 200);
  assert.equal(d.headers['access-control-allow-origin'], '*');
  assert.equal(d.headers['access-control-allow-headers'], 'X-Anything');
  const g = await raw(plain.port, 'GET', '/health', { headers: { Origin: 'http://x.example' } });
  assert.equal(g.headers['access-control-allow-origin'], '*');
  // no Origin: no CORS headers at all
  const n = await raw(plain.port, 'GET', '/health');
  assert.equal(n.headers['access-control-allow-origin'], undefined);
});

test('HTTPS: a bad key file ends the start-up with one line', () => {
  const r = spawnSync(process.env.DUET_DECODE, ['--model', path.join(process.env.DUET_GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(process.env.DUET_GOLDEN, 'tokenizer'), '--port', '0',
    '--ssl-keyfile', path.join(dir, 'client.key'), '--ssl-certfile', path.join(dir, 'server.pem')],
  { encoding: 'utf8', timeout: 60000 });
  assert.equal(r.status, 1);
  assert.match(r.stderr, /TLS: cannot use the key file .*client\.key: .*mismatch/);
  assert.equal(r.stderr.trim().split('\n').length, 1, r.stderr);
});
