//! A filter on the frontend's vhost-user control connection, for the one message
//! vhost-user-backend 0.24 answers without asking the backend: SET_VRING_NUM.
//!
//! The crate range-checks the size (1..=max) but acks a size that is not a power of two (its
//! request handler is private and offers no hook that can refuse the message), so a frontend
//! would believe a ring layout the backend never uses (virtio 1.2 2.7: a split queue's size is a
//! power of two). The filter sits between the frontend and the crate's handler: it forwards every
//! message unchanged, with its file descriptors, except a SET_VRING_NUM with an invalid size,
//! whose size it replaces by 0. The crate then refuses it the way it refuses any out-of-range
//! size: an error ack (when REPLY_ACK is negotiated and asked for) in the message's own place in
//! the reply stream, and the end of the connection. Replies go back unchanged.
//!
//! A SET_VRING_KICK without a kick fd (the invalid-FD flag: "poll the ring") is refused the same
//! way, by aiming it at a ring that does not exist: the crate would acknowledge it and never start
//! the ring.
//!
//! SET_MEM_TABLE, ADD_MEM_REG and SET_LOG_BASE whose range runs past the end of its (regular)
//! file are refused the same way (their size rewritten to 0): the crate would map them, and the
//! first access past the file's end would kill the process with SIGBUS.
//!
//! A frontend that negotiates REPLY_ACK without a GET_FEATURES on the connection (it knows our
//! features from an earlier one) would get no acks from the crate, which honours REPLY_ACK only
//! after answering a GET_FEATURES: the filter then asks GET_FEATURES itself before the
//! SET_PROTOCOL_FEATURES and drops the answer.
//!
//! It also lets the backend act on SET_VRING_ENABLE before the crate answers it (the crate has no
//! hook for it): a ring being disabled takes no new request and its request in progress completes
//! first, so the frontend's pause (cloud-hypervisor's) means no more guest memory changes.
//!
//! GET_INFLIGHT_FD and SET_INFLIGHT_FD (INFLIGHT_SHMFD negotiated), which the crate refuses, are
//! answered by the backend ([`ControlHooks::get_inflight_fd`], [`ControlHooks::set_inflight_fd`]):
//! the crate gets a GET_FEATURES in the message's place, and its reply is replaced by the
//! backend's (or dropped when no reply is due), so the frontend's replies keep the order of its
//! requests. A message the backend refuses is forwarded unchanged for the crate to refuse.
//!
//! Only the control connection passes through the filter (a few messages per ring start or
//! stop); the data path (kick/call eventfds, shared guest memory) never does.
//!
//! The crate accepts its connection from a listener only, so each connection gets a private
//! listener in the abstract socket namespace with a random name; the filter connects to it and
//! the crate accepts. A connection that is not the filter's (another local process racing for
//! the random name) is detected (the filter's own connection was never accepted) and refused.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::Mutex;
use std::thread::JoinHandle;

use libc::{c_void, iovec};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserProtocolFeatures, MAX_ATTACHED_FD_ENTRIES, MAX_MSG_SIZE,
};
use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::device::lock;
use super::inflight::{InflightDescription, InflightError, DESCRIPTION_SIZE};

/// Size of a vhost-user message header (request, flags, size; little-endian u32 each).
const HEADER_SIZE: usize = 12;

/// The rules the filter applies to the frontend's messages.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules {
    /// Largest ring size offered (the crate refuses larger ones itself).
    pub max_queue_size: usize,
}

impl Rules {
    /// Rewrites `payload` of a request with code `code` if it must be refused; returns a
    /// description of what was refused.
    fn apply(&self, code: u32, payload: &mut [u8], files: &[File]) -> Option<String> {
        if code == FrontendReq::SET_VRING_KICK as u32 {
            return refuse_kick_without_fd(payload);
        }
        if let Some(refused) = refuse_mapping_past_file_end(code, payload, files) {
            return Some(refused);
        }
        if code != FrontendReq::SET_VRING_NUM as u32 || payload.len() != 8 {
            return None;
        }
        let index = u32::from_le_bytes(payload[0..4].try_into().ok()?);
        let num = u32::from_le_bytes(payload[4..8].try_into().ok()?);
        if num.is_power_of_two() && num as usize <= self.max_queue_size {
            return None;
        }
        // 0 is the size the crate itself refuses (error ack, end of the connection).
        payload[4..8].copy_from_slice(&0u32.to_le_bytes());
        let why = if num.is_power_of_two() {
            "larger than the largest queue size served (serve --queue-size)"
        } else {
            "not a power of two"
        };
        Some(format!(
            "SET_VRING_NUM {num} on ring {index} refused: {why}; sizes accepted: powers of two \
             up to {}",
            self.max_queue_size
        ))
    }
}

