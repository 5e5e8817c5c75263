//! The proxy leaves the last descriptors of the open-file limit to the rest of xlb: a frontend
//! that would need one is not listened on, is counted as short of descriptors, and listens
//! once descriptors are freed. The limit is per process, so the test runs itself again in a
//! child process (a fresh exec: no descriptor of the other tests is inherited) with a low one.

use std::net::Ipv4Addr;

use xlb::dataplane::Dataplane as _;
use xlb::dataplane::proxy::{ListenFailure, ProxyDataplane, RESERVED_DESCRIPTORS};
use xlb::model::{Backend, Frontend, Protocol, VirtualService};

/// Set in the child process.
const CHILD: &str = "XLB_TEST_DESCRIPTOR_RESERVE_CHILD";

/// The open-file limit of the child.
const LIMIT: u64 = 200;

#[test]
fn a_frontend_that_would_eat_the_descriptor_reserve_is_counted_and_retried() {
    const NAME: &str = "a_frontend_that_would_eat_the_descriptor_reserve_is_counted_and_retried";
    if std::env::var_os(CHILD).is_some() {
        std::process::exit(child());
    }
    let status = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", NAME, "--test-threads", "1"])
        .env(CHILD, "1")
        .status()
        .expect("run the child");
    let code = status
        .code()
        .unwrap_or_else(|| panic!("the child crashed: {status}"));
    assert!(
        code & 1 == 1,
        "out of descriptors: not reported and counted as such ({code})"
    );
    assert!(
        code & 2 == 2,
        "descriptors freed: the retry did not listen ({code})"
    );
}

/// The child's part: with every descriptor but the reserve taken, a frontend is refused as
/// short of descriptors (bit 1 of the result); once they are freed it listens (bit 2).
fn child() -> i32 {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let vip = Ipv4Addr::LOCALHOST;
    let port = std::net::TcpListener::bind((vip, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let service = VirtualService {
        frontend: Frontend {
            vip,
            port,
            protocol: Protocol::Tcp,
        },
        backends: vec![Backend { ip: vip, port: 9 }],
        owner: "default/web".to_owned(),
    };
    let mut proxy = ProxyDataplane::with_handle(runtime.handle().clone());
    let limit = libc::rlimit {
        rlim_cur: LIMIT,
        rlim_max: LIMIT,
    };
    // SAFETY: setrlimit(2) reads the struct we own.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    let mut filler = Vec::new();
    loop {
        // SAFETY: dup(2) of stdin; the descriptor is closed below.
        let fd = unsafe { libc::dup(0) };
        if fd < 0 {
            break;
        }
        filler.push(fd);
        if u64::try_from(fd).unwrap_or(0) + 1 >= LIMIT - RESERVED_DESCRIPTORS {
            break;
        }
    }
    let first = proxy.apply(std::slice::from_ref(&service));
    let short = proxy.failing().values().next() == Some(&ListenFailure::Descriptors)
        && proxy.listen_failures().get(&ListenFailure::Descriptors) == Some(&1)
        && first
            .as_ref()
            .is_err_and(|error| error.to_string().contains("out of file descriptors"));
    for fd in filler {
        // SAFETY: close(2) of a descriptor opened above.
        unsafe { libc::close(fd) };
    }
    let retried = proxy.apply(std::slice::from_ref(&service)).is_ok()
        && proxy.failing().is_empty()
        && proxy.frontends().count() == 1;
    i32::from(short) + 2 * i32::from(retried)
}
