//! Network-namespace fixtures: namespaces and veth pairs that remove themselves on drop, even
//! when the test fails, and commands run inside them.

use std::os::fd::AsRawFd as _;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// Fails the test with a clear message unless it runs as root: namespaces, veth and XDP need
/// CAP_SYS_ADMIN, CAP_NET_ADMIN and CAP_BPF. CI runs as root, so every test runs there.
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "{what} needs root (network namespaces, veth and BPF need CAP_SYS_ADMIN/CAP_NET_ADMIN/CAP_BPF); \
         run `sudo -E cargo xtask test` (CI runs as root)"
    );
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A network namespace named `<prefix>-<tag>-<pid>-<n>`, deleted on drop. The prefix is
/// `xlbt`, or `XLB_TEST_NETNS_PREFIX` when set (so people sharing a machine can tell, and
/// clean up, their own namespaces).
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with loopback up. `tag` names the test, so parallel tests never clash.
    pub fn new(tag: &str) -> Netns {
        require_root("creating a network namespace");
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = std::env::var("XLB_TEST_NETNS_PREFIX")
            .ok()
            .filter(|prefix| !prefix.is_empty())
            .unwrap_or_else(|| "xlbt".to_owned());
        let name = format!("{prefix}-{tag}-{}-{n}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A `Command` that runs `argv` inside this namespace.
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(argv);
        cmd
    }

    /// Runs `argv` inside the namespace and returns its output, whatever the exit status.
    pub fn output(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .output()
            .unwrap_or_else(|err| panic!("running {argv:?} in {}: {err}", self.name))
    }

    /// Runs `argv` inside the namespace; panics with its stderr when it fails. Returns stdout.
    pub fn run(&self, argv: &[&str]) -> String {
        run(&mut self.command(argv))
    }

    /// Starts `argv` inside the namespace; the process is killed when the guard drops.
    pub fn spawn(&self, argv: &[&str]) -> ChildGuard {
        let child = self
            .command(argv)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("starting {argv:?} in {}: {err}", self.name));
        ChildGuard(child)
    }

    /// Opens the namespace now; the returned closure, called on another thread, moves that
    /// thread into it (sockets and netlink calls made afterwards act inside it).
    pub fn joiner(&self) -> impl FnOnce() + Send + 'static {
        let path = format!("/var/run/netns/{}", self.name);
        let file = std::fs::File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"));
        move || {
            // SAFETY: setns on a valid namespace fd affects only the calling thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "setns into {path}: {}",
                std::io::Error::last_os_error()
            );
        }
    }

    /// Runs `f` on a thread that has entered this namespace, so sockets and netlink calls made
    /// by `f` act inside it.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let join = self.joiner();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    join();
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its veth ends too.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Joins `a` and `b` with a veth pair: `a_if` inside `a`, `b_if` inside `b`, both up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    run(Command::new("ip").args([
        "link",
        "add",
        a_if,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]));
    a.run(&["ip", "link", "set", a_if, "up"]);
    b.run(&["ip", "link", "set", b_if, "up"]);
}

/// A child process killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a command; panics with its stderr when it fails. Returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let output = cmd
        .output()
        .unwrap_or_else(|err| panic!("running {cmd:?}: {err}"));
    assert!(
        output.status.success(),
        "{cmd:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
