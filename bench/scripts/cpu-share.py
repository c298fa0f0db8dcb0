#!/usr/bin/env python3
"""Splits a server's CPU time per call by what it was spent on, from a `perf record` of it.

Each sample (cpu-clock, DWARF stacks: kernel time included, attributed to the stack that
entered the kernel) goes to one area, the first rule that its stack matches:

- the audit writer thread, and other threads besides the tokio workers;
- on the workers: the audit append (any `tenant_kms::audit::` frame), split further by the
  SQLite transaction step it was in (`WriteTx::begin`, `insert_with`, `write_anchor`,
  `WriteTx::commit`) and by syscall;
- the key store's change check (`wal_watch`, `change_generation`);
- else the frame nearest the leaf that names a crate: socket I/O (`tokio::net`), the
  scheduler (other `tokio::`), HTTP/2 and gRPC (h2, hyper, tonic, axum, tower, prost), the
  handler, guard and codec (`tenant_kms`).

Areas are printed in µs per call: their share of the samples times the server's CPU per
call measured over the same window (h2load.sh prints it).

usage: perf record -e cpu-clock -F 4999 --call-graph dwarf,16384 -p PID -o P.data -- sleep 4
       perf script -i P.data -F comm,tid,ip,sym,dso > P.txt
       cpu-share.py P.txt US_PER_CALL
"""
import collections
import re
import sys

CRATE = re.compile(
    r"(tenant_kms(?:_bench)?::|\bh2::|hyper(?:_util)?::|tonic::|tokio::net|tokio::|prost::|"
    r"axum::|tower::)"
)
TRANSPORT = ("h2::", "hyper::", "hyper_util::", "tonic::", "axum::", "tower::", "prost::")
AUDIT_STEPS = ("WriteTx::begin", "insert_with", "write_anchor", "WriteTx::commit")


def samples(path):
    """Each sample as (thread name, frames from the leaf up, function names only)."""
    block = []
    for line in open(path, errors="replace"):
        if line.strip():
            block.append(line.rstrip("\n"))
            continue
        if block:
            yield sample(block)
        block = []
    if block:
        yield sample(block)


def sample(block):
    frames = []
    for line in block[1:]:
        parts = line.strip().split(None, 1)
        frames.append(parts[1].split(" (")[0] if len(parts) > 1 else "")
    return block[0].split()[0], frames


def area(thread, frames):
    if thread != "tokio-rt-worker":
        return f"thread {thread}", None
    stack = " ".join(frames)
    if "tenant_kms::audit::" in stack:
        step = next((s for f in frames for s in AUDIT_STEPS if s in f), "other")
        syscall = next((f for f in frames if f.startswith("__x64_sys_")), "user")
        return "audit append on the worker", (step, syscall.removeprefix("__x64_sys_"))
    if "wal_watch" in stack or "change_generation" in stack:
        return "key store change check", None
    crate = next((m.group(1) for f in frames if (m := CRATE.search(f))), "")
    if crate == "tokio::net":
        return "socket I/O (tokio::net)", None
    if crate == "tokio::":
        return "scheduler (tokio)", None
    if crate in TRANSPORT:
        return "HTTP/2 and gRPC (h2, hyper, tonic, prost)", None
    if crate.startswith("tenant_kms"):
        return "handler, guard, codec (tenant_kms)", None
    return "other", None


def main():
    path, per_call = sys.argv[1], float(sys.argv[2])
    areas, steps, syscalls, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for thread, frames in samples(path):
        total += 1
        name, detail = area(thread, frames)
        areas[name] += 1
        if detail:
            steps[detail[0]] += 1
            syscalls[detail[1]] += 1
    us = lambda count: count * per_call / total
    print(f"{total} samples; µs per call of {per_call}")
    for name, count in areas.most_common():
        print(f"{us(count):7.1f}  {name}")
        if name.startswith("audit") and count:
            print("         by step: " + ", ".join(f"{s} {us(c):.1f}" for s, c in steps.most_common()))
            print("         by kind: " + ", ".join(f"{s} {us(c):.1f}" for s, c in syscalls.most_common()))


if __name__ == "__main__":
    main()
