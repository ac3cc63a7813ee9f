//! `turnserver probe`: a TURN client that checks a server from outside, step by step.
//!
//! Steps, each timed and reported on its own line (or in one JSON object with `--json`):
//!
//! 1. `resolve` (host names only) and `connect` (TCP only).
//! 2. `binding`: a Binding request without credentials; the mapped address.
//! 3. `allocate`: a UDP relay, with the long-term credentials the server asks for (401, then
//!    signed requests; 438 retried once with the new nonce).
//! 4. `peer`: a UDP socket of the probe's own as the peer, at the address the server sees for
//!    it (a Binding from it to the server's UDP port), or an external echo peer (`--peer`).
//! 5. `create_permission` and 6. `channel_bind` (channel 0x4000) for the peer.
//! 7. `round_trip`: `--count` datagrams through the relay and back as ChannelData, checked
//!    byte for byte, with their round-trip times.
//! 8. `refresh`: LIFETIME 0 releases the allocation (a failure here is only a warning).
//!
//! The last line is `OK` or `FAIL: reason`; the exit code is 0 when every step passed, 1 when
//! one failed, 2 for a usage error.

mod conn;
mod relay;
pub(crate) mod report;
mod session;
mod url;

use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::wire::{AttrType, Method};

use conn::Control;
use relay::{CHANNEL, LocalPeer};
use report::{Report, Status, Step};
use session::{Allocation, Answer, Fail, Session, refused};
use url::{Host, Target, Transport};

/// Arguments of `turnserver probe`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server, as an ICE URL: `turn:HOST[:PORT][?transport=udp|tcp]` (port 3478 and UDP
    /// by default; an IPv6 address in brackets).
    pub url: String,
    /// Username for the long-term credentials.
    #[arg(long, requires = "password")]
    pub user: Option<String>,
    /// Password for the long-term credentials.
    #[arg(long, requires = "user")]
    pub password: Option<String>,
    /// Fail unless the server's realm is this one.
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,
    /// Seconds each step, and each relayed round trip, may take at most (decimals allowed).
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_timeout)]
    pub timeout: f64,
    /// Relayed round trips to make.
    #[arg(long, value_name = "N", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub count: u32,
    /// An external UDP echo peer (IP:PORT or HOST:PORT) instead of the probe's own peer socket.
    #[arg(long, value_name = "ADDR")]
    pub peer: Option<String>,
    /// Print the result as one JSON object instead of lines of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 600.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 and at most 600"
        )),
    }
}

/// Runs the probe and prints the report; success when every step passed.
pub fn run(args: &Args) -> ExitCode {
    let target = match url::parse(&args.url) {
        Ok(t) => t,
        Err(e) => return usage(args.json, &e),
    };
    if let Some(p) = &args.peer
        && let Err(e) = check_peer_syntax(p)
    {
        return usage(args.json, &e);
    }
    let mut report = Report::new(
        args.json,
        target.label(),
        target.transport.name(),
        args.url.trim(),
    );
    let result = probe(args, &target, &mut report);
    report.finish(result.as_ref().err().map(|f| f.reason.as_str()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}

/// A usage error: a sentence on stderr (and a JSON object on stdout with `--json`), exit 2.
fn usage(json: bool, e: &str) -> ExitCode {
    if json {
        let mut s = String::from(
            "{\"ok\":false,\"server\":null,\"transport\":null,\"steps\":[],\"error\":",
        );
        report::push_json_str(&mut s, e);
        s.push('}');
        println!("{s}");
    }
    eprintln!("turnserver probe: {e}");
    ExitCode::from(2)
}

/// `--peer` must be IP:PORT, [IPv6]:PORT or HOST:PORT.
fn check_peer_syntax(p: &str) -> Result<(), String> {
    if p.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let bad = || format!("--peer {p:?}: expected IP:PORT, [IPv6]:PORT or HOST:PORT");
    let (host, port) = p.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(n) if n != 0 && !host.is_empty() && !host.contains([':', '/', ' ']) => Ok(()),
        _ => Err(bad()),
    }
}

/// Times `f` and reports it as step `name`.
fn step<T>(
    rep: &mut Report,
    name: &'static str,
    f: impl FnOnce() -> Result<(T, String), Fail>,
) -> Result<T, Fail> {
    let t0 = Instant::now();
    let r = f();
    let elapsed = t0.elapsed();
    let (status, detail) = match &r {
        Ok((_, d)) => (Status::Ok, d.clone()),
        Err(f) => (Status::Fail, f.reason.clone()),
    };
    rep.add(Step {
        name,
        status,
        elapsed,
        detail,
        rtt: None,
    });
    r.map(|(v, _)| v)
}

/// Resolves a host name, preferring an address of `family_of` when given.
fn resolve(host: &str, port: u16, family_of: Option<SocketAddr>) -> Result<SocketAddr, Fail> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Fail::new(format!("cannot resolve {host}: {e}")))?
        .collect();
    let preferred = family_of.and_then(|f| addrs.iter().find(|a| a.is_ipv4() == f.is_ipv4()));
    preferred
        .or(addrs.first())
        .copied()
        .ok_or_else(|| Fail::new(format!("{host} has no address")))
}

