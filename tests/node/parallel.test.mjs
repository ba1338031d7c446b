// Parallel instances under mpirun: DP2 with expert parallelism (ports P and P+1, DP groups in
// lockstep) where only rank 0's port gets requests, and TP2. Both answer the golden greedy ids
// through the OpenAI client, and SIGTERM to the ranks ends every one with status 0 (mpirun's 0).
// Usage: node parallel.test.mjs dp2|tp2
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import path from 'node:path';
import { test } from 'node:test';
import OpenAI from 'openai';

import { GOLDEN, Server, freePort, goldenCases, requireEnv } from './lib.mjs';

requireEnv();
const layout = process.argv[2] || 'dp2';
const cases = goldenCases();

async function greedy(client, c) {
  const r = await client.completions.create({
    model: 'tiny', prompt: c.prompt_ids, max_tokens: c.greedy_ids.length, temperature: 0,
    ignore_eos: true, return_token_ids: true,
  });
  return r.choices[0].token_ids;
}

// SIGTERM to the ranks themselves, as a supervisor of each rank would send it.
function signalRanks(server) {
  const out = execFileSync('pgrep', ['-P', String(server.proc.pid)], { encoding: 'utf8' });
  const pids = out.split('\n').filter(Boolean).map(Number);
  assert.equal(pids.length, 2, out);
  for (const p of pids) process.kill(p, 'SIGTERM');
}

test(`${layout}: golden greedy ids through the OpenAI client, clean exit`, async () => {
  const dp = layout === 'dp2';
  const port = await freePort(2);
  const args = ['--model', path.join(GOLDEN, 'tiny-v3', 'model'),
    '--tokenizer', path.join(GOLDEN, 'tokenizer'), '--served-model-name', 'tiny',
    '--host', '127.0.0.1', '--port', String(port), '--kv-cache-memory', '32M',
    ...(dp ? ['-dp', '2', '--enable-expert-parallel'] : ['-tp', '2'])];
  const server = new Server(args, { mpi: { np: 2 }, port });
  try {
    await server.ready(dp ? [port, port + 1] : [port], 120000);
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
    // all at once to rank 0 only: rank 1 (DP) stays idle and must join the steps
    const got = await Promise.all(cases.map((c) => greedy(client, c)));
    cases.forEach((c, i) => assert.deepEqual(got[i], c.greedy_ids, c.name));
    // streamed too
    const c = cases[2];
    const ids = [];
    for await (const ch of await client.completions.create({
      model: 'tiny', prompt: c.prompt_ids, max_tokens: c.greedy_ids.length, temperature: 0,
      ignore_eos: true, return_token_ids: true, stream: true })) ids.push(...ch.choices[0].token_ids);
    assert.deepEqual(ids, c.greedy_ids);
    if (dp) {
      // and the other DP rank serves on its own port
      const other = new OpenAI({ baseURL: `http://127.0.0.1:${port + 1}/v1`, apiKey: 'unused', maxRetries: 0 });
      assert.deepEqual(await greedy(other, cases[0]), cases[0].greedy_ids);
    }
    signalRanks(server);
    const x = await server.waitExit(60000);
    assert.deepEqual(x, { code: 0, signal: null }, server.log);
    assert.equal((server.log.match(/duet-decode: stopped/g) || []).length, dp ? 2 : 1, server.log);
  } finally {
    if (!server.exitInfo) server.proc.kill('SIGKILL');
  }
});
