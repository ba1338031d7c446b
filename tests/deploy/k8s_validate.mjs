// Validates rendered Kubernetes manifests (kubectl kustomize output) offline:
//   1. every object against the Kubernetes OpenAPI schemas, as the kubernetes-models npm package
//      ships them (types, required fields, enums, formats);
//   2. what a schema cannot see: names unique per kind; Services, StatefulSets and
//      PodDisruptionBudgets select pods that exist; a StatefulSet's serviceName is a headless
//      Service; volumes name rendered ConfigMaps and claims (Secrets are made by hand: only
//      duet-secrets and duet-ssh may be missing); probes name a container port; every endpoint
//      on duet-proxy's command line is a pod and DP port of an instance of that role.
// Usage: node k8s_validate.mjs RENDERED.yaml   (exit 1 with one line per problem)
// node_modules comes from tests/node (npm ci there).
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(here, '..', 'node', 'package.json'));
const YAML = require('yaml');

const HAND_MADE_SECRETS = new Set(['duet-secrets', 'duet-ssh']);
const problems = [];
const bad = (obj, msg) => problems.push(`${obj.kind}/${obj.metadata?.name}: ${msg}`);

function modelFor(apiVersion, kind) {
  const [group, version] = apiVersion.includes('/') ? apiVersion.split('/') : [null, apiVersion];
  const mod = group ? `kubernetes-models/${group}/${version}/${kind}` : `kubernetes-models/${version}/${kind}`;
  try {
    return require(mod)[kind];
  } catch {
    return null;
  }
}

const file = process.argv[2];
const docs = YAML.parseAllDocuments(fs.readFileSync(file, 'utf8'));
const objs = [];
for (const d of docs) {
  if (d.errors.length) {
    problems.push(`YAML: ${d.errors[0].message}`);
    continue;
  }
  const o = d.toJS();
  if (o) objs.push(o);
}
if (!objs.length) problems.push(`${file}: no objects`);

// 1. the schemas
for (const o of objs) {
  if (!o.apiVersion || !o.kind || !o.metadata?.name) {
    problems.push(`an object without apiVersion, kind or metadata.name: ${JSON.stringify(o).slice(0, 80)}`);
    continue;
  }
  const Model = modelFor(o.apiVersion, o.kind);
  if (!Model) {
    bad(o, `no schema for ${o.apiVersion} ${o.kind}`);
    continue;
  }
  try {
    new Model(o).validate();
  } catch (e) {
    bad(o, `schema: ${String(e.message).split('\n')[0]}`);
  }
}

// 2. references between objects
const of = (kind) => objs.filter((o) => o.kind === kind);
const seen = new Set();
for (const o of objs) {
  const k = `${o.kind}/${o.metadata?.name}`;
  if (seen.has(k)) bad(o, 'defined twice');
  seen.add(k);
}
const workloads = [...of('StatefulSet'), ...of('Deployment')];
const matches = (sel, labels) => Object.entries(sel || {}).every(([k, v]) => labels?.[k] === v);
const podsOf = (sel) => workloads.filter((w) => matches(sel, w.spec?.template?.metadata?.labels));

