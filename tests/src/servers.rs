//! Backends and clients on real sockets, on threads inside namespaces.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::netns::Netns;

/// Spawns a detached thread that enters `ns` and runs `f`.
pub fn spawn_in<R: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> R + Send + 'static,
) -> JoinHandle<R> {
    let join = ns.joiner();
    std::thread::spawn(move || {
        join();
        f()
    })
}

/// A TCP and UDP backend named `name`: each TCP connection gets `name\n` and then an echo of
/// every line; each UDP datagram is answered with `name`. Stops when dropped.
pub struct Backend {
    stop: Arc<AtomicBool>,
}

impl Backend {
    /// Listens on `addr` (TCP and UDP) inside `ns`.
    pub fn start(ns: &Netns, addr: SocketAddr, name: &str) -> Backend {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        for udp in [false, true] {
            let (stop, name, ready) = (stop.clone(), name.to_owned(), ready_tx.clone());
            spawn_in(ns, move || {
                if udp {
                    let socket = UdpSocket::bind(addr).expect("bind udp");
                    socket
                        .set_read_timeout(Some(Duration::from_millis(100)))
                        .expect("timeout");
                    ready.send(()).expect("ready");
                    let mut buf = [0u8; 1500];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                            let _ = socket.send_to(name.as_bytes(), peer);
                        }
                    }
                } else {
                    let listener = TcpListener::bind(addr).expect("bind tcp");
                    listener.set_nonblocking(true).expect("nonblocking");
                    ready.send(()).expect("ready");
                    while !stop.load(Ordering::Relaxed) {
                        match listener.accept() {
                            Ok((conn, _)) => {
                                let name = name.clone();
                                std::thread::spawn(move || serve(conn, &name));
                            }
                            Err(_) => wait_readable(&listener, 50),
                        }
                    }
                }
            });
        }
        for _ in 0..2 {
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("backend did not start");
        }
        Backend { stop }
    }
}

/// Waits until `listener` has a connection to accept, at most `ms` milliseconds (so the accept
/// loop notices `stop` while staying prompt: no fixed sleep between connections).
fn wait_readable(listener: &TcpListener, ms: i32) {
    let mut fd = libc::pollfd {
        fd: listener.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for a socket this thread owns.
    unsafe { libc::poll(&mut fd, 1, ms) };
}

fn serve(conn: TcpStream, name: &str) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let mut writer = conn.try_clone().expect("clone");
    if writer.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if writer.write_all(format!("{line}\n").as_bytes()).is_err() {
            return;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Connects to `addr` and returns the backend's name line, or the error.
pub fn tcp_name(addr: SocketAddr) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    read_name(stream)
}

/// [`tcp_name`] from source port `port`.
pub fn tcp_name_from(port: u16, addr: SocketAddr) -> Result<String, String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .map_err(|e| e.to_string())?;
    socket
        .bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())
        .map_err(|e| format!("bind to port {port}: {e}"))?;
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    read_name(socket.into())
}

/// Reads the backend's greeting line (its name) from `stream`.
fn read_name(stream: TcpStream) -> Result<String, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("read: {e}"))?;
    Ok(line.trim().to_owned())
}

/// Sends one UDP datagram to `addr` from each of `count` sockets, one after the other, and
/// returns the answers. Every socket stays open until the last answer: a closed socket's port
/// could be handed to the next one, whose datagram would then continue the earlier flow
/// instead of starting a new one.
pub fn udp_names(addr: SocketAddr, count: usize) -> Vec<Result<String, String>> {
    let mut sockets = Vec::with_capacity(count);
    let mut answers = Vec::with_capacity(count);
    for _ in 0..count {
        let socket = match UdpSocket::bind("0.0.0.0:0") {
            Ok(socket) => socket,
            Err(e) => {
                answers.push(Err(e.to_string()));
                continue;
            }
        };
        answers.push(udp_ask(&socket, addr));
        sockets.push(socket);
    }
    answers
}

/// Sends one UDP datagram to `addr` from `socket` and returns the answer.
fn udp_ask(socket: &UdpSocket, addr: SocketAddr) -> Result<String, String> {
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    socket
        .send_to(b"who", addr)
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = [0u8; 256];
    let (n, from) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("recv: {e}"))?;
    if from != addr {
        return Err(format!("answer came from {from}, not {addr}"));
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A long-lived TCP connection: `ping` sends a line and expects it echoed.
pub struct LongLived {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The backend that answered the connection.
    pub backend: String,
}

impl LongLived {
    /// Connects (call inside the client namespace).
    pub fn connect(addr: SocketAddr) -> Result<LongLived, String> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut backend = String::new();
        reader
            .read_line(&mut backend)
            .map_err(|e| format!("read: {e}"))?;
        Ok(LongLived {
            stream,
            reader,
            backend: backend.trim().to_owned(),
        })
    }

    /// Sends `n` and expects it back.
    pub fn ping(&mut self, n: u32) -> Result<(), String> {
        self.stream
            .write_all(format!("ping {n}\n").as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .map_err(|e| format!("read: {e}"))?;
        if line.trim() != format!("ping {n}") {
            return Err(format!("unexpected echo {line:?}"));
        }
        Ok(())
    }

    /// Sends 1 MiB and reads it back, to move full-size segments through the LB.
    pub fn bulk(&mut self) -> Result<(), String> {
        let line = "x".repeat(1023) + "\n";
        let mut sent = 0;
        let mut buf = String::new();
        for _ in 0..1024 {
            self.stream
                .write_all(line.as_bytes())
                .map_err(|e| format!("write: {e}"))?;
            sent += line.len();
            buf.clear();
            self.reader
                .read_line(&mut buf)
                .map_err(|e| format!("read after {sent} bytes: {e}"))?;
        }
        let _ = self.reader.get_mut().read(&mut []);
        Ok(())
    }
}
