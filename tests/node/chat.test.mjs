// Chat completions through the official OpenAI client, on the golden model's shapes with
// DeepSeek's full vocabulary (random weights, --load-format dummy) and the R1 tokenizer with
// --reasoning-parser deepseek_r1: response and chunk shapes, role only in the first chunk,
// one chunk per token, finish and usage chunks, streamed text equal to the whole answer,
// logprobs/top_logprobs, n, seeds, return_token_ids against /tokenize, continue_final_message,
// and the reasoning split (no "</think>" from random weights: all of it is reasoning).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { GOLDEN, Server, freePort, largeVocabModel, requireEnv } from './lib.mjs';

requireEnv();
let server;
let client;
let modelDir;
const msgs = [{ role: 'system', content: 'You are terse.' }, { role: 'user', content: 'Say hi.' }];

before(async () => {
  modelDir = largeVocabModel();
  const port = await freePort();
  server = new Server(['--model', modelDir, '--tokenizer', path.join(GOLDEN, 'tokenizer-r1'),
    '--load-format', 'dummy', '--served-model-name', 'r1-tiny', '--host', '127.0.0.1',
    '--port', String(port), '--kv-cache-memory', '32M', '--reasoning-parser', 'deepseek_r1'],
  { port });
  await server.ready();
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
});

after(async () => {
  const x = await server.stop();
  fs.rmSync(modelDir, { recursive: true, force: true });
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
});

async function collect(args) {
  const chunks = [];
  for await (const c of await client.chat.completions.create({ ...args, stream: true })) chunks.push(c);
  return chunks;
}

test('chat: whole response shape, reasoning split, usage', async () => {
  const r = await client.chat.completions.create({
    model: 'r1-tiny', messages: msgs, max_tokens: 8, temperature: 0, ignore_eos: true,
  });
  assert.equal(r.object, 'chat.completion');
  assert.match(r.id, /^chatcmpl-/);
  assert.equal(r.model, 'r1-tiny');
  assert.equal(r.choices.length, 1);
  const m = r.choices[0].message;
  assert.equal(m.role, 'assistant');
  // random weights never write "</think>": everything is reasoning, content null (as vLLM)
  assert.equal(typeof m.reasoning_content, 'string');
  assert.ok(m.reasoning_content.length > 0);
  assert.equal(m.content, null);
  assert.equal(r.choices[0].finish_reason, 'length');
  assert.equal(r.usage.completion_tokens, 8);
  assert.ok(r.usage.prompt_tokens > 5);
});

test('chat: stream has role first only, one chunk per token, finish, usage, same text', async () => {
  const args = { model: 'r1-tiny', messages: msgs, max_completion_tokens: 10, temperature: 0,
    ignore_eos: true, stream_options: { include_usage: true }, return_token_ids: true };
  const chunks = await collect(args);
  const usage = chunks.filter((c) => c.choices.length === 0);
  const body = chunks.filter((c) => c.choices.length > 0);
  assert.equal(usage.length, 1);
  assert.equal(usage[0].usage.completion_tokens, 10);
  assert.equal(chunks[chunks.length - 1], usage[0], 'usage chunk last');
  assert.equal(body.length, 10, 'one chunk per generated token');
  assert.equal(body[0].choices[0].delta.role, 'assistant');
  for (const c of body.slice(1)) assert.equal(c.choices[0].delta.role, undefined);
  for (const c of body.slice(0, -1)) assert.equal(c.choices[0].finish_reason, null);
  assert.equal(body[body.length - 1].choices[0].finish_reason, 'length');
  assert.ok(Array.isArray(body[0].prompt_token_ids));
  let reasoning = '';
  let content = '';
  const ids = [];
  for (const c of body) {
    assert.equal(c.object, 'chat.completion.chunk');
    reasoning += c.choices[0].delta.reasoning_content || '';
    content += c.choices[0].delta.content || '';
    ids.push(...c.choices[0].token_ids);
  }
  assert.equal(ids.length, 10);
  const { stream_options: _, ...plain } = args;
  const whole = await client.chat.completions.create({ ...plain, stream: false });
  assert.equal(reasoning, whole.choices[0].message.reasoning_content);
  assert.equal(content, whole.choices[0].message.content || '');
  assert.deepEqual(ids, whole.choices[0].token_ids);
  const tk = await (await fetch(`${server.url}/tokenize`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ model: 'r1-tiny', messages: msgs }),
  })).json();
  assert.deepEqual(whole.prompt_token_ids, tk.tokens, 'prompt ids are the rendered template');
  assert.deepEqual(body[0].prompt_token_ids, tk.tokens);
});

test('chat: logprobs with top_logprobs', async () => {
  const r = await client.chat.completions.create({
    model: 'r1-tiny', messages: msgs, max_tokens: 5, temperature: 0, ignore_eos: true,
    logprobs: true, top_logprobs: 3,
  });
  const lp = r.choices[0].logprobs.content;
  assert.equal(lp.length, 5);
  for (const e of lp) {
    assert.equal(typeof e.token, 'string');
    assert.ok(e.logprob <= 0);
    assert.ok(Array.isArray(e.bytes));
    assert.equal(e.top_logprobs.length, 3);
    assert.ok(Math.abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5, 'greedy picks the top');
  }
  await assert.rejects(client.chat.completions.create({
    model: 'r1-tiny', messages: msgs, max_tokens: 2, top_logprobs: 2 }), (e) => e.status === 400);
});

test('chat: n choices, seeded sampling repeats, streamed choices indexed', async () => {
  const args = { model: 'r1-tiny', messages: msgs, max_tokens: 6, temperature: 1.0, seed: 1234,
    n: 3, ignore_eos: true, return_token_ids: true };
  const a = await client.chat.completions.create(args);
  const b = await client.chat.completions.create(args);
  assert.equal(a.choices.length, 3);
  assert.deepEqual(a.choices.map((c) => c.token_ids), b.choices.map((c) => c.token_ids));
  assert.deepEqual(a.choices.map((c) => c.index), [0, 1, 2]);
  const chunks = await collect(args);
  const per = [[], [], []];
  for (const c of chunks) for (const ch of c.choices) per[ch.index].push(...ch.token_ids);
  assert.deepEqual(per, a.choices.map((c) => c.token_ids));
});

test('chat: continue_final_message, array content parts, bad messages', async () => {
  const r = await client.chat.completions.create({
    model: 'r1-tiny', max_tokens: 2, ignore_eos: true, add_generation_prompt: false,
    continue_final_message: true, return_token_ids: true,
    messages: [{ role: 'user', content: [{ type: 'text', text: 'Count:' }] },
      { role: 'assistant', content: 'one two' }],
  });
  assert.equal(r.choices[0].token_ids.length, 2);
  await assert.rejects(client.chat.completions.create({
    model: 'r1-tiny', messages: [{ role: 'wizard', content: 'x' }] }), (e) => e.status === 400);
  await assert.rejects(client.chat.completions.create({
    model: 'r1-tiny', messages: [] }), (e) => e.status === 400);
  await assert.rejects(client.chat.completions.create({
    model: 'r1-tiny', messages: msgs, max_tokens: 5000 }),
  (e) => e.status === 400 && /maximum context length is 4096 tokens/.test(e.message));
});
