#!/usr/bin/env python3
"""Where the time of a hop goes, from the worker logs of a kept demo folder.

Run a one-session demo with the stage and hop logs on, keep its folder, then read it:

    SOVRA_LOG=sovra_worker::stage=debug,sovra_worker::hop=debug \
        ./target/release/sovra demo --keep --dtype q8_0 --max-tokens 64 --ignore-eos
    python3 scripts/hop_timeline.py /tmp/sovra-demo-XXXXXX

For every decode hop (one row leaving a stage for the next) it measures, in microseconds:
  to network   end of the forward -> the worker's output pump has the frame
  written      -> the frame is written to the QUIC stream
  read         -> the next worker has read the whole frame from its stream (after its stage's
                  input budget had room for it, at once unless the stage is backed up)
  engine woke  -> that worker's stage engine has woken up with it
  forward      -> that engine starts its forward
and prints the median and 90th percentile of each step per link, then the forwards' medians.
All processes run on one machine, so their clocks agree.
"""

import datetime
import glob
import os
import re
import statistics
import sys

LINE = re.compile(r"(\S+Z)\s+DEBUG\s+(\S+?):\s+(.*)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
STEPS = ["frame to network", "frame written", "frame read", "engine woke", "forward start"]
NAMES = ["to network", "written", "read", "engine woke", "forward"]


def events(folder):
    out = []
    for path in glob.glob(os.path.join(folder, "*.log")):
        worker = os.path.basename(path)[: -len(".log")]
        if worker == "coordinator":
            continue
        with open(path, errors="replace") as f:
            for raw in f:
                m = LINE.match(ANSI.sub("", raw))
                if not m:
                    continue
                t = datetime.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
                msg = m.group(3)
                if msg.startswith("stage forward"):
                    us = int(re.search(r"us=(\d+)", msg).group(1))
                    rows = int(re.search(r"rows=(\d+)", msg).group(1))
                    out.append((t - us / 1e6, worker, "forward start", rows))
                    out.append((t, worker, "forward end", rows))
                else:
                    for step in STEPS[:4]:
                        if msg.startswith(step):
                            out.append((t, worker, step, 0))
    out.sort()
    return out


def hops(evs):
    """Yields (from, to, [step durations in us]) for every single-row hop."""
    pending = None
    for t, worker, kind, rows in evs:
        if kind == "forward end":
            pending = {"end": t, "from": worker, "steps": {}} if rows == 1 else None
        elif pending is None:
            continue
        elif kind in ("frame to network", "frame written") and worker == pending["from"]:
            pending["steps"].setdefault(kind, t)
        elif kind in ("frame read", "engine woke") and worker != pending["from"]:
            pending["steps"].setdefault(kind, t)
        elif kind == "forward start" and worker != pending["from"]:
            pending["steps"]["forward start"] = t
            if all(s in pending["steps"] for s in STEPS):
                prev, durations = pending["end"], []
                for s in STEPS:
                    durations.append((pending["steps"][s] - prev) * 1e6)
                    prev = pending["steps"][s]
                yield pending["from"], worker, durations
            pending = None


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    evs = events(sys.argv[1])
    links = {}
    for src, dst, durations in hops(evs):
        links.setdefault((src, dst), []).append(durations)
    if not links:
        sys.exit("no hop found: run the demo with SOVRA_LOG=sovra_worker::stage=debug,sovra_worker::hop=debug")
    print("| link | hops | " + " | ".join(NAMES) + " | total |")
    print("|---" * (len(NAMES) + 3) + "|")
    for (src, dst), rows in sorted(links.items()):
        cells = []
        for i in range(len(NAMES)):
            v = sorted(r[i] for r in rows)
            cells.append(f"{statistics.median(v):.0f} ({v[int(len(v) * 0.9)]:.0f})")
        total = sorted(sum(r) for r in rows)
        cells.append(f"{statistics.median(total):.0f} ({total[int(len(total) * 0.9)]:.0f})")
        print(f"| {src} → {dst} | {len(rows)} | " + " | ".join(cells) + " |")
    print("\nmedian (90th percentile), microseconds\n")
    forwards = {}
    for t, worker, kind, rows in evs:
        if kind == "forward start" and rows == 1:
            forwards.setdefault(worker, []).append(t)
    ends = {}
    for t, worker, kind, rows in evs:
        if kind == "forward end" and rows == 1:
            ends.setdefault(worker, []).append(t)
    for worker in sorted(forwards):
        d = [(e - s) * 1e6 for s, e in zip(forwards[worker], ends[worker])]
        print(f"{worker}: single-row forward median {statistics.median(d):.0f} us over {len(d)}")


if __name__ == "__main__":
    main()
