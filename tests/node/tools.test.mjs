// Chat templates, tool calls and V3.1 thinking end to end, with the official openai client:
//   - every golden template case through /tokenize (messages, tools, chat_template,
//     chat_template_kwargs, add_generation_prompt): ids equal, and the ids decode to the golden
//     text byte for byte;
//   - a chat request with tools gets them rendered into its prompt exactly as the goldens say;
//   - tool_choice: auto needs the server flags, required and named functions are refused, none
//     renders the tools and parses nothing;
//   - a scripted checkpoint (lib.mjs scriptedModel: greedy answers known in advance) answers
//     with DeepSeek-V3.1 tool-call markup: tool_calls whole and streamed (the name first, then
//     the argument deltas), finish_reason "tool_calls", reasoning split when thinking is on;
//     the V3 parser given V3.1 markup falls back to plain content.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { GOLDEN, Server, freePort, requireEnv, scriptedModel } from './lib.mjs';

requireEnv();
const golden = JSON.parse(fs.readFileSync(path.join(GOLDEN, 'tokenizer-cases', 'template_cases.json'), 'utf8'));
const tplFile = (name) => path.join(GOLDEN, 'chat-templates', `${name}.jinja`);
const tplText = (name) => name === 'v3_tokenizer_config'
  ? JSON.parse(fs.readFileSync(path.join(GOLDEN, 'tokenizer', 'tokenizer_config.json'), 'utf8')).chat_template
  : fs.readFileSync(tplFile(name), 'utf8');

// The scripted answers (token ids of the DeepSeek tokenizers):
//   after "</think>" (the V3.1 prompt without thinking):
//     <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Paris"}
//     <｜tool▁call▁end｜><｜tool▁calls▁end｜> then EOS
//   after "<think>" (with thinking): "Checking the weather." "</think>" and the same call
//   after "\n" (the V3 tools template's prompt end): "Sure" and the same V3.1 markup
const CALL = [128806, 128808, 1133, 65, 50219, 128814, 24313, 37399, 3362, 582, 51119, 62773,
  128809, 128807, 1];
const chain = [];
const link = (seq) => { for (let i = 0; i + 1 < seq.length; i++) chain.push([seq[i], seq[i + 1]]); };
link([128799, ...CALL]);
link([128798, 123452, 270, 9670, 16, 128799]);
link([201, 53624, 128806]);
const ARGS = '{"city": "Paris"}';
const MARKUP = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>' + ARGS +
  '<｜tool▁call▁end｜><｜tool▁calls▁end｜>';

const weatherTools = golden.cases.find((c) => c.tools).tools;
let dirs = [], v3, v31, c3, c31;

function start(dir, tokenizer, extra) {
  return freePort().then((port) => new Server(['serve', dir, '--tokenizer', path.join(GOLDEN, tokenizer),
    '--served-model-name', 'scripted', '--host', '127.0.0.1', '--port', String(port),
    '--kv-cache-memory', '32M', ...extra], { port }).ready());
}

before(async () => {
  // one checkpoint per tokenizer directory (duet-mkmodel copies it next to the weights)
  dirs = [scriptedModel(chain, path.join(GOLDEN, 'tokenizer')),
    scriptedModel(chain, path.join(GOLDEN, 'tokenizer-r1'))];
  [v3, v31] = await Promise.all([
    start(dirs[0], 'tokenizer', ['--chat-template', tplFile('deepseek_v3_tools'),
      '--enable-auto-tool-choice', '--tool-call-parser', 'deepseek_v3']),
    start(dirs[1], 'tokenizer-r1', ['--chat-template', tplFile('deepseek_v31_tools'),
      '--enable-auto-tool-choice', '--tool-call-parser', 'deepseek_v31',
      '--reasoning-parser', 'deepseek_v3']),
  ]);
  c3 = new OpenAI({ baseURL: `${v3.url}/v1`, apiKey: 'none', maxRetries: 0 });
  c31 = new OpenAI({ baseURL: `${v31.url}/v1`, apiKey: 'none', maxRetries: 0 });
});

