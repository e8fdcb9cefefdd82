"""Which signals end `serve` cleanly (committing completed, unflushed writes) and which lose them."""
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import evlib

work = sys.argv[1]
os.makedirs(work, exist_ok=True)
BIN = evlib.vu.BIN
C = 65536
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE, signal.SIGUSR2,
            signal.SIGALRM, signal.SIGUSR1):
    d = os.path.join(work, sig.name)
    os.makedirs(d, exist_ok=True)
    image = os.path.join(d, "s.img")
    if os.path.exists(image):
        os.unlink(image)
    subprocess.run([BIN, "create", image, "--size", "8M"], check=True, stdout=subprocess.DEVNULL)
    b = evlib.vu.Backend(image=image, queues=1, workdir=d)
    cl = evlib.Client(b)
    data = b"S" * C
    assert cl.write(0, data) == 0
    os.kill(b.p.pid, sig)
    try:
        b.p.wait(5)
        rc = b.p.returncode
    except subprocess.TimeoutExpired:
        rc = "still running"
        b.p.kill()
        b.p.wait()
    raw = os.path.join(d, "s.raw")
    if os.path.exists(raw):
        os.unlink(raw)
    subprocess.run([BIN, "convert", image, raw], check=True, capture_output=True)
    kept = open(raw, "rb").read(C) == data
    chk = subprocess.run([BIN, "check", image], capture_output=True).returncode
    log = b.text()
    print(f"{sig.name:8} exit={rc} unflushed write kept={kept} check={chk} panic={'panicked' in log}")
