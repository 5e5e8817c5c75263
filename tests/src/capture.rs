//! Watching TCP handshakes and resets at a client with a raw `AF_PACKET` socket (issue 14,
//! item 5): every reset the client receives, and every SYN-ACK that reaches a client port
//! with no SYN outstanding (a reply translated to the wrong client).
//!
//! A reset that arrives after both FINs (the client closed, and acknowledged the server's
//! FIN, so its socket is in TIME_WAIT) and carries the sequence number right after the
//! server's FIN is counted apart: it reaches no application. It is what a server sends when
//! a segment arrives after its socket closed, e.g. the client's TIME_WAIT answering a
//! duplicate ACK (veths deliver packets sent from two CPUs in either order, so the server's
//! ACK of the client's FIN can overtake its FIN).
//!
//! The socket carries a classic BPF filter that keeps only IPv4 TCP segments with SYN, FIN
//! or RST set, so a busy test's capture stays small; the kernel's drop count is read at the
//! end, so a test can tell an incomplete capture from a clean one.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::channel;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::Netns;

const ETH_P_IP: u16 = 0x0800;
/// Every protocol: only such sockets also see the packets the host sends.
const ETH_P_ALL: u16 = 0x0003;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// What the watch saw.
#[derive(Debug, Default, Clone)]
pub struct Handshakes {
    /// SYNs the client sent (retransmissions included).
    pub syns_sent: u64,
    /// SYN-ACKs the client received.
    pub syn_acks: u64,
    /// SYN-ACKs to a client port that had no SYN outstanding.
    pub unexpected_syn_acks: u64,
    /// Resets the client received on a connection not closed both ways.
    pub resets_received: u64,
    /// Resets the client received after both FINs, in sequence right after the server's FIN
    /// (its TIME_WAIT; no application sees them).
    pub resets_after_close: u64,
    /// Resets the client sent (its answer to a segment it did not expect).
    pub resets_sent: u64,
    /// Packets the kernel dropped because the watch was too slow (the counts are then
    /// incomplete).
    pub dropped: u32,
    /// The first few unexpected segments, described.
    pub examples: Vec<String>,
}

/// A running watch; [`Watch::finish`] stops it.
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Handshakes>,
}

impl Watch {
    /// Starts watching `device` in `ns`, where the client has the address `client`; returns
    /// once the socket is capturing.
    pub fn start(ns: &Netns, device: &str, client: Ipv4Addr) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = channel();
        let device = device.to_owned();
        let flag = stop.clone();
        let thread = crate::servers::spawn_in(ns, move || {
            let fd = open(&device).unwrap_or_else(|e| panic!("capture socket on {device}: {e}"));
            ready_tx.send(()).expect("ready");
            watch(&fd, client, &flag)
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the capture did not start");
        Watch { stop, thread }
    }

    /// Stops the watch (after reading what is queued) and returns what it saw.
    pub fn finish(self) -> Handshakes {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("capture thread")
    }
}

/// The classic BPF filter: IPv4, TCP, SYN, FIN or RST set.
fn filter() -> [libc::sock_filter; 10] {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    [
        op(0x28, 0, 0, 12),                                   // ldh [12]: EtherType
        op(0x15, 0, 7, ETH_P_IP as u32),                      // jeq IPv4, else drop
        op(0x30, 0, 0, 23),                                   // ldb [23]: IP protocol
        op(0x15, 0, 5, 6),                                    // jeq TCP, else drop
        op(0xb1, 0, 0, 14),                                   // ldx 4 * (IHL)
        op(0x50, 0, 0, 27),                                   // ldb [x + 14 + 13]: TCP flags
        op(0x54, 0, 0, (TCP_SYN | TCP_RST | TCP_FIN) as u32), // and SYN|RST|FIN
        op(0x15, 1, 0, 0),                                    // jeq 0: drop
        op(0x06, 0, 0, 0x4_0000),                             // accept
        op(0x06, 0, 0, 0),                                    // drop
    ]
}

fn open(device: &str) -> std::io::Result<OwnedFd> {
    let check = |rc: libc::c_int| match rc < 0 {
        true => Err(std::io::Error::last_os_error()),
        false => Ok(rc),
    };
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = check(unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ALL.to_be()),
        )
    })?;
    // SAFETY: fd was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let program = filter();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr().cast_mut(),
    };
    let set = |level, name, value: *const libc::c_void, len: usize| {
        // SAFETY: value points to `len` valid bytes for the duration of the call.
        check(unsafe {
            libc::setsockopt(fd.as_raw_fd(), level, name, value, len as libc::socklen_t)
        })
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        (&raw const fprog).cast(),
        std::mem::size_of::<libc::sock_fprog>(),
    )?;
    let buffer: libc::c_int = 64 << 20;
    set(
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        (&raw const buffer).cast(),
        std::mem::size_of::<libc::c_int>(),
    )?;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    set(
        libc::SOL_SOCKET,
        libc::SO_RCVTIMEO,
        (&raw const timeout).cast(),
        std::mem::size_of::<libc::timeval>(),
    )?;
    let name = std::ffi::CString::new(device).map_err(std::io::Error::other)?;
    // SAFETY: name is a valid C string.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = ETH_P_ALL.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: addr is valid for the length passed.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(fd)
}