for (const s of of('Service')) {
  if (!s.spec?.selector || !podsOf(s.spec.selector).length) bad(s, 'selects no pods');
}
for (const p of of('PodDisruptionBudget')) {
  if (!podsOf(p.spec?.selector?.matchLabels).length) bad(p, 'selects no pods');
}
for (const w of workloads) {
  const tpl = w.spec?.template;
  if (!matches(w.spec?.selector?.matchLabels, tpl?.metadata?.labels)) bad(w, 'its selector does not match its pod template');
  if (w.kind === 'StatefulSet') {
    const svc = of('Service').find((s) => s.metadata.name === w.spec.serviceName);
    if (!svc) bad(w, `serviceName ${w.spec.serviceName} is not a rendered Service`);
    else if (svc.spec.clusterIP !== 'None') bad(w, `serviceName ${w.spec.serviceName} is not headless`);
    else if (!matches(svc.spec.selector, tpl?.metadata?.labels)) bad(w, `Service ${svc.metadata.name} does not select its pods`);
  }
  for (const v of tpl?.spec?.volumes || []) {
    if (v.configMap && !of('ConfigMap').some((c) => c.metadata.name === v.configMap.name)) bad(w, `volume ${v.name}: no ConfigMap ${v.configMap.name}`);
    if (v.persistentVolumeClaim && !of('PersistentVolumeClaim').some((c) => c.metadata.name === v.persistentVolumeClaim.claimName)) bad(w, `volume ${v.name}: no claim ${v.persistentVolumeClaim.claimName}`);
    if (v.secret && !HAND_MADE_SECRETS.has(v.secret.secretName) && !of('Secret').some((c) => c.metadata.name === v.secret.secretName)) bad(w, `volume ${v.name}: no Secret ${v.secret.secretName}`);
  }
  for (const c of tpl?.spec?.containers || []) {
    const names = new Set((c.ports || []).map((p) => p.name));
    for (const pr of ['startupProbe', 'readinessProbe', 'livenessProbe']) {
      const port = c[pr]?.httpGet?.port ?? c[pr]?.tcpSocket?.port;
      if (typeof port === 'string' && !names.has(port)) bad(w, `${c.name}: ${pr} names port ${port}, which the container does not have`);
    }
    for (const e of c.env || []) {
      const ref = e.valueFrom?.secretKeyRef;
      if (ref && !HAND_MADE_SECRETS.has(ref.name) && !of('Secret').some((x) => x.metadata.name === ref.name)) bad(w, `env ${e.name}: no Secret ${ref.name}`);
    }
  }
}

// duet-proxy's endpoints: NAME-K.SERVICE:PORT of an instance of the listed role
const envOf = (w) => Object.fromEntries((w.spec.template.spec.containers[0].env || []).map((e) => [e.name, e.value]));
for (const d of of('Deployment').filter((x) => x.metadata.name === 'duet-proxy')) {
  const c = d.spec.template.spec.containers[0];
  const argv = [...(c.command || []), ...(c.args || [])];
  let role = null;
  const count = { prefill: 0, decode: 0 };
  for (const a of argv) {
    if (a === '--prefill' || a === '--decode') { role = a.slice(2); continue; }
    if (a.startsWith('--')) { role = null; continue; }
    if (!role) continue;
    const m = /^(.+)-(\d+)\.([^.:]+):(\d+)$/.exec(a);
    const sts = m && of('StatefulSet').find((s) => s.metadata.name === m[1]);
    if (!sts) { bad(d, `endpoint ${a} is not a pod of a rendered StatefulSet`); continue; }
    const env = envOf(sts);
    const pods = Number(env.DUET_PODS), dp = Number(env.DUET_DP), port = Number(env.DUET_PORT);
    if (sts.spec.replicas !== pods) bad(sts, `replicas ${sts.spec.replicas} but DUET_PODS ${pods}`);
    if (m[3] !== sts.spec.serviceName) bad(d, `endpoint ${a}: ${sts.metadata.name}'s pods are under Service ${sts.spec.serviceName}`);
    if (Number(m[2]) >= pods) bad(d, `endpoint ${a}: ${sts.metadata.name} has ${pods} pods`);
    const p = Number(m[4]);
    if (p < port || p >= port + dp / pods) bad(d, `endpoint ${a}: each pod of ${sts.metadata.name} serves ports ${port}..${port + dp / pods - 1}`);
    if (env.DUET_ROLE !== role) bad(d, `endpoint ${a} is listed as ${role} but ${sts.metadata.name} is ${env.DUET_ROLE}`);
    count[role]++;
  }
  for (const sts of of('StatefulSet')) {
    const env = envOf(sts);
    const want = Number(env.DUET_DP);
    const listed = argv.filter((a) => a.startsWith(`${sts.metadata.name}-`)).length;
    if (listed !== want) bad(d, `lists ${listed} of ${sts.metadata.name}'s ${want} DP endpoints`);
  }
  if (!count.prefill || !count.decode) bad(d, 'needs prefill and decode endpoints');
}

if (problems.length) {
  for (const p of problems) console.log(`FAIL: ${p}`);
  process.exit(1);
}
console.log(`ok: ${objs.length} objects valid (${[...new Set(objs.map((o) => o.kind))].join(', ')})`);