/// The invalid-FD flag of a SET_VRING_KICK / SET_VRING_CALL payload (vhost-user.rst: no fd
/// comes with the message; for a kick, the back-end is to poll the ring instead).
const VRING_NOFD_FLAG: u64 = 0x100;
/// A ring index no backend serves (the crate offers at most 64 queues): the crate refuses a
/// SET_VRING_KICK for it.
const REFUSED_RING_INDEX: u64 = 0xff;

/// SET_VRING_KICK with the invalid-FD flag asks the backend to poll the ring. We do not poll a
/// ring without a kick fd (a worker spinning for as long as the ring lives), and the crate would
/// acknowledge the message and then never start the ring: the frontend would believe it started
/// and its guest would hang. Rewriting the ring index to one that does not exist makes the crate
/// refuse it (error ack when asked for, then the end of the connection, as for every message it
/// refuses), so the frontend learns at once. libvhost-user does not poll either.
fn refuse_kick_without_fd(payload: &mut [u8]) -> Option<String> {
    let value = u64::from_le_bytes(<[u8; 8]>::try_from(&*payload).ok()?);
    if value & VRING_NOFD_FLAG == 0 {
        return None;
    }
    let index = value & 0xff;
    let refused = (value & !0xff) | REFUSED_RING_INDEX;
    payload.copy_from_slice(&refused.to_le_bytes());
    Some(format!(
        "SET_VRING_KICK without a kick fd (polling) on ring {index} refused: rings are served \
         only on kick eventfds"
    ))
}

/// Bytes of a `VhostUserMemoryRegion` (guest address, size, user address, mmap offset).
const MEMORY_REGION_SIZE: usize = 32;

/// SET_MEM_TABLE, ADD_MEM_REG and SET_LOG_BASE hand the backend a file to map at an offset and
/// size. vm-memory maps it without looking at the file's size, and a mapping past the end of a
/// file is valid until touched: the first access beyond the file's last page (a guest request's
/// buffer, a used ring, a dirty-page bit) raises SIGBUS and kills the whole process, every
/// guest's disk with it. Such a message is refused instead: the size of each range that does
/// not fit its regular file (memfd, tmpfs, hugetlbfs) is set to 0, which the crate refuses
/// (error ack when asked for, then the end of the connection). Other kinds of fd are left to
/// the crate. A frontend that shrinks its file after the mapping is not caught here.
fn refuse_mapping_past_file_end(code: u32, payload: &mut [u8], files: &[File]) -> Option<String> {
    // (what, offset of the size field, offset of the mmap offset field, index of the fd).
    let mut ranges: Vec<(&str, usize, usize, usize)> = Vec::new();
    if code == FrontendReq::SET_MEM_TABLE as u32 {
        let count = u32::from_le_bytes(payload.get(..4)?.try_into().ok()?) as usize;
        if payload.len() != 8 + count.checked_mul(MEMORY_REGION_SIZE)? || files.len() != count {
            return None; // malformed: the crate refuses it
        }
        for i in 0..count {
            let region = 8 + i * MEMORY_REGION_SIZE;
            ranges.push(("SET_MEM_TABLE region", region + 8, region + 24, i));
        }
    } else if code == FrontendReq::ADD_MEM_REG as u32 {
        if payload.len() != 8 + MEMORY_REGION_SIZE || files.len() != 1 {
            return None;
        }
        ranges.push(("ADD_MEM_REG region", 16, 32, 0));
    } else if code == FrontendReq::SET_LOG_BASE as u32 {
        if payload.len() != 16 || files.len() != 1 {
            return None;
        }
        ranges.push(("SET_LOG_BASE log", 0, 8, 0));
    } else {
        return None;
    }
    let read = |payload: &[u8], at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            payload.get(at..at + 8)?.try_into().ok()?,
        ))
    };
    let mut refused = Vec::new();
    for (what, size_at, offset_at, fd) in ranges {
        let (Some(size), Some(offset), Some(file)) = (
            read(payload, size_at),
            read(payload, offset_at),
            files.get(fd),
        ) else {
            continue;
        };
        let Ok(metadata) = file.metadata() else {
            continue;
        };
        if !metadata.file_type().is_file() {
            continue;
        }
        let file_len = metadata.len();
        if offset.checked_add(size).is_some_and(|end| end <= file_len) {
            continue;
        }
        payload[size_at..size_at + 8].copy_from_slice(&0u64.to_le_bytes());
        refused.push(format!(
            "{what} {fd} maps {size} bytes at offset {offset} of a file of {file_len} bytes"
        ));
    }
    if refused.is_empty() {
        return None;
    }
    Some(format!(
        "{} refused: touching the part past the file's end would kill the backend (SIGBUS)",
        refused.join("; ")
    ))
}

