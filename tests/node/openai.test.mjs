// duet-decode on the golden tiny-v3 model, driven by the official OpenAI client: greedy token
// ids (non-streamed and streamed, several prompts, n > 1) equal the golden greedy ids; logprobs,
// echo, stop strings and stop token ids, usage, /v1/models, /tokenize and /detokenize, and the
// clean 400 for a chat prompt whose ids exceed the model's 2048-token vocabulary.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { goldenCases, requireEnv, startGolden } from './lib.mjs';

requireEnv();
const cases = goldenCases();
let server;
let client;

before(async () => {
  server = await startGolden();
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
});

after(async () => {
  const x = await server.stop();
  assert.deepEqual(x, { code: 0, signal: null }, server.log);
});

test('completions: greedy ids of every golden case (return_token_ids)', async () => {
  await Promise.all(cases.map(async (c) => {
    const r = await client.completions.create({
      model: 'tiny', prompt: c.prompt_ids, max_tokens: c.greedy_ids.length, temperature: 0,
      ignore_eos: true, return_token_ids: true,
    });
    assert.equal(r.object, 'text_completion');
    assert.equal(r.choices.length, 1);
    const ch = r.choices[0];
    assert.deepEqual(ch.token_ids, c.greedy_ids, c.name);
    assert.deepEqual(ch.prompt_token_ids, c.prompt_ids);
    assert.equal(ch.finish_reason, 'length');
    assert.equal(r.usage.prompt_tokens, c.prompt_ids.length);
    assert.equal(r.usage.completion_tokens, c.greedy_ids.length);
    assert.equal(r.usage.total_tokens, c.prompt_ids.length + c.greedy_ids.length);
  }));
});

test('completions: streamed greedy ids, one chunk per token, usage chunk, [DONE]', async () => {
  for (const c of cases.slice(0, 3)) {
    const stream = await client.completions.create({
      model: 'tiny', prompt: c.prompt_ids, max_tokens: c.greedy_ids.length, temperature: 0,
      ignore_eos: true, return_token_ids: true, stream: true,
      stream_options: { include_usage: true },
    });
    const ids = [];
    let text = '';
    let finish = null;
    let usage = null;
    let chunks = 0;
    for await (const chunk of stream) {
      if (chunk.choices.length === 0) {
        usage = chunk.usage;
        continue;
      }
      chunks++;
      assert.equal(finish, null, 'no chunk after the finish');
      ids.push(...chunk.choices[0].token_ids);
      text += chunk.choices[0].text;
      finish = chunk.choices[0].finish_reason;
    }
    assert.deepEqual(ids, c.greedy_ids, c.name);
    assert.equal(chunks, c.greedy_ids.length);
    assert.equal(finish, 'length');
    assert.equal(usage.completion_tokens, c.greedy_ids.length);
    assert.equal(usage.prompt_tokens, c.prompt_ids.length);
    const whole = await client.completions.create({
      model: 'tiny', prompt: c.prompt_ids, max_tokens: c.greedy_ids.length, temperature: 0,
      ignore_eos: true,
    });
    assert.equal(text, whole.choices[0].text, 'streamed text equals the whole text');
  }
});

test('completions: several prompts in one request, n = 2 each', async () => {
  const cs = cases.slice(0, 3);
  const max = Math.min(...cs.map((c) => c.greedy_ids.length));
  const r = await client.completions.create({
    model: 'tiny', prompt: cs.map((c) => c.prompt_ids), n: 2, max_tokens: max, temperature: 0,
    ignore_eos: true, return_token_ids: true,
  });
  assert.equal(r.choices.length, 6);
  r.choices.forEach((ch, i) => {
    assert.equal(ch.index, i);
    assert.deepEqual(ch.token_ids, cs[Math.floor(i / 2)].greedy_ids.slice(0, max));
  });
  assert.equal(r.usage.prompt_tokens, cs.reduce((a, c) => a + c.prompt_ids.length, 0));
  assert.equal(r.usage.completion_tokens, 6 * max);
});

test('completions: logprobs (legacy format) agree with the greedy choice', async () => {
  const c = cases[1];
  const r = await client.completions.create({
    model: 'tiny', prompt: c.prompt_ids, max_tokens: 4, temperature: 0, ignore_eos: true,
    logprobs: 3, return_token_ids: true,
  });
  const lp = r.choices[0].logprobs;
  assert.equal(lp.tokens.length, 4);
  assert.equal(lp.token_logprobs.length, 4);
  assert.equal(lp.text_offset.length, 4);
  assert.equal(lp.top_logprobs.length, 4);
  for (let i = 0; i < 4; i++) {
    const top = lp.top_logprobs[i];
    assert.ok(Object.keys(top).length >= 1 && Object.keys(top).length <= 4);
    // greedy: the chosen token is the most likely one
    const best = Math.max(...Object.values(top));
    assert.ok(Math.abs(lp.token_logprobs[i] - best) < 1e-5, JSON.stringify(top));
    assert.ok(lp.token_logprobs[i] <= 0);
    if (i > 0) assert.ok(lp.text_offset[i] >= lp.text_offset[i - 1]);
  }
});

