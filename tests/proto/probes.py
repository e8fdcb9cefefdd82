#!/usr/bin/env python3
"""Protocol probes against the real `insitu-blk serve` (release build).

Run: python3 tests/proto/probes.py [NAME ...]   (all when no name). Each probe prints
OBSERVED / EXPECTED lines and PASS or FINDING.
"""
import os
import struct
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(__file__))
from vu import *  # noqa

RESULTS = []


def report(name, ok, observed, expected=""):
    RESULTS.append((name, ok))
    print(f"[{'PASS' if ok else 'FINDING'}] {name}: observed: {observed}" + (f" | expected: {expected}" if not ok else ""))


def io_round(c, mem, ring, sector=0, tag=b"A"):
    data = (tag * 4096)
    h, st, _ = blk_req(mem, ring, T_OUT, sector, data)
    u = ring.wait_used(1, 10)
    if not u or mem.r(st, 1) != b"\x00":
        return f"write failed used={u} status={mem.r(st,1)}"
    h, st, d = blk_req(mem, ring, T_IN, sector, data_len=4096, writable_data=True)
    u = ring.wait_used(1, 10)
    if not u or mem.r(st, 1) != b"\x00" or mem.r(d, 4096) != data:
        return f"read failed used={u} status={mem.r(st,1)}"
    return None


def probe_ch_order():
    """cloud-hypervisor's sequence: config read before SET_FEATURES, NUM/ADDR/BASE/CALL/KICK/ENABLE."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        offered, acked, pf, nq, cfg = handshake(c, mem)
        rings = [Ring(mem, q) for q in range(2)]
        for r in rings:
            assert all(x in (None, 0) for x in r.setup(c, order="ch"))
        errs = [io_round(c, mem, r, sector=8 * r.index) for r in rings]
        report("ch_order_io", not any(errs), f"errors={errs} offered={offered:#x} pf={pf:#x} nq={nq}")
        print("   offered features:", hex(offered), "packed:", bool(offered & F_RING_PACKED),
              "in_order:", bool(offered & F_IN_ORDER), "access_platform:", bool(offered & F_ACCESS_PLATFORM))
        print("   protocol features:", [k for k, v in PF.items() if pf & v])
        c.close()
    finally:
        b.stop()
        print("   backend exit", b.p.returncode)


def probe_config_partial():
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        full = get_config(c, 0, 96)[3]
        res = {}
        for off, size in [(0, 8), (8, 4), (34, 2), (60, 36), (0, 256), (20, 4), (90, 16), (95, 1),
                          (0x100, 60), (0xF0, 0x20), (0, 257), (0, 0x1000), (200, 100), (0xFFF, 1)]:
            try:
                o, s, f, data = get_config(c, off, size)
                res[(off, size)] = (s, data)
            except Exception as e:
                res[(off, size)] = ("ERR", repr(e))
                c = b.connect()
                handshake(c, mem)
        for k, v in res.items():
            print("   GET_CONFIG", k, "->", v[0], (v[1][:16].hex() if isinstance(v[1], bytes) else v[1]))
        # consistency: partial reads equal slices of the full read
        bad = []
        for (off, size), (s, data) in res.items():
            if s == size and off + size <= 96 and data != full[off:off + size]:
                bad.append((off, size))
        report("config_partial_consistent", not bad, f"mismatching partial reads: {bad}")
        cap, size_max, seg_max = struct.unpack_from("<QII", full, 0)
        blk_size, = struct.unpack_from("<I", full, 20)
        pbe, ao, min_io, opt_io = struct.unpack_from("<BBHI", full, 24)
        wb, _, nq = struct.unpack_from("<BBH", full, 32)
        mds, mdseg, dsa, mwz, mwzseg, wzu = struct.unpack_from("<IIIIIB", full, 36)
        print(f"   capacity={cap} size_max={size_max} seg_max={seg_max} blk_size={blk_size} pbe={pbe} "
              f"align={ao} min_io={min_io} opt_io={opt_io} writeback={wb} nq={nq} max_discard_sectors={mds} "
              f"max_discard_seg={mdseg} discard_align={dsa} max_wz={mwz} max_wz_seg={mwzseg} wz_unmap={wzu}")
        print("   bytes 60..96:", full[60:96].hex())
        c.close()
    finally:
        b.stop()


def _served(mem, ring, n=1, timeout=5.0):
    u = ring.wait_used(n, timeout)
    return bool(u)


def probe_prequeued_interrupt():
    """Requests already in the avail ring when the ring starts (reconnect, migration destination,
    guest that queued before the device start). Is the completion signalled on the call fd for
    each frontend order?"""
    for order, feats in [("qemu", None), ("ch", None), ("enable_first", None),
                         ("qemu", ~F_PROTOCOL_FEATURES)]:
        b = Backend()
        try:
            c, mem = b.connect(), Mem()
            handshake(c, mem, features=feats)
            r = Ring(mem, 0)
            # queue a write before the ring starts
            r.avail_idx = 0
            h, st, _ = blk_req(mem, r, T_OUT, 0, b"Q" * 4096, kick=False)
            # setup resets avail idx in memory: re-publish after
            r.setup(c, order=order, base=0, keep_idx=True, enable=feats is None)
            # no kick: rely on the device looking at start
            served = _served(mem, r, 1, 3)
            if not served:
                os.eventfd_write(r.kick, 1)
                served_after_kick = _served(mem, r, 1, 3)
            else:
                served_after_kick = None
            irq = r.call_pending(0.5)
            label = f"{order}{'/noPF' if feats else ''}"
            report(f"prequeued_{label}", served and irq,
                   f"served without kick={served} (after kick={served_after_kick}) call signalled={irq}",
                   "served and the guest notified (vhost-user.rst: ring started+enabled processes; virtio 2.7.7 notify)")
            c.close()
        finally:
            b.stop()


def probe_enable_cycle():
    """SET_VRING_ENABLE 0 with requests queued, then 1: served after re-enable without a new kick."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        assert not io_round(c, mem, r)
        ack = c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 0))
        # queue while disabled (guest kicks; the backend must not process)
        blk_req(mem, r, T_OUT, 16, b"D" * 4096)
        time.sleep(0.5)
        processed_while_disabled = r.used_idx() != r.last_used
        ack2 = c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        served = _served(mem, r, 1, 5)
        report("enable_0_then_1", (not processed_while_disabled) and served and ack == 0 and ack2 == 0,
               f"acks={ack},{ack2} processed while disabled={processed_while_disabled} served after enable={served}")
        # disable with the kick consumed and nothing pending, queue after the disable w/o kick
        c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 0))
        blk_req(mem, r, T_OUT, 24, b"E" * 4096, kick=False)
        c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        served = _served(mem, r, 1, 3)
        report("enable_1_looks_at_ring", served, f"request queued without kick while disabled served after enable={served}")
        c.close()
    finally:
        b.stop()


