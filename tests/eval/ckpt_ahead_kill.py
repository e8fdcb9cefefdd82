"""Checkpoints written ahead (R16) under random SIGKILLs: a table of >= 256 chunks (1100 MiB at
16 KiB clusters), 25 % stored, then many small commits (the journal is 1 MiB: ahead steps start at
half of it) with unflushed writes between, and a SIGKILL at a random moment. After each kill:
check 0/3, every untouched stored cluster intact, every touched 4 KiB block = its flushed value or a
later write."""
import os
import random
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 4
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
CS = 16384
SIZE = 1100 << 20
N = SIZE // CS
FILL = N * 26 // 100
base = os.path.join(work, "base.img")


def fill_value(c):
    line = struct.pack("<I", c) * 4
    return (line + b"fill" * 12) * (CS // 64)


if not os.path.exists(base):
    subprocess.run([BIN, "create", base, "--size", str(SIZE), "--cluster-size", "16K"], check=True,
                   stdout=subprocess.DEVNULL)
    b = evlib.vu.Backend(image=base, queues=1, workdir=work)
    cl = evlib.Client(b)
    t0 = time.time()
    for c in range(FILL):
        assert cl.write(c * CS // 512, fill_value(c)) == 0
    assert cl.flush() == 0
    cl.close()
    print(f"filled {FILL} of {N} clusters in {time.time() - t0:.0f}s; stop", b.stop(), flush=True)

rng = random.Random(int(os.environ.get("SEED", "9")))
for it in range(iters):
    image = os.path.join(work, "it.img")
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run(["cp", "--sparse=always", base, image], check=True)
    b = evlib.vu.Backend(image=image, queues=1, workdir=work)
    cl = evlib.Client(b)
    history = {}      # 4K block -> [(i, value)]
    flushed_at = -1   # index of the last write covered by a successful FLUSH
    kill_after = rng.uniform(3, 12)
    killed = threading.Event()

    def killer():
        time.sleep(kill_after)
        b.p.kill()
        killed.set()
    threading.Thread(target=killer, daemon=True).start()
    i = 0
    commits = 0
    try:
        while not killed.is_set():
            blk = rng.randrange(SIZE // 4096)
            val = struct.pack("<III", it, i, blk) * 341 + b"\0\0\0\0"
            st = cl._do(evlib.T_OUT, blk * 8, val, timeout=3)[0]
            if st != 0:
                break
            history.setdefault(blk, []).append((i, val))
            if rng.random() < 0.5:
                if cl._do(evlib.T_FLUSH, 0, timeout=3)[0] == 0:
                    flushed_at = i
                    commits += 1
            i += 1
    except Exception:
        pass
    b.p.wait()
    log = b.text()
    ahead = sum(1 for l in log.splitlines() if "ahead" in l.lower())
    chk = subprocess.run([BIN, "check", image], capture_output=True, text=True)
    raw = f"/dev/shm/cak-{os.getpid()}.raw"
    if os.path.exists(raw):
        os.unlink(raw)
    conv = subprocess.run([BIN, "convert", image, raw], capture_output=True, text=True)
    problems = []
    if chk.returncode not in (0, 3):
        problems.append(f"check {chk.returncode}: {chk.stdout[-400:]}")
    if conv.returncode != 0:
        problems.append(f"convert: {conv.stderr[-300:]}")
    else:
        with open(raw, "rb") as f:
            data = f.read()
        os.unlink(raw)
        touched_clusters = {blk * 4096 // CS for blk in history}
        for c in range(FILL):
            if c not in touched_clusters and data[c * CS:(c + 1) * CS] != fill_value(c):
                problems.append(f"untouched cluster {c} changed")
                if len(problems) > 5:
                    break
        for blk, hist in history.items():
            got = data[blk * 4096:(blk + 1) * 4096]
            before = [v for j, v in hist if j <= flushed_at]
            after = [v for j, v in hist if j > flushed_at]
            c = blk * 4096 // CS
            orig = fill_value(c)[(blk * 4096 % CS):(blk * 4096 % CS) + 4096] if c < FILL else bytes(4096)
            allowed = ([before[-1]] if before else [orig]) + after
            if got not in allowed:
                problems.append(f"block {blk}: not its flushed value nor a later write")
    print(f"iter {it}: killed after {kill_after:.1f}s, {i} writes, {commits} flushed commits, "
          f"log lines mentioning 'ahead': {ahead}; check {chk.returncode}; problems {problems[:4]}", flush=True)