/// How long [`FilteredConnection::close`] lets the crate's last replies reach the frontend.
const LAST_REPLIES_LIMIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What the filter tells the backend before the crate handles a message.
pub(crate) trait ControlHooks: Send + Sync + 'static {
    /// SET_VRING_ENABLE of ring `index` to `enable`. Runs before the message reaches the crate,
    /// so the crate's reply (the frontend's signal that the ring is disabled) can wait for what
    /// this does (draining the ring's request in progress).
    fn vring_enable(&self, index: u32, enable: bool);

    /// SET_FEATURES with `features`, before the crate handles it. Without
    /// VHOST_USER_F_PROTOCOL_FEATURES every ring is enabled by this message (vhost-user.rst
    /// "Ring states"), which ends any disable the frontend asked for earlier on this
    /// connection (e.g. before a RESET_OWNER).
    fn features_set(&self, features: u64);

    /// SET_VRING_BASE with the ring's new index `base` (the crate validates the ring index).
    /// Runs before the crate handles it, so before the ring can be enabled.
    fn vring_base_set(&self, base: u32);

    /// GET_INFLIGHT_FD (the frontend negotiated INFLIGHT_SHMFD): a new inflight buffer for the
    /// queue count and size asked for, and the reply's description. An error refuses the
    /// message (the crate then ends the connection).
    fn get_inflight_fd(
        &self,
        request: &InflightDescription,
    ) -> Result<(InflightDescription, File), InflightError>;

    /// SET_INFLIGHT_FD: the buffer to track requests in from now on (the one a previous
    /// backend may have left requests in). An error refuses the message (error ack when asked
    /// for, then the end of the connection, from the crate).
    fn set_inflight_fd(
        &self,
        description: &InflightDescription,
        file: File,
    ) -> Result<(), InflightError>;

    /// The frontend closed the connection (or can no longer be written to). From now on the
    /// ring state is the frontend's alone: QEMU, for one, restarts each ring at the used index
    /// it reads at that moment, so the backend must not add anything to a used ring any more
    /// (a request completed now would be returned twice after its resubmission).
    fn frontend_gone(&self);
}

/// The value of a SET_FEATURES payload; None for another message or a malformed one.
fn set_features(code: u32, payload: &[u8]) -> Option<u64> {
    if code != FrontendReq::SET_FEATURES as u32 {
        return None;
    }
    Some(u64::from_le_bytes(<[u8; 8]>::try_from(payload).ok()?))
}

/// The ring index and value of a SET_VRING_ENABLE payload (`struct vhost_vring_state`); None
/// for another message or a malformed one (which the crate refuses).
fn vring_enable(code: u32, payload: &[u8]) -> Option<(u32, bool)> {
    if code != FrontendReq::SET_VRING_ENABLE as u32 || payload.len() != 8 {
        return None;
    }
    let index = u32::from_le_bytes(payload[0..4].try_into().ok()?);
    match u32::from_le_bytes(payload[4..8].try_into().ok()?) {
        0 => Some((index, false)),
        1 => Some((index, true)),
        _ => None,
    }
}

/// The index of a SET_VRING_BASE payload (`struct vhost_vring_state`); None for another
/// message or a malformed one (which the crate refuses).
fn vring_base(code: u32, payload: &[u8]) -> Option<u32> {
    if code != FrontendReq::SET_VRING_BASE as u32 || payload.len() != 8 {
        return None;
    }
    Some(u32::from_le_bytes(payload[4..8].try_into().ok()?))
}

/// The two ends the filter joins, and its threads.
pub(crate) struct FilteredConnection {
    frontend: UnixStream,
    backend: UnixStream,
    threads: Vec<JoinHandle<()>>,
}

