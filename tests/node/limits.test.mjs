// Limits a server must hold against one client, probed over HTTP against real processes: a
// duet-decode worker (--max-model-len 256, --max-request-body 64 KiB, --api-key) and duet-proxy
// in front of it with its own key. Each limit should end in a clear error, not in work done, a
// hang or a lost server: prompt length, max_tokens, n, logprobs, body size, the time to send
// headers, connections per client, the API key (every wrong form refused), and no secret in
// any log line (see docs/hardening.md).
import assert from 'node:assert/strict';
import net from 'node:net';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { GOLDEN, Server, freePort, rawExchange, requireEnv, sleep } from './lib.mjs';

requireEnv();
const KEY = 'sk-limits-worker-7d1f0c2a9b';
const PROXY_KEY = 'sk-limits-proxy-4e8a61d3c5';
const KV_SECRET = 'kv-limits-secret-93b0e6f2';
const WRONG = 'sk-limits-wrong-5c2d8e1b7a';
const MAX_LEN = 256;
const MAX_BODY = 64 * 1024;
const PER_CLIENT = 64;
let worker = null, proxy = null, wPort = 0, xPort = 0;

before(async () => {
  wPort = await freePort();
  xPort = await freePort();
  worker = await new Server(['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(wPort), '--kv-cache-memory', '32M',
    '--max-model-len', String(MAX_LEN), '--max-request-body', String(MAX_BODY), '--api-key', KEY,
    '--max-connections-per-client', String(PER_CLIENT)],
  { port: wPort, env: { DUET_LOG: 'debug', DUET_KV_SECRET: KV_SECRET } }).ready();
  proxy = await new Server(['--host', '127.0.0.1', '--port', String(xPort),
    '--prefill', `127.0.0.1:${wPort}`, '--decode', `127.0.0.1:${wPort}`,
    '--api-key', PROXY_KEY, '--upstream-api-key', KEY,
    '--max-connections-per-client', String(PER_CLIENT)],
  { port: xPort, bin: process.env.DUET_PROXY, env: { DUET_LOG: 'debug' } }).ready();
});

after(async () => {
  for (const s of [proxy, worker]) if (s) await s.stop(20000);
});

async function post(port, body, key = port === xPort ? PROXY_KEY : KEY, route = '/v1/completions') {
  const r = await fetch(`http://127.0.0.1:${port}${route}`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Authorization: `Bearer ${key}` },
    body: typeof body === 'string' ? body : JSON.stringify(body),
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch { /* not JSON */ }
  return { status: r.status, text, json };
}

// A clear error: the status, vLLM's error object, and a message that names the subject.
function clearError(res, status, subject) {
  assert.equal(res.status, status, res.text);
  assert.equal(res.json?.error?.code, status, res.text);
  assert.match(res.json.error.message, subject, res.text);
}

const ids = (n) => Array.from({ length: n }, (_, i) => 1 + (i % 1000));

for (const [name, port] of [['worker', () => wPort], ['proxy', () => xPort]]) {
  test(`${name}: a prompt longer than the context is refused`, async () => {
    clearError(await post(port(), { model: 'tiny', prompt: ids(MAX_LEN + 10), max_tokens: 1 }),
      400, /maximum context length is 256/);
  });

  test(`${name}: max_tokens beyond the context left is refused`, async () => {
    clearError(await post(port(), { model: 'tiny', prompt: ids(10), max_tokens: MAX_LEN }),
      400, /max_tokens/);
  });

  test(`${name}: n above the limit is refused`, async () => {
    clearError(await post(port(), { model: 'tiny', prompt: ids(4), max_tokens: 1, n: 100000 }),
      400, /\bn\b/);
  });

  test(`${name}: logprobs above the limit are refused`, async () => {
    clearError(await post(port(), { model: 'tiny', prompt: ids(4), max_tokens: 1, logprobs: 1000 }),
      400, /logprobs/);
    clearError(await post(port(), { model: 'tiny', messages: [{ role: 'user', content: 'x' }],
      max_tokens: 1, logprobs: true, top_logprobs: 1000 }, undefined, '/v1/chat/completions'),
    400, /top_logprobs/);
  });

  test(`${name}: a wrong, partial or missing API key is refused, the right one accepted`, async () => {
    const right = port() === xPort ? PROXY_KEY : KEY;
    for (const k of [WRONG, right.slice(0, -1), right + 'x', right.toUpperCase(), '', ' ']) {
      const r = await post(port(), { model: 'tiny', prompt: ids(2), max_tokens: 1 }, k);
      assert.equal(r.status, 401, `key ${JSON.stringify(k)}: ${r.text}`);
    }
    const none = await fetch(`http://127.0.0.1:${port()}/v1/models`);
    assert.equal(none.status, 401);
    const ok = await post(port(), { model: 'tiny', prompt: ids(2), max_tokens: 1 }, right);
    assert.equal(ok.status, 200, ok.text);
  });
}

test('worker: a body beyond --max-request-body is answered 413', async () => {
  const big = JSON.stringify({ model: 'tiny', prompt: 'x'.repeat(MAX_BODY), max_tokens: 1 });
  const r = await rawExchange(wPort, `POST /v1/completions HTTP/1.1\r\nHost: x\r\n` +
    `Content-Type: application/json\r\nAuthorization: Bearer ${KEY}\r\n` +
    `Content-Length: ${Buffer.byteLength(big)}\r\n\r\n${big}`);
  assert.match(r.data, /^HTTP\/1\.1 413 /, r.data.slice(0, 200));
});

