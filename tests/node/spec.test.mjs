// MTP drafts end to end on a scripted checkpoint (lib.mjs scriptedModel with an MTP module that
// drafts exactly what the model predicts next): greedy decoding along a chain of tokens with
// 1 and 3 drafts a step gives the chain, and every draft is accepted (vLLM's spec_decode
// counters). The drafts are the module's own argmax, taken by the backend's sampling ops: a
// wrong row, token or offset there shows as rejected drafts here.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, test } from 'node:test';

import { GOLDEN, Server, freePort, metricValue, metrics, requireEnv, scriptedModel } from './lib.mjs';

requireEnv();
// a chain of ordinary token ids: after each comes the next
const ids = [];
for (let t = 1000; ids.length < 40; t += 37) ids.push(t);
const chain = [];
for (let i = 0; i + 1 < ids.length; i++) chain.push([ids[i], ids[i + 1]]);
const dir = scriptedModel(chain, path.join(GOLDEN, 'tokenizer'), { mtp: true });
const servers = [];

after(async () => {
  for (const s of servers) assert.deepEqual(await s.stop(), { code: 0, signal: null }, s.log);
  fs.rmSync(dir, { recursive: true, force: true });
});

for (const k of [1, 3]) {
  test(`MTP with ${k} draft(s): the chain, every draft accepted`, async () => {
    const port = await freePort();
    const s = new Server(['serve', dir, '--tokenizer', path.join(GOLDEN, 'tokenizer'),
      '--served-model-name', 'scripted', '--host', '127.0.0.1', '--port', String(port),
      '--kv-cache-memory', '32M', '--speculative-config',
      JSON.stringify({ method: 'deepseek_mtp', num_speculative_tokens: k })], { port });
    servers.push(s);
    await s.ready();
    const n = 20;
    const r = await fetch(`${s.url}/v1/completions`, { method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ model: 'scripted', prompt: ids.slice(0, 5), max_tokens: n,
        temperature: 0, ignore_eos: true, return_token_ids: true }) });
    const j = await r.json();
    assert.equal(r.status, 200, JSON.stringify(j));
    assert.deepEqual(j.choices[0].token_ids, ids.slice(5, 5 + n));
    const m = await metrics(port);
    const drafted = metricValue(m, 'vllm:spec_decode_num_draft_tokens_total');
    const accepted = metricValue(m, 'vllm:spec_decode_num_accepted_tokens_total');
    assert.ok(drafted >= n / (k + 1) - 1, `${drafted} draft tokens for ${n} output tokens`);
    assert.equal(accepted, drafted, `${accepted} of ${drafted} drafts accepted`);
  });
}