impl FilteredConnection {
    /// Puts the filter between `frontend` (an accepted connection) and a vhost-user daemon:
    /// `start` receives the private listener to accept the filter's connection from (the crate's
    /// `VhostUserDaemon::start`).
    pub(crate) fn establish<E: std::fmt::Display>(
        frontend: UnixStream,
        rules: Rules,
        hooks: std::sync::Arc<dyn ControlHooks>,
        start: impl FnOnce(&mut Listener) -> Result<(), E>,
    ) -> io::Result<Self> {
        let name = format!("insitu-blk/{}/{}", std::process::id(), uuid::Uuid::new_v4());
        let address = SocketAddr::from_abstract_name(name.as_bytes())?;
        let private = UnixListener::bind_addr(&address)?;
        let backend = UnixStream::connect_addr(&address)?;
        let mut listener = Listener::from(private);
        start(&mut listener).map_err(|e| io::Error::other(e.to_string()))?;
        // Closing the listener resets every connection it did not accept: if ours is one of
        // them, the crate accepted someone else's.
        drop(listener);
        if !accepted(&backend)? {
            return Err(io::Error::other(
                "another process connected to the private control socket first",
            ));
        }
        let mut connection = Self {
            frontend,
            backend,
            threads: Vec::new(),
        };
        let to_backend = (
            connection.frontend.try_clone()?,
            connection.backend.try_clone()?,
        );
        let to_frontend = (
            connection.backend.try_clone()?,
            connection.frontend.try_clone()?,
        );
        let in_hooks = std::sync::Arc::clone(&hooks);
        // What to do with each GET_FEATURES reply the crate sends, in the order of the
        // GET_FEATURES it was sent (replies come in the order of the requests).
        let features_replies = std::sync::Arc::new(Mutex::new(VecDeque::new()));
        let features_replies_out = std::sync::Arc::clone(&features_replies);
        let mut get_features_seen = false;
        // The protocol features the frontend acknowledged (SET_PROTOCOL_FEATURES).
        let mut protocol_features = 0u64;
        connection.threads.push(spawn("vhost-filter-in", move || {
            let (ended, result) = forward(
                &to_backend.0,
                &to_backend.1,
                |code, flags, payload, files| {
                    if let Some(refused) = rules.apply(code, payload, files) {
                        tracing::warn!("frontend sent {refused}: refused");
                    }
                    if let Some((index, enable)) = vring_enable(code, payload) {
                        in_hooks.vring_enable(index, enable);
                    }
                    if let Some(features) = set_features(code, payload) {
                        in_hooks.features_set(features);
                    }
                    if let Some(base) = vring_base(code, payload) {
                        in_hooks.vring_base_set(base);
                    }
                    if code == FrontendReq::SET_PROTOCOL_FEATURES as u32 {
                        if let Ok(value) = <[u8; 8]>::try_from(&*payload) {
                            protocol_features = u64::from_le_bytes(value);
                        }
                    }
                    let negotiated = |feature: VhostUserProtocolFeatures| {
                        protocol_features & feature.bits() != 0
                    };
                    if negotiated(VhostUserProtocolFeatures::INFLIGHT_SHMFD) {
                        let reply_ack = negotiated(VhostUserProtocolFeatures::REPLY_ACK)
                            && flags & NEED_REPLY_FLAG != 0;
                        if let Some(reply) =
                            answer_inflight(&*in_hooks, code, payload, files, reply_ack)
                        {
                            // Answered here: the crate gets a GET_FEATURES in the message's
                            // place, whose reply becomes this one (or is dropped), so the
                            // frontend's replies keep the order of its requests.
                            lock(&features_replies).push_back(reply);
                            return Verdict {
                                instead: Some((get_features_request().to_vec(), Vec::new())),
                                ..Verdict::default()
                            };
                        }
                    }
                    if code == FrontendReq::GET_FEATURES as u32 {
                        get_features_seen = true;
                        lock(&features_replies).push_back(FeaturesReply::Forward);
                    } else if code == FrontendReq::SET_PROTOCOL_FEATURES as u32
                        && !get_features_seen
                    {
                        // The vhost crate honours REPLY_ACK only once it has answered a
                        // GET_FEATURES on this connection (it checks the features it *sent*). A
                        // frontend that knows our features from an earlier connection may skip
                        // GET_FEATURES; vhost-user.rst makes the protocol features depend on the
                        // bit being offered, not on the question being asked. Without its acks
                        // the frontend would wait forever for the first NEED_REPLY answer: ask
                        // the crate ourselves, and drop its answer.
                        get_features_seen = true;
                        lock(&features_replies).push_back(FeaturesReply::Drop);
                        return Verdict {
                            prepend: Some(get_features_request()),
                            ..Verdict::default()
                        };
                    }
                    Verdict::default()
                },
            );
            match ended {
                Ended::Source => frontend_left(&*in_hooks, &to_backend.0, &to_backend.1),
                Ended::Destination => {
                    // The crate ended its side (it refused a message) while the frontend may
                    // still be connected: the daemon now lets the requests in progress
                    // complete. Whatever the frontend sends has nowhere to go, but its hang-up
                    // must still be seen, or one of those requests could reach the used ring
                    // of a frontend that has left (and restarts the ring without it).
                    read_until_end(&to_backend.0);
                    in_hooks.frontend_gone();
                }
            }
            result
        })?);
        connection.threads.push(spawn("vhost-filter-out", move || {
            let (ended, result) = forward(&to_frontend.0, &to_frontend.1, |code, _, _, _| {
                if code != FrontendReq::GET_FEATURES as u32 {
                    return Verdict::default();
                }
                match lock(&features_replies_out).pop_front() {
                    None | Some(FeaturesReply::Forward) => Verdict::default(),
                    Some(FeaturesReply::Drop) => Verdict {
                        drop: true,
                        ..Verdict::default()
                    },
                    Some(FeaturesReply::Instead(message, files)) => Verdict {
                        instead: Some((message, files)),
                        ..Verdict::default()
                    },
                }
            });
            if ended == Ended::Destination {
                frontend_left(&*hooks, &to_frontend.1, &to_frontend.0);
            }
            result
        })?);
        Ok(connection)
    }