def probe_vring_base_never_started():
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r0 = Ring(mem, 0)
        r0.setup(c)
        assert not io_round(c, mem, r0)
        t = time.time()
        p = c.call(GET_VRING_BASE, struct.pack("<II", 3, 0))
        idx, num = struct.unpack("<II", p)
        err = io_round(c, mem, r0, 8)
        report("get_vring_base_never_started", idx == 3 and num == 0 and not err,
               f"reply index={idx} num={num} in {time.time()-t:.3f}s; ring 0 still serves: {not err}")
        # GET_VRING_BASE with NEED_REPLY: exactly one reply
        c.send(GET_VRING_BASE, struct.pack("<II", 2, 0), flags=VERSION | NEED_REPLY)
        code, flags, p = c.recv()
        c.s.settimeout(0.5)
        extra = None
        try:
            extra = c.recv()
        except Exception:
            pass
        c.s.settimeout(10)
        report("need_reply_on_get_message_one_reply", code == GET_VRING_BASE and len(p) == 8 and extra is None,
               f"first reply code={code} len={len(p)} extra reply={extra}")
        # out-of-range ring index with NEED_REPLY
        try:
            v = c.msg(SET_VRING_BASE, struct.pack("<II", 99, 0), ack=True)
            alive = True
        except Exception as e:
            v, alive = repr(e), False
        report("bad_index_acked_as_error", v == 1, f"SET_VRING_BASE index 99 ack={v}")
        c.close()
    finally:
        b.stop()


def probe_unused_queues_pause():
    """Frontend uses 1 of 4 queues; pause by SET_VRING_ENABLE 0 (cloud-hypervisor) -> quiesce; resume."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        assert not io_round(c, mem, r)
        c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 0))
        # The pause detector quiesces within its interval, plus a commit: wait for it (a loaded
        # machine may take seconds), bounded.
        deadline = time.time() + 20
        while True:
            quiesced = "quiesced" in b.text().split("disabled every queue")[-1] or "device quiesced (the frontend disabled every queue" in b.text()
            if quiesced or time.time() > deadline:
                break
            time.sleep(0.05)
        c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        err = io_round(c, mem, r, 40, b"R")
        report("pause_by_disable_with_unused_queues", quiesced and not err, f"quiesced={quiesced} io after resume err={err}")
        c.close()
    finally:
        b.stop()


def probe_reset_owner():
    """RESET_OWNER while rings run, then a fresh SET_OWNER + set-up on the same connection."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        assert not io_round(c, mem, r)
        try:
            c.msg(RESET_OWNER, ack=False)
            mem2 = Mem()
            handshake(c, mem2)
            r2 = Ring(mem2, 0)
            res = r2.setup(c, base=0)
            err = io_round(c, mem2, r2, 8, b"Z")
        except Exception as e:
            err, res = repr(e), None
        report("reset_owner_then_reinit", not err, f"setup acks={res} io err={err} backend alive={b.alive()}")
    finally:
        b.stop()


