// The server command lines of ../shared/seed-commands.md (what vLLM and vllm-ascend users run),
// each against the tiny demo model (duet-mkmodel --preset tiny with the DeepSeek-V3 tokenizer,
// as deploy/quickstart.sh builds it), each answering a chat request with the official openai
// client. Only the program, the model path, ports and sizes that do not fit this machine are
// changed: TP 8 -> 2 or 1, DP 4 or 32 -> 2, one host for two (mpirun runs both command lines of
// a two-node DP instance as one job). The demo model has an MTP layer (duet-mkmodel --mtp), so the
// MTP lines run as they are, with expert parallelism over their DP ranks. The 2P1D pair with
// --kv-transfer-config runs behind duet-proxy, started with vllm-ascend's flags.
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';
import OpenAI from 'openai';

import { GOLDEN, Server, freePort, requireEnv, sleep, startGolden } from './lib.mjs';

requireEnv();
const PREFILL = process.env.DUET_PREFILL;
const DECODE = process.env.DUET_DECODE;
const PROXY = process.env.DUET_PROXY;
const env = { DUET_KV_SECRET: 'compat-secret', UCX_TLS: 'shm', VLLM_LOG_STATS_INTERVAL: '0.5' };
let M; // the demo model
const running = [];

before(() => {
  M = fs.mkdtempSync(path.join(os.tmpdir(), 'duet-demo-'));
  execFileSync(process.env.DUET_MKMODEL, ['--preset', 'tiny', '--mtp', '--tokenizer',
    path.join(GOLDEN, 'tokenizer'), '--out', M, '--force'], { stdio: 'ignore' });
});

after(async () => {
  for (const s of running) if (!s.exitInfo) await s.stop(20000);
  fs.rmSync(M, { recursive: true, force: true });
});

