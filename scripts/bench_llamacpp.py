#!/usr/bin/env python3
"""sovra generate --local against llama.cpp on the same GGUF and thread count, in one run.

Needs llama-cpp-python (builds llama.cpp from source: 15-35 min on 2 cores), kept out of CI:
    python3 -m venv /tmp/llama-venv && /tmp/llama-venv/bin/pip install llama-cpp-python==0.3.36
    /tmp/llama-venv/bin/python scripts/bench_llamacpp.py --sovra target/release/sovra

Measures prompt processing of a 128-token prompt and decoding of 128 tokens, median of --repeat,
alternating the engines so both see the same machine state, and prints a markdown table with the
ratios sovra / llama.cpp.
"""
import argparse, json, os, statistics, subprocess, time

def llamacpp_run(llm, prompt, n_gen):
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    pp = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(n_gen):
        tok = llm.sample(top_k=1)
        llm.eval([tok])
    tg = time.perf_counter() - t1
    return len(prompt) / pp, n_gen / tg

def sovra_run(binary, mode, threads, n_prompt, n_gen):
    out = subprocess.run([binary, "--threads", str(threads), "bench", "--dtype", mode, "--batch", "1",
                          "--prompt-tokens", str(n_prompt), "--tokens", str(n_gen), "--repeat", "1"],
                         check=True, capture_output=True, text=True).stdout
    row = [l for l in out.splitlines() if l.startswith(f"| {mode} |")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    return float(cells[1]), float(cells[3])

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sovra", default="target/release/sovra")
    ap.add_argument("--model", default=os.path.expanduser(os.environ.get("SOVRA_HOME", "~/.cache/sovra")) + "/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--golden", default="../shared/golden/bench_prompt_128.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from llama_cpp import Llama
    prompt = json.load(open(args.golden))["prompt_ids"]
    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=512, n_batch=512, verbose=False)
    results = {"llama.cpp": []}
    modes = ["gguf", "q8_0", "f32"]
    for m in modes:
        results[m] = []
    for _ in range(args.repeat):
        results["llama.cpp"].append(llamacpp_run(llm, prompt, args.gen))
        for m in modes:
            results[m].append(sovra_run(args.sovra, m, args.threads, len(prompt), args.gen))
    med = {k: (statistics.median(p for p, _ in v), statistics.median(t for _, t in v)) for k, v in results.items()}
    base = med["llama.cpp"]
    print(f"{len(prompt)}-token prompt, {args.gen} generated tokens, {args.threads} threads, median of {args.repeat}\n")
    print("| engine | prompt tok/s | decode tok/s | prompt vs llama.cpp | decode vs llama.cpp |")
    print("|---|---|---|---|---|")
    for k, (pp, tg) in med.items():
        print(f"| {k if k == 'llama.cpp' else 'sovra ' + k} | {pp:.1f} | {tg:.1f} | {pp / base[0]:.2f}x | {tg / base[1]:.2f}x |")

if __name__ == "__main__":
    main()