def probe_kick_without_fd():
    """SET_VRING_KICK with the invalid-FD flag (bit 8): vhost-user.rst says the back-end then polls."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c, kick=False)
        ack = c.msg(SET_VRING_KICK, struct.pack("<Q", 0 | 0x100))
        h, st, _ = blk_req(mem, r, T_OUT, 0, b"K" * 4096, kick=False)
        served = _served(mem, r, 1, 3)
        report("kick_invalid_fd_polling", served or ack == 1, f"ack={ack} served={served}",
               "vhost-user.rst SET_VRING_KICK: invalid FD flag -> polling instead of waiting for the kick "
               "(or an honest refusal: error ack)")
    finally:
        b.stop()





def probe_prequeued_interrupt_running():
    """As prequeued_interrupt, but the device already runs (another ring started), so the ring's
    worker serves the queued request at once when the ring starts: is the completion signalled when
    SET_VRING_CALL comes after the ring was started and enabled?"""
    for order, feats in [("qemu", ~F_PROTOCOL_FEATURES), ("enable_first", None), ("qemu", None)]:
        lost = 0
        tries = 10
        b = Backend()
        try:
            c, mem = b.connect(), Mem()
            handshake(c, mem, features=feats)
            r1 = Ring(mem, 1)
            r1.setup(c, order="ch" if feats is None else "qemu", enable=feats is None)
            assert not io_round(c, mem, r1, 64)
            for t in range(tries):
                r = Ring(mem, 0)
                h, st, _ = blk_req(mem, r, T_OUT, 8, b"Q" * 4096, kick=False)
                r.setup(c, order=order, base=0, enable=feats is None, keep_idx=True)
                served = _served(mem, r, 1, 1)
                if not served:
                    # a backend that waits for a kick (vhost-user.rst: "start ring upon receiving a kick")
                    os.eventfd_write(r.kick, 1)
                    served = _served(mem, r, 1, 3)
                irq = r.call_pending(0.3)
                if served and not irq:
                    lost += 1
                if not served:
                    lost += 100
                c.call(GET_VRING_BASE, struct.pack("<II", 0, 0))
                os.close(r.kick); os.close(r.call)
            label = f"{order}{'/noPF' if feats else ''}"
            report(f"prequeued_running_{label}", lost == 0, f"{lost} of {tries} starts completed the queued request without a call notification",
                   "every completion the driver asked for is notified (virtio 1.2 2.7.10); libvhost-user signals call at SET_VRING_CALL for this")
            c.close()
        finally:
            b.stop()


def ch_reinitialize(c, mem, rings, acked, pf, base_from="avail", inflight=None):
    """cloud-hypervisor's reconnect (vu_common_ctrl.rs reinitialize_vhost_user + setup_vhost_user):
    SET_OWNER, GET_FEATURES, SET_PROTOCOL_FEATURES, SET_FEATURES, SET_MEM_TABLE, all SET_VRING_NUM,
    SET_INFLIGHT_FD with the buffer kept (when INFLIGHT_SHMFD was negotiated), per ring ADDR,
    BASE (= guest avail idx, or used idx with IN_ORDER and no inflight buffer), CALL, KICK; then
    ENABLE."""
    c.msg(SET_OWNER, ack=False)
    c.u64(GET_FEATURES)
    c.msg(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf), ack=False)
    c.need_reply = bool(pf & PF["REPLY_ACK"])
    assert c.msg(SET_FEATURES, struct.pack("<Q", acked)) in (None, 0)
    assert c.msg(SET_MEM_TABLE, mem.mem_table(), fds=[mem.fd]) in (None, 0)
    for r in rings:
        c.msg(SET_VRING_NUM, struct.pack("<II", r.index, r.size))
    if inflight is not None:
        assert c.msg(SET_INFLIGHT_FD, inflight[0], fds=[inflight[1]]) in (None, 0), "SET_INFLIGHT_FD refused"
    for r in rings:
        avail = struct.unpack("<H", mem.r(r.avail + 2, 2))[0]
        used = r.used_idx()
        base = used if base_from == "used" else avail
        c.msg(SET_VRING_ADDR, struct.pack("<IIQQQQ", r.index, 0, mem.va(r.desc), mem.va(r.used), mem.va(r.avail), 0))
        c.msg(SET_VRING_BASE, struct.pack("<II", r.index, base))
        c.msg(SET_VRING_CALL, struct.pack("<Q", r.index), fds=[r.call])
        c.msg(SET_VRING_KICK, struct.pack("<Q", r.index), fds=[r.kick])
    for r in rings:
        c.msg(SET_VRING_ENABLE, struct.pack("<II", r.index, 1))


def ch_backend_restart(label, features_mask, need_reply=True):
    """Backend killed (SIGKILL) with requests available but not completed; restarted; cloud-hypervisor
    reconnects (with the inflight buffer when INFLIGHT_SHMFD is offered, as cloud-hypervisor then
    does). Every request the guest made available must eventually complete, once."""
    b = Backend(size="256M", extra=("--write-buffer", "0"))
    try:
        c, mem = b.connect(), Mem(size=96 << 20)
        offered, acked, pf, nq, cfg = handshake(c, mem, features=features_mask, need_reply=need_reply)
        r = Ring(mem, 0, size=128)
        inflight = get_and_set_inflight(c, 1, r.size) if pf & PF["INFLIGHT_SHMFD"] else None
        r.setup(c)
        assert not io_round(c, mem, r)
        # 100 writes of 512 KiB of incompressible data: takes a while to serve
        N = 100
        heads = []
        rnd = os.urandom(512 << 10)
        for k in range(N):
            heads.append(blk_req(mem, r, T_OUT, 2048 * k, rnd, kick=False))
        os.eventfd_write(r.kick, 1)
        # wait for a few completions, then kill -9
        deadline = time.time() + 10
        while ((r.used_idx() - r.last_used) & 0xFFFF) < 3 and time.time() < deadline:
            time.sleep(0.0005)
        b.p.kill(); b.p.wait()
        done_before = (r.used_idx() - r.last_used) & 0xFFFF
        c.close()
        b.start()
        c2 = b.connect()
        in_order = bool(acked & F_IN_ORDER)
        ch_reinitialize(c2, mem, [r], acked, pf if need_reply else pf & ~PF["REPLY_ACK"],
                        base_from="used" if in_order and inflight is None else "avail", inflight=inflight)
        deadline = time.time() + 20
        while ((r.used_idx() - r.last_used) & 0xFFFF) < N and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # a request completed twice would show up by now
        done = (r.used_idx() - r.last_used) & 0xFFFF
        report(f"ch_backend_restart_completes_everything_{label}", done == N,
               f"{done_before} of {N} completed before SIGKILL; after cloud-hypervisor's reconnect {done} of {N} used entries "
               f"(IN_ORDER negotiated: {in_order}, INFLIGHT_SHMFD negotiated: {inflight is not None})",
               "every request made available completes exactly once (else the guest waits forever, or sees one twice)")
        c2.close()
    finally:
        b.stop()


def probe_ch_backend_restart():
    """A guest that accepts VIRTIO_F_IN_ORDER (Linux 6.19+)."""
    ch_backend_restart("in_order", None)


def probe_ch_backend_restart_without_in_order():
    """A guest that does not accept VIRTIO_F_IN_ORDER (most): only the inflight buffer
    (INFLIGHT_SHMFD) lets the restarted backend find the requests the dead one had taken."""
    ch_backend_restart("without_in_order", ~F_IN_ORDER & ((1 << 64) - 1))


def probe_ch_backend_restart_without_in_order_or_acks():
    """As probe_ch_backend_restart_without_in_order, without NEED_REPLY on the messages that have no
    reply of their own: SET_INFLIGHT_FD then gets no answer, and the next replies must still be the
    ones their requests expect."""
    ch_backend_restart("without_in_order_or_acks", ~F_IN_ORDER & ((1 << 64) - 1), need_reply=False)


def probe_hostile_inflight_messages():
    """GET_INFLIGHT_FD for absurd sizes, SET_INFLIGHT_FD of a file too small or not sealed: each is
    refused (error ack or the end of its connection) and the backend serves the next connection."""
    b = Backend()
    try:
        cases = [
            ("get_65535_queues", GET_INFLIGHT_FD, inflight_description(0, 0, 0xFFFF, 0x8000), None),
            ("get_queue_size_100", GET_INFLIGHT_FD, inflight_description(0, 0, 1, 100), None),
            ("get_short_payload", GET_INFLIGHT_FD, inflight_description(0, 0, 1, 128)[:20], None),
            ("set_file_too_small", SET_INFLIGHT_FD, inflight_description(2 * 2112, 0, 2, 128), 4096),
            ("set_unsealed_file", SET_INFLIGHT_FD, inflight_description(2 * 2112, 0, 2, 128), 2 * 2112),
        ]
        for label, code, payload, file_len in cases:
            c, mem = b.connect(), Mem()
            offered, acked, pf, nq, cfg = handshake(c, mem)
            refused = False
            try:
                if code == GET_INFLIGHT_FD:
                    c.call_fd(code, payload)
                else:
                    fd = os.memfd_create("probe-inflight")
                    os.ftruncate(fd, file_len)
                    refused = c.msg(code, payload, fds=[fd], ack=True) != 0
                    os.close(fd)
                    # A refused message ends the connection: the next request gets no answer.
                    c.u64(GET_FEATURES)
            except (Closed, OSError, AssertionError, socket.timeout):
                refused = True
            c.close()
            c2, mem2 = b.connect(), Mem()
            handshake(c2, mem2)
            r = Ring(mem2, 0, size=64)
            r.setup(c2)
            healthy = b.p.poll() is None and not io_round(c2, mem2, r)
            c2.close()
            report(f"hostile_inflight_{label}", refused and healthy,
                   f"INFLIGHT_SHMFD offered: {bool(pf & PF['INFLIGHT_SHMFD'])}; refused: {refused}; "
                   f"next connection served: {healthy}",
                   "the bad inflight message is refused, alone; the backend keeps serving")
    finally:
        b.stop()


def full_sequence(mem, rings_n=2):
    """The frontend's messages of a full start, as (code, payload, fds, has_reply) tuples (QEMU-like)."""
    seq = [(SET_OWNER, b"", [], False), (GET_FEATURES, b"", [], True), (GET_PROTOCOL_FEATURES, b"", [], True),
           (SET_PROTOCOL_FEATURES, struct.pack("<Q", PF["MQ"] | PF["CONFIG"] | PF["REPLY_ACK"] | PF["CONFIGURE_MEM_SLOTS"]), [], False),
           (GET_QUEUE_NUM, b"", [], True), (GET_CONFIG, struct.pack("<III", 0, 60, 0) + bytes(60), [], True),
           (SET_FEATURES, struct.pack("<Q", 0x174007e46 & ~F_LOG_ALL), [], False),
           (SET_MEM_TABLE, mem.mem_table(), [mem.fd], False)]
    for i in range(rings_n):
        r = Ring(mem, i)
        seq += [(SET_VRING_NUM, struct.pack("<II", i, 128), [], False),
                (SET_VRING_BASE, struct.pack("<II", i, 0), [], False),
                (SET_VRING_ADDR, struct.pack("<IIQQQQ", i, 0, mem.va(r.desc), mem.va(r.used), mem.va(r.avail), 0), [], False),
                (SET_VRING_KICK, struct.pack("<Q", i), [r.kick], False),
                (SET_VRING_CALL, struct.pack("<Q", i), [r.call], False),
                (SET_VRING_ENABLE, struct.pack("<II", i, 1), [], False)]
    seq += [(GET_VRING_BASE, struct.pack("<II", 0, 0), [], True)]
    return seq