after(async () => {
  for (const s of [v3, v31]) if (s) assert.deepEqual(await s.stop(), { code: 0, signal: null }, s.log);
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

async function post(server, route, body) {
  const r = await fetch(`${server.url}${route}`, { method: 'POST',
    headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  return { status: r.status, json: await r.json() };
}

// The goldens are transformers rendering the messages as given. A server first prepares them as
// vLLM does (chat.h): a tool call's "arguments" string is parsed into JSON (so a template's
// tojson writes the object, not a quoted string), and an assistant's null content becomes "".
// For conversations with assistant tool calls the expected text is the golden one with that
// one difference applied (ids then come from the text); the tokenizer_config.json template of
// DeepSeek-V3 picks its tool-call branch by "content is none", so its cases with a null
// assistant content render as vLLM renders them and are left to the interpreter's unit test.
const toolCalls = (c) => c.messages.flatMap((m) => (m.role === 'assistant' && m.tool_calls) || []);
const nullAssistant = (c) => c.messages.some((m) => m.role === 'assistant' && m.content === null);
const httpCases = golden.cases.filter((c) => !(c.template === 'v3_tokenizer_config' && nullAssistant(c)));
function vllmText(c) {
  let t = c.text;
  for (const call of toolCalls(c)) {
    const a = call.function.arguments;
    t = t.split(JSON.stringify(a)).join(a);
  }
  return t;
}

test('/tokenize renders every golden template case: ids equal, text equal byte for byte', async () => {
  assert.ok(httpCases.length >= 40);
  for (const t of ['deepseek_r1_tools', 'deepseek_v31_tools', 'deepseek_v3_tools'])
    assert.equal(httpCases.filter((c) => c.template === t).length,
      golden.cases.filter((c) => c.template === t).length, `every ${t} case`);
  const failures = [];
  for (const c of httpCases) {
    const body = { messages: c.messages, add_generation_prompt: c.add_generation_prompt,
      chat_template: tplText(c.template), chat_template_kwargs: c.chat_template_kwargs,
      return_token_strs: true };
    if (c.tools) body.tools = c.tools;
    const r = await post(v3, '/tokenize', body);
    const what = `${c.template} ${c.messages.map((m) => m.role).join(',')} agp=${c.add_generation_prompt} ${JSON.stringify(c.chat_template_kwargs)}`;
    if (r.status !== 200) {
      failures.push(`${what}: ${JSON.stringify(r.json)}`);
      continue;
    }
    const d = await post(v3, '/detokenize', { tokens: r.json.tokens });
    const prepared = toolCalls(c).length > 0;
    const want = prepared ? vllmText(c) : c.text;
    if ((!prepared && JSON.stringify(r.json.tokens) !== JSON.stringify(c.ids)) || d.json.prompt !== want)
      failures.push(`${what}:\n got  ${JSON.stringify(d.json.prompt)}\n want ${JSON.stringify(want)}`);
  }
  assert.deepEqual(failures, []);
  // the server's own template (--chat-template) without chat_template
  const c = golden.cases.find((x) => x.template === 'deepseek_v3_tools' && x.tools && x.add_generation_prompt);
  const r = await post(v3, '/tokenize', { messages: c.messages, tools: c.tools });
  assert.deepEqual(r.json.tokens, c.ids);
  // a template it cannot interpret: 400 naming the line, nothing else lost
  const bad = await post(v3, '/tokenize', { messages: c.messages, chat_template: 'a\n{% include "x" %}' });
  assert.equal(bad.status, 400);
  assert.match(bad.json.error.message, /line 2/);
});

test('chat with tools: the prompt is the golden rendering (return_token_ids)', async () => {
  const c = golden.cases.find((x) => x.template === 'deepseek_v3_tools' && x.tools &&
    x.add_generation_prompt && x.messages.length === 1);
  const r = await c3.chat.completions.create({ model: 'scripted', messages: c.messages,
    tools: c.tools, temperature: 0, max_tokens: 30, return_token_ids: true });
  assert.deepEqual(r.prompt_token_ids, c.ids);
  // V3.1 markup is not what the V3 parser reads: the whole answer stays content
  assert.equal(r.choices[0].message.content, 'Sure' + MARKUP);
  assert.deepEqual(r.choices[0].message.tool_calls, []);
  assert.equal(r.choices[0].finish_reason, 'stop');
  const c31case = golden.cases.find((x) => x.template === 'deepseek_v31_tools' && x.tools &&
    x.add_generation_prompt && x.messages.length === 1 && !x.chat_template_kwargs.thinking);
  const r31 = await c31.chat.completions.create({ model: 'scripted', messages: c31case.messages,
    tools: c31case.tools, temperature: 0, max_tokens: 30, return_token_ids: true });
  const text = await post(v31, '/detokenize', { tokens: r31.prompt_token_ids });
  assert.equal(text.json.prompt, c31case.text);
});

test('tool_choice: required and named refused, none renders without parsing, bad tools', async () => {
  const msgs = [{ role: 'user', content: 'Weather in Paris?' }];
  const base = { model: 'scripted', messages: msgs, tools: weatherTools, max_tokens: 30, temperature: 0 };
  await assert.rejects(c31.chat.completions.create({ ...base, tool_choice: 'required' }),
    (e) => e.status === 400 && /constrained decoding/.test(e.message));
  await assert.rejects(c31.chat.completions.create({ ...base,
    tool_choice: { type: 'function', function: { name: 'get_weather' } } }),
  (e) => e.status === 400 && /constrained decoding/.test(e.message));
  await assert.rejects(c31.chat.completions.create({ ...base,
    tool_choice: { type: 'function', function: { name: 'nope' } } }),
  (e) => e.status === 400 && /not found in tools/.test(e.message));
  await assert.rejects(c31.chat.completions.create({ model: 'scripted', messages: msgs, tool_choice: 'auto' }),
    (e) => e.status === 400 && /`tools` must be set/.test(e.message));
  await assert.rejects(c31.chat.completions.create({ ...base, tools: [{ type: 'function', function: {} }] }),
    (e) => e.status === 400 && /tools\[0\]/.test(e.message));
  await assert.rejects(c31.chat.completions.create({ ...base, chat_template: '{{ messages }}' }),
    (e) => e.status === 400 && /--trust-request-chat-template is not set/.test(e.message));
  const none = await c31.chat.completions.create({ ...base, tool_choice: 'none' });
  assert.equal(none.choices[0].message.content, MARKUP);
  assert.deepEqual(none.choices[0].message.tool_calls, []);
  assert.equal(none.choices[0].finish_reason, 'stop');
});

test('V3.1 tool calls: whole answer and stream (name first, then argument deltas)', async () => {
  const args = { model: 'scripted', messages: [{ role: 'user', content: 'Weather in Paris?' }],
    tools: weatherTools, temperature: 0, max_tokens: 30, n: 2 };
  const r = await c31.chat.completions.create(args);
  assert.equal(r.choices.length, 2);
  for (const ch of r.choices) {
    assert.equal(ch.finish_reason, 'tool_calls');
    assert.equal(ch.message.content, null);
    assert.equal(ch.message.reasoning_content, null);
    assert.equal(ch.message.tool_calls.length, 1);
    const call = ch.message.tool_calls[0];
    assert.equal(call.type, 'function');
    assert.match(call.id, /\S/);
    assert.equal(call.function.name, 'get_weather');
    assert.equal(call.function.arguments, ARGS);
  }
  const s = await c31.chat.completions.create({ ...args, n: 1, stream: true });
  const deltas = [];
  let finish = null;
  for await (const chunk of s) {
    for (const ch of chunk.choices) {
      if (ch.delta.tool_calls) deltas.push(...ch.delta.tool_calls);
      if (ch.finish_reason) finish = ch.finish_reason;
      assert.ok(!ch.delta.content, `no content expected, got ${JSON.stringify(ch.delta)}`);
    }
  }
  assert.equal(finish, 'tool_calls');
  assert.ok(deltas.length >= 2, JSON.stringify(deltas));
  assert.equal(deltas[0].index, 0);
  assert.equal(deltas[0].type, 'function');
  assert.equal(deltas[0].function.name, 'get_weather');
  assert.ok(deltas[0].id);
  for (const d of deltas.slice(1)) {
    assert.equal(d.index, 0);
    assert.equal(d.function.name, undefined);
  }
  assert.equal(deltas.map((d) => d.function.arguments || '').join(''), ARGS);
});

test('V3.1 thinking: chat_template_kwargs.thinking renders <think> and splits the reasoning', async () => {
  const base = { model: 'scripted', messages: [{ role: 'user', content: 'Weather in Paris?' }],
    tools: weatherTools, temperature: 0, max_tokens: 40, return_token_ids: true };
  const r = await c31.chat.completions.create({ ...base, chat_template_kwargs: { thinking: true } });
  const want = golden.cases.find((x) => x.template === 'deepseek_v31_tools' && x.tools &&
    x.add_generation_prompt && x.messages.length === 1 && x.chat_template_kwargs.thinking);
  assert.equal((await post(v31, '/detokenize', { tokens: r.prompt_token_ids })).json.prompt, want.text);
  const m = r.choices[0].message;
  assert.equal(m.reasoning_content, 'Checking the weather.');
  assert.equal(m.content, null);
  assert.equal(m.tool_calls[0].function.arguments, ARGS);
  assert.equal(r.choices[0].finish_reason, 'tool_calls');
  const s = await c31.chat.completions.create({ ...base, chat_template_kwargs: { thinking: true },
    stream: true });
  let reasoning = '', args = '', finish = null, reasoningDone = false;
  for await (const chunk of s) {
    for (const ch of chunk.choices) {
      if (ch.delta.reasoning_content) {
        assert.ok(!reasoningDone, 'reasoning after a tool call delta');
        reasoning += ch.delta.reasoning_content;
      }
      for (const d of ch.delta.tool_calls || []) {
        reasoningDone = true;
        args += d.function.arguments || '';
      }
      if (ch.finish_reason) finish = ch.finish_reason;
    }
  }
  assert.equal(reasoning, 'Checking the weather.');
  assert.equal(args, ARGS);
  assert.equal(finish, 'tool_calls');
  // thinking off: no split, and without tools the markup is plain content
  const off = await c31.chat.completions.create({ model: 'scripted', max_tokens: 40, temperature: 0,
    messages: [{ role: 'user', content: 'Hello!' }] });
  assert.equal(off.choices[0].message.reasoning_content, null);
  assert.equal(off.choices[0].message.content, MARKUP);
});

test('auto tool choice needs the server flags (vLLM\'s message)', async () => {
  const port = await freePort();
  const plain = await new Server(['--model', dirs[1], '--served-model-name', 'scripted',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '16M',
    '--chat-template', tplFile('deepseek_v31_tools')], { port }).ready();
  try {
    const c = new OpenAI({ baseURL: `${plain.url}/v1`, apiKey: 'none', maxRetries: 0 });
    await assert.rejects(c.chat.completions.create({ model: 'scripted', tools: weatherTools,
      messages: [{ role: 'user', content: 'x' }] }),
    (e) => e.status === 400 &&
      /"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser/.test(e.message));
  } finally {
    await plain.stop();
  }
});
