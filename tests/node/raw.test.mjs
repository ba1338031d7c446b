// duet-decode over raw sockets: every error status the API answers (400 per bad field, 401,
// 404, 405, 413, 415), invalid UTF-8, pipelined keep-alive requests, a slowloris client, the
// request id echo, 200 concurrent streaming clients of which a third disconnect midway (the
// server stays up and the KV pool is whole again), and /metrics under promtool.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import net from 'node:net';
import { after, before, test } from 'node:test';

import {
  httpRequest, metricValue, metrics, parseResponses, raw, rawExchange, sleep, sseData,
  startGolden,
  requireEnv,
} from './lib.mjs';

requireEnv();
const KEY = 'sk-test-key';
const auth = { Authorization: `Bearer ${KEY}` };
const json = { 'Content-Type': 'application/json', ...auth };
let server;
let port;
let slowloris; // a connection that sent half its headers at the start: answered 408 later

before(async () => {
  server = await startGolden(['--api-key', KEY, '--max-request-body', '65536',
    '--shutdown-timeout', '5']);
  port = server.port;
  slowloris = rawExchange(port, null, {
    writes: [['POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty', 100]], timeoutMs: 30000,
  });
});

after(async () => {
  const x = await server.stop();
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
});

async function post(path, body, headers = json) {
  const r = await raw(port, 'POST', path, { body: typeof body === 'string' ? body : JSON.stringify(body), headers });
  if (r.headers['content-type']?.startsWith('application/json')) r.json = JSON.parse(r.body);
  return r;
}

function assertError(r, status, re, param) {
  assert.equal(r.status, status, r.body);
  const e = JSON.parse(r.body).error;
  assert.equal(e.code, status);
  assert.equal(typeof e.type, 'string');
  assert.ok('param' in e, 'vLLM error shape has param');
  if (re) assert.match(e.message, re);
  if (param !== undefined) assert.equal(e.param, param);
}

test('auth: /v1/* needs the key, /health and /metrics do not', async () => {
  assertError(await raw(port, 'GET', '/v1/models'), 401);
  assertError(await raw(port, 'GET', '/v1/models', { headers: { Authorization: 'Bearer nope' } }), 401);
  assertError(await post('/v1/completions', { prompt: [1], max_tokens: 1 }, { 'Content-Type': 'application/json' }), 401);
  assert.equal((await raw(port, 'GET', '/v1/models', { headers: auth })).status, 200);
  assert.equal((await raw(port, 'GET', '/health')).status, 200);
  assert.equal((await raw(port, 'GET', '/metrics')).status, 200);
});

test('404 unknown path and model, 405 wrong method, 415 content type, 413 body', async () => {
  assertError(await raw(port, 'GET', '/v2/nothing', { headers: auth }), 404);
  assertError(await post('/v1/completions', { model: 'gpt-4', prompt: [1] }), 404, /gpt-4/, 'model');
  const m = await raw(port, 'GET', '/v1/completions', { headers: auth });
  assertError(m, 405);
  assert.equal(m.headers.allow, 'POST');
  assertError(await post('/v1/completions', 'prompt=1', { ...auth, 'Content-Type': 'application/x-www-form-urlencoded' }), 415);
  assertError(await post('/v1/completions', 'x', { ...auth, 'Content-Type': 'text/plain' }), 415);
  const big = JSON.stringify({ prompt: 'a'.repeat(70000) });
  const r = await post('/v1/completions', big);
  assert.equal(r.status, 413, r.body);
});