fn probe(args: &Args, target: &Target, rep: &mut Report) -> Result<(), Fail> {
    let timeout = Duration::from_secs_f64(args.timeout);
    let timeout_text = format!("{}", args.timeout);
    let label = target.label();

    // Names to resolve: the server's, and the external peer's.
    let peer_literal = args.peer.as_deref().map(|p| p.parse::<SocketAddr>().ok());
    let (server, peer) =
        if matches!(target.host, Host::Name(_)) || matches!(peer_literal, Some(None)) {
            step(rep, "resolve", || {
                let mut detail = Vec::new();
                let server = match &target.host {
                    Host::Ip(ip) => SocketAddr::new(*ip, target.port),
                    Host::Name(n) => {
                        let a = resolve(n, target.port, None)?;
                        detail.push(format!("{n} is {}", a.ip()));
                        a
                    }
                };
                let peer = match (&args.peer, peer_literal) {
                    (Some(_), Some(Some(a))) => Some(a),
                    (Some(p), _) => {
                        let (h, port) = p.rsplit_once(':').unwrap_or((p, "0"));
                        let port = port.parse().unwrap_or(0);
                        let a = resolve(h, port, Some(server))?;
                        detail.push(format!("peer {h} is {}", a.ip()));
                        Some(a)
                    }
                    (None, _) => None,
                };
                Ok(((server, peer), detail.join(", ")))
            })?
        } else {
            let server = match &target.host {
                Host::Ip(ip) => SocketAddr::new(*ip, target.port),
                Host::Name(_) => return Err(Fail::new("unresolved host")),
            };
            (server, peer_literal.flatten())
        };

    let ctl = match target.transport {
        Transport::Udp => Control::udp(server)
            .map_err(|e| Fail::new(format!("cannot open a UDP socket toward {server}: {e}")))?,
        Transport::Tcp => step(rep, "connect", || {
            let c = Control::tcp(server, timeout)
                .map_err(|e| connect_fail(&label, &timeout_text, e))?;
            let local = c
                .local_addr()
                .map(|a| format!("connected from {a}"))
                .unwrap_or_else(|_| "connected".into());
            Ok((c, local))
        })?,
    };
    let credentials = args.user.clone().zip(args.password.clone());
    let mut s = Session::new(
        ctl,
        label,
        timeout,
        timeout_text,
        credentials,
        args.realm.clone(),
    );

    step(rep, "binding", || {
        let mapped = s.binding(s.deadline())?;
        let nat = match s.ctl.local_addr() {
            Ok(l) if l == mapped => " (the probe's own address: no NAT on the way)".to_string(),
            Ok(l) => format!(" (the probe's local address is {l}: a NAT on the way)"),
            Err(_) => String::new(),
        };
        Ok(((), format!("mapped address {mapped}{nat}")))
    })?;

    // The relay is of the peer's family: the server's, or the external peer's.
    let ipv6 = peer.unwrap_or(server).is_ipv6();
    let alloc = step(rep, "allocate", || {
        let a = s.allocate(ipv6, s.deadline())?;
        let mut d = format!("relayed address {}", a.relayed);
        if let Some(l) = a.lifetime {
            d.push_str(&format!(", lifetime {l} s"));
        }
        match (&a.realm, s.user()) {
            (Some(r), Some(u)) => d.push_str(&format!(", realm {}, user {u}", session::clean(r))),
            _ => d.push_str(", the server asked for no credentials"),
        }
        if let Some(sw) = &a.software {
            d.push_str(&format!(", server {sw}"));
        }
        Ok((a, d))
    })?;

    let result = relay_steps(args, &mut s, rep, server, peer, &alloc);
    // Release the allocation whenever the server can still be talked to.
    if result.as_ref().map_or_else(|f| !f.dead, |()| true) {
        refresh_step(&mut s, rep);
    }
    result
}

fn connect_fail(label: &str, timeout_text: &str, e: std::io::Error) -> Fail {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::ConnectionRefused => Fail::new(format!(
            "connection to {label} over tcp refused: is the server running and listening on tcp?"
        )),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Fail::new(format!(
            "no answer from {label} over tcp within {timeout_text} s (the connection was not accepted): is the server running and the port open?"
        )),
        _ => Fail::new(format!("cannot connect to {label} over tcp: {e}")),
    }
}

/// The peer, where it is.
enum Peer {
    Local(LocalPeer),
    External(SocketAddr),
}

impl Peer {
    fn addr(&self) -> SocketAddr {
        match self {
            Peer::Local(p) => p.addr,
            Peer::External(a) => *a,
        }
    }
}

