//! A compact text form of a virtual service, for the command line and test loaders:
//! `VIP:PORT/PROTO=BACKEND:PORT[,BACKEND:PORT…]`, e.g.
//! `198.51.100.10:80/tcp=203.0.113.2:30080,203.0.113.3:30080`. No backends (`…/tcp=`) is allowed.

use std::net::SocketAddrV4;

use xlb::model::{Backend, Frontend, Protocol, VirtualService};

/// A service spec that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "bad service spec {spec:?}: {why}; expected VIP:PORT/tcp|udp=BACKEND:PORT[,BACKEND:PORT...]"
)]
pub struct SpecError {
    spec: String,
    why: &'static str,
}

/// Parses one service spec.
pub fn parse_service(spec: &str) -> Result<VirtualService, SpecError> {
    let err = |why| SpecError {
        spec: spec.to_owned(),
        why,
    };
    let (front, backends) = spec.split_once('=').ok_or(err("missing '='"))?;
    let (addr, proto) = front.split_once('/').ok_or(err("missing /tcp or /udp"))?;
    let protocol = match proto.to_ascii_lowercase().as_str() {
        "tcp" => Protocol::Tcp,
        "udp" => Protocol::Udp,
        _ => return Err(err("protocol must be tcp or udp")),
    };
    let addr: SocketAddrV4 = addr.parse().map_err(|_| err("bad VIP:PORT"))?;
    let backends = backends
        .split(',')
        .filter(|b| !b.trim().is_empty())
        .map(|b| {
            b.trim().parse::<SocketAddrV4>().map(|a| Backend {
                ip: *a.ip(),
                port: a.port(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| err("bad BACKEND:PORT"))?;
    Ok(VirtualService {
        frontend: Frontend {
            vip: *addr.ip(),
            port: addr.port(),
            protocol,
        },
        backends,
        owner: format!("cli/{front}"),
    })
}

/// Parses a services file: one spec per line, `#` comments and blank lines ignored.
pub fn parse_services(text: &str) -> Result<Vec<VirtualService>, SpecError> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(parse_service)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        let s = parse_service("198.51.100.10:80/tcp=203.0.113.2:30080, 203.0.113.3:30080").unwrap();
        assert_eq!(s.frontend.port, 80);
        assert_eq!(s.backends.len(), 2);
        assert!(
            parse_service("198.51.100.10:53/udp=")
                .unwrap()
                .backends
                .is_empty()
        );
        assert!(parse_service("198.51.100.10:80/sctp=1.2.3.4:5").is_err());
        assert_eq!(
            parse_services("# c\n\n198.51.100.10:80/tcp=203.0.113.2:80\n")
                .unwrap()
                .len(),
            1
        );
    }
}