test('400 for every malformed field', async () => {
  const bad = [
    [{ prompt: [1], max_tokens: 'x' }, 'max_tokens'],
    [{ prompt: [1], max_tokens: -1 }, 'max_tokens'],
    [{ prompt: [1], max_tokens: 0 }, 'max_tokens'],
    [{ prompt: [1], max_tokens: 1.5 }, 'max_tokens'],
    [{ prompt: [1], n: 0 }, 'n'],
    [{ prompt: [1], n: 'two' }, 'n'],
    [{ prompt: [1], temperature: -1 }, 'temperature'],
    [{ prompt: [1], temperature: 'hot' }, 'temperature'],
    [{ prompt: [1], top_p: 2 }, 'top_p'],
    [{ prompt: [1], top_p: 0 }, 'top_p'],
    [{ prompt: [1], top_k: -5 }, 'top_k'],
    [{ prompt: [1], min_p: 1.5 }, 'min_p'],
    [{ prompt: [1], presence_penalty: 3 }, 'presence_penalty'],
    [{ prompt: [1], frequency_penalty: -3 }, 'frequency_penalty'],
    [{ prompt: [1], repetition_penalty: 0 }, 'repetition_penalty'],
    [{ prompt: [1], logprobs: 21 }, 'logprobs'],
    [{ prompt: [1], logprobs: true }, 'logprobs'],
    [{ prompt: [1], stop: 5 }, 'stop'],
    [{ prompt: [1], stop: ['a', 3] }, 'stop'],
    [{ prompt: [1], stop_token_ids: [-1] }, 'stop_token_ids'],
    [{ prompt: [1], seed: 'x' }, 'seed'],
    [{ prompt: [1], echo: 'yes' }, 'echo'],
    [{ prompt: [1], stream: 1 }, 'stream'],
    [{ prompt: [1], stream_options: { include_usage: true } }, 'stream_options'],
    [{ prompt: [1], min_tokens: 5, max_tokens: 2 }, 'min_tokens'],
    [{ prompt: [1], logit_bias: { 1: 5 } }, 'logit_bias'],
    [{ prompt: [1], best_of: 3 }, 'best_of'],
    [{}, 'prompt'],
    [{ prompt: null }, 'prompt'],
    [{ prompt: {} }, 'prompt'],
    [{ prompt: [] }, 'prompt'],
    [{ prompt: [[1], 'x', 3] }, 'prompt'],
    [{ prompt: [1.5] }, 'prompt'],
    [{ prompt: [[]] }, 'prompt'],
    [{ prompt: [1], model: 5 }, 'model'],
    [{ prompt: [1], kv_transfer_params: 'x' }, 'kv_transfer_params'],
  ];
  for (const [body, param] of bad) {
    const r = await post('/v1/completions', body);
    assertError(r, 400, null, param);
  }
  for (const body of [{ messages: 'hi' }, { messages: [{ role: 'user', content: 'x' }], n: -1 },
    { messages: [{ role: 'user', content: 'x' }], max_completion_tokens: 'x' },
    { messages: [{ role: 'user', content: 5 }] }]) {
    assertError(await post('/v1/chat/completions', body), 400);
  }
  assertError(await post('/tokenize', { prompt: 5 }), 400);
  assertError(await post('/detokenize', { tokens: ['a'] }), 400);
  assertError(await post('/detokenize', { tokens: [999999999] }), 400);
  // the token ids exceed the model's vocabulary
  assertError(await post('/v1/completions', { prompt: [5000], max_tokens: 1 }), 400, /out of vocabulary/);
});

test('400 for malformed JSON, non-objects and invalid UTF-8', async () => {
  assertError(await post('/v1/completions', '{"prompt": [1,'), 400, /JSON/);
  assertError(await post('/v1/completions', '[1, 2]'), 400);
  assertError(await post('/v1/completions', '{"prompt": [1]} trailing'), 400);
  assertError(await post('/v1/completions', '{"prompt": "\\ud800"}'), 400);
  const invalid = Buffer.concat([Buffer.from('{"prompt": "'), Buffer.from([0xff, 0xfe, 0xc3]), Buffer.from('", "max_tokens": 1}')]);
  const r = await rawExchange(port, Buffer.concat([
    Buffer.from(`POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nContent-Length: ${invalid.length}\r\n\r\n`),
    invalid]));
  assertError(parseResponses(r.data)[0], 400, /UTF-8/);
  const nested = '['.repeat(5000) + ']'.repeat(5000);
  assert.equal((await post('/v1/completions', nested)).status, 400);
});

