// The official openai client through duet-proxy (stub backends behind it): completions and chat,
// streamed and not, an API key, a backend's 400 surfacing as the client's BadRequestError, and
// a decode dying mid-stream surfacing as an error inside the stream rather than a silent end.
// Usage: node roundtrip.mjs PROXY_PORT DECODE_STUB_PORT
import assert from "node:assert/strict";
import OpenAI from "openai";

const [port, decodePort] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "test-key", maxRetries: 0 });
let passed = 0;
const check = async (name, fn) => {
  await fn();
  passed++;
  console.log(`ok ${name}`);
};

await check("completion", async () => {
  const r = await client.completions.create({ model: "duet-stub", prompt: "hello", max_tokens: 3 });
  assert.equal(r.choices[0].text, "tok0 tok1 tok2 ");
  assert.equal(r.usage.completion_tokens, 3);
});

await check("completion stream", async () => {
  const s = await client.completions.create({ model: "duet-stub", prompt: "hi", max_tokens: 5, stream: true, min_tokens: 2 });
  let text = "";
  for await (const chunk of s) text += chunk.choices[0]?.text ?? "";
  assert.equal(text, "tok0 tok1 tok2 tok3 tok4 ");
});

await check("chat", async () => {
  const r = await client.chat.completions.create({ model: "duet-stub", messages: [{ role: "user", content: "hi" }], max_completion_tokens: 2 });
  assert.equal(r.choices[0].message.content, "tok0 tok1 ");
});

await check("chat stream with usage", async () => {
  const s = await client.chat.completions.create({
    model: "duet-stub", messages: [{ role: "user", content: "hi" }], max_tokens: 4, stream: true,
    stream_options: { include_usage: true },
  });
  let text = "", usage = null;
  for await (const chunk of s) {
    text += chunk.choices[0]?.delta?.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  assert.equal(text, "tok0 tok1 tok2 tok3 ");
  assert.equal(usage.completion_tokens, 4);
});

await check("models", async () => {
  const m = await client.models.list();
  assert.equal(m.data[0].id, "duet-stub");
});

await check("backend 400 passes through", async () => {
  await assert.rejects(client.completions.create({ model: "duet-stub", max_tokens: 3 }),
    (e) => e instanceof OpenAI.BadRequestError && /prompt/.test(e.message));
});

await check("wrong key is 401", async () => {
  const bad = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: "nope", maxRetries: 0 });
  await assert.rejects(bad.models.list(), (e) => e instanceof OpenAI.AuthenticationError);
});

await check("decode dies mid-stream: an error, not a silent end", async () => {
  const ctl = await fetch(`http://127.0.0.1:${decodePort}/stub/control`, {
    method: "POST", body: JSON.stringify({ fail: "close", after: 2, count: 1 }),
  });
  assert.equal(ctl.status, 200);
  const s = await client.completions.create({ model: "duet-stub", prompt: "hi", max_tokens: 8, stream: true });
  let text = "";
  await assert.rejects(async () => {
    for await (const chunk of s) text += chunk.choices[0]?.text ?? "";
  }, (e) => e instanceof OpenAI.APIError && /mid-stream/.test(e.message));
  assert.equal(text, "tok0 tok1 ");
});

console.log(`${passed} passed, 0 failed`);