test('completions: echo with logprobs covers the prompt, first prompt token without one', async () => {
  const c = cases[1];
  const r = await client.completions.create({
    model: 'tiny', prompt: c.prompt_ids, max_tokens: 3, temperature: 0, ignore_eos: true,
    echo: true, logprobs: 1,
  });
  const plain = await client.completions.create({
    model: 'tiny', prompt: c.prompt_ids, max_tokens: 3, temperature: 0, ignore_eos: true,
  });
  const det = await (await fetch(`${server.url}/detokenize`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ tokens: c.prompt_ids }),
  })).json();
  assert.equal(r.choices[0].text, det.prompt + plain.choices[0].text);
  const lp = r.choices[0].logprobs;
  assert.equal(lp.tokens.length, c.prompt_ids.length + 3);
  assert.equal(lp.token_logprobs[0], null);
  assert.equal(lp.top_logprobs[0], null);
  for (let i = 1; i < lp.token_logprobs.length; i++) assert.equal(typeof lp.token_logprobs[i], 'number');
  // a request that ends on its first token still reports the prompt's logprobs
  const one = await client.completions.create({
    model: 'tiny', prompt: c.prompt_ids, max_tokens: 1, echo: true, logprobs: 0,
  });
  const lp1 = one.choices[0].logprobs.token_logprobs;
  assert.equal(lp1.length, c.prompt_ids.length + 1);
  assert.equal(lp1[0], null);
  lp1.slice(1).forEach((x, i) => assert.equal(typeof x, 'number', `position ${i + 1}`));
  assert.deepEqual(lp1.slice(1, c.prompt_ids.length), lp.token_logprobs.slice(1, c.prompt_ids.length));
});

test('completions: text prompt gets BOS; stop token ids and stop strings', async () => {
  const tk = await (await fetch(`${server.url}/tokenize`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt: 'hello' }),
  })).json();
  assert.equal(tk.tokens[0], 0, 'BOS first');
  assert.equal(tk.count, tk.tokens.length);
  assert.equal(tk.max_model_len, 4096);
  const c = cases[0];
  const stopId = c.greedy_ids[3];
  const firstAt = c.greedy_ids.indexOf(stopId);
  const r = await client.completions.create({
    model: 'tiny', prompt: c.prompt_ids, max_tokens: 16, temperature: 0,
    stop_token_ids: [stopId], return_token_ids: true,
  });
  assert.equal(r.choices[0].finish_reason, 'stop');
  assert.equal(r.choices[0].stop_reason, stopId);
  assert.deepEqual(r.choices[0].token_ids, c.greedy_ids.slice(0, firstAt + 1));

  const whole = await client.completions.create({
    model: 'tiny', prompt: c.prompt_ids, max_tokens: 16, temperature: 0, ignore_eos: true,
  });
  const text = whole.choices[0].text;
  const chars = [...text].filter((ch) => ch !== '\ufffd' && ch.trim());
  const stop = chars[Math.floor(chars.length / 2)];
  const cut = text.indexOf(stop);
  for (const stream of [false, true]) {
    const args = { model: 'tiny', prompt: c.prompt_ids, max_tokens: 16, temperature: 0, ignore_eos: true, stop: [stop] };
    let got = '';
    let finish;
    let stopReason;
    if (stream) {
      for await (const ch of await client.completions.create({ ...args, stream: true })) {
        got += ch.choices[0].text;
        finish = ch.choices[0].finish_reason || finish;
        stopReason = ch.choices[0].stop_reason || stopReason;
      }
    } else {
      const s = await client.completions.create(args);
      got = s.choices[0].text;
      finish = s.choices[0].finish_reason;
      stopReason = s.choices[0].stop_reason;
    }
    assert.equal(got, text.slice(0, cut), `stream=${stream}`);
    assert.equal(finish, 'stop');
    assert.equal(stopReason, stop);
  }
});

test('models, version, tokenize round trip', async () => {
  const list = await client.models.list();
  const models = [];
  for await (const m of list) models.push(m);
  assert.equal(models.length, 1);
  assert.equal(models[0].id, 'tiny');
  assert.equal(models[0].object, 'model');
  assert.equal(models[0].max_model_len, 4096);
  assert.ok(models[0].root.endsWith('model'));
  assert.ok(Array.isArray(models[0].permission));
  const v = await (await fetch(`${server.url}/version`)).json();
  assert.match(v.version, /^\d+\.\d+\.\d+/);
  const text = 'Hello, 世界! 🙂';
  const tk = await (await fetch(`${server.url}/tokenize`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ prompt: text, add_special_tokens: false }),
  })).json();
  const dt = await (await fetch(`${server.url}/detokenize`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ tokens: tk.tokens }),
  })).json();
  assert.equal(dt.prompt, text);
});

test('chat on the 2048-token golden model: prompt ids out of vocabulary are a clean 400', async () => {
  await assert.rejects(
    client.chat.completions.create({ model: 'tiny', messages: [{ role: 'user', content: 'hi' }] }),
    (e) => e.status === 400 && /out of vocabulary/.test(e.message));
  // and the server still answers
  const r = await client.completions.create({ model: 'tiny', prompt: [0, 1, 2], max_tokens: 1 });
  assert.equal(r.choices.length, 1);
});

test('unknown model is 404 NotFoundError', async () => {
  await assert.rejects(
    client.completions.create({ model: 'nope', prompt: [1, 2], max_tokens: 1 }),
    (e) => e.status === 404 && e.error?.param === 'model');
});
