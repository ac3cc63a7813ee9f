//! The server to probe, from an ICE URL of RFC 7065: `turn:HOST[:PORT][?transport=udp|tcp]`.

use std::net::IpAddr;

/// Default port of `turn:` URLs (RFC 7065 3).
pub const DEFAULT_PORT: u16 = 3478;

/// The transport of the control connection between the probe and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

/// Where the server is named: an address literal or a host name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

/// A parsed `turn:` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: Host,
    pub port: u16,
    pub transport: Transport,
}

impl Target {
    /// `HOST:PORT` as the operator would write it, brackets around an IPv6 literal.
    pub fn label(&self) -> String {
        match &self.host {
            Host::Ip(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            Host::Ip(IpAddr::V4(ip)) => format!("{ip}:{}", self.port),
            Host::Name(name) => format!("{name}:{}", self.port),
        }
    }
}

/// Parses a `turn:` URL. The error is a sentence for the operator.
pub fn parse(url: &str) -> Result<Target, String> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once(':') else {
        return Err(format!(
            "bad URL {url:?}: expected turn:HOST[:PORT][?transport=udp|tcp]"
        ));
    };
    match scheme.to_ascii_lowercase().as_str() {
        "turn" => {}
        "turns" => {
            return Err(format!(
                "{url:?}: turns: (TURN over TLS) is not supported by probe yet (TLS); \
                 probe the same server with turn:HOST[:PORT][?transport=udp|tcp]"
            ));
        }
        "stun" | "stuns" => {
            return Err(format!(
                "{url:?}: probe checks TURN servers; write turn: instead of {scheme}:"
            ));
        }
        _ => {
            return Err(format!(
                "bad URL {url:?}: unknown scheme {scheme:?}; expected turn:HOST[:PORT][?transport=udp|tcp]"
            ));
        }
    }
    if rest.starts_with("//") {
        return Err(format!(
            "bad URL {url:?}: turn: URLs have no \"//\"; write turn:HOST[:PORT]"
        ));
    }
    let (authority, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    let transport = match query {
        None => Transport::Udp,
        Some(q) => parse_query(url, q)?,
    };
    let (host, port) = split_host_port(url, authority)?;
    Ok(Target {
        host,
        port,
        transport,
    })
}

fn parse_query(url: &str, query: &str) -> Result<Transport, String> {
    let Some((key, value)) = query.split_once('=') else {
        return Err(format!(
            "bad URL {url:?}: expected ?transport=udp or ?transport=tcp after the host"
        ));
    };
    if !key.eq_ignore_ascii_case("transport") {
        return Err(format!(
            "bad URL {url:?}: unknown parameter {key:?}; only transport=udp|tcp is allowed"
        ));
    }
    match value.to_ascii_lowercase().as_str() {
        "udp" => Ok(Transport::Udp),
        "tcp" => Ok(Transport::Tcp),
        _ => Err(format!(
            "bad URL {url:?}: transport {value:?} is not udp or tcp"
        )),
    }
}

fn split_host_port(url: &str, authority: &str) -> Result<(Host, u16), String> {
    if authority.contains('@') {
        return Err(format!(
            "bad URL {url:?}: credentials do not go in the URL; use --user and --password"
        ));
    }
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let Some((literal, after)) = inner.split_once(']') else {
            return Err(format!(
                "bad URL {url:?}: unclosed '[' around the IPv6 address"
            ));
        };
        let ip: std::net::Ipv6Addr = literal
            .parse()
            .map_err(|_| format!("bad URL {url:?}: {literal:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => match p.strip_prefix(':') {
                Some(p) => Some(p),
                None => {
                    return Err(format!(
                        "bad URL {url:?}: unexpected {p:?} after the IPv6 address"
                    ));
                }
            },
        };
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        if authority.matches(':').count() > 1 {
            return Err(format!(
                "bad URL {url:?}: put an IPv6 address in brackets, as turn:[2001:db8::1]:3478"
            ));
        }
        let (h, p) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if h.is_empty() {
            return Err(format!("bad URL {url:?}: no host"));
        }
        let host = match h.parse::<IpAddr>() {
            Ok(ip) => Host::Ip(ip),
            Err(_) if valid_name(h) => Host::Name(h.to_string()),
            Err(_) => return Err(format!("bad URL {url:?}: {h:?} is not a host name")),
        };
        (host, p)
    };
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("bad URL {url:?}: {p:?} is not a port (1-65535)")),
        },
    };
    Ok((host, port))
}

/// Letters, digits, '-', '_' and '.', as in DNS names (RFC 1123, with '_' tolerated).
fn valid_name(h: &str) -> bool {
    h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        && !h.starts_with('.')
        && !h.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> Target {
        parse(url).unwrap_or_else(|e| panic!("{url}: {e}"))
    }

    #[test]
    fn defaults_are_port_3478_over_udp() {
        let t = ok("turn:example.org");
        assert_eq!(t.host, Host::Name("example.org".into()));
        assert_eq!(t.port, 3478);
        assert_eq!(t.transport, Transport::Udp);
        assert_eq!(t.label(), "example.org:3478");
    }

    #[test]
    fn port_transport_and_ipv6_literals() {
        let t = ok("turn:127.0.0.1:3479?transport=tcp");
        assert_eq!(t.host, Host::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!((t.port, t.transport), (3479, Transport::Tcp));
        let t = ok("TURN:[::1]:5000?Transport=UDP");
        assert_eq!(t.host, Host::Ip("::1".parse().unwrap()));
        assert_eq!((t.port, t.transport), (5000, Transport::Udp));
        assert_eq!(t.label(), "[::1]:5000");
        assert_eq!(ok("turn:[2001:db8::1]").port, 3478);
    }

    #[test]
    fn refusals_name_the_problem() {
        let cases = [
            ("turns:example.org", "TLS"),
            ("stun:example.org", "turn:"),
            ("http://example.org", "scheme"),
            ("example.org", "expected turn:"),
            ("turn://example.org", "//"),
            ("turn:", "no host"),
            ("turn:example.org:0", "port"),
            ("turn:example.org:99999", "port"),
            ("turn:example.org:+80", "port"),
            ("turn:example.org?transport=sctp", "sctp"),
            ("turn:example.org?foo=bar", "foo"),
            ("turn:example.org?transport", "transport=udp"),
            ("turn:2001:db8::1", "brackets"),
            ("turn:[2001:db8::1", "unclosed"),
            ("turn:[::1]x", "after the IPv6"),
            ("turn:[nope]:3478", "not an IPv6"),
            ("turn:user@example.org", "--user"),
            ("turn:exa mple.org", "not a host name"),
        ];
        for (url, needle) in cases {
            let e = parse(url).expect_err(url);
            assert!(e.contains(needle), "{url}: {e}");
        }
    }
}