/// Steps 4 to 7: peer, permission, channel, round trips.
fn relay_steps(
    args: &Args,
    s: &mut Session,
    rep: &mut Report,
    server: SocketAddr,
    external: Option<SocketAddr>,
    alloc: &Allocation,
) -> Result<(), Fail> {
    let peer = step(rep, "peer", || match external {
        Some(a) => Ok((
            Peer::External(a),
            format!("{a}, an external echo peer (--peer)"),
        )),
        None => {
            let p = relay::local_peer(server, s.timeout)?;
            let d = if p.mapped {
                format!("{}, the probe's peer socket as the server sees it", p.addr)
            } else {
                format!(
                    "{}, the peer socket's local address (the server did not answer a Binding from it over udp)",
                    p.addr
                )
            };
            Ok((Peer::Local(p), d))
        }
    })?;
    let peer_addr = peer.addr();

    step(rep, "create_permission", || {
        let add = |w: &mut crate::wire::MessageWriter| {
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer_addr);
        };
        match s.request(Method::CREATE_PERMISSION, &add, s.deadline())? {
            Answer::Success => Ok(((), format!("peer {} permitted", peer_addr.ip()))),
            Answer::Error {
                code,
                reason,
                message,
            } => Err(peer_refused(
                Method::CREATE_PERMISSION,
                code,
                &reason,
                &message,
                peer_addr,
                alloc.relayed,
            )),
        }
    })?;

    step(rep, "channel_bind", || {
        let add = |w: &mut crate::wire::MessageWriter| {
            w.add_u32(AttrType::CHANNEL_NUMBER, u32::from(CHANNEL) << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer_addr);
        };
        match s.request(Method::CHANNEL_BIND, &add, s.deadline())? {
            Answer::Success => Ok(((), format!("channel 0x{CHANNEL:04x} bound to {peer_addr}"))),
            Answer::Error {
                code,
                reason,
                message,
            } => Err(peer_refused(
                Method::CHANNEL_BIND,
                code,
                &reason,
                &message,
                peer_addr,
                alloc.relayed,
            )),
        }
    })?;

    let t0 = Instant::now();
    let trips = match &peer {
        Peer::Local(p) => relay::local_round_trips(s, p, alloc.relayed, args.count),
        Peer::External(a) => relay::echo_round_trips(s, *a, alloc.relayed, args.count),
    };
    let elapsed = t0.elapsed();
    match trips {
        Ok(t) => {
            rep.add(Step {
                name: "round_trip",
                status: Status::Ok,
                elapsed,
                detail: t.detail,
                rtt: Some(t.rtt),
            });
            Ok(())
        }
        Err(f) => {
            rep.add(Step {
                name: "round_trip",
                status: Status::Fail,
                elapsed,
                detail: f.reason.clone(),
                rtt: None,
            });
            Err(f)
        }
    }
}

/// The failure for an error answer to CreatePermission or ChannelBind.
fn peer_refused(
    method: Method,
    code: u16,
    reason: &str,
    message: &[u8],
    peer: SocketAddr,
    relayed: SocketAddr,
) -> Fail {
    match code {
        403 => Fail::new(format!(
            "the server's peer policy refuses the peer address {peer} (403 {reason} to {}): loopback, private and other special-purpose addresses (and the server's own addresses outside its relay ports) are refused by default; the server's allow-loopback-peers / allowed-peer-ips settings allow them, or probe with --peer and a public UDP echo peer",
            session::method_name(method)
        )),
        443 => Fail::new(format!(
            "peer address family mismatch (443 {reason}): the relayed address {relayed} and the peer {peer} are of different IP families"
        )),
        _ => match crate::wire::MessageRef::parse(message) {
            Ok(m) => Fail::new(refused(method, code, reason, &m)),
            Err(_) => Fail::new(format!(
                "{} refused: {code} {reason}",
                session::method_name(method)
            )),
        },
    }
}

/// Step 8: release the allocation. A failure is a warning.
fn refresh_step(s: &mut Session, rep: &mut Report) {
    let t0 = Instant::now();
    let add = |w: &mut crate::wire::MessageWriter| {
        w.add_u32(AttrType::LIFETIME, 0);
    };
    let r = s.request(Method::REFRESH, &add, s.deadline());
    let (status, detail) = match r {
        Ok(Answer::Success) => (Status::Ok, "allocation released".to_string()),
        Ok(Answer::Error {
            code: 437, reason, ..
        }) => (
            Status::Warn,
            format!("no allocation to release (437 {reason}): it expired, or the server lost it"),
        ),
        Ok(Answer::Error {
            code,
            reason,
            message,
        }) => (
            Status::Warn,
            match crate::wire::MessageRef::parse(&message) {
                Ok(m) => refused(Method::REFRESH, code, &reason, &m),
                Err(_) => format!("Refresh refused: {code} {reason}"),
            },
        ),
        Err(f) => (Status::Warn, f.reason),
    };
    rep.add(Step {
        name: "refresh",
        status,
        elapsed: t0.elapsed(),
        detail,
        rtt: None,
    });
}
