"""Every codec x cluster size through the real daemon: random-sized unaligned writes (512 B .. 192 KiB),
write-zeroes and discards, FLUSH, reads checked live, then SIGTERM, convert compared, check clean."""
import os
import random
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
SIZE = 12 << 20
combos = [("lz4", "16K"), ("lz4", "128K"), ("snappy", "32K"), ("zstd", "64K"), ("zstd:-7", "16K"),
          ("zstd:22", "64K"), ("none", "4K"), ("none", "8K"), ("none", "16K"), ("none", "128K")]
for codec, cs in combos:
    d = os.path.join(work, f"{codec.replace(':', '_')}-{cs}")
    os.makedirs(d, exist_ok=True)
    image = os.path.join(d, "c.img")
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run([BIN, "create", image, "--size", str(SIZE), "-c", codec, "--cluster-size", cs], check=True,
                   stdout=subprocess.DEVNULL)
    rng = random.Random(hash((codec, cs)) & 0xFFFF)
    exp = bytearray(SIZE)
    b = evlib.vu.Backend(image=image, queues=1, workdir=d)
    cl = evlib.Client(b, mem_size=64 << 20)
    bad = []
    for i in range(400):
        n = 512 * rng.randrange(1, 385)
        off = 512 * rng.randrange(0, (SIZE - n) // 512)
        r = rng.random()
        if r < 0.1:
            st = cl.segs(evlib.T_WRITE_ZEROES, [(off // 512, n // 512, rng.choice([0, 1]))])
            if st == 0:
                exp[off:off + n] = bytes(n)
        elif r < 0.15:
            st = cl.segs(evlib.T_DISCARD, [(off // 512, n // 512, 0)])
            if st == 0:
                # discard: content unspecified by virtio; this backend zeroes
                exp[off:off + n] = bytes(n)
        else:
            kind = rng.randrange(3)
            data = rng.randbytes(n) if kind == 0 else (b"text %d " % i * (n // 6 + 1))[:n] if kind == 1 else bytes(n)
            st = cl.write(off // 512, data)
            if st == 0:
                exp[off:off + n] = data
        if st != 0:
            bad.append(("status", i, st))
        if i % 50 == 49:
            assert cl.flush() == 0
            o = 512 * rng.randrange(0, (SIZE - 262144) // 512)
            st, got = cl.read(o // 512, 262144)
            if st != 0 or got != exp[o:o + 262144]:
                bad.append(("read", i, o))
    cl.close()
    rc = b.stop()
    raw = os.path.join(d, "c.raw")
    if os.path.exists(raw):
        os.unlink(raw)
    subprocess.run([BIN, "convert", image, raw], check=True, capture_output=True)
    same = open(raw, "rb").read() == bytes(exp)
    chk = subprocess.run([BIN, "check", image], capture_output=True, text=True)
    info = subprocess.run([BIN, "info", image], capture_output=True, text=True).stdout
    ratio = [l for l in info.splitlines() if "data:" in l]
    print(f"{codec:8} {cs:5} stop={rc} check={chk.returncode} export-exact={same} problems={bad[:5]} {ratio}",
          flush=True)