def probe_disconnect_every_point():
    """Connect, send the first k messages of a start (then close, or close mid-message), for every k;
    the backend must keep serving; finally data written and flushed earlier must read back."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        h, st, _ = blk_req(mem, r, T_OUT, 0, b"F" * 65536)
        assert r.wait_used(1) and mem.r(st, 1) == b"\0"
        h, st, _ = blk_req(mem, r, T_FLUSH, 0)
        assert r.wait_used(1) and mem.r(st, 1) == b"\0"
        c.close()
        problems = []
        mem2 = Mem()
        seq = full_sequence(mem2)
        for k in range(len(seq) + 1):
            for partial in (False, True):
                if partial and k == len(seq):
                    continue
                try:
                    cc = b.connect()
                    for code, payload, fds, has_reply in seq[:k]:
                        if has_reply:
                            cc.call(code, payload)
                        else:
                            cc.send(code, payload, fds)
                    if partial:
                        code, payload, fds, _ = seq[k]
                        raw = struct.pack("<III", code, VERSION, len(payload)) + payload
                        cut = max(1, len(raw) // 2)
                        if fds:
                            socket.send_fds(cc.s, [raw[:cut]], fds)
                        else:
                            cc.s.sendall(raw[:cut])
                    time.sleep(0.02)
                    cc.close()
                except Exception as e:
                    problems.append(f"k={k} partial={partial}: {e!r}")
                if not b.alive():
                    problems.append(f"backend died at k={k} partial={partial}")
                    break
            if not b.alive():
                break
        # a full connection afterwards
        c, mem3 = b.connect(), Mem()
        handshake(c, mem3)
        r = Ring(mem3, 0)
        r.setup(c)
        h, st, d = blk_req(mem3, r, T_IN, 0, data_len=65536, writable_data=True)
        ok = bool(r.wait_used(1, 10)) and mem3.r(st, 1) == b"\0" and mem3.r(d, 65536) == b"F" * 65536
        report("disconnect_every_point", ok and not problems and b.alive(),
               f"{len(seq)} messages x 2 cut points; problems={problems[:5]}; flushed data intact and served after: {ok}")
        c.close()
        errs = [l for l in b.text().splitlines() if "ERROR" in l or "panick" in l]
        print("   error lines in log:", len(errs), errs[:3])
    finally:
        b.stop()


def probe_frontend_killed_mid_io():
    """Frontend vanishes with writes in flight right after a FLUSH completed; the backend is then killed
    too (host crash right after). Everything written before the completed FLUSH must read back."""
    b = Backend(size="64M")
    try:
        lost = []
        for round_ in range(3):
            c, mem = b.connect(), Mem(size=64 << 20)
            handshake(c, mem)
            rings = [Ring(mem, q) for q in range(2)]
            for r in rings:
                r.setup(c)
            tag = bytes([0x30 + round_])
            for k in range(16):
                blk_req(mem, rings[k % 2], T_OUT, 128 * k, tag * 65536)
            for r in rings:
                r.wait_used(8, 10)
            h, st, _ = blk_req(mem, rings[0], T_FLUSH, 0)
            assert rings[0].wait_used(1, 10) and mem.r(st, 1) == b"\0"
            # more writes in flight, then the frontend dies
            for k in range(16):
                blk_req(mem, rings[k % 2], T_OUT, 128 * (k + 16), os.urandom(65536))
            c.s.shutdown(socket.SHUT_RDWR)
            c.close()
            time.sleep(0.05 * round_)
            b.p.kill(); b.p.wait()
            b.start()
            c, mem = b.connect(), Mem(size=64 << 20)
            handshake(c, mem)
            r = Ring(mem, 0)
            r.setup(c)
            for k in range(16):
                h, st, d = blk_req(mem, r, T_IN, 128 * k, data_len=65536, writable_data=True)
                if not r.wait_used(1, 10) or mem.r(st, 1) != b"\0" or mem.r(d, 65536) != tag * 65536:
                    lost.append((round_, k))
            c.close()
        report("flushed_data_survives_frontend_and_backend_kill", not lost, f"lost flushed clusters: {lost}")
    finally:
        b.stop()


def probe_spdk_order():
    """SPDK virtio-user (lib/virtio/virtio_vhost_user.c): SET_FEATURES before the protocol features,
    only MQ|CONFIG acked (no REPLY_ACK), GET_CONFIG of 256 bytes, SET_VRING_ENABLE 1 for every queue
    before the memory table, CALL for all queues, SET_MEM_TABLE + GET_FEATURES as a barrier, then
    NUM BASE ADDR KICK. Reply flags must be exactly VERSION|REPLY (SPDK refuses others)."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        c.send(SET_OWNER)
        c.send(GET_FEATURES)
        code, flags, p = c.recv()
        offered = struct.unpack("<Q", p)[0]
        acked = offered & (F_VERSION_1 | F_PROTOCOL_FEATURES | F_INDIRECT | F_EVENT_IDX | (1 << 9) | (1 << 12) | (1 << 6) | (1 << 2) | (1 << 1))
        c.send(SET_FEATURES, struct.pack("<Q", acked))
        pf = c.u64(GET_PROTOCOL_FEATURES) & (PF["MQ"] | PF["CONFIG"])
        c.send(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf))
        o, s, f, cfg = get_config(c, 0, 256)
        nq = 2
        for q in range(nq):
            c.send(SET_VRING_ENABLE, struct.pack("<II", q, 1))
        qn = c.u64(GET_QUEUE_NUM)
        rings = [Ring(mem, q) for q in range(nq)]
        for r in rings:
            c.send(SET_VRING_CALL, struct.pack("<Q", r.index), [r.call])
        c.send(SET_MEM_TABLE, mem.mem_table(), [mem.fd])
        c.u64(GET_FEATURES)
        for r in rings:
            r.setup(c, order="qemu", call=False, enable=False)  # NUM BASE ADDR KICK (no acks: need_reply False)
        errs = [io_round(c, mem, r, 8 * r.index) for r in rings]
        report("spdk_order_io", not any(errs) and flags == (VERSION | REPLY) and s == 256,
               f"reply flags={flags:#x} config size={s} queue_num={qn} io errors={errs}")
        # SPDK stop: GET_VRING_BASE for every queue, then a restart the same way
        bases = [struct.unpack("<II", c.call(GET_VRING_BASE, struct.pack("<II", r.index, 0)))[1] for r in rings]
        for r in rings:
            c.send(SET_VRING_ENABLE, struct.pack("<II", r.index, 1))
        for r in rings:
            c.send(SET_VRING_CALL, struct.pack("<Q", r.index), [r.call])
        for r in rings:
            r.setup(c, base=0, order="qemu", call=False, enable=False)  # SPDK restarts at base 0 (fresh rings)
        errs = [io_round(c, mem, r, 8 * r.index + 32) for r in rings]
        report("spdk_restart_io", not any(errs), f"bases at stop={bases}; io after restart errors={errs}")
        c.close()
    finally:
        b.stop()