// A line as the documents write it: words, with JSON values kept whole.
const words = (line) => line.trim().split(/\s+(?=(?:[^']*'[^']*')*[^']*$)/).map((w) => w.replace(/^'|'$/g, ''));

async function chat(port, model, key = 'none', extra = {}) {
  const c = new OpenAI({ baseURL: `http://127.0.0.1:${port}/v1`, apiKey: key, maxRetries: 0 });
  const r = await c.chat.completions.create({ model, max_tokens: 8, ignore_eos: true,
    messages: [{ role: 'user', content: 'Hello!' }], ...extra });
  assert.equal(r.object, 'chat.completion');
  assert.equal(r.usage.completion_tokens * 1, 8 * (extra.n || 1));
  assert.equal(r.choices.length, extra.n || 1);
  return r;
}

async function serve(bin, mpi, port, readyPorts = [port]) {
  const s = new Server([], { bin, mpi, port, env });
  running.push(s);
  return s.ready(readyPorts, 90000);
}

function refused(bin, args, pattern) {
  const r = spawnSync(bin, args, { encoding: 'utf8', env: { ...process.env, ...env } });
  assert.equal(r.status, 2, `${args.join(' ')}\n${r.stdout}${r.stderr}`);
  // one error line; the lines before it are the log's notes on ignored flags
  const lines = r.stderr.trim().split('\n').filter((l) => !/^\d\d:\d\d:\d\d\.\d+ /.test(l));
  assert.equal(lines.length, 1, r.stderr);
  assert.match(lines[0], pattern);
}

// SIGTERM ends the server; mpirun, which forwards it to the ranks, then reports 1 for having been
// signalled itself (docs/api.md), so its status is 0 or 1, never a crash.
async function stopped(s) {
  const x = await s.stop();
  assert.ok(x.signal === null && (x.code === 0 || x.code === 1), `${JSON.stringify(x)}\n${s.log}`);
  assert.doesNotMatch(s.log, / E /, 'an error was logged');
}

const withoutSpec = (a) => a.filter((w, i) => w !== '--speculative-config' && a[i - 1] !== '--speculative-config');

test('single node, all GPUs as TP (TP 8 -> 2): a chat answer, the ignored flags logged', async () => {
  const P = await freePort();
  const args = words(`serve ${M} --served-model-name demo --gpu-memory-utilization 0.98 --max-model-len 4096
    --enable-chunked-prefill --host=0.0.0.0 --port ${P} --trust-remote-code
    --api-key "secret-key" --tensor-parallel-size 2`).map((w) => w.replace(/"/g, ''));
  const s = await serve(DECODE, { apps: [{ np: 2, args }] }, P);
  await chat(P, 'demo', 'secret-key');
  await sleep(800);
  assert.match(s.log, /--trust-remote-code: accepted for vLLM compatibility and ignored/);
  assert.match(s.log, /--enable-chunked-prefill: accepted for vLLM compatibility and ignored/);
  assert.match(s.log, /TP 2\)/);
  assert.match(s.log, /stats: prompt throughput [\d.]+ tokens\/s, generation throughput [\d.]+ tokens\/s, running \d+ reqs, waiting \d+ reqs, KV cache usage [\d.]+%, prefix cache hit rate [\d.]+%/);
  await stopped(s);
});

test('two nodes: the same plus --pipeline-parallel-size 2 (TP 1 x PP 2 ranks)', async () => {
  const P = await freePort();
  const args = words(`serve ${M} --served-model-name demo --gpu-memory-utilization 0.98 --max-model-len 4096
    --enable-chunked-prefill --host=0.0.0.0 --port ${P} --trust-remote-code
    --api-key secret-key --tensor-parallel-size 1 --pipeline-parallel-size 2`);
  const s = await serve(DECODE, { apps: [{ np: 2, args }] }, P);
  await chat(P, 'demo', 'secret-key');
  assert.match(s.log, /no pipeline stages; running tensor parallel over 2 x 1 = 2 ranks/);
  await stopped(s);
});

test('single node DP4 x TP4 + EP with MTP 3 (DP 2 x TP 1): served with MTP', async () => {
  for (const [name, tail] of [['deepseek_r1', ''],
    ['deepseek_v3', '--no-enable-prefix-caching']]) {
    const P = await freePort(2);
    const line = words(`serve ${M} --host 0.0.0.0 --port ${P} --data-parallel-size 2
      --tensor-parallel-size 1 --quantization ascend --seed 1024 --served-model-name ${name}
      --enable-expert-parallel --async-scheduling --max-num-seqs 16 --max-model-len 16384
      --max-num-batched-tokens 4096 --trust-remote-code --gpu-memory-utilization 0.92
      --speculative-config '{"num_speculative_tokens":3,"method":"mtp"}'
      --compilation-config '{"cudagraph_capture_sizes":[4,16,32,48,64], "cudagraph_mode": "FULL_DECODE_ONLY"}' ${tail}`);
    const s = await serve(DECODE, { apps: [{ np: 2, args: line }] }, P, [P, P + 1]);
    await chat(P, name);
    await chat(P + 1, name, 'none', { n: 2, seed: 5, temperature: 1 });
    assert.match(s.log, /MTP module \(layer \d+\) loaded/);
    // both DP ranks verified drafts (the other rank joining each one's MTP passes under EP)
    await sleep(300);
    for (const port of [P, P + 1]) {
      const m = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
      assert.match(m, /vllm:spec_decode_num_draft_tokens_total\{[^}]*\} [1-9]/, `port ${port}`);
    }
    assert.match(s.log, /--quantization: accepted for vLLM compatibility and ignored/);
    assert.match(s.log, /--async-scheduling: accepted/);
    assert.match(s.log, /cudagraph_capture_sizes noted/);
    await stopped(s);
  }
});

test('two nodes, DP across them (one mpirun job of both command lines)', async () => {
  const P0 = await freePort(), P1 = await freePort();
  const common = `--data-parallel-size 2 --data-parallel-size-local 1 --data-parallel-address 127.0.0.1
    --data-parallel-rpc-port 13389 --tensor-parallel-size 1 --quantization ascend --seed 1024
    --served-model-name deepseek_r1 --enable-expert-parallel --async-scheduling --max-num-seqs 16
    --max-model-len 16384 --max-num-batched-tokens 4096 --trust-remote-code
    --gpu-memory-utilization 0.92 --speculative-config '{"num_speculative_tokens":1,"method":"mtp"}'`;
  const node0 = words(`serve ${M} --host 0.0.0.0 --port ${P0} ${common}`);
  const node1 = words(`serve ${M} --host 0.0.0.0 --port ${P1} ${common} --headless --data-parallel-start-rank 1`);
  const s = await serve(DECODE, { apps: [{ np: 1, args: node0 }, { np: 1, args: node1 }] },
    P0, [P0, P1]);
  await chat(P0, 'deepseek_r1');
  await chat(P1, 'deepseek_r1');
  assert.match(s.log, /--headless: accepted/);
  assert.match(s.log, /--data-parallel-address: accepted/);
  await stopped(s);
});

test('2P1D with --kv-transfer-config behind duet-proxy (vllm-ascend flags), one line per DP rank', async () => {
  const pPorts = [await freePort(), await freePort()];
  const dPorts = [await freePort(), await freePort()];
  const kvP = await freePort(2), kvD = await freePort(2), rpc = await freePort();
  const xPort = await freePort();
  const extra = `"kv_connector_extra_config": {"prefill": {"dp_size": 2, "tp_size": 1}, "decode": {"dp_size": 2, "tp_size": 1}}`;
  const prefill = (port, rank) => words(`serve ${M} --host 0.0.0.0 --port ${port}
    --data-parallel-size 2 --data-parallel-rank ${rank} --data-parallel-address 127.0.0.1
    --data-parallel-rpc-port ${rpc} --tensor-parallel-size 1 --enable-expert-parallel --seed 1024
    --served-model-name deepseek_v3 --max-model-len 65536 --max-num-batched-tokens 16384
    --max-num-seqs 8 --enforce-eager --trust-remote-code --gpu-memory-utilization 0.9
    --quantization ascend --no-enable-prefix-caching
    --speculative-config '{"num_speculative_tokens": 1, "method": "mtp"}'
    --additional-config '{"recompute_scheduler_enable":true}'
    --kv-transfer-config '{"kv_connector": "MooncakeConnectorV1", "kv_role": "kv_producer", "kv_port": "${kvP}", "engine_id": "0", ${extra}}'`);
  const decode = (port, rank) => words(`serve ${M} --host 0.0.0.0 --port ${port}
    --data-parallel-size 2 --data-parallel-rank ${rank} --data-parallel-address 127.0.0.1
    --data-parallel-rpc-port ${rpc} --tensor-parallel-size 1 --enable-expert-parallel --seed 1024
    --served-model-name deepseek_v3 --max-model-len 65536 --max-num-batched-tokens 256
    --max-num-seqs 28 --trust-remote-code --gpu-memory-utilization 0.92 --async-scheduling
    --quantization ascend --no-enable-prefix-caching
    --speculative-config '{"num_speculative_tokens": 1, "method": "mtp"}'
    --compilation-config '{"cudagraph_mode": "FULL_DECODE_ONLY", "cudagraph_capture_sizes":[2, 4, 8, 16, 24, 32, 48, 56]}'
    --additional-config '{"recompute_scheduler_enable":true, "multistream_overlap_shared_expert": true, "finegrained_tp_config": {"lmhead_tensor_parallel_size":16}}'
    --kv-transfer-config '{"kv_connector": "MooncakeConnectorV1", "kv_role": "kv_consumer", "kv_port": "${kvD}", "engine_id": "2", ${extra}}'`);
  // the role the config names must be the program's
  refused(PREFILL, withoutSpec(decode(pPorts[0], 0)), /kv_role kv_consumer belongs to duet-decode, not to duet-prefill/);
  const p = await serve(PREFILL, { apps: [0, 1].map((r) => ({ np: 1, args: prefill(pPorts[r], r) })) },
    pPorts[0], pPorts);
  const d = await serve(DECODE, { apps: [0, 1].map((r) => ({ np: 1, args: decode(dPorts[r], r) })) },
    dPorts[0], dPorts);
  const x = new Server(words(`--port ${xPort} --host 127.0.0.1
    --prefiller-hosts 127.0.0.1 127.0.0.1 --prefiller-ports ${pPorts.join(' ')}
    --decoder-hosts 127.0.0.1 127.0.0.1 --decoder-ports ${dPorts.join(' ')}`), { port: xPort, bin: PROXY });
  running.push(x);
  await x.ready();
  assert.match(p.log, /--kv-transfer-config: kv_producer \(MooncakeConnectorV1 named\)/);
  for (let i = 0; i < 4; i++) await chat(xPort, 'deepseek_v3');
  await chat(xPort, 'deepseek_v3', 'none', { n: 3, seed: 11, temperature: 1 });
  // the KV went over the side channel: the prefill workers served pins
  const pm = await (await fetch(`http://127.0.0.1:${pPorts[0]}/metrics`)).text() +
    await (await fetch(`http://127.0.0.1:${pPorts[1]}/metrics`)).text();
  assert.match(pm, /duet_kv_lease_pins_total\{[^}]*result="ok"\} [1-9]/);
  for (const s of [x, d, p]) await stopped(s);
});

test('older API server form (8xH800, AWQ, --dtype float16; TP 8 -> 1)', async () => {
  const P = await freePort();
  const s = new Server(words(`--served-model-name deepseek-r1
    --model ${M} --trust-remote-code --host 0.0.0.0 --port ${P} --gpu-memory-utilization 0.95
    --tensor-parallel-size 1 --enable-prefix-caching --max-model-len 8192 --enforce-eager
    --dtype float16`), { port: P, env });
  running.push(s);
  await s.ready([P], 90000);
  await chat(P, 'deepseek-r1');
  assert.match(s.log, /--dtype float16: duet has no float16 path/);
  assert.deepEqual(await s.stop(), { code: 0, signal: null }, s.log);
});

test('unknown flags still fail, with a suggestion; bad JSON values name the flag', () => {
  refused(DECODE, ['serve', M, '--trust-remote-codes'], /unknown option --trust-remote-codes \(did you mean --trust-remote-code\?\)/);
  refused(DECODE, ['serve', M, 'extra'], /unexpected argument 'extra'/);
  refused(DECODE, ['serve', M, '--kv-transfer-config', '{"kv_role": "kv_both"}'], /kv_both: duet splits the roles/);
  refused(DECODE, ['serve', M, '--kv-transfer-config', '{"kv_rol": "kv_consumer"}'], /unknown key 'kv_rol'/);
  refused(DECODE, ['serve', M, '--speculative-config', '{"method": "eagle", "num_speculative_tokens": 1}'], /MTP/);
  refused(DECODE, ['serve', M, '--compilation-config', '{"cudagraph_mode": "SOMETIMES"}'], /cudagraph_mode must be/);
  refused(DECODE, ['serve', M, '--enable-auto-tool-choice'], /needs --tool-call-parser/);
  refused(DECODE, ['serve', M, '--tool-call-parser', 'hermes'], /deepseek_v3 .* deepseek_v31/);
  refused(DECODE, ['serve', M, '--gpu-memory-utilization', '1.5'], /fraction in \(0, 1\]/);
  refused(DECODE, ['serve', M, '--ssl-keyfile', 'k.pem'], /--ssl-keyfile and --ssl-certfile go together/);
  refused(DECODE, ['serve', M, '--allowed-origins', '["a", 3]'], /--allowed-origins/);
});

test('--seed draws unseeded requests\' seeds (a restart replays them), --enable-log-requests, --max-logprobs', async () => {
  const runs = [];
  for (let k = 0; k < 2; k++) {
    const s = await startGolden(['--seed', '1234', '--enable-log-requests', '--max-logprobs', '3']);
    running.push(s);
    const c = new OpenAI({ baseURL: `${s.url}/v1`, apiKey: 'none', maxRetries: 0 });
    const ids = [];
    for (let i = 0; i < 3; i++) {
      const r = await c.completions.create({ model: 'tiny', prompt: [1, 2, 3], max_tokens: 6,
        temperature: 1, ignore_eos: true, return_token_ids: true });
      ids.push(r.choices[0].token_ids);
    }
    await assert.rejects(c.completions.create({ model: 'tiny', prompt: [1], logprobs: 4 }),
      (e) => e.status === 400 && /logprobs/.test(e.message));
    await sleep(300);
    assert.match(s.log, /request cmpl-\S+: 1 prompt\(s\) of 3 tokens, n 1, max_tokens 6, temperature 1, top_p 1, top_k 0, seed \d+, stream no/);
    assert.match(s.log, /request cmpl-\S+ finished: length, 6 output tokens in [\d.]+ s/);
    assert.deepEqual(await s.stop(), { code: 0, signal: null }, s.log);
    runs.push(ids);
  }
  assert.deepEqual(runs[0], runs[1], 'the same seeds after a restart');
  assert.notDeepEqual(runs[0][0], runs[0][1], 'each request its own seed');
});