    /// Ends both directions and waits for the filter's threads. Call it once the crate's end of
    /// the connection is shut down: everything the crate wrote last (the error reply of a
    /// message it refused) is forwarded to the frontend first, then the frontend's connection
    /// is closed. When the crate ended the connection (a stop, a refused message) the frontend
    /// is still connected until this call, so the daemon can first let the requests in
    /// progress complete: nothing reaches a used ring after the frontend saw the end.
    pub(crate) fn close(mut self) {
        // The outbound thread (pushed second) ends at the end of the crate's stream, unless it
        // is stuck writing to a frontend that reads no reply (hung or hostile): after a bounded
        // wait its connection is shut down, which ends that write, so a stop never hangs on it.
        if self.threads.len() == 2 {
            if let Some(outbound) = self.threads.pop() {
                let deadline = std::time::Instant::now() + LAST_REPLIES_LIMIT;
                while !outbound.is_finished() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                if !outbound.is_finished() {
                    tracing::warn!(
                        "the frontend reads no reply: closing its connection without the \
                         replies still queued for it"
                    );
                    let _ = self.frontend.shutdown(std::net::Shutdown::Both);
                }
                let _ = outbound.join();
            }
        }
        let _ = self.frontend.shutdown(std::net::Shutdown::Both);
        let _ = self.backend.shutdown(std::net::Shutdown::Both);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// True if the private listener accepted `stream` (it is connected, no reset or end pending).
fn accepted(stream: &UnixStream) -> io::Result<bool> {
    let mut byte = 0u8;
    // SAFETY: `byte` is valid for a write of 1 byte; MSG_PEEK leaves the data in the socket and
    // MSG_DONTWAIT makes the call return at once.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n >= 1 {
        // The crate never writes before it got a request.
        return Ok(false);
    }
    if n == 0 {
        return Ok(false);
    }
    let error = io::Error::last_os_error();
    match error.kind() {
        io::ErrorKind::WouldBlock => Ok(true),
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => Ok(false),
        _ => Err(error),
    }
}

fn spawn(
    name: &str,
    body: impl FnOnce() -> io::Result<()> + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let name_owned = name.to_owned();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            if let Err(e) = body() {
                tracing::debug!("{name_owned}: {e}");
            }
        })
}

/// The frontend's end of the connection is gone: the backend is told (before the crate sees the
/// end), and the crate's end is shut down so the crate ends the connection.
fn frontend_left(hooks: &dyn ControlHooks, frontend: &UnixStream, backend: &UnixStream) {
    hooks.frontend_gone();
    let _ = frontend.shutdown(std::net::Shutdown::Both);
    let _ = backend.shutdown(std::net::Shutdown::Both);
}