def probe_legacy_driver():
    """A frontend whose guest did not accept VIRTIO_F_VERSION_1 (legacy interface), no EVENT_IDX,
    no INDIRECT: I/O must still work (virtio 1.2 7.2: devices may offer a legacy interface; we
    offer VERSION_1 only, so a transitional frontend acking without it is a driver error?)."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        offered, acked, pf, nq, cfg = handshake(c, mem, features=~(F_VERSION_1 | F_EVENT_IDX | F_INDIRECT))
        r = Ring(mem, 0)
        r.setup(c)
        err = io_round(c, mem, r)
        report("no_version_1_io", not err, f"acked={acked:#x} io err={err} (informational)")
    except Exception as e:
        report("no_version_1_io", False, f"raised {e!r}; backend alive={b.alive()} (informational)")
    finally:
        b.stop()


def probe_kick_fd_replaced_while_running():
    """SET_VRING_KICK with a new eventfd on a started, enabled ring (vhost-user.rst: the message sets
    the kick fd; nothing restricts it to stopped rings). Kicks on the new fd must be seen."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        assert not io_round(c, mem, r)
        new_kick = os.eventfd(0, os.EFD_NONBLOCK)
        ack = c.msg(SET_VRING_KICK, struct.pack("<Q", 0), fds=[new_kick])
        old = r.kick
        r.kick = new_kick
        time.sleep(0.1)  # let the worker finish polling and sleep
        h, st, _ = blk_req(mem, r, T_OUT, 8, b"N" * 4096)
        served = bool(r.wait_used(1, 3))
        report("kick_fd_replaced_while_running", served, f"ack={ack} request kicked on the new fd served={served}",
               "the new kick fd is watched (vhost-user.rst SET_VRING_KICK)")
        c.close()
    finally:
        b.stop()


def probe_call_fd_replaced_while_running():
    """SET_VRING_CALL with a new eventfd on a running ring (QEMU does this when the guest masks and
    unmasks the queue's MSI-X vector): later completions are signalled on the new fd."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        assert not io_round(c, mem, r)
        r.call_pending(0)
        new_call = os.eventfd(0, os.EFD_NONBLOCK)
        ack = c.msg(SET_VRING_CALL, struct.pack("<Q", 0), fds=[new_call])
        r.call = new_call
        time.sleep(0.1)
        blk_req(mem, r, T_OUT, 16, b"M" * 4096)
        served = bool(r.wait_used(1, 3))
        irq = r.call_pending(5)
        report("call_fd_replaced_while_running", served and irq, f"ack={ack} served={served} notified on the new call fd={irq}")
        c.close()
    finally:
        b.stop()


def probe_buffer_across_contiguous_regions():
    """Guest RAM made of two memory backends contiguous in guest-physical space (QEMU `-numa node,memdev=m0
    -numa node,memdev=m1`, or a hot-plugged DIMM right after base RAM): two SET_MEM_TABLE regions with
    different fds, [0, 8M) and [8M, 16M). A guest's scatter-gather segment may cover physically contiguous
    pages on both sides of the boundary (Linux merges physically contiguous bio pages into one segment), so one
    descriptor spans both regions. The driver did nothing wrong; the device must serve it."""
    b = Backend()
    try:
        c = b.connect()
        m0, m1 = Mem(size=8 << 20), Mem(size=8 << 20)
        # one view: GPA [0,8M) in m0, [8M,16M) in m1; VA contiguous too
        class Two:
            VA_BASE = Mem.VA_BASE
            def va(self, gpa): return Mem.VA_BASE + gpa
            def w(self, gpa, data):
                for i in range(len(data)):
                    pass
                if gpa + len(data) <= (8 << 20):
                    m0.w(gpa, data)
                elif gpa >= (8 << 20):
                    m1.w(gpa - (8 << 20), data)
                else:
                    cut = (8 << 20) - gpa
                    m0.w(gpa, data[:cut]); m1.w(0, data[cut:])
            def r(self, gpa, n):
                if gpa + n <= (8 << 20):
                    return m0.r(gpa, n)
                if gpa >= (8 << 20):
                    return m1.r(gpa - (8 << 20), n)
                cut = (8 << 20) - gpa
                return m0.r(gpa, cut) + m1.r(0, n - cut)
        two = Two()
        c.msg(SET_OWNER, ack=False)
        offered = c.u64(GET_FEATURES)
        pf = c.u64(GET_PROTOCOL_FEATURES) & (PF["MQ"] | PF["CONFIG"] | PF["REPLY_ACK"])
        c.msg(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf), ack=False)
        c.need_reply = True
        c.msg(SET_FEATURES, struct.pack("<Q", offered & ~F_LOG_ALL))
        table = struct.pack("<II", 2, 0) + struct.pack("<QQQQ", 0, 8 << 20, two.va(0), 0) + \
            struct.pack("<QQQQ", 8 << 20, 8 << 20, two.va(8 << 20), 0)
        ack = c.msg(SET_MEM_TABLE, table, fds=[m0.fd, m1.fd])
        r = Ring(m0, 0)
        r.mem = two
        r.setup(c)
        # write: 64 KiB buffer at GPA 8M - 32K .. 8M + 32K
        data = bytes(range(256)) * 256
        hdr, st = 0x200000, 0x200100
        two.w(hdr, struct.pack("<IIQ", T_OUT, 0, 0)); two.w(st, b"\xff")
        buf = (8 << 20) - 32768
        two.w(buf, data)
        head = r.put_chain([(hdr, 16, False), (buf, 65536, False), (st, 1, True)])
        r.publish(head)
        u = r.wait_used(1, 5)
        wstatus = two.r(st, 1)
        # read it back into a buffer that does not straddle
        rb = 0x300000
        two.w(hdr, struct.pack("<IIQ", T_IN, 0, 0)); two.w(st, b"\xff")
        head = r.put_chain([(hdr, 16, False), (rb, 65536, True), (st, 1, True)])
        r.publish(head)
        r.wait_used(1, 5)
        rstatus = two.r(st, 1)
        same = two.r(rb, 65536) == data
        report("buffer_across_contiguous_regions", wstatus == b"\0" and same,
               f"mem table ack={ack}; write status={wstatus.hex()} used={u}; read back status={rstatus.hex()} data equal={same}",
               "status OK (virtio 1.2 2.7.5: a descriptor is any guest-physical buffer; regions are a vhost-user detail)")
        c.close()
    finally:
        b.stop()


def probe_reset_owner_after_disable_without_pf():
    """Ring disabled (ENABLE 0), RESET_OWNER, then the same connection is set up again WITHOUT
    PROTOCOL_FEATURES (rings enabled from SET_FEATURES, vhost-user.rst "Ring states")."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        assert not io_round(c, mem, r)
        c.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 0))
        c.call(GET_VRING_BASE, struct.pack("<II", 0, 0))
        c.msg(RESET_OWNER, ack=False)
        c.need_reply = False
        mem2 = Mem()
        handshake(c, mem2, features=~F_PROTOCOL_FEATURES)
        r2 = Ring(mem2, 0)
        r2.setup(c, order="qemu", enable=False)
        err = io_round(c, mem2, r2, 8, b"W")
        report("reset_owner_then_no_pf", not err, f"io err={err}")
    finally:
        b.stop()


