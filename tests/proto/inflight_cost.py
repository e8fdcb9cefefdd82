#!/usr/bin/env python3
"""A measurement, not a probe: the backend's CPU time per request with and without an inflight
buffer handed over (INFLIGHT_SHMFD), 4 KiB reads in batches of 32 on one ring, polling off,
interleaved runs, medians of 4. The raw-wire frontend of tests/proto drives it.

    cargo build --release
    insitu-blk create /tmp/inflight-bench/img --size 1G      # any image
    python3 tests/proto/inflight_cost.py target/release/insitu-blk /tmp/inflight-bench/img
"""
import os, subprocess, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vu import *  # noqa

BINARY = sys.argv[1] if len(sys.argv) > 1 else "target/release/insitu-blk"
IMAGE = sys.argv[2] if len(sys.argv) > 2 else "/tmp/inflight-bench/img"
N, BATCH = 300000, 32

def cpu_ticks(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])

def one(inflight):
    sock = IMAGE + ".cost.sock"
    if os.path.exists(sock):
        os.unlink(sock)
    p = subprocess.Popen([BINARY, "serve", "--socket-path", sock, "--blk-file", IMAGE,
                          "--num-queues", "2", "--log-level", "warn", "--poll-max-us", "0"])
    while not os.path.exists(sock):
        time.sleep(0.02)
    c, mem = Conn(sock), Mem(size=64 << 20)
    pf_want = None if inflight else ~PF["INFLIGHT_SHMFD"] & ((1 << 64) - 1)
    offered, acked, pf, nq, cfg = handshake(c, mem, pf_want=pf_want)
    r = Ring(mem, 0, size=128)
    if inflight:
        get_and_set_inflight(c, 1, 128)
    r.setup(c)
    bufs = [mem.alloc(4096, 512) for _ in range(BATCH)]
    t0, w0, done = cpu_ticks(p.pid), time.time(), 0
    while done < N:
        for k in range(BATCH):
            hdr = mem.alloc(16); st = mem.alloc(1)
            mem.w(hdr, struct.pack("<IIQ", T_IN, 0, ((done + k) * 8) % 131072))
            head = r.put_chain([(hdr, 16, False), (bufs[k], 4096, True), (st, 1, True)])
            r.publish(head, kick=(k == BATCH - 1))
        while ((r.used_idx() - r.last_used) & 0xFFFF) < BATCH:
            pass
        r.last_used = (r.last_used + BATCH) & 0xFFFF
        done += BATCH
    t1, w1 = cpu_ticks(p.pid), time.time()
    c.close()
    p.terminate(); p.wait()
    return (t1 - t0) * 10000 / N, N / (w1 - w0)

rows = []
for rep in range(4):
    for inflight in ((False, True) if rep % 2 == 0 else (True, False)):
        us, rate = one(inflight)
        rows.append((inflight, us, rate))
        print(f"inflight={inflight} backend_cpu_us_per_req={us:.2f} req_per_s={rate:.0f} load={os.getloadavg()[0]:.2f}", flush=True)
for flag in (False, True):
    v = sorted(u for f, u, _ in rows if f == flag)
    print(f"inflight={flag} median backend CPU µs/request: {(v[1] + v[2]) / 2:.2f} ({v})")