/// Reads `from` to its end and drops what it reads: plain reads, so the kernel closes any file
/// descriptors sent along. Returns at the end of the stream, or when the connection is shut down
/// ([`FilteredConnection::close`]) or breaks.
fn read_until_end(from: &UnixStream) {
    let mut sink = [0u8; 4096];
    loop {
        match (&*from).read(&mut sink) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// What [`forward`] does with a message besides forwarding it.
#[derive(Debug, Default)]
struct Verdict {
    /// A message of the filter's own (a header without payload) to send before this one.
    prepend: Option<[u8; HEADER_SIZE]>,
    /// Drop the message instead of forwarding it (a reply to the filter's own message).
    drop: bool,
    /// Send this whole message (header and payload) with these files instead of the one
    /// received (whose files are closed).
    instead: Option<(Vec<u8>, Vec<File>)>,
}

/// What the outbound direction does with a GET_FEATURES reply of the crate's.
#[derive(Debug)]
enum FeaturesReply {
    /// The frontend asked: forward it.
    Forward,
    /// The filter asked for its own purposes: drop it.
    Drop,
    /// It stands in for a message the filter answered itself: send this reply instead.
    Instead(Vec<u8>, Vec<File>),
}

/// The NEED_REPLY flag of a request header.
const NEED_REPLY_FLAG: u32 = 0x8;
/// Flags of a reply header: protocol version 1, REPLY.
const REPLY_FLAGS: u32 = 0x1 | 0x4;

/// A reply message to request `code` with `payload`.
fn reply(code: FrontendReq, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER_SIZE + payload.len());
    message.extend_from_slice(&(code as u32).to_le_bytes());
    message.extend_from_slice(&REPLY_FLAGS.to_le_bytes());
    // Payloads built here are a few bytes long.
    message.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    message.extend_from_slice(payload);
    message
}

/// GET_INFLIGHT_FD and SET_INFLIGHT_FD, which vhost-user-backend 0.24 refuses (it has no
/// inflight tracking), are answered by the backend through `hooks` here. Returns what the
/// frontend gets in reply, or None for another message or one the backend refuses (forwarded
/// unchanged: the crate refuses it in turn, with an error ack when asked for, and ends the
/// connection, as for every message refused). `reply_ack`: the frontend asked for an ack and
/// negotiated REPLY_ACK.
fn answer_inflight(
    hooks: &dyn ControlHooks,
    code: u32,
    payload: &[u8],
    files: &[File],
    reply_ack: bool,
) -> Option<FeaturesReply> {
    if code == FrontendReq::GET_INFLIGHT_FD as u32 {
        let Some(request) = InflightDescription::parse(payload) else {
            tracing::warn!(
                "frontend sent GET_INFLIGHT_FD with {} bytes of payload ({DESCRIPTION_SIZE} \
                 expected): refused",
                payload.len()
            );
            return None;
        };
        return match hooks.get_inflight_fd(&request) {
            Ok((answer, file)) => Some(FeaturesReply::Instead(
                reply(FrontendReq::GET_INFLIGHT_FD, &answer.encode()),
                vec![file],
            )),
            Err(e) => {
                tracing::warn!("frontend sent GET_INFLIGHT_FD: refused: {e}");
                None
            }
        };
    }
    if code != FrontendReq::SET_INFLIGHT_FD as u32 {
        return None;
    }
    let (Some(description), [file]) = (InflightDescription::parse(payload), files) else {
        tracing::warn!(
            "frontend sent SET_INFLIGHT_FD with {} bytes of payload and {} fds \
             ({DESCRIPTION_SIZE} bytes and 1 fd expected): refused",
            payload.len(),
            files.len()
        );
        return None;
    };
    let file = match file.try_clone() {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!("SET_INFLIGHT_FD: cannot keep the buffer's fd: {e}: refused");
            return None;
        }
    };
    match hooks.set_inflight_fd(&description, file) {
        Ok(()) if reply_ack => Some(FeaturesReply::Instead(
            reply(FrontendReq::SET_INFLIGHT_FD, &0u64.to_le_bytes()),
            Vec::new(),
        )),
        Ok(()) => Some(FeaturesReply::Drop),
        Err(e) => {
            tracing::warn!("frontend sent SET_INFLIGHT_FD: refused: {e}");
            None
        }
    }
}

/// Flags of a request header: protocol version 1.
const VERSION_1_FLAGS: u32 = 0x1;

/// A GET_FEATURES request (no payload).
fn get_features_request() -> [u8; HEADER_SIZE] {
    let mut header = [0u8; HEADER_SIZE];
    header[0..4].copy_from_slice(&(FrontendReq::GET_FEATURES as u32).to_le_bytes());
    header[4..8].copy_from_slice(&VERSION_1_FLAGS.to_le_bytes());
    header
}

/// Which side ended a [`forward`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ended {
    /// The stream read from ended or failed.
    Source,
    /// Writing to the destination failed, or a message was forwarded that makes the destination
    /// end the connection (a header announcing an impossible size).
    Destination,
}

/// Forwards whole messages from `from` to `to`, each with the file descriptors that came with
/// it, letting `inspect` rewrite a message's payload first. Ends at the end of `from`'s stream,
/// on an error, or on a header whose size no vhost-user message may have (forwarded so the
/// receiver refuses it), and says which side ended it. Shuts no socket down: what to do depends
/// on the side (see [`FilteredConnection::establish`]).
fn forward(
    from: &UnixStream,
    to: &UnixStream,
    mut inspect: impl FnMut(u32, u32, &mut [u8], &[File]) -> Verdict,
) -> (Ended, io::Result<()>) {
    let mut payload = vec![0u8; MAX_MSG_SIZE];
    loop {
        let mut header = [0u8; HEADER_SIZE];
        let files = match receive_header(from, &mut header) {
            Ok(Some(files)) => files,
            Ok(None) => return (Ended::Source, Ok(())),
            Err(e) => return (Ended::Source, Err(e)),
        };
        let code = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let size = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
        if size > MAX_MSG_SIZE {
            return (Ended::Destination, send_all(to, &[&header], &files));
        }
        let body = &mut payload[..size];
        if let Err(e) = (&*from).read_exact(body) {
            return (Ended::Source, Err(e));
        }
        let flags = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        let verdict = inspect(code, flags, body, &files);
        if let Some(own) = verdict.prepend {
            if let Err(e) = send_all(to, &[&own], &[]) {
                return (Ended::Destination, Err(e));
            }
        }
        if verdict.drop {
            continue;
        }
        if let Some((message, files)) = verdict.instead {
            if let Err(e) = send_all(to, &[&message], &files) {
                return (Ended::Destination, Err(e));
            }
            continue;
        }
        if let Err(e) = send_all(to, &[&header, body], &files) {
            return (Ended::Destination, Err(e));
        }
    }
}