def probe_writeback_persists_to_next_vm():
    """Informational: a guest sets write-through (SET_CONFIG writeback=0); the next frontend connection
    (a different VM) reads the config."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        ack = c.msg(SET_CONFIG, struct.pack("<III", 32, 1, 0) + b"\x00")
        wb1 = get_config(c, 32, 1)[3]
        c.close()
        time.sleep(0.3)
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        wb2 = get_config(c, 32, 1)[3]
        report("writeback_after_reconnect", True, f"set ack={ack}; same connection writeback={wb1.hex()}; next connection writeback={wb2.hex()} (informational: virtio allows either after reset)")
        c.close()
    finally:
        b.stop()


def probe_mem_table_changes_while_running():
    """QEMU without CONFIGURE_MEM_SLOTS resends SET_MEM_TABLE on every memory change (hotplug, ROM/BAR
    remaps) while rings run; with it, ADD_MEM_REG / REM_MEM_REG. I/O keeps working across each."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c)
        errs = []
        extra = Mem(size=2 << 20)
        for step in range(6):
            if step % 3 == 0:
                # same RAM + an extra region at 64M
                t = struct.pack("<II", 2, 0) + mem.region() + struct.pack("<QQQQ", 64 << 20, 2 << 20, Mem.VA_BASE + (64 << 20), 0)
                a = c.msg(SET_MEM_TABLE, t, fds=[mem.fd, extra.fd])
            elif step % 3 == 1:
                a = c.msg(REM_MEM_REG, struct.pack("<QQQQQ", 0, 64 << 20, 2 << 20, Mem.VA_BASE + (64 << 20), 0))
            else:
                a = c.msg(ADD_MEM_REG, struct.pack("<QQQQQ", 0, 64 << 20, 2 << 20, Mem.VA_BASE + (64 << 20), 0), fds=[extra.fd])
            e = io_round(c, mem, r, 8 * step, bytes([0x41 + step]))
            errs.append((step, a, e))
        ok = all(a in (0, None) and e is None for _, a, e in errs)
        report("mem_table_changes_while_running", ok, f"(step, ack, io error): {errs}")
        c.close()
    finally:
        b.stop()


def probe_region_larger_than_its_file():
    """SET_MEM_TABLE region bigger than the memfd behind it (a truncated/short memory-backend file):
    hostile-guest.md row 20 says reject; mapping it and touching the tail would SIGBUS the backend."""
    b = Backend()
    try:
        c = b.connect()
        mem = Mem(size=8 << 20)
        c.msg(SET_OWNER, ack=False)
        offered = c.u64(GET_FEATURES)
        pf = c.u64(GET_PROTOCOL_FEATURES) & (PF["MQ"] | PF["CONFIG"] | PF["REPLY_ACK"])
        c.msg(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf), ack=False)
        c.need_reply = True
        c.msg(SET_FEATURES, struct.pack("<Q", offered & ~F_LOG_ALL))
        table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 16 << 20, Mem.VA_BASE, 0)
        try:
            ack = c.msg(SET_MEM_TABLE, table, fds=[mem.fd])
        except Exception as e:
            ack = repr(e)
        result = f"SET_MEM_TABLE(16M region on an 8M memfd) ack={ack}"
        if ack == 0:
            r = Ring(mem, 0)
            r.setup(c)
            # a read whose buffer lies past the end of the file (GPA 12M)
            hdr, st = 0x200000, 0x200100
            mem.w(hdr, struct.pack("<IIQ", T_IN, 0, 0)); mem.w(st, b"\xff")
            head = r.put_chain([(hdr, 16, False), (12 << 20, 4096, True), (st, 1, True)])
            r.publish(head)
            u = r.wait_used(1, 3)
            time.sleep(0.5)
            result += f"; read into the tail: used={u} status={mem.r(st,1).hex()} backend alive={b.alive()} exit={b.p.returncode}"
        report("region_larger_than_file", b.alive() and ack != 0, result,
               "refused (error ack) or at least no crash")
    finally:
        b.stop()


def probe_log_base_larger_than_its_file():
    """SET_LOG_BASE (LOG_SHMFD, live migration) with a log area larger than the fd's file: the first dirty
    page the device marks (any IN request) touches the missing part of the log."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        offered, acked, pf, nq, cfg = handshake(c, mem, pf_want=PF["MQ"] | PF["CONFIG"] | PF["REPLY_ACK"] | PF["LOG_SHMFD"])
        r = Ring(mem, 0)
        r.setup(c)
        assert not io_round(c, mem, r)
        # migration starts: SET_FEATURES with LOG_ALL, SET_LOG_BASE
        c.msg(SET_FEATURES, struct.pack("<Q", acked | F_LOG_ALL))
        logfd = os.memfd_create("short-log")  # size 0
        c.send(SET_LOG_BASE, struct.pack("<QQ", 1 << 20, 0), fds=[logfd])
        try:
            code, flags, p = c.recv()
            reply = (code, p.hex())
        except Exception as e:
            reply = repr(e)
        h, st, d = blk_req(mem, r, T_IN, 0, data_len=4096, writable_data=True)
        u = r.wait_used(1, 3)
        time.sleep(0.5)
        report("log_base_larger_than_file", b.alive(),
               f"SET_LOG_BASE(1 MiB log on an empty memfd) reply={reply}; read request used={u}; backend alive={b.alive()} exit={b.p.returncode}",
               "refused, or no crash")
    finally:
        b.stop()


def probe_tiny_rings():
    """Ring sizes 1, 2 and 4 (powers of two, legal, virtio 1.2 2.7): with 2+ descriptors per request a ring of
    1 needs an indirect table; 2 and 4 hold one request."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        res = {}
        for q, size in ((0, 4), (1, 2), (2, 1)):
            r = Ring(mem, q, size=size)
            acks = r.setup(c)
            if size >= 3:
                err = io_round(c, mem, r, 8 * q)
            else:
                # one indirect descriptor pointing at a 3-entry table
                tbl = mem.alloc(48)
                hdr = mem.alloc(16); mem.w(hdr, struct.pack("<IIQ", T_OUT, 0, 8 * q))
                d = mem.alloc(4096, 512); mem.w(d, b"T" * 4096)
                st = mem.alloc(1); mem.w(st, b"\xff")
                mem.w(tbl, struct.pack("<QIHH", hdr, 16, 1, 1) + struct.pack("<QIHH", d, 4096, 1, 2) + struct.pack("<QIHH", st, 1, 2, 0))
                mem.w(r.desc, struct.pack("<QIHH", tbl, 48, 4, 0))
                r.publish(0)
                u = r.wait_used(1, 3)
                err = None if u and mem.r(st, 1) == b"\0" else f"used={u} status={mem.r(st,1).hex()}"
            res[size] = (acks, err)
        report("tiny_rings", all(e is None for _, e in res.values()), f"{res}")
        c.close()
    finally:
        b.stop()


def probe_disconnect_while_waiting_for_lock():
    """Migration destination started with --wait-lock; its frontend goes away (migration cancelled, QEMU
    killed) while the device waits for the source's writer lock. The backend should accept the next
    connection promptly (not after the whole wait)."""
    src = Backend(size="8M")
    dst = None
    try:
        c1, m1 = src.connect(), Mem()
        handshake(c1, m1)
        r1 = Ring(m1, 0)
        r1.setup(c1)
        assert not io_round(c1, m1, r1)   # the source holds the writer lock now
        dst = Backend(image=src.image, workdir=src.dir + "/dst" if os.makedirs(src.dir + "/dst", exist_ok=True) is None else None,
                      extra=("--wait-lock", "120s"))
        c2, m2 = dst.connect(), Mem()
        handshake(c2, m2)
        r2 = Ring(m2, 0)
        r2.setup(c2)
        h, st, _ = blk_req(m2, r2, T_OUT, 8, b"D" * 4096)
        time.sleep(1.0)
        c2.close()  # destination frontend dies
        t = time.time()
        c3 = dst.connect()
        c3.s.settimeout(120)
        c3.msg(SET_OWNER, ack=False)
        c3.u64(GET_FEATURES)
        waited = time.time() - t
        report("disconnect_while_waiting_for_lock", waited < 15,
               f"next connection answered after {waited:.1f}s (--wait-lock 120s)",
               "prompt answer: the frontend that wanted the device is gone")
        c3.close()
        c1.close()
    finally:
        src.stop()
        if dst:
            dst.stop()


