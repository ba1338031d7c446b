// SIGTERM: a request in flight finishes within --shutdown-timeout and the process exits 0;
// streams still running at the deadline end cleanly (an SSE error event, then [DONE]); new
// connections are refused once draining starts. Also: a flood beyond --max-num-seqs +
// --max-waiting-requests is answered 503 at once, the rest served.
import assert from 'node:assert/strict';
import net from 'node:net';
import { test } from 'node:test';

import { httpRequest, parseResponses, rawExchange, sleep, sseData, startGolden, requireEnv } from './lib.mjs';

requireEnv();
const json = { 'Content-Type': 'application/json' };

function connectRefused(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, '127.0.0.1');
    s.on('connect', () => { s.destroy(); resolve(false); });
    s.on('error', (e) => resolve(e.code === 'ECONNREFUSED'));
  });
}

test('SIGTERM: an in-flight request completes, then exit 0', async () => {
  const server = await startGolden();
  const body = JSON.stringify({ prompt: [1, 2, 3], max_tokens: 300, temperature: 0, ignore_eos: true });
  const pending = rawExchange(server.port, httpRequest('POST', '/v1/completions', { body, headers: json }), { timeoutMs: 30000 });
  await sleep(50); // the request is in the engine
  const t0 = Date.now();
  server.proc.kill('SIGTERM');
  await sleep(50);
  assert.ok(await connectRefused(server.port), 'no new connections while draining');
  const [resp] = parseResponses((await pending).data);
  assert.equal(resp.status, 200);
  assert.equal(resp.headers.connection, 'close');
  assert.equal(JSON.parse(resp.body).usage.completion_tokens, 300);
  const x = await server.waitExit(20000);
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
  assert.ok(Date.now() - t0 < 15000);
  assert.match(server.log, /SIGTERM/);
});

test('SIGTERM: streams past --shutdown-timeout are aborted cleanly, exit 0 in time', async () => {
  const server = await startGolden(['--shutdown-timeout', '1']);
  const streams = [];
  for (let i = 0; i < 4; i++) {
    const body = JSON.stringify({ prompt: [1, 2, 3 + i], max_tokens: 4000, temperature: 0, ignore_eos: true, stream: true });
    streams.push(rawExchange(server.port, httpRequest('POST', '/v1/completions', { body, headers: json }), { timeoutMs: 30000 }));
  }
  await sleep(300);
  const t0 = Date.now();
  server.proc.kill('SIGTERM');
  for (const s of streams) {
    const [resp] = parseResponses((await s).data);
    assert.equal(resp.status, 200);
    const data = sseData(resp.body);
    assert.equal(data[data.length - 1], '[DONE]', resp.body.slice(-300));
    const err = JSON.parse(data[data.length - 2]);
    assert.equal(err.error.code, 503);
    assert.match(err.error.message, /shutting down/);
    assert.ok(data.length > 3, 'some tokens streamed before the abort');
  }
  const x = await server.waitExit(20000);
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
  assert.ok(Date.now() - t0 < 8000, `took ${Date.now() - t0} ms`);
  assert.match(server.log, /aborting 4 requests/);
});

test('overload: beyond --max-num-seqs + --max-waiting-requests new requests get 503', async () => {
  const server = await startGolden(['--max-num-seqs', '1', '--max-waiting-requests', '2']);
  const body = JSON.stringify({ prompt: [1, 2, 3], max_tokens: 200, ignore_eos: true });
  const reqs = [];
  for (let i = 0; i < 8; i++) {
    reqs.push(rawExchange(server.port, httpRequest('POST', '/v1/completions', { body, headers: json, close: true }), { timeoutMs: 30000 }));
  }
  const codes = (await Promise.all(reqs)).map((r) => parseResponses(r.data)[0].status);
  assert.equal(codes.filter((c) => c === 200).length, 3, codes.join());
  assert.equal(codes.filter((c) => c === 503).length, 5, codes.join());
  const x = await server.stop();
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
});
