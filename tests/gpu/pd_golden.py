#!/usr/bin/env python3
"""Sends every golden case to an OpenAI-compatible endpoint (greedy, token ids returned) and
writes the ids it got as JSON; with --expect FILE compares them with another run's ids, with
--golden CASES.json with the reference greedy ids. Standard library only (device machines).
Usage: pd_golden.py URL CASES.json OUT.json [--expect FILE] [--golden]"""
import json
import sys
import urllib.request

url, cases_path, out_path = sys.argv[1:4]
expect = sys.argv[sys.argv.index("--expect") + 1] if "--expect" in sys.argv else None
golden = "--golden" in sys.argv
cases = json.load(open(cases_path))["cases"]
got = {}
bad = 0
for c in cases:
    body = json.dumps({"model": "tiny", "prompt": c["prompt_ids"], "max_tokens": len(c["greedy_ids"]),
                       "temperature": 0, "ignore_eos": True, "return_token_ids": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        ids = json.load(r)["choices"][0]["token_ids"]
    got[c["name"]] = ids
    if golden and ids != c["greedy_ids"]:
        bad += 1
        print(f"{c['name']}: {ids} != golden {c['greedy_ids']}")
json.dump(got, open(out_path, "w"))
if expect:
    ref = json.load(open(expect))
    for k, v in got.items():
        if ref.get(k) != v:
            bad += 1
            print(f"{k}: {v} != single-GPU {ref.get(k)}")
print(f"{len(cases) - bad if bad <= len(cases) else 0} matched, {bad} differed ({url})")
sys.exit(1 if bad else 0)