/// Reads a message header and the file descriptors sent with it. `None` at the end of the
/// stream before a new message.
fn receive_header(
    from: &UnixStream,
    header: &mut [u8; HEADER_SIZE],
) -> io::Result<Option<Vec<File>>> {
    let mut fds = [-1 as RawFd; MAX_ATTACHED_FD_ENTRIES];
    let mut iov = [iovec {
        iov_base: header.as_mut_ptr().cast::<c_void>(),
        iov_len: HEADER_SIZE,
    }];
    let (read, count) = loop {
        // SAFETY: the iovec points at `header`, valid for writes of HEADER_SIZE bytes for the
        // duration of the call.
        let received = unsafe { from.recv_with_fds(&mut iov, &mut fds) };
        match received {
            Ok(result) => break result,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    let files = fds[..count]
        .iter()
        // SAFETY: recvmsg installed these descriptors in this process for us; nothing else owns
        // them, and each is wrapped exactly once (closed when the message was forwarded).
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if read == 0 {
        return Ok(None);
    }
    (&*from).read_exact(&mut header[read..])?;
    Ok(Some(files))
}

/// Sends `parts` as one message with `files` attached to its first byte.
fn send_all(to: &UnixStream, parts: &[&[u8]], files: &[File]) -> io::Result<()> {
    let message: Vec<u8> = parts.concat();
    let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    let mut sent = loop {
        match to.send_with_fds(&[&message[..]], &fds) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    while sent < message.len() {
        match to.send_with_fds(&[&message[sent..]], &[]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vring_num(index: u32, num: u32) -> Vec<u8> {
        [index.to_le_bytes(), num.to_le_bytes()].concat()
    }

    /// The check that detects another process winning the race for the private listener: a
    /// connection the listener accepted is told apart from one still queued when it closed.
    #[test]
    fn accepted_tells_an_accepted_connection_from_a_reset_one() {
        let name = format!("insitu-blk-test/{}", uuid::Uuid::new_v4());
        let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixListener::bind_addr(&address).unwrap();
        let first = UnixStream::connect_addr(&address).unwrap();
        let second = UnixStream::connect_addr(&address).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        drop(listener);
        assert!(accepted(&first).unwrap(), "the accepted connection");
        assert!(!accepted(&second).unwrap(), "the one never accepted");
        drop(server_side);
        assert!(!accepted(&first).unwrap(), "after the peer closed");
    }

    #[test]
    fn set_vring_enable_payloads_are_recognised() {
        let code = FrontendReq::SET_VRING_ENABLE as u32;
        assert_eq!(vring_enable(code, &vring_num(2, 0)), Some((2, false)));
        assert_eq!(vring_enable(code, &vring_num(2, 1)), Some((2, true)));
        assert_eq!(vring_enable(code, &vring_num(2, 2)), None);
        assert_eq!(vring_enable(code, &[0; 4]), None);
        let other = FrontendReq::SET_VRING_NUM as u32;
        assert_eq!(vring_enable(other, &vring_num(2, 0)), None);
    }

    fn memfd(len: u64) -> File {
        // SAFETY: the name is a valid C string; the returned descriptor is checked and then
        // owned by exactly one File.
        let fd = unsafe { libc::memfd_create(c"filter-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        file
    }

    fn region(gpa: u64, size: u64, offset: u64) -> Vec<u8> {
        [gpa, size, 0x7000_0000 + gpa, offset]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect()
    }

    fn word(payload: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(payload[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn mappings_past_the_end_of_their_file_get_a_size_the_crate_refuses() {
        let rules = Rules {
            max_queue_size: 1024,
        };
        const MIB: u64 = 1 << 20;
        let files = [memfd(MIB), memfd(2 * MIB)];
        // SET_MEM_TABLE: region 0 fits its file exactly; region 1 runs one page past its file.
        let mut table = [2u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        table.extend(region(0, MIB, 0));
        table.extend(region(MIB, 2 * MIB, 4096));
        let code = FrontendReq::SET_MEM_TABLE as u32;
        let why = rules.apply(code, &mut table, &files).expect("refused");
        assert!(why.contains("region 1"), "{why}");
        assert_eq!(
            word(&table, 8 + 8),
            MIB,
            "the region that fits is untouched"
        );
        assert_eq!(word(&table, 8 + 32 + 8), 0, "the one past its file's end");
        // Every region fits: forwarded unchanged.
        let mut table = [2u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        table.extend(region(0, MIB, 0));
        table.extend(region(MIB, MIB, MIB));
        let before = table.clone();
        assert!(rules.apply(code, &mut table, &files).is_none());
        assert_eq!(table, before);
        // An offset + size that overflows is refused too.
        let mut table = [1u32.to_le_bytes(), 0u32.to_le_bytes()].concat();
        table.extend(region(0, MIB, u64::MAX - 10));
        assert!(rules.apply(code, &mut table, &files[..1]).is_some());

        // ADD_MEM_REG (8 bytes of padding, then the region).
        let code = FrontendReq::ADD_MEM_REG as u32;
        let mut single = [vec![0u8; 8], region(4 * MIB, MIB + 1, 0)].concat();
        assert!(rules.apply(code, &mut single, &files[..1]).is_some());
        assert_eq!(word(&single, 16), 0);
        let mut single = [vec![0u8; 8], region(4 * MIB, MIB, 0)].concat();
        assert!(rules.apply(code, &mut single, &files[..1]).is_none());
        assert_eq!(word(&single, 16), MIB);

        // SET_LOG_BASE (size, offset).
        let code = FrontendReq::SET_LOG_BASE as u32;
        let mut log = [(MIB / 2).to_le_bytes(), (MIB / 2 + 1).to_le_bytes()].concat();
        assert!(rules.apply(code, &mut log, &files[..1]).is_some());
        assert_eq!(word(&log, 0), 0);
        let mut log = [(MIB / 2).to_le_bytes(), (MIB / 2).to_le_bytes()].concat();
        assert!(rules.apply(code, &mut log, &files[..1]).is_none());

        // Not a regular file (here an eventfd): left to the crate.
        // SAFETY: eventfd(2) with valid flags; the result is checked and then owned once.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let eventfd = unsafe { File::from_raw_fd(fd) };
        let mut single = [vec![0u8; 8], region(4 * MIB, MIB, 0)].concat();
        assert!(rules
            .apply(FrontendReq::ADD_MEM_REG as u32, &mut single, &[eventfd])
            .is_none());
    }

    #[test]
    fn set_vring_kick_without_an_fd_is_aimed_at_a_ring_that_does_not_exist() {
        let rules = Rules {
            max_queue_size: 1024,
        };
        let code = FrontendReq::SET_VRING_KICK as u32;
        let mut payload = (0x100u64 | 3).to_le_bytes();
        assert!(rules.apply(code, &mut payload, &[]).is_some());
        assert_eq!(u64::from_le_bytes(payload), 0x1ff);
        // With an fd (flag clear): unchanged.
        let mut payload = 3u64.to_le_bytes();
        assert!(rules.apply(code, &mut payload, &[]).is_none());
        assert_eq!(u64::from_le_bytes(payload), 3);
        // SET_VRING_CALL without an fd is legitimate (the driver polls the used ring).
        let mut payload = (0x100u64 | 3).to_le_bytes();
        assert!(rules
            .apply(FrontendReq::SET_VRING_CALL as u32, &mut payload, &[])
            .is_none());
        assert_eq!(u64::from_le_bytes(payload), 0x103);
    }

    #[test]
    fn set_vring_num_sizes_that_are_not_powers_of_two_become_zero() {
        let rules = Rules {
            max_queue_size: 1024,
        };
        let code = FrontendReq::SET_VRING_NUM as u32;
        for num in [1u32, 2, 64, 1024] {
            let mut payload = vring_num(3, num);
            assert!(rules.apply(code, &mut payload, &[]).is_none(), "{num}");
            assert_eq!(payload, vring_num(3, num), "{num} forwarded unchanged");
        }
        for num in [0u32, 3, 100, 1023, 2048, u32::MAX] {
            let mut payload = vring_num(3, num);
            assert!(rules.apply(code, &mut payload, &[]).is_some(), "{num}");
            assert_eq!(payload, vring_num(3, 0), "{num} rewritten");
        }
        // Other messages with the same payload shape are untouched.
        let mut payload = vring_num(0, 3);
        assert!(rules
            .apply(FrontendReq::SET_VRING_BASE as u32, &mut payload, &[])
            .is_none());
        assert_eq!(payload, vring_num(0, 3));
    }
}