def probe_qemu_stop_cont_under_load():
    """QEMU 10 `stop`/`cont` cycles while the guest keeps 32 requests queued on each of 2 rings:
    stop = ENABLE 0 + GET_VRING_BASE on every ring; cont = NUM BASE ADDR KICK CALL ENABLE 1 with the
    returned base. Every request completes exactly once; GET_VRING_BASE's base equals the used idx
    (no popped-but-unfinished request); the guest is notified after each cont."""
    b = Backend(size="64M")
    try:
        c, mem = b.connect(), Mem(size=64 << 20)
        handshake(c, mem)
        rings = [Ring(mem, q, size=128) for q in range(2)]
        for r in rings:
            r.setup(c, order="qemu")
        problems = []
        completed = {0: 0, 1: 0}
        submitted = {0: 0, 1: 0}
        for cycle in range(15):
            for r in rings:
                for k in range(32):
                    blk_req(mem, r, T_OUT if k % 2 else T_IN, 8 * ((cycle * 32 + k) % 1024), b"L" * 4096 if k % 2 else b"",
                            data_len=0 if k % 2 else 4096, writable_data=not (k % 2))
                    submitted[r.index] += 1
            time.sleep(0.002 * (cycle % 5))
            for r in rings:
                c.msg(SET_VRING_ENABLE, struct.pack("<II", r.index, 0))
            bases = []
            for r in rings:
                base = struct.unpack("<II", c.call(GET_VRING_BASE, struct.pack("<II", r.index, 0)))[1]
                bases.append(base)
                if base != r.used_idx():
                    problems.append(f"cycle {cycle} ring {r.index}: base {base} != used idx {r.used_idx()}")
            for r, base in zip(rings, bases):
                r.call_pending(0)
                r.setup(c, order="qemu", base=base, keep_idx=True)
            for r in rings:
                want = (r.avail_idx - r.last_used) & 0xFFFF
                got = r.wait_used(want, 10)
                if got is False:
                    problems.append(f"cycle {cycle} ring {r.index}: {want} requests not completed")
                    continue
                completed[r.index] += len(got)
                bad = [st for st in got if st[1] == 0]
        ok = not problems and completed == submitted
        report("qemu_stop_cont_under_load", ok, f"submitted={submitted} completed={completed} problems={problems[:4]}")
        c.close()
    finally:
        b.stop()


def probe_ch_pause_resume_under_load():
    """cloud-hypervisor pause/resume = SET_VRING_ENABLE 0 / 1 on every ring (no GET_VRING_BASE) while
    32 requests per ring are queued. After the ENABLE 0 replies, guest memory must not change (CH
    snapshots it); after resume everything completes exactly once."""
    b = Backend(size="64M")
    try:
        c, mem = b.connect(), Mem(size=64 << 20)
        handshake(c, mem)
        rings = [Ring(mem, q, size=128) for q in range(2)]
        for r in rings:
            r.setup(c, order="ch")
        problems = []
        total = 0
        for cycle in range(10):
            for r in rings:
                for k in range(32):
                    blk_req(mem, r, T_OUT, 8 * ((cycle * 32 + k) % 1024), b"P" * 4096)
            time.sleep(0.001 * (cycle % 4))
            for r in rings:
                c.msg(SET_VRING_ENABLE, struct.pack("<II", r.index, 0))
            snap = bytes(mem.m[:])
            time.sleep(0.3 if cycle % 3 == 0 else 0.05)
            if bytes(mem.m[:]) != snap:
                diff = next(i for i in range(len(snap)) if mem.m[i] != snap[i])
                problems.append(f"cycle {cycle}: guest memory changed after the pause replies (first byte {diff:#x})")
            for r in rings:
                c.msg(SET_VRING_ENABLE, struct.pack("<II", r.index, 1))
            for r in rings:
                want = (r.avail_idx - r.last_used) & 0xFFFF
                got = r.wait_used(want, 10)
                if got is False:
                    problems.append(f"cycle {cycle} ring {r.index}: {want} not completed")
                else:
                    total += len(got)
        quiesces = b.text().count("device quiesced (the frontend disabled every queue")
        report("ch_pause_resume_under_load", not problems and total == 640,
               f"completed {total}/640; quiesces by the pause detector={quiesces}; problems={problems[:3]}")
        c.close()
    finally:
        b.stop()


def probe_reply_ack_without_get_features():
    """A reconnecting frontend that already knows the backend's features skips GET_FEATURES and sends
    SET_PROTOCOL_FEATURES(REPLY_ACK) + SET_FEATURES with NEED_REPLY (vhost-user.rst REPLY_ACK: once negotiated
    the back-end MUST answer every NEED_REPLY message)."""
    b = Backend()
    try:
        c = b.connect()
        c.s.settimeout(3)
        c.msg(SET_OWNER, ack=False)
        pf = PF["MQ"] | PF["CONFIG"] | PF["REPLY_ACK"]
        c.msg(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf), ack=False)
        try:
            ack = c.msg(SET_FEATURES, struct.pack("<Q", F_VERSION_1 | F_PROTOCOL_FEATURES), ack=True)
        except Exception as e:
            ack = repr(e)
        report("reply_ack_without_get_features", ack == 0, f"SET_FEATURES with NEED_REPLY -> {ack}",
               "an ack (0); otherwise the frontend waits forever")
    finally:
        b.stop()


