"""Disks of 512 B, 4 KiB + 512 B and 64 KiB + 512 B: I/O at the very end, past it, straddling it."""
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
for size in (512, 4096 + 512, 65536 + 512, 131072 - 512):
    image = os.path.join(work, f"t{size}.img")
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run([BIN, "create", image, "--size", str(size)], check=True, stdout=subprocess.DEVNULL)
    b = evlib.new_backend(image)
    cl = evlib.Client(b)
    cap = int.from_bytes(cl.cfg[3][0:8], "little")
    secs = size // 512
    last = secs - 1
    res = {
        "cap": cap,
        "w_last": cl.write(last, b"L" * 512),
        "r_last": cl.read(last, 512),
        "w_past": cl.write(secs, b"P" * 512),
        "w_straddle": cl.write(last, b"X" * 1024),
        "r_straddle": cl.read(last, 1024)[0],
        "wz_last": cl.segs(evlib.T_WRITE_ZEROES, [(last, 1, 0)]),
        "disc_all": cl.segs(evlib.T_DISCARD, [(0, secs, 0)]),
        "disc_past": cl.segs(evlib.T_DISCARD, [(0, secs + 1, 0)]),
        "w_all": cl.write(0, b"A" * size),
        "flush": cl.flush(),
    }
    st, d = res["r_last"]
    res["r_last"] = (st, d == b"L" * 512)
    cl.close()
    rc = b.stop()
    chk = subprocess.run([BIN, "check", image], capture_output=True).returncode
    raw = image + ".raw"
    if os.path.exists(raw):
        os.unlink(raw)
    subprocess.run([BIN, "convert", image, raw], check=True, capture_output=True)
    data = open(raw, "rb").read()
    print(size, res, "stop", rc, "check", chk, "raw ok", data == b"A" * size, "panic", "panicked" in b.text())
