// duet-bench against the real thing: a CPU 1P1D deployment (one duet-prefill and one
// duet-decode instance, KV over UCX) behind duet-proxy, serving the demo model (duet-mkmodel's
// tiny preset: DeepSeek-V3's architecture and vocabulary, random weights). Checks the result
// JSON's keys and counts: every request completed, the server's prompt counts equal the random
// dataset's input length, and output tokens = requests x output length with --ignore-eos,
// for /v1/completions (token-id prompts) and /v1/chat/completions (text prompts).
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { promisify } from 'node:util';

import { GOLDEN, Server, freePort, requireEnv } from './lib.mjs';

requireEnv();
const run = promisify(execFile);
const { DUET_PREFILL: PREFILL, DUET_DECODE: DECODE, DUET_PROXY: PROXY } = process.env;
const { DUET_BENCH: BENCH, DUET_MKMODEL: MKMODEL } = process.env;
const env = { DUET_KV_SECRET: 'bench-secret', UCX_TLS: 'shm' };
let dir = '', model = '', prefill = null, decode = null, proxy = null, xPort = 0;

// what `vllm bench serve` writes for a streamed run with --percentile-metrics ttft,tpot,itl,e2el
const KEYS = ['date', 'endpoint_type', 'backend', 'label', 'model_id', 'tokenizer_id',
  'num_prompts', 'request_rate', 'burstiness', 'max_concurrency', 'duration', 'completed',
  'failed', 'total_input_tokens', 'total_output_tokens', 'request_throughput',
  'request_goodput', 'output_throughput', 'total_token_throughput', 'max_output_tokens_per_s',
  'max_concurrent_requests', 'input_lens', 'output_lens', 'ttfts', 'itls', 'errors',
  ...['ttft', 'tpot', 'itl', 'e2el'].flatMap((m) =>
    [`mean_${m}_ms`, `median_${m}_ms`, `std_${m}_ms`, `p99_${m}_ms`])];

function workerArgs(port) {
  return ['--model', model, '--served-model-name', 'demo', '--host', '127.0.0.1',
    '--port', String(port), '--kv-cache-memory', '64M', '--block-size', '16'];
}

before(async () => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-bench-'));
  model = path.join(dir, 'model');
  await run(MKMODEL, ['--preset', 'tiny', '--tokenizer', path.join(GOLDEN, 'tokenizer'),
    '--out', model]);
  const pPort = await freePort();
  const dPort = await freePort();
  xPort = await freePort();
  prefill = await new Server(workerArgs(pPort), { port: pPort, bin: PREFILL, mpi: { np: 1 }, env })
    .ready([pPort], 120000);
  decode = await new Server(workerArgs(dPort), { port: dPort, bin: DECODE, mpi: { np: 1 }, env })
    .ready([dPort], 120000);
  proxy = await new Server(['--host', '127.0.0.1', '--port', String(xPort),
    '--prefill', `127.0.0.1:${pPort}`, '--decode', `127.0.0.1:${dPort}`],
  { port: xPort, bin: PROXY }).ready();
});

after(async () => {
  for (const s of [proxy, decode, prefill]) if (s) await s.stop(20000);
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

async function bench(name, extra) {
  const args = ['--base-url', `http://127.0.0.1:${xPort}`, '--model', model,
    '--served-model-name', 'demo', '--dataset-name', 'random', '--random-input-len', '48',
    '--random-output-len', '12', '--num-prompts', '10', '--max-concurrency', '4', '--ignore-eos',
    '--percentile-metrics', 'ttft,tpot,itl,e2el', '--save-result', '--save-detailed',
    '--result-dir', dir, '--result-filename', `${name}.json`, '--fail-on-error', ...extra];
  let out;
  try {
    out = await run(BENCH, args, { timeout: 120000 });
  } catch (e) {
    assert.fail(`duet-bench failed (${e.code}):\n${e.stdout}\n${e.stderr}`);
  }
  assert.match(out.stdout, /=+ Serving Benchmark Result =+\nSuccessful requests: +10 *\n/);
  return JSON.parse(fs.readFileSync(path.join(dir, `${name}.json`), 'utf8'));
}

function checkCommon(r) {
  for (const k of KEYS) assert.ok(k in r, `result JSON lacks ${k}`);
  assert.equal(r.completed, 10);
  assert.equal(r.failed, 0);
  assert.deepEqual(r.errors, Array(10).fill(''));
  assert.equal(r.total_output_tokens, 10 * 12);
  assert.deepEqual(r.output_lens, Array(10).fill(12));
  assert.equal(r.num_prompts, 10);
  assert.equal(r.max_concurrency, 4);
  assert.equal(r.request_rate, 'inf');
  assert.equal(r.model_id, model);
  assert.equal(r.itls.length, 10);
  for (const itl of r.itls) assert.equal(itl.length, 11); // one chunk per token from duet
  for (const k of ['mean_ttft_ms', 'mean_tpot_ms', 'mean_itl_ms', 'mean_e2el_ms', 'duration'])
    assert.ok(r[k] > 0, `${k} = ${r[k]}`);
  assert.ok(r.mean_e2el_ms > r.mean_ttft_ms);
  assert.ok(Math.abs(r.output_throughput - r.total_output_tokens / r.duration) < 1e-6);
  assert.ok(r.max_concurrent_requests >= 1 && r.max_concurrent_requests <= 4);
}

test('completions through duet-proxy (1P1D): every request, exact token counts', async () => {
  const r = await bench('completions', []);
  checkCommon(r);
  assert.equal(r.endpoint_type, 'openai');
  // token-id prompts: the server counts exactly the dataset's length
  assert.equal(r.total_input_tokens, 10 * 48);
  assert.deepEqual(r.input_lens, Array(10).fill(48));
});

test('chat completions through duet-proxy (1P1D): text prompts, server-counted inputs', async () => {
  const r = await bench('chat', ['--backend', 'openai-chat', '--temperature', '0']);
  checkCommon(r);
  assert.equal(r.endpoint_type, 'openai-chat');
  // decoded random text re-tokenized with the chat template around it: the server's count
  for (const n of r.input_lens) assert.ok(n > 10, `prompt of ${n} tokens`);
  assert.equal(r.total_input_tokens, r.input_lens.reduce((a, b) => a + b, 0));
});