test('context length: vLLM wording with the input token count', async () => {
  const ids = Array.from({ length: 5000 }, (_, i) => i % 2000);
  const r = await post('/v1/completions', { prompt: ids, max_tokens: 1 });
  assertError(r, 400, /maximum context length is 4096 tokens/);
  assert.match(JSON.parse(r.body).error.message, /5000 input tokens/);
  const r2 = await post('/v1/completions', { prompt: ids.slice(0, 4000), max_tokens: 200 });
  assertError(r2, 400, /maximum context length is 4096 tokens.*4000 input tokens/);
});

test('X-Request-Id is echoed and names the completion', async () => {
  const r = await post('/v1/completions', { prompt: [1, 2, 3], max_tokens: 2 }, { ...json, 'X-Request-Id': 'abc-123' });
  assert.equal(r.status, 200);
  assert.equal(r.headers['x-request-id'], 'abc-123');
  assert.equal(r.json.id, 'cmpl-abc-123');
  const g = await post('/v1/completions', { prompt: [1, 2, 3], max_tokens: 1 });
  assert.match(g.headers['x-request-id'], /^[0-9a-f]{32}$/);
});

test('pipelined keep-alive requests are answered in order', async () => {
  const reqs = [];
  for (let i = 0; i < 5; i++) {
    reqs.push(httpRequest('POST', '/v1/completions', {
      body: JSON.stringify({ prompt: [1, 2, 3 + i], max_tokens: 1 + i, temperature: 0 }),
      headers: { ...json, 'X-Request-Id': `pipe-${i}` },
    }));
  }
  reqs.push(httpRequest('GET', '/health', { close: true }));
  const r = await rawExchange(port, Buffer.concat(reqs));
  const resps = parseResponses(r.data);
  assert.equal(resps.length, 6, r.data);
  for (let i = 0; i < 5; i++) {
    assert.equal(resps[i].status, 200);
    assert.equal(resps[i].headers['x-request-id'], `pipe-${i}`);
    assert.equal(JSON.parse(resps[i].body).usage.completion_tokens, 1 + i);
  }
  assert.equal(resps[5].status, 200);
});

test('slowloris: trickled headers do not block others; a stalled one gets 408', async () => {
  const body = JSON.stringify({ prompt: [1, 2], max_tokens: 1 });
  const msg = `POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${KEY}\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: ${body.length}\r\n\r\n${body}`;
  const writes = [];
  for (let i = 0; i < msg.length; i += 8) writes.push([msg.slice(i, i + 8), 15]);
  const trickle = rawExchange(port, null, { writes, timeoutMs: 20000 });
  // meanwhile the server answers everyone else at once
  const t0 = Date.now();
  for (let i = 0; i < 5; i++) assert.equal((await raw(port, 'GET', '/health')).status, 200);
  assert.ok(Date.now() - t0 < 2000);
  const done = parseResponses((await trickle).data);
  assert.equal(done[0].status, 200, 'the trickled request is served once whole');
  const stalled = await slowloris; // began before every test: 10 s header timeout
  assert.equal(parseResponses(stalled.data)[0]?.status, 408, stalled.data);
});