def probe_call_without_fd():
    """SET_VRING_CALL with the invalid-FD flag: the driver polls the used ring (no interrupts). The ring
    must still be served; SET_VRING_ERR with an fd is accepted."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        handshake(c, mem)
        r = Ring(mem, 0)
        r.setup(c, call=False)
        ack = c.msg(SET_VRING_CALL, struct.pack("<Q", 0 | 0x100))
        errfd = os.eventfd(0, os.EFD_NONBLOCK)
        ack2 = c.msg(SET_VRING_ERR, struct.pack("<Q", 0), fds=[errfd])
        err = io_round(c, mem, r)
        report("call_without_fd_polling_driver", not err and ack == 0 and ack2 == 0, f"acks={ack},{ack2} io err={err}")
        c.close()
    finally:
        b.stop()


def probe_sigterm_while_waiting_for_lock():
    """vhost-user.rst Backend program conventions: "The back-end program must end (as quickly and cleanly as
    possible) when the SIGTERM signal is received." A destination backend waits for the writer lock
    (--wait-lock 120s) with its frontend connected; SIGTERM must end it promptly."""
    src = Backend(size="8M")
    dst = None
    try:
        c1, m1 = src.connect(), Mem()
        handshake(c1, m1)
        r1 = Ring(m1, 0)
        r1.setup(c1)
        assert not io_round(c1, m1, r1)
        os.makedirs(src.dir + "/dst2", exist_ok=True)
        dst = Backend(image=src.image, workdir=src.dir + "/dst2", extra=("--wait-lock", "120s"))
        c2, m2 = dst.connect(), Mem()
        handshake(c2, m2)
        r2 = Ring(m2, 0)
        r2.setup(c2)
        blk_req(m2, r2, T_OUT, 8, b"D" * 4096)
        results = []
        for delay in (1.0,):
            time.sleep(delay)
            t = time.time()
            dst.p.send_signal(15)
            try:
                dst.p.wait(200)
            except Exception:
                pass
            results.append(round(time.time() - t, 1))
        report("sigterm_while_waiting_for_lock", results[0] < 15, f"exit {results[0]}s after SIGTERM (wait-lock 120s), rc={dst.p.returncode}",
               "prompt exit")
        c1.close()
    finally:
        src.stop()
        if dst:
            dst.stop()


def probe_completions_after_close_on_sigterm():
    """Planned restart (SIGTERM) of the backend while requests are in flight, QEMU-style reconnect.
    QEMU, on the socket's close, stops the device at once: GET_VRING_BASE fails, so it sets the ring's
    last_avail_idx to the used idx it reads *then* (virtio_queue_restore_last_avail_idx) and later restarts
    the ring at that base. If the backend still adds used entries after it closed the socket, those
    requests are executed and completed twice: the guest sees a head it already got back (virtio 1.2
    2.7.8: the device returns each buffer once; Linux then marks the ring broken, or completes a reused
    head's new request with the old result)."""
    b = Backend(size="256M", extra=("--write-buffer", "0"))
    try:
        c, mem = b.connect(), Mem(size=160 << 20)
        handshake(c, mem)
        r = Ring(mem, 0, size=256)
        r.setup(c, order="qemu")
        assert not io_round(c, mem, r)
        rnd = os.urandom(1 << 20)
        N = 64
        for k in range(N):
            blk_req(mem, r, T_OUT, 2048 * k, rnd * 2, kick=False)  # 2 MiB writes
        os.eventfd_write(r.kick, 1)
        while r.used_idx() == r.last_used:
            time.sleep(0.0002)
        b.p.send_signal(15)
        # the frontend notices the close and reads the used idx at once (QEMU's restore)
        c.s.settimeout(10)
        try:
            while c.s.recv(4096):
                pass
        except Exception:
            pass
        u_at_close = r.used_idx()
        b.p.wait(60)
        u_at_exit = r.used_idx()
        late = (u_at_exit - u_at_close) & 0xFFFF
        # restart and reconnect as QEMU does (base = used idx read at the close)
        b.start()
        c2 = b.connect()
        handshake(c2, mem)
        r.call_pending(0)
        c2.msg(SET_VRING_NUM, struct.pack("<II", 0, r.size))
        c2.msg(SET_VRING_BASE, struct.pack("<II", 0, u_at_close))
        c2.msg(SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, mem.va(r.desc), mem.va(r.used), mem.va(r.avail), 0))
        c2.msg(SET_VRING_KICK, struct.pack("<Q", 0), fds=[r.kick])
        c2.msg(SET_VRING_CALL, struct.pack("<Q", 0), fds=[r.call])
        c2.msg(SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        start = (r.last_used) & 0xFFFF
        # Every request completes (those before the close, the rest after the restart), then a
        # moment for any entry too many.
        deadline = time.time() + 60
        while ((r.used_idx() - start) & 0xFFFF) < N and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)
        heads = []
        total = (r.used_idx() - start) & 0xFFFF
        for i in range(total):
            slot = r.used + 4 + 8 * ((start + i) % r.size)
            heads.append(struct.unpack("<I", mem.r(slot, 4))[0])
        dups = sorted({h for h in heads if heads.count(h) > 1})
        report("no_completion_after_close", late == 0 and not dups and total == N,
               f"used idx at close={u_at_close - r.last_used}, at backend exit={u_at_exit - r.last_used} ({late} completed after the "
               f"socket closed); after the QEMU-style reconnect the used ring holds {total} entries for {N} requests, "
               f"heads returned twice: {len(dups)}",
               "every head returned once: finish (or drop) the requests in progress before closing the socket")
        c2.close()
    finally:
        b.stop()


def probe_firecracker_order():
    """Firecracker's vhost-user-blk frontend (devices/virtio/vhost_user.rs, block/vhost_user/device.rs):
    features VERSION_1|EVENT_IDX|PROTOCOL_FEATURES|RO|FLUSH only, protocol features CONFIG only (no REPLY_ACK,
    no MQ), GET_CONFIG(0, 60), one queue; at activation SET_FEATURES again, SET_MEM_TABLE, SET_VRING_NUM,
    then ADDR, BASE (= guest avail idx), CALL, KICK, ENABLE."""
    b = Backend()
    try:
        c, mem = b.connect(), Mem()
        c.msg(SET_OWNER, ack=False)
        offered = c.u64(GET_FEATURES)
        want = offered & (F_VERSION_1 | F_EVENT_IDX | F_PROTOCOL_FEATURES | (1 << 5) | (1 << 9))
        pf = c.u64(GET_PROTOCOL_FEATURES) & PF["CONFIG"]
        c.msg(SET_PROTOCOL_FEATURES, struct.pack("<Q", pf), ack=False)
        o, s, f, cfg = get_config(c, 0, 60)
        c.msg(SET_FEATURES, struct.pack("<Q", want), ack=False)
        c.msg(SET_MEM_TABLE, mem.mem_table(), fds=[mem.fd], ack=False)
        r = Ring(mem, 0)
        r.setup(c, order="ch")
        err = io_round(c, mem, r)
        h, st, _ = blk_req(mem, r, T_FLUSH, 0)
        ok_flush = bool(r.wait_used(1, 5)) and mem.r(st, 1) == b"\0"
        report("firecracker_order_io", not err and ok_flush and s == 60,
               f"config size={s} io err={err} flush ok={ok_flush}")
        c.close()
    finally:
        b.stop()


def probe_completions_after_close_on_refused_message():
    """As completions_after_close_on_sigterm, but the backend ends the connection because it refuses a
    message (here a SET_VRING_NUM of 3 on an unused ring, which the filter turns into a refusal): requests
    still completed after the socket closed are the ones QEMU would replay after its reconnect."""
    b = Backend(size="256M", extra=("--write-buffer", "0"))
    try:
        c, mem = b.connect(), Mem(size=160 << 20)
        handshake(c, mem)
        r = Ring(mem, 0, size=256)
        r.setup(c, order="qemu")
        assert not io_round(c, mem, r)
        rnd = os.urandom(1 << 20)
        N = 64
        for k in range(N):
            blk_req(mem, r, T_OUT, 2048 * k, rnd * 2, kick=False)
        os.eventfd_write(r.kick, 1)
        while r.used_idx() == r.last_used:
            time.sleep(0.0002)
        c.send(SET_VRING_NUM, struct.pack("<II", 1, 3), flags=VERSION | NEED_REPLY)
        c.s.settimeout(10)
        try:
            while c.s.recv(4096):
                pass
        except Exception:
            pass
        u_at_close = r.used_idx()
        time.sleep(5)
        u_later = r.used_idx()
        late = (u_later - u_at_close) & 0xFFFF
        report("no_completion_after_close_refused_message", late == 0,
               f"used idx at close={u_at_close - r.last_used}, 5 s later={u_later - r.last_used}: {late} requests completed "
               f"after the backend closed the connection (backend alive={b.alive()})",
               "no used-ring write after the close (QEMU restores last_avail_idx from the used idx at the close)")
    finally:
        b.stop()
