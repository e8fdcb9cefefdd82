"""SIGKILL `serve` at random moments during a quiesce (GET_VRING_BASE after many buffered small
writes): after a restart, every sector flushed before holds its flushed value or a later one that
was written (I2/I3 per 4 KiB block), check reports no corruption."""
import os
import random
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib
from vu import GET_VRING_BASE, SET_VRING_ENABLE

work = sys.argv[1]
iters = int(sys.argv[2]) if len(sys.argv) > 2 else 10
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
C = 65536
SIZE = 32 << 20
rng = random.Random(int(os.environ.get("SEED", "4")))
for it in range(iters):
    image = os.path.join(work, "kq.img")
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run([BIN, "create", image, "--size", str(SIZE)], check=True, stdout=subprocess.DEVNULL)
    b = evlib.vu.Backend(image=image, queues=1, workdir=work)
    cl = evlib.Client(b)
    history = {}   # 4K block -> [(i, value)]
    for i in range(300):
        blk = rng.randrange(SIZE // 4096)
        val = struct.pack("<II", it, i) * 512
        assert cl.write(blk * 8, val) == 0
        history.setdefault(blk, []).append((i, val))
        if i == 150:
            assert cl.flush() == 0
    delay = rng.random() * 0.03

    def stop():
        try:
            cl.c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 0))
            cl.c.call(GET_VRING_BASE, struct.pack("<II", 0, 0))
        except Exception:
            pass
    t = threading.Thread(target=stop)
    t.start()
    time.sleep(delay)
    b.p.kill()
    b.p.wait()
    t.join(5)
    chk = subprocess.run([BIN, "check", image], capture_output=True, text=True)
    raw = os.path.join("/dev/shm", f"kq-{os.getpid()}.raw")
    if os.path.exists(raw):
        os.unlink(raw)
    conv = subprocess.run([BIN, "convert", image, raw], capture_output=True, text=True)
    problems = []
    if chk.returncode not in (0, 3):
        problems.append(f"check {chk.returncode}: {chk.stdout[-300:]}")
    if conv.returncode != 0:
        problems.append(f"convert {conv.returncode}: {conv.stderr[-300:]}")
    else:
        data = open(raw, "rb").read()
        os.unlink(raw)
        for blk, hist in history.items():
            got = data[blk * 4096:(blk + 1) * 4096]
            before = [v for i, v in hist if i <= 150]
            after = [v for i, v in hist if i > 150]
            allowed = ([before[-1]] if before else [bytes(4096)]) + after
            if got not in allowed:
                problems.append(f"block {blk}: {got[:8].hex()} is not its flushed value or a later write")
    print(f"iter {it} kill after {delay * 1000:.1f} ms of quiesce: check {chk.returncode} problems {problems[:3]}",
          flush=True)