test('200 concurrent streams, a third disconnect midway: server up, KV pool whole again', async () => {
  const N = 200;
  const clients = [];
  for (let i = 0; i < N; i++) {
    const quitter = i % 3 === 0;
    clients.push(new Promise((resolve, reject) => {
      const body = JSON.stringify({ prompt: [1, 2 + (i % 50), 3, 4], max_tokens: 40, temperature: 0.8,
        seed: i, ignore_eos: true, stream: true });
      const sock = net.connect(port, '127.0.0.1');
      let buf = '';
      let events = 0;
      sock.setEncoding('latin1');
      sock.on('connect', () => sock.write(httpRequest('POST', '/v1/completions', { body, headers: json, close: true })));
      sock.on('data', (d) => {
        buf += d;
        events = (buf.match(/\ndata: /g) || []).length;
        if (quitter && events >= 3) {
          sock.destroy();
          resolve({ quitter, ok: true });
        }
      });
      sock.on('error', (e) => reject(e));
      sock.on('close', () => {
        if (quitter) return resolve({ quitter, ok: true });
        const [resp] = parseResponses(buf);
        const data = resp ? sseData(resp.body) : [];
        const chunks = data.filter((d) => d !== '[DONE]').map((d) => JSON.parse(d));
        resolve({ quitter, ok: resp?.status === 200 && data[data.length - 1] === '[DONE]' &&
          chunks.length === 40 && chunks[39].choices[0].finish_reason === 'length', buf });
      });
    }));
  }
  const res = await Promise.all(clients);
  const bad = res.filter((r) => !r.ok);
  assert.equal(bad.length, 0, bad[0]?.buf?.slice(0, 500));
  assert.equal((await raw(port, 'GET', '/health')).status, 200);
  // aborted requests free their blocks at the engine's next step
  let m;
  for (let i = 0; i < 100; i++) {
    m = await metrics(port);
    if (metricValue(m, 'vllm:kv_cache_usage_perc') === 0 && metricValue(m, 'vllm:num_requests_running') === 0) break;
    await sleep(100);
  }
  assert.equal(metricValue(m, 'vllm:kv_cache_usage_perc'), 0, m);
  assert.equal(metricValue(m, 'vllm:num_requests_running'), 0);
  assert.equal(metricValue(m, 'vllm:num_requests_waiting'), 0);
  const aborted = m.split('\n').find((l) => l.startsWith('vllm:request_success_total') && l.includes('"abort"'));
  assert.ok(parseFloat(aborted.split(' ').pop()) >= Math.floor(N / 3) - 1, aborted);
  // and it still generates
  const r = await post('/v1/completions', { prompt: [1, 2, 3], max_tokens: 3 });
  assert.equal(r.status, 200);
});

test('/metrics: vLLM names, passes promtool check metrics', async () => {
  const text = await metrics(port);
  for (const name of ['vllm:num_requests_running', 'vllm:num_requests_waiting', 'vllm:kv_cache_usage_perc',
    'vllm:prompt_tokens_total', 'vllm:generation_tokens_total', 'vllm:request_success_total',
    'vllm:num_preemptions_total', 'vllm:prefix_cache_queries_total', 'vllm:prefix_cache_hits_total',
    'vllm:time_to_first_token_seconds_bucket', 'vllm:inter_token_latency_seconds_count',
    'vllm:e2e_request_latency_seconds_sum', 'vllm:request_prompt_tokens_bucket',
    'vllm:request_generation_tokens_count']) {
    assert.ok(text.includes(`\n${name}{model_name="tiny"`), name);
  }
  assert.ok(metricValue(text, 'vllm:generation_tokens_total') > 0);
  assert.ok(metricValue(text, 'vllm:time_to_first_token_seconds_count') > 0);
  // promtool's one complaint is the ':' that vLLM's own names carry (a lint rule reserving
  // colons for recording rules); with it renamed away the text must be entirely clean.
  const p = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8' });
  const problems = (p.stdout + p.stderr).split('\n').filter((l) => l.trim());
  assert.ok(p.status === 0 || p.status === 3, `promtool exit ${p.status}: ${p.stdout}${p.stderr}`);
  for (const l of problems) assert.match(l, /metric names should not contain ':'/);
  const renamed = text.replace(/vllm:/g, 'vllm_');
  const q = spawnSync('promtool', ['check', 'metrics'], { input: renamed, encoding: 'utf8' });
  assert.equal(q.status, 0, q.stdout + q.stderr);
});
