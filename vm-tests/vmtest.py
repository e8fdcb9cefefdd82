#!/usr/bin/env python3
"""VM tests of insitu-blk: real QEMU guests on a real vhost-user-blk backend.

Each test starts the backend (`insitu-blk serve` by default, or qemu-storage-daemon to validate the
harness itself), boots the test guest built by images/build-guest.sh with `qemu-system-x86_64`
(vhost-user-blk-pci, shared memfd RAM, a QMP socket), hands the guest a shell script through fw_cfg,
and watches the serial console for markers. A second serial port is a control channel: the guest
prints `INSITU-WAIT <tag>` and blocks until the host answers, so the host can measure or act at a
known point of the guest's run.

Usage:
    python3 vm-tests/vmtest.py [--backend insitu|qsd] [--keep] [TEST ...]   (default: all tests)
    python3 vm-tests/vmtest.py --list
Environment:
    VMTEST_ACCEL=tcg|kvm        accelerator (default tcg: KVM crawls on nested CI machines)
    INSITU_BLK_BIN=PATH         the insitu-blk binary (default target/debug/insitu-blk)
    VMTEST_BACKEND=insitu|qsd   default backend
    VMTEST_GUEST_DIR=DIR        guest image directory (default .cache/guest)
    VMTEST_WORK_DIR=DIR         where test directories go (default .cache/vmtests)
    VMTEST_TIMEOUT_SCALE=F      multiply every timeout (e.g. 3 on a slow machine)
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_DIR = os.environ.get("VMTEST_GUEST_DIR", os.path.join(REPO, ".cache", "guest"))
WORK_DIR = os.environ.get("VMTEST_WORK_DIR", os.path.join(REPO, ".cache", "vmtests"))
ACCEL = os.environ.get("VMTEST_ACCEL", "tcg")
TIMEOUT_SCALE = float(os.environ.get("VMTEST_TIMEOUT_SCALE", "1"))
INSITU_BIN = os.environ.get("INSITU_BLK_BIN", os.path.join(REPO, "target", "debug", "insitu-blk"))

DISK_SIZE = 1 << 30  # 1 GiB logical disk
GUEST_RAM = "1G"


class TestFailure(Exception):
    pass


def log(msg):
    print(f"[vmtest {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def scaled(seconds):
    return seconds * TIMEOUT_SCALE


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def image_lock_holders(path):
    """Pids holding a lock on path, from /proc/locks (OFD locks show pid -1)."""
    ino = os.stat(path).st_ino
    pids = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (blocked waiters have a "->" field)
            if "->" in fields:
                continue
            try:
                pid, dev_ino = int(fields[4]), fields[5]
            except (IndexError, ValueError):
                continue
            if dev_ino.rsplit(":", 1)[-1] == str(ino):
                pids.append(pid)
    return pids


def tail(path, lines=80):
    try:
        with open(path, "rb") as f:
            data = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(data[-lines:])
    except OSError as e:
        return f"<cannot read {path}: {e}>"


# --------------------------------------------------------------------------------------------
# Backends


class Backend:
    """One backend process serving one image on one vhost-user socket."""

    name = "?"

    def __init__(self, test, image, sock, label, extra_args=()):
        self.test = test
        self.image = image
        self.sock = sock
        self.label = label
        self.extra_args = list(extra_args)  # further `serve` options (our backend only)
        self.log_path = os.path.join(test.dir, f"backend-{label}.log")
        self.proc = None

    def command(self, wait_lock=False, num_queues=2):
        raise NotImplementedError

    def start(self, wait_lock=False, num_queues=2, wait_socket=True):
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        cmd = self.command(wait_lock=wait_lock, num_queues=num_queues)
        logf = open(self.log_path, "ab")
        logf.write(f"### {' '.join(cmd)}\n".encode())
        logf.flush()
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        self.test.register(self)
        if wait_socket:
            self.wait_socket()
        return self

    def wait_socket(self, timeout=30):
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TestFailure(f"backend {self.label} exited with {self.proc.returncode} before listening")
            if os.path.exists(self.sock):
                return
            time.sleep(0.05)
        raise TestFailure(f"backend {self.label} did not create {self.sock} within {timeout}s")

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout=30):
        """SIGTERM, and require a clean exit (0) within the timeout."""
        if not self.alive():
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=scaled(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            raise TestFailure(f"backend {self.label} did not exit within {timeout}s of SIGTERM")
        return rc

    def kill(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def kill_with_a_request_in_flight(self, timeout):
        """SIGKILL, at a moment the backend has a guest request recorded in its inflight buffer
        (INFLIGHT_SHMFD): it is stopped (SIGSTOP) and looked at until one is, for up to `timeout`
        seconds. Returns the (queue, head) pairs recorded at the kill ([] if none was seen), or
        None for a backend without such a buffer."""
        self.kill()
        return None

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def holds_lock(self):
        """True while the backend process holds a file lock (flock/POSIX) on the image."""
        return self.alive() and self.proc.pid in image_lock_holders(self.image)

    # Image helpers (class methods: they need no running backend)
    @classmethod
    def create_image(cls, path, size):
        raise NotImplementedError

    @classmethod
    def export_raw(cls, image, raw_path):
        """Writes the logical content of an (idle) image to a raw file."""
        raise NotImplementedError

    @classmethod
    def check_image(cls, image, after_crash=False):
        """Offline consistency check of an idle image; returns its output or raises."""
        return ""

    quiesce_log_pattern = None


class InsituBackend(Backend):
    name = "insitu"
    quiesce_log_pattern = re.compile(r"quiesced", re.I)
    resume_log_pattern = re.compile(r"resumed", re.I)

    def command(self, wait_lock=False, num_queues=2):
        cmd = [INSITU_BIN, "serve", "--socket-path", self.sock, "--blk-file", self.image,
               "--num-queues", str(num_queues)]
        if wait_lock:
            cmd.append("--wait-lock")
        return cmd + self.extra_args

    @classmethod
    def create_image(cls, path, size):
        run([INSITU_BIN, "create", path, "--size", str(size)])

    @classmethod
    def export_raw(cls, image, raw_path):
        run([INSITU_BIN, "convert", image, raw_path])

    @classmethod
    def check_image(cls, image, after_crash=False):
        """`insitu-blk check` must be clean (exit 0). After a SIGKILL of the backend, leaked space
        (exit 3, qemu-img's convention: allocated but unreferenced, data intact) is tolerated and
        reported: writes in flight at the kill went to free space that no commit refers to."""
        p = subprocess.run([INSITU_BIN, "check", image], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           timeout=scaled(300))
        out = p.stdout.decode("utf-8", "replace")
        if p.returncode == 0 or (after_crash and p.returncode == 3):
            if p.returncode == 3:
                log(f"check after a crash reports leaked space (tolerated): {out.strip().splitlines()[0]}")
            return out
        raise TestFailure(f"insitu-blk check {image} exited {p.returncode}:\n{out}")

    @classmethod
    def info(cls, image):
        out = run([INSITU_BIN, "info", image, "--json"])
        return json.loads(out)

    def inflight_heads(self):
        """The (queue, head) pairs the backend's inflight buffer records in flight (read through
        the buffer's fd in /proc; the spec's split layout, 64-byte aligned queue regions)."""
        heads = []
        for fd in glob.glob(f"/proc/{self.proc.pid}/fd/*"):
            try:
                if "insitu-blk-inflight" not in os.readlink(fd):
                    continue
                with open(fd, "rb") as f:
                    buf = f.read()
            except OSError:
                continue
            desc_num = struct.unpack_from("<H", buf, 10)[0] if len(buf) >= 16 else 0
            if desc_num == 0:
                continue
            region = (16 + 16 * desc_num + 63) // 64 * 64
            heads += [(q, h) for q in range(len(buf) // region) for h in range(desc_num)
                      if buf[q * region + 16 + 16 * h] == 1]
        return heads

    def kill_with_a_request_in_flight(self, timeout):
        caught = []
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            self.proc.send_signal(signal.SIGSTOP)
            time.sleep(0.005)  # every thread stopped (a group stop takes microseconds)
            caught = self.inflight_heads()
            if caught:
                break
            self.proc.send_signal(signal.SIGCONT)
            time.sleep(0.01)
        self.kill()
        return caught


class QsdBackend(Backend):
    """qemu-storage-daemon exporting a raw file: the reference backend for the harness itself."""

    name = "qsd"

    def command(self, wait_lock=False, num_queues=2):
        # Two qsd on one file (migration) need locking=off: qsd has no "wait for the lock".
        locking = "off" if wait_lock else "auto"
        return ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={self.image},discard=unmap,"
                              f"locking={locking},cache.direct=off",
                "--export", f"type=vhost-user-blk,id=e,node-name=f,addr.type=unix,"
                            f"addr.path={self.sock},writable=on,num-queues={num_queues}"]

    @classmethod
    def create_image(cls, path, size):
        with open(path, "wb") as f:
            f.truncate(size)

    @classmethod
    def export_raw(cls, image, raw_path):
        shutil.copyfile(image, raw_path)


BACKENDS = {"insitu": InsituBackend, "qsd": QsdBackend}


def run(cmd, timeout=300, check=True):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=scaled(timeout))
    out = p.stdout.decode("utf-8", "replace")
    if check and p.returncode != 0:
        raise TestFailure(f"command failed ({p.returncode}): {' '.join(cmd)}\n{out}")
    return out


# --------------------------------------------------------------------------------------------
# QMP


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.monotonic() + scaled(timeout)
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise TestFailure(f"cannot connect to QMP socket {path}")
                time.sleep(0.05)
        self.sock.settimeout(scaled(60))
        self.buf = b""
        self.events = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise TestFailure("QMP connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            resp = self._read()
            if "event" in resp:
                self.events.append(resp)
                continue
            if "error" in resp:
                raise TestFailure(f"QMP {name} failed: {resp['error']}")
            return resp.get("return")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# --------------------------------------------------------------------------------------------
# QEMU guest


class Guest:
    def __init__(self, test, label, script, sock, smp=2, num_queues=2, incoming=None, reconnect=False,
                 queue_size=None, no_reboot=True, disk_bus=None, extra_args=(), disk_props=""):
        self.test = test
        self.label = label
        self.console = os.path.join(test.dir, f"console-{label}.log")
        # Unix socket paths are limited to 108 bytes: sockets live in the test's short directory.
        self.qmp_path = os.path.join(test.sock_dir, f"qmp-{label}.sock")
        self.ctl_path = os.path.join(test.sock_dir, f"ctl-{label}.sock")
        self.script_path = os.path.join(test.dir, f"script-{label}.sh")
        self.stderr_path = os.path.join(test.dir, f"qemu-{label}.log")
        with open(self.script_path, "w") as f:
            f.write(GUEST_LIB + script)
        for p in (self.qmp_path, self.ctl_path, self.console):
            if os.path.exists(p):
                os.unlink(p)
        open(self.console, "w").close()
        accel = ["-accel", "kvm", "-cpu", "host"] if ACCEL == "kvm" else ["-accel", "tcg", "-cpu", "max"]
        chardev = f"socket,id=vu0,path={sock}"
        if reconnect:
            chardev += ",reconnect-ms=500"
        self.cmd = [
            "qemu-system-x86_64", "-machine", "q35", *accel, "-smp", str(smp), "-m", GUEST_RAM,
            "-object", f"memory-backend-memfd,id=mem,size={GUEST_RAM},share=on",
            "-numa", "node,memdev=mem",
            "-nodefaults", "-no-user-config", "-display", "none", *(["-no-reboot"] if no_reboot else []),
            "-kernel", os.path.join(GUEST_DIR, "vmlinuz"),
            "-initrd", os.path.join(GUEST_DIR, "initramfs.cpio"),
            "-append", "console=ttyS0 loglevel=6 panic=-1 rdinit=/init",
            "-chardev", f"file,id=con,path={self.console}", "-serial", "chardev:con",
            "-chardev", f"socket,id=ctl,path={self.ctl_path},server=on,wait=off", "-serial", "chardev:ctl",
            "-fw_cfg", f"name=opt/insitu/test,file={self.script_path}",
            "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
            *extra_args,  # before the disk: e.g. the PCIe root port it plugs into
            "-chardev", chardev,
            "-device", f"vhost-user-blk-pci,chardev=vu0,num-queues={num_queues},id=disk0"
            + (f",queue-size={queue_size}" if queue_size else "") + (f",bus={disk_bus}" if disk_bus else "")
            + (f",{disk_props}" if disk_props else ""),
        ]
        if incoming:
            self.cmd += ["-incoming", incoming]
        self.proc = None
        self.qmp = None
        self.ctl = None
        self.ctl_answered = set()

    def start(self):
        errf = open(self.stderr_path, "ab")
        errf.write(f"### {' '.join(self.cmd)}\n".encode())
        errf.flush()
        self.proc = subprocess.Popen(self.cmd, stdout=errf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        errf.close()
        self.test.register(self)
        self.qmp = Qmp(self.qmp_path)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def text(self):
        with open(self.console, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\r\n", "\n")

    def wait_for(self, pattern, timeout, allow_exit=False):
        """Waits until the console matches pattern; returns the match."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + scaled(timeout)
        while True:
            text = self.text()
            m = rx.search(text)
            if m:
                return m
            fail = re.search(r"^INSITU-RESULT: FAIL.*$|Kernel panic.*$", text, re.M)
            if fail:
                raise TestFailure(f"guest {self.label} failed while waiting for /{pattern}/: {fail.group(0)}")
            if not self.alive() and not allow_exit:
                raise TestFailure(f"QEMU {self.label} exited ({self.proc.returncode}) while waiting for /{pattern}/")
            if time.monotonic() > deadline:
                booted = "INSITU-BOOTED" in text or "-incoming" in self.cmd
                raise TestFailure(f"timeout ({timeout}s) waiting for /{pattern}/ on guest {self.label}"
                                  + ("" if booted else " (the guest never reached init: boot hang)"))
            time.sleep(0.1)

    def answer(self, tag, reply="go"):
        """Answers the guest's `host_wait TAG` on the control serial port."""
        if self.ctl is None:
            self.ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.ctl.connect(self.ctl_path)
        self.ctl.sendall(f"{reply}\n".encode())
        self.ctl_answered.add(tag)

    def wait_host_point(self, tag, timeout):
        self.wait_for(rf"^INSITU-WAIT {re.escape(tag)}\s*$", timeout)

    def wait_result(self, timeout):
        """Waits for the guest's final marker and for QEMU to exit; raises unless PASS."""
        m = self.wait_for(r"^INSITU-RESULT: (PASS|FAIL.*)$", timeout, allow_exit=True)
        if m.group(1) != "PASS":
            raise TestFailure(f"guest {self.label}: {m.group(0)}")
        try:
            self.proc.wait(timeout=scaled(30))
        except subprocess.TimeoutExpired:
            raise TestFailure(f"QEMU {self.label} did not exit after the guest powered off")
        return self.text()

    def quit(self):
        if self.alive():
            try:
                self.qmp.cmd("quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=scaled(30))
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def close(self):
        for c in (self.qmp, self.ctl):
            if c is not None:
                c.close()


# Shell helpers prepended to every guest script. The guest's disk under test is /dev/vda.
GUEST_LIB = r"""
set -e
step() { echo "INSITU-STEP: $*"; }
host_wait() {
    # Blocks until the host answers on the control port (second serial port, ttyS1). The port is
    # opened before the host is told to answer and stays open until the answer is read: bytes
    # that reach a serial port nobody holds open are dropped, and the host may answer at once.
    exec 3</dev/ttyS1
    stty -F /dev/ttyS1 raw -echo 2>/dev/null || true
    echo "INSITU-WAIT $1"
    read -r _reply <&3
    exec 3<&-
}
mkfs_disk() {
    step "mkfs.ext4 /dev/vda"
    mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 -b 4096 /dev/vda
}
mount_disk() { mount -t ext4 -o noinit_itable${1:+,$1} /dev/vda /mnt; }
fresh_fs_measured() {
    # A new ext4 mounted on /mnt; the host measures the image's allocation at "formatted".
    mkfs_disk
    mount_disk
    sync
    host_wait formatted
}
checksums() { (cd "$1" && find . -type f ! -name SUMS | sort | xargs md5sum); }
blk_pattern() {
    # 64 KiB block whose every line names block $1; the host rebuilds it to check.
    yes "INSITU-BLOCK-$(printf %08d "$1")-" | head -c 65536
}
"""


def blk_pattern(n):
    line = f"INSITU-BLOCK-{n:08d}-\n".encode()
    return (line * (65536 // len(line) + 1))[:65536]


# --------------------------------------------------------------------------------------------
# Test context


class Test:
    def __init__(self, name, backend_cls):
        self.name = name
        self.backend_cls = backend_cls
        self.dir = os.path.join(WORK_DIR, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        # Unix socket paths are limited to 108 bytes: keep the sockets in a short directory.
        self.sock_dir = f"/tmp/vmtest-{os.getpid()}-{name}"
        shutil.rmtree(self.sock_dir, ignore_errors=True)
        os.makedirs(self.sock_dir)
        self.processes = []
        self.image = os.path.join(self.dir, "disk.img")
        self.notes = []

    def sock(self, label):
        return os.path.join(self.sock_dir, f"{label}.sock")

    def register(self, proc_owner):
        self.processes.append(proc_owner)

    def backend(self, label, image=None, sock=None, extra_args=()):
        return self.backend_cls(self, image or self.image, sock or self.sock(label), label, extra_args)

    def guest(self, label, script, sock, **kw):
        return Guest(self, label, script, sock, **kw)

    def note(self, msg):
        log(f"{self.name}: {msg}")
        self.notes.append(msg)

    def cleanup(self):
        for p in reversed(self.processes):
            try:
                p.kill()
            except Exception:
                pass
            if isinstance(p, Guest):
                p.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)

    def dump(self):
        """On failure: every guest console and backend log of this test."""
        for p in self.processes:
            if isinstance(p, Guest):
                print(f"----- guest console {p.label} (last 120 lines) -----")
                print(tail(p.console, 120))
                print(f"----- qemu {p.label} stderr -----")
                print(tail(p.stderr_path, 40))
            else:
                print(f"----- backend log {p.label} (last 120 lines) -----")
                print(tail(p.log_path, 120))
        sys.stdout.flush()



# --------------------------------------------------------------------------------------------
# Shared pieces of the tests

FIO_VERIFY = ("fio --name=verify --filename=/dev/vda --thread --ioengine=libaio --direct=1 --rw=randwrite "
              "--bsrange=4k-64k --iodepth=8 --numjobs=2 --size={size} --offset_increment=256M "
              "--verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 --group_reporting")

COUNTER_BASE_BLOCK = (768 << 20) // 65536  # counter blocks live in [768 MiB, 1 GiB): fio stays below 512 MiB
COUNTER_MAX = (256 << 20) // 65536

# A verified fio run in the background plus a "counter writer": 64 KiB O_DIRECT writes of numbered
# blocks, each announced on the console (`INSITU-W n`) only after it completed. Whatever the host
# does (pause, migrate), every announced block must be readable from the image afterwards.
WORKLOAD = r"""
step "workload: fio verify + counter writer"
%(fio)s > /tmp/fio.out 2>&1 &
fiopid=$!
(
    n=0
    while kill -0 $fiopid 2>/dev/null && [ $n -lt %(max)d ]; do
        blk_pattern $n > /tmp/blk
        dd if=/tmp/blk of=/dev/vda bs=65536 seek=$((%(base)d + n)) oflag=direct conv=notrunc 2>/dev/null
        echo "INSITU-W $n"
        # A guest FLUSH now and then: it must never fail (a migration or a pause must not
        # look like a lost-write event to the guest).
        if [ $((n %% 4)) = 3 ]; then
            sync /dev/vda || echo "INSITU-FLUSH-FAILED $n"
        fi
        n=$((n + 1))
    done
) &
wpid=$!
rc=0
wait $fiopid || rc=$?
wait $wpid
cat /tmp/fio.out
echo "INSITU-FIO-DONE rc=$rc"
[ $rc = 0 ]
grep -q 'err= 0' /tmp/fio.out
step "a cache flush after the workload (the first one after a migration or a pause) succeeds"
sync /dev/vda
""" % {"fio": FIO_VERIFY.format(size="64M"), "max": COUNTER_MAX, "base": COUNTER_BASE_BLOCK}


def no_failed_flush(*texts):
    """The WORKLOAD's periodic guest FLUSHes all succeeded."""
    failed = [m for text in texts for m in re.findall(r"^INSITU-FLUSH-FAILED \d+", text, re.M)]
    if failed:
        raise TestFailure(f"guest FLUSH failed: {failed}")


def counters_announced(*texts):
    ns = [int(n) for text in texts for n in re.findall(r"^INSITU-W (\d+)\s*$", text, re.M)]
    return max(ns) if ns else -1


def verify_counter_blocks(t, image, last, label):
    """Exports the image's logical content and checks counter blocks 0..last."""
    raw = os.path.join(t.dir, f"export-{label}.raw")
    if os.path.exists(raw):
        os.unlink(raw)
    t.backend_cls.export_raw(image, raw)
    bad = []
    with open(raw, "rb") as f:
        for n in range(last + 1):
            f.seek((COUNTER_BASE_BLOCK + n) * 65536)
            if f.read(65536) != blk_pattern(n):
                bad.append(n)
    os.unlink(raw)
    if bad:
        raise TestFailure(f"{label}: {len(bad)} of {last + 1} completed counter blocks are wrong "
                          f"(first: {bad[:10]})")
    t.note(f"{label}: counter blocks 0..{last} intact")


def snapshot_image(t, image, label):
    dst = os.path.join(t.dir, f"snapshot-{label}.img")
    run(["cp", "--sparse=always", image, dst])
    return dst


def quiesce_log_check(t, backend, log_offset, what):
    """Our backend must log that it quiesced (or resumed) after log_offset."""
    if backend.name != "insitu":
        return
    rx = backend.quiesce_log_pattern if what == "quiesced" else backend.resume_log_pattern
    deadline = time.monotonic() + scaled(15)
    while time.monotonic() < deadline:
        if rx.search(backend.log_text()[log_offset:]):
            t.note(f"backend {backend.label} logged '{what}'")
            return
        time.sleep(0.1)
    raise TestFailure(f"backend {backend.label} did not log '{what}' within 15s")


# --------------------------------------------------------------------------------------------
# The tests


def test_ext4(t):
    """a. ext4: real files, checksums, fsck; new backend + new guest: fsck clean, checksums match."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b1 = t.backend("b1").start()
    g1 = t.guest("boot1", r"""
mkfs_disk
mount_disk
step "copy real files"
cp -a /files/. /mnt/
checksums /mnt > /tmp/SUMS
checksums /files > /tmp/SUMS.orig
cmp /tmp/SUMS /tmp/SUMS.orig
cp /tmp/SUMS /mnt/SUMS
echo "INSITU-SUMS $(md5sum < /mnt/SUMS | cut -d' ' -f1) files=$(wc -l < /mnt/SUMS)"
sync
umount /mnt
step "e2fsck -fn"
e2fsck -fn /dev/vda
""", b1.sock).start()
    text1 = g1.wait_result(scaled(300))
    sums1 = re.search(r"^INSITU-SUMS (\w+) files=(\d+)", text1, re.M)
    rc = b1.stop()
    if rc != 0:
        raise TestFailure(f"backend b1 exited with {rc} on SIGTERM")
    t.note(f"boot 1: {sums1.group(2)} files copied and checksummed")
    t.backend_cls.check_image(t.image)
    b2 = t.backend("b2").start()
    g2 = t.guest("boot2", r"""
step "e2fsck -fn after backend restart"
e2fsck -fn /dev/vda
mount_disk ro
echo "INSITU-SUMS $(md5sum < /mnt/SUMS | cut -d' ' -f1) files=$(wc -l < /mnt/SUMS)"
step "md5sum -c"
cd /mnt
if ! md5sum -c SUMS > /tmp/check.out 2>&1; then grep -v ': OK$' /tmp/check.out | head -20; exit 1; fi
cd /
umount /mnt
""", b2.sock).start()
    text2 = g2.wait_result(scaled(300))
    sums2 = re.search(r"^INSITU-SUMS (\w+) files=(\d+)", text2, re.M)
    if sums1.groups() != sums2.groups():
        raise TestFailure(f"checksum lists differ: {sums1.groups()} vs {sums2.groups()}")
    b2.stop()


def test_fio(t):
    """b. fio verify=crc32c, random writes, 2 jobs, -smp 2, num-queues=2, queue-size=1024."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start(num_queues=2)
    g = t.guest("boot1", "step fio\n" + FIO_VERIFY.format(size="96M") + " > /tmp/fio.out 2>&1 || "
                "{ cat /tmp/fio.out; exit 1; }\ncat /tmp/fio.out\ngrep -q 'err= 0' /tmp/fio.out\n",
                # The largest ring QEMU allows (libvirt users tune it up); QEMU's default is 128.
                b.sock, smp=2, num_queues=2, queue_size=1024).start()
    text = g.wait_result(scaled(400))
    m = re.search(r"WRITE: bw=.*", text)
    t.note(f"fio: {m.group(0) if m else '?'}")
    if b.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")
    t.backend_cls.check_image(t.image)


def test_pause(t):
    """c. pause/resume: QMP stop while the guest writes; quiesced; cont; the workload verifies."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start()
    g = t.guest("boot1", WORKLOAD, b.sock).start()
    g.wait_for(r"^INSITU-W 5\s*$", scaled(120))
    time.sleep(1)
    log_offset = len(b.log_text())
    g.qmp.cmd("stop")
    status = g.qmp.cmd("query-status")
    if status["running"]:
        raise TestFailure(f"VM still running after stop: {status}")
    text = g.text()
    if "INSITU-FIO-DONE" in text:
        raise TestFailure("the workload ended before the pause: the test did not pause a writing guest")
    quiesce_log_check(t, b, log_offset, "quiesced")
    time.sleep(0.5)
    last = counters_announced(g.text())
    # While paused, the image on the host must hold every write the guest saw complete.
    snap = snapshot_image(t, t.image, "paused")
    t.backend_cls.check_image(snap)
    verify_counter_blocks(t, snap, last, "paused snapshot")
    os.unlink(snap)
    time.sleep(1)
    log_offset = len(b.log_text())
    g.qmp.cmd("cont")
    quiesce_log_check(t, b, log_offset, "resumed")
    text = g.wait_result(scaled(400))
    no_failed_flush(text)
    last = counters_announced(text)
    if b.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")
    t.backend_cls.check_image(t.image)
    verify_counter_blocks(t, t.image, last, "after resume")


def test_migrate(t):
    """d. live migration: destination backend with --wait-lock on the same image; migrate while writing."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    src_b = t.backend("src").start()
    src = t.guest("src", WORKLOAD, src_b.sock, reconnect=True).start()
    dst_b = t.backend("dst").start(wait_lock=True, wait_socket=False)
    mig_sock = os.path.join(t.sock_dir, "mig.sock")
    dst = t.guest("dst", WORKLOAD, dst_b.sock, reconnect=True, incoming=f"unix:{mig_sock}").start()
    src.wait_for(r"^INSITU-W 5\s*$", scaled(120))
    if dst.qmp.cmd("query-status")["status"] != "inmigrate":
        raise TestFailure(f"destination not waiting for migration: {dst.qmp.cmd('query-status')}")
    t0 = time.monotonic()
    src.qmp.cmd("migrate", uri=f"unix:{mig_sock}")
    deadline = time.monotonic() + scaled(180)
    while True:
        info = src.qmp.cmd("query-migrate")
        if info.get("status") == "completed":
            break
        if info.get("status") in ("failed", "cancelled"):
            raise TestFailure(f"migration {info.get('status')}: {info}")
        if time.monotonic() > deadline:
            raise TestFailure(f"migration did not complete in 180s: {info}")
        time.sleep(0.2)
    t.note(f"migration completed in {time.monotonic() - t0:.1f}s "
           f"(downtime {info.get('downtime')} ms, {info.get('ram', {}).get('transferred')} bytes)")
    if "INSITU-FIO-DONE" in src.text():
        raise TestFailure("the workload ended before the migration: the test did not migrate a writing guest")
    src_last = counters_announced(src.text())
    st = dst.qmp.cmd("query-status")
    if st["status"] != "running":
        raise TestFailure(f"destination not running after migration: {st}")
    if src_b.name == "insitu":
        # The destination can only resume (take the writer lock) once the source released it.
        quiesce_log_check(t, dst_b, 0, "resumed")
        if src_b.holds_lock():
            raise TestFailure("the source backend still holds a lock on the image after the migration")
        if dst_b.proc.pid not in image_lock_holders(t.image):
            raise TestFailure(f"the destination backend does not hold the image lock: "
                              f"holders {image_lock_holders(t.image)}")
        t.note("source backend released the image; the destination holds its lock")
    src.quit()
    if src_b.name != "insitu":
        src_b.stop()
    text = dst.wait_result(scaled(400))
    t.note(f"guest finished and verified on the destination; counters on source up to {src_last}")
    no_failed_flush(src.text(), text)
    last = counters_announced(src.text(), text)
    if dst_b.stop() != 0:
        raise TestFailure("destination backend exited non-zero on SIGTERM")
    src_b.stop()
    t.backend_cls.check_image(t.image)
    verify_counter_blocks(t, t.image, last, "after migration")


def test_restart(t):
    """e. SIGKILL the backend while the guest writes; restart; QEMU reconnects; synced data survives.

    A backend killed with writes it completed but had not committed loses them (they were in its
    volatile cache, like a disk's write cache). The guest did not die with it, so the restarted
    backend fails the guest's next FLUSH once (I2: a FLUSH that succeeds makes every earlier
    completed write durable). The test accepts exactly the two honest outcomes for such a write:
    it is intact, or the guest's first flush after the restart failed.
    """
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b0 = t.backend("b0").start()
    g = t.guest("boot1", r"""
step "phase 1: a raw O_DIRECT write completed (not flushed) before a kill, fsync after the restart"
dd if=/dev/urandom of=/tmp/pre bs=65536 count=4 2>/dev/null
dd if=/tmp/pre of=/dev/vda bs=65536 count=4 seek=4096 oflag=direct conv=notrunc 2>/dev/null
echo "INSITU-PENDING $(md5sum < /tmp/pre | cut -d' ' -f1)"
host_wait kill1
set +e
sync /dev/vda; rc1=$?
sync /dev/vda; rc2=$?
set -e
got=$(dd if=/dev/vda bs=65536 count=4 skip=4096 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
echo "INSITU-PHASE1 first-fsync=$rc1 second-fsync=$rc2 data=$got"
mkfs_disk
mount_disk commit=300
step "phase 2 writer: 256 KiB files, each fsynced before it is announced"
(
    i=0
    while [ ! -e /tmp/stop ]; do
        if dd if=/dev/urandom of=/mnt/f$i bs=65536 count=4 2>/dev/null && sync /mnt/f$i; then
            echo "INSITU-SYNCED $i $(md5sum < /mnt/f$i | cut -d' ' -f1)"
        else
            echo "INSITU-SYNC-FAILED $i"
            sleep 0.2
        fi
        i=$((i + 1))
    done
) &
wpid=$!
# A second writer keeps O_DIRECT requests in flight at any moment (so the kill hits some). Its data
# is never flushed, so nothing is asserted about it after the restart: it reports its errors.
(
    n=0; errors=0
    while [ ! -e /tmp/stop ]; do
        dd if=/dev/zero of=/mnt/stream bs=65536 count=16 seek=$(( (n % 64) * 16 )) oflag=direct \
            conv=notrunc 2>/dev/null || errors=$((errors + 1))
        n=$((n + 1))
    done
    echo "INSITU-STREAM writes=$n errors=$errors"
) &
spid=$!
# Requests the guest has in flight on the disk (reads writes), twice a second, for the host's report.
( while [ ! -e /tmp/stop ]; do echo "INSITU-INFLIGHT $(cat /sys/block/vda/inflight)"; sleep 0.5; done ) &
host_wait restarted
touch /tmp/stop
set +e
wait $wpid
echo "INSITU-WRITER-RC $?"
wait $spid
echo "--- guest kernel messages about the disk ---"
dmesg | grep -iE 'vda|I/O error|blk_update|EXT4-fs|virtio|jbd2' | tail -30
echo "INSITU-KERNEL-ERRORS $(dmesg | grep -ciE 'I/O error|EXT4-fs error|Buffer I/O')"
sync
umount /mnt
set -e
""", b0.sock, reconnect=True).start()
    # Phase 1: the guest completed a write and issued no FLUSH since; kill, restart, let it fsync.
    g.wait_host_point("kill1", scaled(120))
    pending = re.search(r"^INSITU-PENDING (\w+)", g.text(), re.M).group(1)
    b0.kill()
    t.note("phase 1: backend SIGKILLed after a completed, unflushed guest write")
    time.sleep(1)
    b1 = t.backend("b1", sock=b0.sock).start()
    g.answer("kill1")
    phase1 = r"^INSITU-PHASE1 first-fsync=(\d+) second-fsync=(\d+) data=(\w+)"
    g.wait_for(phase1, scaled(60))
    m = re.search(phase1, g.text(), re.M)
    rc1, rc2, got = m.group(1), m.group(2), m.group(3)
    t.note(f"phase 1: after the restart: first fsync rc={rc1}, second fsync rc={rc2}, "
           f"data {'intact' if got == pending else 'lost'}")
    if got != pending and rc1 == "0":
        raise TestFailure("phase 1: a write the guest saw complete before the kill is gone, and the "
                          "guest's first fsync after the restart succeeded: I2 violated (silent loss)")
    if rc2 != "0":
        raise TestFailure(f"phase 1: the second fsync after the restart failed too (rc={rc2}): "
                          "the lost-writes error must be reported once, then the disk works")
    # Phase 2: kill while the guest writes (fsynced files + an O_DIRECT stream).
    g.wait_for(r"^INSITU-SYNCED 5 ", scaled(120))
    # Killed while it executes a guest request, so the restarted backend has one to execute again
    # from the inflight buffer (QEMU restarts the ring at the used index; the request must
    # complete once: a second completion is a "not a head" error in the guest's kernel).
    caught = b1.kill_with_a_request_in_flight(scaled(20))
    t.note(f"backend SIGKILLed while the guest writes (requests recorded in flight: {caught})")
    before = dict(re.findall(r"^INSITU-SYNCED (\d+) (\w+)\s*$", g.text(), re.M))
    time.sleep(2)
    stalled = dict(re.findall(r"^INSITU-SYNCED (\d+) (\w+)\s*$", g.text(), re.M))
    time.sleep(0.5)
    if len(stalled) > len(before) + 1:
        raise TestFailure(f"the guest kept syncing with no backend: {len(before)} -> {len(stalled)}")
    outage = re.findall(r"^INSITU-INFLIGHT +(\d+) +(\d+)\s*$", g.text(), re.M)
    if outage:
        t.note(f"guest requests in flight on /dev/vda during the outage (reads, writes): {outage[-1]}")
    b2 = t.backend("b2", sock=b1.sock).start()
    t.note(f"backend restarted; {len(before)} files synced before the kill")
    # The guest goes on: either its fsyncs succeed again, or it was told that writes were lost.
    g.wait_for(rf"^(INSITU-SYNCED {len(stalled) + 3} |INSITU-SYNC-FAILED )", scaled(120))
    t.note("QEMU reconnected and the guest's requests are answered again")
    if caught and "executed again" not in b2.log_text():
        raise TestFailure(f"the backend was killed with requests {caught} recorded in flight, and the "
                          "restarted one did not execute them again")
    g.wait_host_point("restarted", scaled(30))
    g.answer("restarted")
    text = g.wait_result(scaled(300))
    writer_rc = re.search(r"^INSITU-WRITER-RC (\d+)", text, re.M).group(1)
    kerr = re.search(r"^INSITU-KERNEL-ERRORS (\d+)", text, re.M).group(1)
    stream = re.search(r"^INSITU-STREAM (.*)$", text, re.M).group(1)
    failed_syncs = len(re.findall(r"^INSITU-SYNC-FAILED ", text, re.M))
    qemu_said = [line for line in open(g.stderr_path).read().splitlines() if not line.startswith("###")]
    if re.search(r"not a head|out of range|larger than in buflen", text):
        raise TestFailure("the guest's virtio driver found its used ring broken after the restart "
                          "(a request completed twice?)")
    t.note(f"what the guest saw across the kill: file writer exit status {writer_rc}, {failed_syncs} "
           f"failed fsyncs, O_DIRECT stream writer {stream}, {kerr} kernel I/O error lines; "
           f"QEMU said: {qemu_said}")
    synced = dict(re.findall(r"^INSITU-SYNCED (\d+) (\w+)\s*$", text, re.M))
    if b2.stop() != 0:
        raise TestFailure("restarted backend exited non-zero on SIGTERM")
    # The restarted backend opened the image read-write after the crash (reclaiming leaks) and closed
    # it cleanly: the image must check clean.
    t.backend_cls.check_image(t.image)
    expect = "\n".join(f"{h}  f{i}" for i, h in sorted(synced.items(), key=lambda kv: int(kv[0])))
    b3 = t.backend("b3").start()
    g2 = t.guest("boot2", r"""
step "fresh boot: e2fsck (repairs what the told-of lost writes left), then every fsynced file"
set +e
e2fsck -fy /dev/vda; rc=$?
set -e
echo "INSITU-FSCK $rc"
[ $rc -le 1 ]
mount_disk ro
cat > /tmp/SUMS <<'EOF'
%s
EOF
cd /mnt
set +e
md5sum -c /tmp/SUMS > /tmp/check.out 2>&1
rc=$?
set -e
grep -v ': OK$' /tmp/check.out | sed 's/^/INSITU-BAD /'
[ $rc = 0 ]
echo "INSITU-VERIFIED $(wc -l < /tmp/SUMS)"
cd /
umount /mnt
step "phase 3: a planned restart (SIGTERM) with 32 1 MiB writes in flight and a FLUSH every 8"
fio --name=inflight --filename=/dev/vda --offset=512M --size=256M --rw=randwrite --bs=1M \
    --direct=1 --ioengine=libaio --iodepth=32 --fsync=8 --time_based --runtime=3600 \
    --output=/tmp/inflight.out >/dev/null 2>&1 &
fpid=$!
sleep 2
dmesg_before=$(dmesg | wc -l)
host_wait sigterm
sleep 3
# fio stops at its first I/O error; it must still be running, then exit cleanly when told to.
kill -0 $fpid
kill $fpid
set +e
wait $fpid
echo "INSITU-PHASE3-FIO-RC $?"
set -e
grep -E 'err=' /tmp/inflight.out | sed 's/^/INSITU-PHASE3-FIO /'
# Kernel complaints since the planned restart: I/O errors, or a used ring the driver finds
# broken (a request completed twice: "is not a head", "out of range", "larger than in buflen").
echo "INSITU-PHASE3-KERNEL-ERRORS $(dmesg | tail -n +$((dmesg_before + 1)) \
    | grep -ciE 'I/O error|Buffer I/O|not a head|out of range|larger than in buflen')"
""" % expect, b3.sock, reconnect=True).start()
    try:
        # Phase 3: a planned restart (SIGTERM) while the guest has requests in flight. The
        # backend completes what it accepted before it lets the connection go, so QEMU (which
        # restarts each ring at the used index it finds when the socket closes) hands nothing out
        # twice, and nothing is lost: no FLUSH fails and the guest's kernel logs no error.
        g2.wait_host_point("sigterm", scaled(300))
        if b3.stop() != 0:
            raise TestFailure("backend exited non-zero on SIGTERM with guest requests in flight")
        b4 = t.backend("b4", sock=b3.sock).start()
        t.note("phase 3: backend stopped with SIGTERM during guest I/O (fio, 32 1 MiB writes in flight, "
               "a FLUSH every 8 writes) and restarted")
        g2.answer("sigterm")
        g2.wait_result(scaled(120))
    except TestFailure:
        bad = [int(i) for i in re.findall(r"^INSITU-BAD f(\d+):", g2.text(), re.M)]
        if not bad:
            raise
        lost_before = [i for i in bad if str(i) in before]
        lost_after = [i for i in bad if str(i) not in before]
        raise TestFailure(
            f"after the fresh boot, fsynced files are wrong: {len(lost_before)} synced before the kill "
            f"{['f%d' % i for i in lost_before]}, {len(lost_after)} synced after the restart "
            f"{['f%d' % i for i in lost_after]}: a file whose fsync succeeded must be durable (I2)")
    fsck = re.search(r"^INSITU-FSCK (\d+)", g2.text(), re.M)
    t.note(f"fresh boot: e2fsck rc {fsck.group(1) if fsck else '?'}, all {len(synced)} fsynced files "
           f"intact ({len(before)} synced before the kill)")
    text2 = g2.text()
    fio_rc = re.search(r"^INSITU-PHASE3-FIO-RC (\d+)", text2, re.M).group(1)
    fio_lines = re.findall(r"^INSITU-PHASE3-FIO (.*)$", text2, re.M)
    phase3_errors = int(re.search(r"^INSITU-PHASE3-KERNEL-ERRORS (\d+)", text2, re.M).group(1))
    t.note(f"phase 3: fio exit {fio_rc} ({fio_lines}), {phase3_errors} guest kernel error lines "
           "after the planned restart")
    if phase3_errors or any(not re.search(r"err= *0", line) for line in fio_lines):
        raise TestFailure(
            f"a planned restart (SIGTERM) cost the guest {phase3_errors} kernel error lines, fio "
            f"{fio_lines}: SIGTERM must complete every accepted request before the connection "
            "closes, and lose nothing")
    if b4.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")


def measure_point(t, g, tag, image, settle=0.0):
    g.wait_host_point(tag, scaled(300))
    if settle:
        time.sleep(settle)
    a = allocated_bytes(image)
    g.answer(tag)
    return a


def wait_allocation_at_most(image, limit, seconds):
    """The image's allocated bytes once they are <= limit, or after `seconds` (freed space is
    released at the backend's next commits: timer 1 s, stale space after a grace period)."""
    deadline = time.monotonic() + seconds
    while True:
        allocated = allocated_bytes(image)
        if allocated <= limit or time.monotonic() > deadline:
            return allocated
        time.sleep(0.5)


def test_discard(t):
    """f. deleting files and fstrim in the guest shrink the image's allocated bytes on the host."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start()
    g = t.guest("boot1", r"""
fresh_fs_measured
step "copy the real files twice"
cp -a /files/. /mnt/a
cp -a /files/. /mnt/b
sync
host_wait copied
step "rm + fstrim"
rm -rf /mnt/a /mnt/b
sync
fstrim -v /mnt
sync
host_wait trimmed
umount /mnt
e2fsck -fn /dev/vda
""", b.sock).start()
    a0 = measure_point(t, g, "formatted", t.image)
    a1 = measure_point(t, g, "copied", t.image)
    g.wait_host_point("trimmed", scaled(300))
    # Space a discard frees waits up to the engine's grace period (10 s) for reuse before it is
    # punched, then the next writer pass punches it.
    a2 = wait_allocation_at_most(t.image, a0 + 0.2 * (a1 - a0), scaled(90))
    g.answer("trimmed")
    g.wait_result(scaled(300))
    t.note(f"allocated on host: formatted {a0 >> 20} MiB, copied {a1 >> 20} MiB, trimmed {a2 >> 20} MiB")
    if a1 - a0 < (8 << 20):
        raise TestFailure(f"copying ~80 MiB allocated only {(a1 - a0) >> 20} MiB on the host: nothing measured")
    if a2 - a0 > 0.2 * (a1 - a0):
        raise TestFailure(f"fstrim released too little: {(a1 - a2) >> 20} of {(a1 - a0) >> 20} MiB "
                          f"(allocated: formatted {a0}, copied {a1}, trimmed {a2})")
    b.stop()
    t.backend_cls.check_image(t.image)


def test_space(t):
    """g. the real files occupy on the host at most 60 % of their logical size."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start()
    g = t.guest("boot1", r"""
echo "INSITU-FILES-BYTES $(find /files -type f -exec stat -c %s {} + | awk '{s+=$1} END {print s}')"
fresh_fs_measured
step "copy the real files"
cp -a /files/. /mnt/
sync
host_wait copied
umount /mnt
e2fsck -fn /dev/vda
""", b.sock).start()
    a0 = measure_point(t, g, "formatted", t.image)
    a1 = measure_point(t, g, "copied", t.image)
    text = g.wait_result(scaled(300))
    logical = int(re.search(r"^INSITU-FILES-BYTES (\d+)", text, re.M).group(1))
    ratio = (a1 - a0) / logical
    t.note(f"real files: {logical >> 20} MiB logical, {(a1 - a0) >> 20} MiB allocated on the host ({ratio:.0%})")
    b.stop()
    if t.backend_cls.name != "insitu":
        t.note("reference backend does not compress: 60% limit not asserted")
        return
    if ratio > 0.60:
        raise TestFailure(f"real files take {ratio:.0%} of their logical size on the host (limit 60%)")


def test_rewrite(t):
    """h. rewriting the files in place keeps them compressed: host allocation does not grow."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start()
    g = t.guest("boot1", r"""
fresh_fs_measured
step "copy the real files"
cp -a /files/. /mnt/
sync
host_wait copied
step "rewrite every file in place, twice (partial-cluster writes over compressed clusters)"
for pass in 1 2; do
    find /mnt -type f | while read -r f; do
        dd if="$f" of="$f" bs=4k conv=notrunc 2>/dev/null
    done
    sync
done
step "copy the files over themselves (truncate + rewrite: new blocks), then fstrim"
cp -a /files/. /mnt/
sync
fstrim -v /mnt
sync
checksums /mnt > /tmp/SUMS
checksums /files > /tmp/SUMS.orig
cmp /tmp/SUMS /tmp/SUMS.orig
host_wait rewritten
umount /mnt
e2fsck -fn /dev/vda
""", b.sock).start()
    a0 = measure_point(t, g, "formatted", t.image)
    a1 = measure_point(t, g, "copied", t.image)
    g.wait_host_point("rewritten", scaled(600))
    limit = a0 + 1.10 * (a1 - a0) + (4 << 20)
    # Rewritten blocks free old versions: punched after the grace period (10 s), then the next
    # writer pass; the wait returns as soon as the allocation is down (a bound, not a delay).
    a2 = wait_allocation_at_most(t.image, limit, scaled(90))
    g.answer("rewritten")
    g.wait_result(scaled(300))
    t.note(f"allocated on host: formatted {a0 >> 20} MiB, copied {a1 >> 20} MiB, "
           f"after rewrites {a2 >> 20} MiB")
    if a1 - a0 < (8 << 20):
        raise TestFailure(f"copying ~40 MiB allocated only {(a1 - a0) >> 20} MiB on the host: nothing measured")
    b.stop()
    t.backend_cls.check_image(t.image)
    if a2 > limit:
        raise TestFailure(f"rewrites grew the image: {(a1 - a0) >> 20} MiB after the copy, "
                          f"{(a2 - a0) >> 20} MiB after rewriting the same files (limit +10 % + 4 MiB)")


# --------------------------------------------------------------------------------------------
# Evaluator tests (black-box): workloads the tests above do not cover.

ODD_DISK_SIZE = (192 << 20) + 3584  # not a multiple of the cluster size, nor of 4 KiB


def host_md5_of_image(t, image, label):
    """md5 of the image's logical content (exported with `insitu-blk convert`)."""
    import hashlib
    raw = os.path.join(t.dir, f"export-{label}.raw")
    if os.path.exists(raw):
        os.unlink(raw)
    t.backend_cls.export_raw(image, raw)
    h = hashlib.md5()
    with open(raw, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    size = os.path.getsize(raw)
    os.unlink(raw)
    return h.hexdigest(), size


def test_sectors(t):
    """i. odd-sized disk (192 MiB + 3.5 KiB), 512-byte O_DIRECT I/O unaligned to clusters, discard ranges, write-zeroes, serial."""
    t.backend_cls.create_image(t.image, ODD_DISK_SIZE)
    b = t.backend("b1", extra_args=["--serial", "EVAL-SERIAL-0123"]).start()
    g = t.guest("boot1", r"""
sz=$(blockdev --getsize64 /dev/vda)
echo "INSITU-SIZE $sz"
q=/sys/block/vda/queue
for f in logical_block_size physical_block_size max_hw_sectors_kb max_segments max_segment_size \
         discard_granularity discard_max_bytes write_zeroes_max_bytes; do echo "queue $f=$(cat $q/$f)"; done
echo "INSITU-SERIAL [$(cat /sys/block/vda/serial)]"
step "fio: 512-byte-aligned random writes of 512 B..16 KiB over the whole disk, verified"
fio --name=sec --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bsrange=512-16k \
    --blockalign=512 --iodepth=16 --size=$sz --io_size=12M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --verify_state_save=0 > /tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 1; }
grep -q 'err= 0' /tmp/fio.out
step "the last sectors of the disk"
last=$((sz / 512))
yes "INSITU-TAIL-SECTORS-" | head -c 3584 > /tmp/tail
dd if=/tmp/tail of=/dev/vda bs=512 seek=$((last - 7)) count=7 oflag=direct conv=notrunc 2>/dev/null
dd if=/dev/vda of=/tmp/tail2 bs=512 skip=$((last - 7)) count=7 iflag=direct 2>/dev/null
cmp /tmp/tail /tmp/tail2
n=$(dd if=/dev/vda bs=512 skip=$last count=1 iflag=direct 2>/dev/null | wc -c)
[ "$n" = 0 ]
step "writes straddling cluster boundaries (3 sectors across each of 8 boundaries)"
for k in 1 2 3 5 8 13 21 34; do
    yes "STRADDLE-$k-" | head -c 1536 > /tmp/s
    dd if=/tmp/s of=/dev/vda bs=512 seek=$((k * 128 - 1)) count=3 oflag=direct conv=notrunc 2>/dev/null
    dd if=/dev/vda of=/tmp/s2 bs=512 skip=$((k * 128 - 1)) count=3 iflag=direct 2>/dev/null
    cmp /tmp/s /tmp/s2
done
step "large requests: max_sectors_kb raised to the device's limit, 24 MiB O_DIRECT write and read"
cat $q/max_hw_sectors_kb > $q/max_sectors_kb || true
echo "queue max_sectors_kb=$(cat $q/max_sectors_kb)"
dd if=/dev/urandom of=/tmp/big bs=1M count=24 2>/dev/null
dd if=/tmp/big of=/dev/vda bs=24M count=1 seek=5 oflag=direct conv=notrunc 2>/dev/null
dd if=/dev/vda of=/tmp/big2 bs=24M count=1 skip=5 iflag=direct 2>/dev/null
cmp /tmp/big /tmp/big2
rm -f /tmp/big /tmp/big2
step "discard of ranges unaligned to clusters keeps the bytes around them"
base=$((96 << 20))
dd if=/dev/urandom of=/tmp/r bs=1M count=4 2>/dev/null
dd if=/tmp/r of=/dev/vda bs=1M seek=96 oflag=direct conv=notrunc 2>/dev/null
sync /dev/vda
for range in "12800 132096" "1048064 512" "2097152 65536" "2999808 70144"; do
    set -- $range
    off=$1; len=$2
    blkdiscard -o $((base + off)) -l $len /dev/vda
    dd if=/dev/vda of=/tmp/r2 bs=1M skip=96 count=4 iflag=direct 2>/dev/null
    # Every byte that differs from what was written lies inside the discarded range and is 0.
    bad=$(cmp -l /tmp/r /tmp/r2 | awk -v a=$off -v e=$((off + len)) '($1 - 1 < a || $1 - 1 >= e || $3 != 0) {b++} END {print b + 0}')
    same=$(cmp -l /tmp/r /tmp/r2 | wc -l)
    echo "INSITU-DISCARD off=$off len=$len differing=$same bad=$bad"
    [ "$bad" = 0 ]
    cp /tmp/r2 /tmp/r
done
step "mkfs zeroing its inode tables and journal with WRITE_ZEROES over random data, then fsck"
dd if=/dev/urandom of=/dev/vda bs=1M seek=0 count=48 oflag=direct conv=notrunc 2>/dev/null
mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/vda 32M
e2fsck -fn /dev/vda
step "a mounted ext4 that zeroes its inode tables lazily (ext4lazyinit), files, fsck"
mkfs.ext4 -q -F -b 4096 -E nodiscard,lazy_itable_init=1 -N 200000 /dev/vda 160M
mount -t ext4 -o init_itable=0 /dev/vda /mnt
cp -a /files/. /mnt/
sync
sleep 5
umount /mnt
e2fsck -fn /dev/vda
sync
echo 3 > /proc/sys/vm/drop_caches
echo "INSITU-MD5 $(md5sum < /dev/vda | cut -d' ' -f1)"
""", b.sock).start()
    text = g.wait_result(scaled(400))
    for line in re.findall(r"^(queue .*|INSITU-(?:SIZE|SERIAL|DISCARD).*)$", text, re.M):
        t.note(line)
    size = int(re.search(r"^INSITU-SIZE (\d+)", text, re.M).group(1))
    if size != ODD_DISK_SIZE:
        raise TestFailure(f"guest sees {size} bytes, image is {ODD_DISK_SIZE}")
    if t.backend_cls.name == "insitu" and "INSITU-SERIAL [EVAL-SERIAL-0123]" not in text:
        raise TestFailure("guest does not see the --serial")
    guest_md5 = re.search(r"^INSITU-MD5 (\w+)", text, re.M).group(1)
    if b.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")
    t.backend_cls.check_image(t.image)
    host_md5, host_size = host_md5_of_image(t, t.image, "final")
    if (host_md5, host_size) != (guest_md5, ODD_DISK_SIZE):
        raise TestFailure(f"image content {host_md5} ({host_size} bytes) != what the guest read {guest_md5}")
    t.note("host export matches the guest's md5 of the whole disk")


def file_sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


def test_readonly(t):
    """j. serve --read-only of an immutable image file: the guest sees a read-only disk with the right data; writes, discards forced through (blockdev --setrw) fail; the file is unchanged."""
    if t.backend_cls.name != "insitu":
        t.note("insitu backend only")
        return
    raw = os.path.join(t.dir, "src.raw")
    with open(raw, "wb") as f:
        f.write(os.urandom(8 << 20))
        f.write(b"INSITU-READ-ONLY-CONTENT\n" * ((8 << 20) // 25))
        f.truncate(64 << 20)
    run([INSITU_BIN, "convert", raw, t.image])
    import hashlib
    with open(raw, "rb") as f:
        want_md5 = hashlib.md5(f.read()).hexdigest()
    os.unlink(raw)
    before = file_sha256(t.image)
    immutable = subprocess.run(["chattr", "+i", t.image], stderr=subprocess.DEVNULL).returncode == 0
    t.note(f"image file immutable (chattr +i): {immutable}")
    try:
        b = t.backend("b1", extra_args=["--read-only"]).start()
        g = t.guest("boot1", r"""
echo "INSITU-RO $(cat /sys/block/vda/ro)"
echo "INSITU-MD5A $(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
step "a write through the kernel's read-only disk fails"
if dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct conv=notrunc 2>/dev/null; then echo "INSITU-RO-WRITE-ACCEPTED kernel"; fi
step "forced read-write in the guest: writes and discards reach the backend and fail"
blockdev --setrw /dev/vda
for i in 1 2 3; do
    if dd if=/dev/zero of=/dev/vda bs=65536 seek=$i count=1 oflag=direct conv=notrunc 2>/dev/null; then
        echo "INSITU-RO-WRITE-ACCEPTED backend $i"
    fi
done
if blkdiscard -o 0 -l 1048576 /dev/vda 2>/dev/null; then echo "INSITU-RO-DISCARD-ACCEPTED"; fi
sync /dev/vda || echo "INSITU-RO-FLUSH-FAILED"
step "host looks while the disk is served read-only"
host_wait served
echo "INSITU-MD5B $(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
""", b.sock).start()
        g.wait_host_point("served", scaled(300))
        # A writer cannot take the image while a read-only server serves it (I8): the file made
        # writable again first, so that only the lock can stop it.
        if immutable:
            subprocess.run(["chattr", "-i", t.image])
            immutable = False
        p = subprocess.run([INSITU_BIN, "check", "--repair", t.image], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, timeout=scaled(60))
        t.note(f"check --repair while served read-only: exit {p.returncode}: "
               f"{p.stdout.decode(errors='replace').strip()[:200]}")
        if p.returncode == 0:
            raise TestFailure("check --repair took the image while a read-only server used it")
        g.answer("served")
        text = g.wait_result(scaled(300))
        rc = b.stop()
        log_text = b.log_text()
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", t.image])
    ro = re.search(r"^INSITU-RO (\d)", text, re.M).group(1)
    md5a = re.search(r"^INSITU-MD5A (\w+)", text, re.M).group(1)
    md5b = re.search(r"^INSITU-MD5B (\w+)", text, re.M).group(1)
    accepted = re.findall(r"^INSITU-RO-(?:WRITE|DISCARD)-ACCEPTED.*$", text, re.M)
    t.note(f"guest: ro={ro}, accepted={accepted}, flush failed={'INSITU-RO-FLUSH-FAILED' in text}, backend exit {rc}")
    problems = []
    if ro != "1":
        problems.append(f"the guest's disk is not read-only (ro={ro})")
    if md5a != want_md5 or md5b != want_md5:
        problems.append(f"guest read {md5a} / {md5b}, the image holds {want_md5}")
    if accepted:
        problems.append(f"changes accepted on a read-only disk: {accepted}")
    if rc != 0:
        problems.append(f"backend exited {rc} on SIGTERM")
    if "panicked" in log_text:
        problems.append("backend panicked")
    if file_sha256(t.image) != before:
        problems.append("the image file changed while served read-only")
    if problems:
        raise TestFailure("; ".join(problems))


def test_reset(t):
    """k. guest reset (QMP system_reset, a virtio reset) while the guest's fio has requests queued: the backend survives, fsynced data is intact after the reboot, the device works (fio verify), check clean."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start()
    g = t.guest("boot1", r"""
if dd if=/dev/vda bs=512 skip=409600 count=1 iflag=direct 2>/dev/null | grep -q INSITU-PHASE-TWO; then
    step "after the reset"
    echo "INSITU-P2MD5 $(dd if=/dev/vda bs=1M skip=64 count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
    fio --name=after --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
        --iodepth=8 --offset=512M --size=48M --verify=crc32c --verify_fatal=1 --do_verify=1 \
        --verify_state_save=0 > /tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 1; }
    grep -q 'err= 0' /tmp/fio.out
    exit 0
fi
step "before the reset: fsynced data, then a busy writer"
dd if=/dev/urandom of=/tmp/p bs=1M count=16 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M seek=64 oflag=direct conv=notrunc 2>/dev/null
sync /dev/vda
echo "INSITU-P1MD5 $(md5sum < /tmp/p | cut -d' ' -f1)"
echo INSITU-PHASE-TWO | dd of=/dev/vda bs=512 seek=409600 conv=sync,notrunc oflag=direct 2>/dev/null
sync /dev/vda
fio --name=busy --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randrw --bsrange=4k-128k \
    --iodepth=32 --numjobs=2 --offset=256M --size=200M --time_based --runtime=120 > /dev/null 2>&1 &
sleep 3
echo INSITU-BUSY
wait
echo "INSITU-NOT-RESET"
exit 1
""", b.sock, no_reboot=False).start()
    g.wait_for(r"^INSITU-BUSY\s*$", scaled(200))
    time.sleep(2)
    g.qmp.cmd("system_reset")
    t.note("system_reset sent while fio ran with iodepth 32 x 2")
    text = g.wait_result(scaled(400))
    p1 = re.search(r"^INSITU-P1MD5 (\w+)", text, re.M).group(1)
    p2 = re.search(r"^INSITU-P2MD5 (\w+)", text, re.M)
    if not p2:
        raise TestFailure("the guest did not come back after the reset")
    if p2.group(1) != p1:
        raise TestFailure(f"fsynced data changed across the reset: {p1} -> {p2.group(1)}")
    if not b.alive():
        raise TestFailure("backend died")
    if b.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")
    if "panicked" in b.log_text():
        raise TestFailure("backend panicked")
    t.backend_cls.check_image(t.image)


def wait_device_gone(g, dev_id, seconds):
    deadline = time.monotonic() + scaled(seconds)
    while time.monotonic() < deadline:
        try:
            g.qmp.cmd("qom-get", path=f"/machine/peripheral/{dev_id}", property="type")
        except TestFailure:
            return True
        time.sleep(0.3)
    return False


def test_hotplug(t):
    """l. hot-unplug (device_del) of the disk, then device_add on the same chardev: the guest sees the disk again with its fsynced data and can write (fio verify); check clean."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start()
    g = t.guest("boot1", r"""
step "fsynced data on the first device"
dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M seek=32 oflag=direct conv=notrunc 2>/dev/null
sync /dev/vda
echo "INSITU-P1MD5 $(md5sum < /tmp/p | cut -d' ' -f1)"
host_wait unplug
n=0; while [ -e /sys/block/vda ] && [ $n -lt 100 ]; do sleep 0.2; n=$((n + 1)); done
echo "INSITU-GONE $([ -e /sys/block/vda ] && echo no || echo yes)"
host_wait replug
n=0; while [ ! -b /dev/vda ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n + 1)); done
[ -b /dev/vda ]
echo "INSITU-P2MD5 $(dd if=/dev/vda bs=1M skip=32 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
fio --name=after --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
    --iodepth=8 --offset=128M --size=32M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --verify_state_save=0 > /tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 1; }
grep -q 'err= 0' /tmp/fio.out
sync /dev/vda
""", b.sock, disk_bus="rp1",
                extra_args=["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"]).start()
    g.wait_host_point("unplug", scaled(200))
    g.qmp.cmd("device_del", id="disk0")
    if not wait_device_gone(g, "disk0", 60):
        raise TestFailure("device_del did not complete within 60 s (guest did not release the device)")
    t.note("device_del completed")
    g.answer("unplug")
    g.wait_for(r"^INSITU-GONE", scaled(60))
    time.sleep(1)
    g.qmp.cmd("device_add", driver="vhost-user-blk-pci", chardev="vu0", id="disk1", bus="rp1",
              **{"num-queues": 2})
    t.note("device_add on the same chardev accepted")
    g.wait_host_point("replug", scaled(60))
    g.answer("replug")
    text = g.wait_result(scaled(300))
    p1 = re.search(r"^INSITU-P1MD5 (\w+)", text, re.M).group(1)
    p2 = re.search(r"^INSITU-P2MD5 (\w+)", text, re.M).group(1)
    if p1 != p2:
        raise TestFailure(f"fsynced data differs after re-plug: {p1} -> {p2}")
    if not b.alive():
        raise TestFailure("backend died")
    if b.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")
    if "panicked" in b.log_text():
        raise TestFailure("backend panicked")
    t.backend_cls.check_image(t.image)


def test_variants(t):
    """m. a driver without EVENT_IDX and INDIRECT_DESC (long direct chains), asking for IN_ORDER and packed rings, 4 queues on 2 vCPUs, ring size 256: fio verify with requests up to 512 KiB, a pause/resume in the middle, check clean."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start(num_queues=4)
    g = t.guest("boot1", r"""
echo "INSITU-FEATURES $(cat /sys/bus/virtio/devices/virtio0/features 2>/dev/null)"
echo "INSITU-MQ $(ls /sys/block/vda/mq | wc -l)"
fio --name=variants --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-512k \
    --iodepth=16 --numjobs=2 --size=256M --offset_increment=256M --verify=crc32c --verify_fatal=1 \
    --do_verify=1 --verify_state_save=0 --group_reporting > /tmp/fio.out 2>&1 &
pid=$!
sleep 1
echo INSITU-MIDWAY
wait $pid || { cat /tmp/fio.out; exit 1; }
cat /tmp/fio.out
grep -q 'err= 0' /tmp/fio.out
sync /dev/vda
""", b.sock, smp=2, num_queues=4, queue_size=256,
                disk_props="event_idx=off,indirect_desc=off,in_order=on,packed=on").start()
    g.wait_for(r"^INSITU-MIDWAY\s*$", scaled(200))
    g.qmp.cmd("stop")
    time.sleep(1)
    g.qmp.cmd("cont")
    text = g.wait_result(scaled(400))
    if not re.search(r"run=(\d{4,})", text):
        raise TestFailure("fio took under a second: the pause did not land during the workload")
    feats = re.search(r"^INSITU-FEATURES (\S*)", text, re.M)
    t.note(f"guest features {feats.group(1) if feats else '?'}; queues "
           f"{re.search(r'^INSITU-MQ (.*)$', text, re.M).group(1)}")
    if b.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")
    if "panicked" in b.log_text():
        raise TestFailure("backend panicked")
    t.backend_cls.check_image(t.image)


def test_pausekill(t):
    """n. backend upgrade while the VM is paused: writes completed but not flushed, QMP stop (quiesce), SIGKILL, new backend, cont: nothing lost, the guest's next FLUSH succeeds (no lost-write error), check clean."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b0 = t.backend("b0").start()
    g = t.guest("boot1", r"""
step "writes completed, not flushed"
dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M seek=32 oflag=direct conv=notrunc 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=4096 seek=20000 count=7 oflag=direct conv=notrunc 2>/dev/null
echo "INSITU-P1MD5 $(md5sum < /tmp/p | cut -d' ' -f1)"
host_wait written
set +e
sync /dev/vda; rc1=$?
set -e
echo "INSITU-FLUSH-AFTER rc=$rc1"
echo "INSITU-P2MD5 $(dd if=/dev/vda bs=1M skip=32 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "INSITU-P3MD5 $(dd if=/dev/vda bs=4096 skip=20000 count=7 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "INSITU-P4MD5 $(head -c 28672 /tmp/p | md5sum | cut -d' ' -f1)"
""", b0.sock, reconnect=True).start()
    g.wait_host_point("written", scaled(200))
    log_offset = len(b0.log_text())
    g.qmp.cmd("stop")
    quiesce_log_check(t, b0, log_offset, "quiesced")
    b0.kill()
    t.note("VM paused, backend quiesced, then SIGKILLed")
    time.sleep(1)
    b1 = t.backend("b1", sock=b0.sock).start()
    time.sleep(2)  # QEMU reconnects (reconnect-ms)
    g.qmp.cmd("cont")
    g.answer("written")
    text = g.wait_result(scaled(200))
    rc = re.search(r"^INSITU-FLUSH-AFTER rc=(\d+)", text, re.M).group(1)
    p1, p2, p3, p4 = (re.search(rf"^INSITU-P{i}MD5 (\w+)", text, re.M).group(1) for i in (1, 2, 3, 4))
    problems = []
    if rc != "0":
        problems.append(f"the guest's FLUSH after the paused restart failed (rc={rc}): a quiesce committed "
                        "everything, so nothing was lost and nothing should be reported")
    if p1 != p2 or p3 != p4:
        problems.append("writes completed before the pause are gone")
    if b1.stop() != 0:
        problems.append("backend exited non-zero on SIGTERM")
    if problems:
        raise TestFailure("; ".join(problems))
    t.backend_cls.check_image(t.image)


def test_qemukill(t):
    """o. QEMU SIGKILLed (VM crash, host OOM killer) while its fio has requests queued; a new VM on the same running backend: fsynced data intact, fio verify passes, SIGTERM exits 0, check clean."""
    t.backend_cls.create_image(t.image, DISK_SIZE)
    b = t.backend("b1").start()
    g1 = t.guest("boot1", r"""
dd if=/dev/urandom of=/tmp/p bs=1M count=8 2>/dev/null
dd if=/tmp/p of=/dev/vda bs=1M seek=32 oflag=direct conv=notrunc 2>/dev/null
sync /dev/vda
echo "INSITU-P1MD5 $(md5sum < /tmp/p | cut -d' ' -f1)"
fio --name=busy --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randrw --bsrange=4k-128k \
    --iodepth=32 --numjobs=2 --offset=256M --size=200M --time_based --runtime=120 > /dev/null 2>&1 &
sleep 3
echo INSITU-BUSY
wait
""", b.sock).start()
    g1.wait_for(r"^INSITU-BUSY\s*$", scaled(200))
    time.sleep(1)
    g1.kill()
    t.note("QEMU SIGKILLed while fio ran (2 x iodepth 32)")
    p1 = re.search(r"^INSITU-P1MD5 (\w+)", g1.text(), re.M).group(1)
    time.sleep(1)
    if not b.alive():
        raise TestFailure("the backend died with its frontend")
    g2 = t.guest("boot2", r"""
echo "INSITU-P2MD5 $(dd if=/dev/vda bs=1M skip=32 count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
fio --name=after --filename=/dev/vda --ioengine=libaio --direct=1 --rw=randwrite --bsrange=4k-64k \
    --iodepth=8 --offset=512M --size=48M --verify=crc32c --verify_fatal=1 --do_verify=1 \
    --verify_state_save=0 > /tmp/fio.out 2>&1 || { cat /tmp/fio.out; exit 1; }
grep -q 'err= 0' /tmp/fio.out
sync /dev/vda
""", b.sock).start()
    text = g2.wait_result(scaled(300))
    p2 = re.search(r"^INSITU-P2MD5 (\w+)", text, re.M).group(1)
    if p1 != p2:
        raise TestFailure(f"fsynced data changed across the VM crash: {p1} -> {p2}")
    if b.stop() != 0:
        raise TestFailure("backend exited non-zero on SIGTERM")
    if "panicked" in b.log_text():
        raise TestFailure("backend panicked")
    t.backend_cls.check_image(t.image)


TESTS = {
    "ext4": test_ext4,
    "fio": test_fio,
    "pause": test_pause,
    "migrate": test_migrate,
    "restart": test_restart,
    "discard": test_discard,
    "space": test_space,
    "rewrite": test_rewrite,
    "sectors": test_sectors,
    "readonly": test_readonly,
    "reset": test_reset,
    "hotplug": test_hotplug,
    "variants": test_variants,
    "pausekill": test_pausekill,
    "qemukill": test_qemukill,
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests", nargs="*", help="tests to run (default: all): " + ", ".join(TESTS))
    ap.add_argument("--backend", default=os.environ.get("VMTEST_BACKEND", "insitu"), choices=BACKENDS)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the test directories (images, logs)")
    args = ap.parse_args()
    if args.list:
        for name, fn in TESTS.items():
            print(f"{name:8} {fn.__doc__.strip().splitlines()[0]}")
        return 0
    names = args.tests or list(TESTS)
    for n in names:
        if n not in TESTS:
            print(f"unknown test {n!r}; tests: {', '.join(TESTS)}", file=sys.stderr)
            return 2
    for f in ("vmlinuz", "initramfs.cpio"):
        if not os.path.exists(os.path.join(GUEST_DIR, f)):
            print(f"guest image missing ({GUEST_DIR}/{f}): run images/build-guest.sh", file=sys.stderr)
            return 2
    if args.backend == "insitu" and not os.access(INSITU_BIN, os.X_OK):
        print(f"{INSITU_BIN} missing: cargo build (or set INSITU_BLK_BIN)", file=sys.stderr)
        return 2
    os.makedirs(WORK_DIR, exist_ok=True)
    results = []
    suite_t0 = time.monotonic()
    for name in names:
        t = Test(name, BACKENDS[args.backend])
        log(f"=== {name} ({args.backend} backend, {ACCEL}) ===")
        t0 = time.monotonic()
        ok = False
        try:
            TESTS[name](t)
            ok = True
        except Exception as e:
            print(f"FAILED {name}: {e}")
            if not isinstance(e, TestFailure):
                traceback.print_exc()
            t.dump()
        finally:
            t.cleanup()
        dt = time.monotonic() - t0
        results.append((name, ok, dt))
        log(f"=== {name}: {'PASS' if ok else 'FAIL'} in {dt:.1f}s ===")
        if ok and not args.keep:
            shutil.rmtree(t.dir, ignore_errors=True)
    print(f"\nVM tests ({args.backend} backend, {ACCEL}), {time.monotonic() - suite_t0:.0f}s total:")
    for name, ok, dt in results:
        print(f"  {'PASS' if ok else 'FAIL'}  {name:8} {dt:6.1f}s")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
