"""`convert` and `check` of an image in use (documented: read-only, last committed state, retrying a
pass that raced the writer) while a client rewrites every cluster with FLUSHes. Each exported
cluster must be a whole version some write produced (or zeros), never garbage or a mix; check must
not report corruption."""
import os
import random
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 8
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
C = 65536
NCL = 128
image = os.path.join(work, "cc.img")
if os.path.exists(image):
    os.unlink(image)
subprocess.run([BIN, "create", image, "--size", f"{NCL * C >> 20}M"], check=True, stdout=subprocess.DEVNULL)
b = evlib.new_backend(image, extra=("--commit-interval", "100ms"))
cl = evlib.Client(b)


def version(c, g):
    head = f"cluster {c:05d} generation {g:06d} ".encode()
    rnd = random.Random(c * 1000003 + g).randbytes(3000)
    return ((head + rnd) * (C // (len(head) + 3000) + 1))[:C]


stop = threading.Event()
gens = [0] * NCL


def writer():
    g = 0
    rng = random.Random(1)
    while not stop.is_set():
        g += 1
        for c in rng.sample(range(NCL), 32):
            if rng.random() < 0.3:
                # partial: the first 8 KiB of the next version over the current one -> not a whole version
                # (skip: keep versions whole so the oracle is exact)
                pass
            assert cl.write(c * C // 512, version(c, g)) == 0
            gens[c] = g
        if g % 2 == 0:
            assert cl.flush() == 0


t = threading.Thread(target=writer)
t.start()
problems = []
try:
    for r in range(rounds):
        raw = os.path.join(work, f"cc{r}.raw")
        if os.path.exists(raw):
            os.unlink(raw)
        p = subprocess.run([BIN, "convert", image, raw], capture_output=True, text=True)
        q = subprocess.run([BIN, "check", image], capture_output=True, text=True)
        bad = []
        if p.returncode == 0:
            data = open(raw, "rb").read()
            for c in range(NCL):
                blk = data[c * C:(c + 1) * C]
                if blk == bytes(C):
                    continue
                try:
                    g = int(blk[25:31])
                except ValueError:
                    bad.append((c, blk[:32]))
                    continue
                if blk != version(c, g):
                    bad.append((c, g))
            os.unlink(raw)
        print(f"round {r}: convert rc {p.returncode} {p.stderr.strip()[:200]} | check rc {q.returncode} "
              f"{q.stdout.strip().splitlines()[-1][:150] if q.stdout.strip() else q.stderr.strip()[:200]} | bad clusters {len(bad)} {bad[:3]}",
              flush=True)
        if p.returncode != 0 or bad or q.returncode not in (0, 3) or "panicked" in p.stderr + q.stderr:
            problems.append(r)
finally:
    stop.set()
    t.join()
print("problems in rounds:", problems)
cl.close()
print("stop", b.stop())