/// Reads segments until `stop` is set and the queue is empty.
fn watch(fd: &OwnedFd, client: Ipv4Addr, stop: &AtomicBool) -> Handshakes {
    let mut seen = Handshakes::default();
    // Client port → its connection's state.
    let mut ports: HashMap<u16, Connection> = HashMap::new();
    // Client port → its last few segments seen, to describe an unexpected one.
    let mut history: HashMap<u16, Vec<String>> = HashMap::new();
    let started = std::time::Instant::now();
    let mut frame = [0u8; 128];
    loop {
        // SAFETY: frame is valid for writes of its length.
        let read = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                if stop.load(Ordering::Relaxed) {
                    libc::MSG_DONTWAIT
                } else {
                    0
                },
            )
        };
        if read < 0 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            continue;
        }
        let frame = &frame[..read as usize];
        let ihl = usize::from(frame.get(14).copied().unwrap_or(0) & 0x0f) * 4;
        let tcp = 14 + ihl;
        if frame.len() < tcp + 14 {
            continue;
        }
        let src = Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]);
        let sport = u16::from_be_bytes([frame[tcp], frame[tcp + 1]]);
        let dport = u16::from_be_bytes([frame[tcp + 2], frame[tcp + 3]]);
        let flags = frame[tcp + 13];
        let outgoing = src == client;
        let word = |at: usize| {
            u32::from_be_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]])
        };
        let (seq, ack) = (word(tcp + 4), word(tcp + 8));
        let port = if outgoing { sport } else { dport };
        let event = format!(
            "{:.6} {} flags {flags:#04x} seq {seq} ack {ack}",
            started.elapsed().as_secs_f64(),
            if outgoing { "out" } else { "in " }
        );
        let events = history.entry(port).or_default();
        let conn = ports.entry(port).or_default();
        if events.len() == 6 {
            events.remove(0);
        }
        events.push(event);
        let example = |what: &str, seen: &mut Handshakes, events: &Vec<String>| {
            if seen.examples.len() < 20 {
                seen.examples.push(format!(
                    "{what} at client port {port}: {}",
                    events.join("; ")
                ));
            }
        };
        match (outgoing, flags & (TCP_SYN | TCP_ACK | TCP_RST)) {
            (true, TCP_SYN) => {
                seen.syns_sent += 1;
                *conn = Connection {
                    syn_outstanding: true,
                    ..Connection::default()
                };
            }
            (true, f) if f & TCP_RST != 0 => seen.resets_sent += 1,
            (false, f) if f & TCP_RST != 0 => {
                if conn.client_fin && conn.server_fin.map(|fin| fin.wrapping_add(1)) == Some(seq) {
                    seen.resets_after_close += 1;
                } else {
                    seen.resets_received += 1;
                    example("reset received", &mut seen, events);
                }
            }
            (false, f) if f == TCP_SYN | TCP_ACK => {
                seen.syn_acks += 1;
                if conn.syn_outstanding {
                    conn.syn_outstanding = false;
                } else {
                    seen.unexpected_syn_acks += 1;
                    example("SYN-ACK without a SYN outstanding", &mut seen, events);
                }
            }
            _ if flags & TCP_FIN != 0 => match outgoing {
                true => conn.client_fin = true,
                false => conn.server_fin = Some(seq),
            },
            _ => {}
        }
    }
    seen.dropped = drops(fd);
    seen
}

/// What the watch knows of the connection on a client port.
#[derive(Debug, Default)]
struct Connection {
    /// SYN sent, no SYN-ACK yet.
    syn_outstanding: bool,
    /// The client sent its FIN.
    client_fin: bool,
    /// The sequence number of the server's FIN.
    server_fin: Option<u32>,
}

/// Packets the kernel dropped for this socket (`PACKET_STATISTICS`).
fn drops(fd: &OwnedFd) -> u32 {
    // SAFETY: tpacket_stats is plain old data; all-zero is a valid value.
    let mut stats: libc::tpacket_stats = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tpacket_stats>() as libc::socklen_t;
    // SAFETY: stats is valid for writes of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_STATISTICS,
            (&raw mut stats).cast(),
            &mut len,
        )
    };
    assert!(
        rc == 0,
        "PACKET_STATISTICS: {}",
        std::io::Error::last_os_error()
    );
    stats.tp_drops
}