test('proxy: a body beyond its --max-body is answered 413', async () => {
  // the proxy's default bound (px_config: --max-body) is far above the worker's: go past both
  const size = 80 * 1024 * 1024;
  const r = await rawExchange(xPort, `POST /v1/completions HTTP/1.1\r\nHost: x\r\n` +
    `Content-Type: application/json\r\nAuthorization: Bearer ${PROXY_KEY}\r\n` +
    `Content-Length: ${size}\r\n\r\n{"prompt":"`, { until: (d) => d.includes('\r\n\r\n') });
  assert.match(r.data, /^HTTP\/1\.1 413 /, r.data.slice(0, 200));
});

// Headers that never end (slowloris): the server answers 408 and closes within its header
// deadline (10 s for both) instead of holding the connection.
for (const [name, port] of [['worker', () => wPort], ['proxy', () => xPort]]) {
  test(`${name}: headers not finished in time get 408 and the connection closed`, async () => {
    const t0 = Date.now();
    const r = await rawExchange(port(), null, {
      writes: [['POST /v1/completions HTTP/1.1\r\nHost: x\r\n', 1000], ['X-Slow: 1\r\n', 0]],
      timeoutMs: 20000,
    });
    assert.ok(!r.timedOut, `the connection was still open after 20 s: ${r.data}`);
    assert.match(r.data, /^HTTP\/1\.1 408 /, r.data.slice(0, 200));
    assert.ok(Date.now() - t0 < 15000);
  });
}

// Many connections from one client: a per-client cap should refuse the excess while another
// client is still served. Clients are told apart by address: 127.0.0.2 is the second one.
function openIdle(port, count, localAddress) {
  return Promise.all(Array.from({ length: count }, () => new Promise((resolve) => {
    const s = net.connect({ port, host: '127.0.0.1', localAddress });
    s.data = '';
    s.on('data', (d) => { s.data += d; });
    s.on('connect', () => resolve(s));
    s.on('error', () => resolve(s));
  })));
}

for (const [name, port] of [['worker', () => wPort], ['proxy', () => xPort]]) {
  test(`${name}: one client's 600 idle connections are capped, another client is served`,
    async () => {
      const key = port() === xPort ? PROXY_KEY : KEY;
      const socks = await openIdle(port(), 600, '127.0.0.1');
      try {
        const answered = () => socks.filter((s) => /^HTTP/.test(s.data)).length;
        for (let i = 0; i < 50 && answered() < 600 - PER_CLIENT; i++) await sleep(100);
        await sleep(200); // a refusal too many would show up by now
        const other = await rawExchange(port(), `GET /v1/models HTTP/1.1\r\nHost: x\r\n` +
          `Authorization: Bearer ${key}\r\nConnection: close\r\n\r\n`,
        { localAddress: '127.0.0.2' });
        assert.match(other.data, /^HTTP\/1\.1 200 /, 'the other client was not served');
        // The cap counts every connection from 127.0.0.1, so fetch's kept-alive connections
        // of earlier tests may take a few of the 64.
        const refused = socks.filter((s) => /^HTTP\/1\.1 429 /.test(s.data));
        const kept = socks.filter((s) => !/^HTTP/.test(s.data) && !s.destroyed);
        assert.equal(refused.length + kept.length, 600);
        assert.ok(kept.length <= PER_CLIENT && kept.length >= PER_CLIENT - 8,
          `${refused.length} of 600 answered 429, ${kept.length} kept (limit ${PER_CLIENT})`);
        const [first] = refused;
        const body = JSON.parse(first.data.slice(first.data.indexOf('\r\n\r\n') + 4));
        assert.equal(body.error.code, 429, first.data);
        assert.match(body.error.message, /too many connections from this client \(at most 64/);
        // the ones kept are served
        const answer = new Promise((resolve) => kept[0].once('data', () => resolve(kept[0].data)));
        kept[0].write(`GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${key}\r\n\r\n`);
        assert.match(await answer, /^HTTP\/1\.1 200 /);
      } finally {
        for (const s of socks) s.destroy();
      }
      // once they are gone, the client is served again
      await sleep(300);
      const again = await rawExchange(port(), `GET /v1/models HTTP/1.1\r\nHost: x\r\n` +
        `Authorization: Bearer ${key}\r\nConnection: close\r\n\r\n`);
      assert.match(again.data, /^HTTP\/1\.1 200 /);
    });
}

test('proxy: its metrics count the connections refused per client', async () => {
  const r = await fetch(`http://127.0.0.1:${xPort}/metrics`,
    { headers: { Authorization: `Bearer ${PROXY_KEY}` } });
  const text = await r.text();
  const m = /^duet_proxy_client_connections_rejected_per_client_total (\d+)$/m.exec(text);
  assert.ok(m, text);
  assert.ok(Number(m[1]) >= 600 - PER_CLIENT, m[0]);
});

test('no secret in any log line: API keys, the KV secret, a client\'s wrong key', async () => {
  // exercise the paths that log: refused keys, good requests, a bad request, a debug log level
  await post(xPort, { model: 'tiny', prompt: ids(3), max_tokens: 2 });
  await post(wPort, { model: 'tiny', prompt: ids(3), max_tokens: 2 }, WRONG);
  await post(xPort, { model: 'tiny', prompt: ids(3), max_tokens: 2 }, WRONG);
  await post(xPort, '{"prompt": [1, 2', PROXY_KEY);
  await sleep(300);
  for (const [name, s] of [['worker', worker], ['proxy', proxy]]) {
    assert.ok(s.log.length > 0, `${name} wrote no log`);
    for (const secret of [KEY, PROXY_KEY, KV_SECRET, WRONG]) {
      const line = s.log.split('\n').find((l) => l.includes(secret) || l.includes(secret.slice(0, 12)));
      assert.equal(line, undefined, `${name} logged a secret: ${line}`);
    }
  }
});
