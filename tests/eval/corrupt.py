"""Byte-flip campaign on a real image: check / convert / info / serve on every flipped copy.
Usage: corrupt.py IMAGE GOLDEN.raw WORKDIR [LIMIT]   (IMAGE and GOLDEN from gen_image.py)
Oracle: no panic; convert either fails or yields exactly the golden content; check exit 0 only when
convert is exact; serve refuses when check reports corrupt metadata other than one superblock copy
(one bad copy opens from the other by design). A damaged newest journal record is counted as a NOTE
(indistinguishable from a record torn by a crash)."""
import json
import os
import random
import shutil
import subprocess
import sys
import time

BIN = os.environ.get("INSITU_BLK", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../target/release/insitu-blk"))
image, golden = sys.argv[1], sys.argv[2]
work = sys.argv[3]
limit = int(sys.argv[4]) if len(sys.argv) > 4 else 10**9
os.makedirs(work, exist_ok=True)
data = open(image, "rb").read()
gold = open(golden, "rb").read()
rng = random.Random(int(os.environ.get("SEED", "1")))


def u64(b, o):
    return int.from_bytes(b[o:o + 8], "little")


size, C = u64(data, 24), int.from_bytes(data[32:36], "little")
N = -(-size // C)
K = -(-N // 255)
A = 4096 * (1 + K)
D = u64(data, 112)
J = u64(data, 104)
jo = u64(data, 96)
cp = [u64(data, 72), u64(data, 80)]
print(f"size={size} C={C} N={N} A={A} J={J} D={D} len={len(data)}")

targets = []  # (label, offset)
for sb in (0, 4096):
    for o in list(range(0, 128)) + [4092, 4093, 4094, 4095, 200]:
        targets.append((f"sb{sb // 4096}+{o}", sb + o))
for i, base in enumerate(cp):
    if data[base:base + 8] == b"INSITUCP":
        for o in list(range(0, 56)) + [4092, 4095, 100]:
            targets.append((f"cp{i}.hdr+{o}", base + o))
        m = u64(data, base + 32)
        for j in range(m):
            cb = base + 4096 * (1 + j)
            for o in list(range(0, 16)) + [16 + 16 * e + f for e in rng.sample(range(255), 6) for f in range(12)]:
                targets.append((f"cp{i}.chunk{j}+{o}", cb + o))
recs = []
for off in range(jo, jo + J, 4096):
    if data[off:off + 8] == b"INSITUJR":
        recs.append((u64(data, off + 8), off))
recs.sort()
print("journal records:", len(recs), "seqs", [s for s, _ in recs][:3], "...", [s for s, _ in recs][-3:])
for k, (seq, off) in enumerate(recs):
    e = int.from_bytes(data[off + 16:off + 20], "little")
    os_ = rng.sample(range(48), 12) if k in (0, len(recs) - 1, len(recs) // 2) else rng.sample(range(48), 2)
    os_ += [48 + 20 * x + f for x in rng.sample(range(max(e, 1)), min(e, 1)) for f in rng.sample(range(20), 3)] if e else []
    for o in os_:
        targets.append((f"jr{k}/{len(recs)}(seq{seq},E{e})+{o}", off + o))
# payload bytes: allocated 4K blocks of the data area
alloc = [o for o in range(D, len(data), 4096) if any(data[o:o + 4096:97])]
for o in rng.sample(alloc, min(60, len(alloc))):
    targets.append((f"data@{(o - D) // C}:{(o - D) % C}", o + rng.randrange(4096)))
print("targets", len(targets))
rng.shuffle(targets)
targets = targets[:limit]

findings = []
stats = {}


SLOW = []


def run(cmd, timeout=60):
    t0 = time.time()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        print("TIMEOUT", cmd, flush=True)
        return 124, "", "TIMEOUT"
    dt = time.time() - t0
    if dt > 0.5:
        SLOW.append((dt, cmd[1], CUR[0]))
        print(f"SLOW {dt:.2f}s {cmd[1]} {CUR[0]}", flush=True)
    return p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")


CUR = [None]


img = os.path.join(work, "c.img")
dirty = [True]
raw = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else work, f"corrupt-{os.getpid()}.raw")
for n, (label, off) in enumerate(targets):
    CUR[0] = label
    new_byte = data[off] ^ (0xFF if rng.random() < 0.5 else (1 << rng.randrange(8)))
    if n == 0 or dirty[0]:
        subprocess.run(["cp", "--sparse=always", image, img], check=True)
        dirty[0] = False
    fd = os.open(img, os.O_WRONLY)
    os.pwrite(fd, bytes([new_byte]), off)
    os.close(fd)
    if os.path.exists(raw):
        os.unlink(raw)
    crc, cout, cerr = run([BIN, "check", "--json", img])
    vrc, vout, verr = run([BIN, "convert", img, raw])
    irc, iout, ierr = run([BIN, "info", "--json", img])
    exact = None
    if vrc == 0:
        got = open(raw, "rb").read()
        exact = got == gold
    kind = label.split("+")[0].split("@")[0].split("(")[0]
    stats.setdefault(kind.rstrip("0123456789/"), {}).setdefault((crc, vrc, exact), 0)
    stats[kind.rstrip("0123456789/")][(crc, vrc, exact)] += 1
    bad = []
    for t in (cerr, verr, cout, ierr, iout):
        if "panicked" in t or "RUST_BACKTRACE" in t:
            bad.append("PANIC")
    newest_record = label.startswith(f"jr{len(recs) - 1}/")
    if newest_record and vrc == 0 and not exact and crc == 0:
        # A damaged newest record looks exactly like one torn by a crash: replay stops before it
        # and the image reads as of the commit before (the last FLUSH's commit is lost silently).
        stats.setdefault("NOTE newest journal record damaged: silent rollback", 0)
        stats["NOTE newest journal record damaged: silent rollback"] += 1
    else:
        if vrc == 0 and not exact:
            bad.append("convert succeeded with WRONG data")
        if crc == 0 and exact is not True:
            bad.append("check clean but data not exact")
    if crc not in (0, 1, 2, 3, 63):
        bad.append(f"check rc {crc}")
    srv = None
    if crc == 2 and not label.startswith(("data", "sb")) or rng.random() < 0.02:
        sock = os.path.join(work, "s.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        p = subprocess.Popen([BIN, "serve", "--socket-path", sock, "--blk-file", img], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < 5 and p.poll() is None and not os.path.exists(sock):
            time.sleep(0.02)
        alive = p.poll() is None
        if alive:
            p.terminate()
        sout = p.communicate(timeout=30)[0].decode(errors="replace")
        srv = "served" if alive else f"refused rc={p.returncode}"
        if "panicked" in sout:
            bad.append("serve PANIC")
        if crc == 2 and alive and not label.startswith("data"):
            # serve accepted an image whose metadata check calls corrupt
            try:
                j = json.loads(cout)
            except Exception:
                j = {}
            bad.append(f"serve opened read-write an image check calls corrupt: {cout[:300]}")
    if srv is not None:
        dirty[0] = True  # serve may have written (recovery, markers): start from a fresh copy
    else:
        fd = os.open(img, os.O_WRONLY)
        os.pwrite(fd, data[off:off + 1], off)
        os.close(fd)
    if bad:
        findings.append((label, off, bad, crc, cout[:400], cerr[:300], vrc, verr[:300], srv))
        print("FINDING", label, off, bad, "check", crc, cerr.strip()[:200], "| convert", vrc, verr.strip()[:200], srv,
              flush=True)
    if n % 50 == 0:
        print(n, "done", flush=True)

print("\nstats (check rc, convert rc, exact):")
for k, v in sorted(stats.items()):
    print(" ", k, v)
print("findings:", len(findings))
json.dump(findings, open(os.path.join(work, "findings.json"), "w"), indent=1)
