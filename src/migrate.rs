//! `turnserver migrate-config`: reads a coturn `turnserver.conf` and writes the equivalent
//! TOML configuration, with a comment for every line it could not carry over and why.
//!
//! coturn's file is one option per line, `key=value` (also `key = value` or `key value`, and
//! a leading `--` as on its command line) or a bare flag; `#` starts a comment line. Repeated
//! keys (`listening-ip`, `relay-ip`, `external-ip`, `user`, `denied-peer-ip`, ...) collect.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::config;

/// Arguments of `turnserver migrate-config`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// coturn's configuration file, e.g. /etc/turnserver.conf.
    pub input: PathBuf,
    /// Where to write the TOML configuration (default: standard output).
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Runs the command: writes the TOML, and says on standard error whether it validates.
pub fn run(args: &Args) -> ExitCode {
    let text = match std::fs::read_to_string(&args.input) {
        Ok(t) => t,
        Err(e) => {
            eprintln!(
                "turnserver migrate-config: cannot read {}: {e}",
                args.input.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let toml = migrate(&text, &args.input.display().to_string());
    let written = match &args.output {
        Some(path) => write_private(path, &toml).map_err(|e| format!("{}: {e}", path.display())),
        None => {
            print!("{toml}");
            Ok(())
        }
    };
    if let Err(e) = written {
        eprintln!("turnserver migrate-config: cannot write {e}");
        return ExitCode::FAILURE;
    }
    match config::parse(&toml) {
        Ok(_) => {
            eprintln!("turnserver migrate-config: the result is a valid configuration");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnserver migrate-config: the result needs editing before use: {e}");
            ExitCode::from(3)
        }
    }
}

/// Writes `text` to a new file readable by its owner only (0600): it may hold passwords and
/// shared secrets. An existing file keeps its permissions.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// One line of the coturn file: its number, key and value (empty for a flag).
struct Line<'a> {
    number: usize,
    key: &'a str,
    value: &'a str,
}

fn lines(text: &str) -> Vec<Line<'_>> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.trim_start_matches("--");
        let (key, value) = match line.find(['=', ' ', '\t']) {
            Some(at) => {
                let (k, v) = line.split_at(at);
                let v = v.trim_start_matches([' ', '\t']);
                let v = v.strip_prefix('=').unwrap_or(v);
                (k.trim(), v.trim())
            }
            None => (line, ""),
        };
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        out.push(Line {
            number: i + 1,
            key,
            value,
        });
    }
    out
}

/// Why coturn keys without an equivalent are left out.
fn not_carried(key: &str) -> Option<&'static str> {
    Some(match key {
        "listening-device" | "relay-device" => {
            "binding to a device is not supported; give the addresses in listening-ips / relay-ips"
        }
        "alt-tls-listening-port" => {
            "RFC 5780 is served over UDP only (on listening-port and alt-listening-port)"
        }
        "aux-server" | "udp-self-balance" | "tcp-proxy-port" => "not supported",
        "pkey-pwd" => "encrypted private keys are not supported; decrypt the key file",
        "cipher-list" | "dh-file" | "ec-curve-name" | "no-tlsv1" | "no-tlsv1_1" | "no-tlsv1_2" => {
            "TLS parameters are fixed: TLS 1.2 and 1.3 with AEAD suites only (rustls)"
        }
        "bps-capacity" => "no server-wide bandwidth cap; max-bps limits each allocation",
        "no-tcp-relay" => "TCP relaying (RFC 6062) is not implemented, so it is always off",
        "no-udp-relay" => "UDP relaying cannot be turned off",
        "channel-lifetime" | "permission-lifetime" => {
            "fixed at the RFC 8656 values (channels 600 s, permissions 300 s)"
        }
        "no-multicast-peers" => "multicast peers are always refused unless allowed-peer-ips says",
        "no-loopback-peers" => "loopback peers are refused by default",
        "server-name" => "not used; the realm and SOFTWARE are set by realm and software",
        "log-file"
        | "syslog"
        | "syslog-facility"
        | "simple-log"
        | "new-log-timestamp"
        | "new-log-timestamp-format"
        | "no-stdout-log"
        | "log-binding" => {
            "logs go to standard error (journald under systemd); log-format = \"json\" for \
             shippers"
        }
        "pidfile" | "proc-user" | "proc-group" => {
            "the systemd unit runs the server as its own user (systemd/turnserver.service)"
        }
        "no-cli"
        | "cli-ip"
        | "cli-port"
        | "cli-password"
        | "cli-max-output-sessions"
        | "web-admin"
        | "web-admin-ip"
        | "web-admin-port"
        | "web-admin-listen-on-workers" => {
            "no admin console; metrics, /health and the self-test page are on prometheus-port"
        }
        "userdb" | "psql-userdb" | "mysql-userdb" | "mongo-userdb" | "redis-userdb"
        | "redis-statsdb" | "secret-key-file" | "oauth" | "server-relay" => {
            "databases and OAuth are not supported; users go in [users] or static-auth-secret"
        }
        "mobility"
        | "secure-stun"
        | "stun-only"
        | "no-stun"
        | "no-stun-backward-compatibility"
        | "check-origin-consistency"
        | "keep-address-family"
        | "allocation-default-address-family"
        | "acme-redirect"
        | "max-allocate-timeout"
        | "ne"
        | "rest-api-separator"
        | "prometheus-username-labels" => "not supported",
        "response-origin-only-with-rfc5780" => {
            "always so here: RESPONSE-ORIGIN is sent only where RFC 5780 is served"
        }
        _ => return None,
    })
}

/// The TOML text of a string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The prefixes covering the addresses `a` to `b` (both included, same family), fewest first.
fn range_to_prefixes(a: IpAddr, b: IpAddr) -> Option<Vec<String>> {
    let (lo, hi, bits, v4) = match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            (u128::from(a.to_bits()), u128::from(b.to_bits()), 32, true)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.to_bits(), b.to_bits(), 128, false),
        _ => return None,
    };
    if lo > hi {
        return None;
    }
    if bits == 128 && lo == 0 && hi == u128::MAX {
        return Some(vec!["::/0".into()]);
    }
    let mut out = Vec::new();
    let mut cur = lo;
    loop {
        // The largest block starting at `cur` that stays within `hi`.
        let mut size = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while size > 0 && (size >= 128 || cur + ((1u128 << size) - 1) > hi) {
            size -= 1;
        }
        let ip: IpAddr = if v4 {
            std::net::Ipv4Addr::from_bits(cur as u32).into()
        } else {
            std::net::Ipv6Addr::from_bits(cur).into()
        };
        out.push(format!("{ip}/{}", bits - size));
        if size >= 128 {
            break;
        }
        let next = cur.checked_add(1u128 << size);
        match next {
            Some(n) if n <= hi && n > cur => cur = n,
            _ => break,
        }
    }
    Some(out)
}

/// A coturn peer address value (`A`, `A-B`, or already `A/N`) as prefixes.
fn peer_prefixes(value: &str) -> Result<Vec<String>, String> {
    if value.contains('/') {
        return Ok(vec![value.to_owned()]);
    }
    let (a, b) = value.split_once('-').unwrap_or((value, value));
    let parse = |s: &str| {
        s.trim()
            .parse::<IpAddr>()
            .map_err(|_| format!("{s:?} is not an IP address"))
    };
    let (a, b) = (parse(a)?, parse(b)?);
    range_to_prefixes(a, b).ok_or_else(|| format!("{value:?} is not a range of one family"))
}

/// Translates a coturn configuration into ours. `source` names the file in the header.
pub fn migrate(text: &str, source: &str) -> String {
    let mut top: Vec<(String, String)> = Vec::new();
    let mut lists: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
    let mut users: Vec<(String, String, usize)> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    let mut log_level: Option<&str> = None;
    let mut prometheus_port: Option<String> = None;
    let mut prometheus = false;
    let set = |key: &str, value: String, top: &mut Vec<(String, String)>| {
        top.retain(|(k, _)| k != key);
        top.push((key.to_owned(), value));
    };
    for Line { number, key, value } in lines(text) {
        let flag_true = || match value {
            "" | "1" | "true" | "yes" | "on" => Some("true".to_owned()),
            "0" | "false" | "no" | "off" => Some("false".to_owned()),
            _ => None,
        };
        let number_value = || value.parse::<u64>().ok().map(|n| n.to_string());
        let mut bad = |why: &str| {
            notes.push(format!("line {number}: {key}={value}: {why}"));
        };
        match key {
            "listening-ip" => lists.entry("listening-ips").or_default().push(value.into()),
            "relay-ip" => lists.entry("relay-ips").or_default().push(value.into()),
            "external-ip" => lists.entry("external-ip").or_default().push(value.into()),
            "alternate-server" => lists
                .entry("alternate-servers")
                .or_default()
                .push(value.into()),
            "tls-alternate-server" => lists
                .entry("tls-alternate-servers")
                .or_default()
                .push(value.into()),
            "static-auth-secret" => lists
                .entry("static-auth-secret")
                .or_default()
                .push(value.into()),
            "listening-port"
            | "tls-listening-port"
            | "alt-listening-port"
            | "min-port"
            | "max-port"
            | "user-quota"
            | "total-quota"
            | "max-bps"
            | "max-allocate-lifetime" => match number_value() {
                Some(n) => set(key, n, &mut top),
                None => bad("not a number"),
            },
            "relay-threads" => match number_value() {
                Some(n) => set("workers", n, &mut top),
                None => bad("not a number"),
            },
            "stale-nonce" => match value {
                "" => set("stale-nonce", "600".into(), &mut top),
                _ => match number_value() {
                    Some(n) => set("stale-nonce", n, &mut top),
                    None => bad("not a number"),
                },
            },
            "realm" => set("realm", quote(value), &mut top),
            "cert" | "pkey" => set(key, quote(value), &mut top),
            "fingerprint"
            | "lt-cred-mech"
            | "no-auth"
            | "use-auth-secret"
            | "no-tcp"
            | "no-udp"
            | "no-tls"
            | "no-dtls"
            | "allow-loopback-peers" => match flag_true() {
                Some(v) => set(key, v, &mut top),
                None => bad("not a flag value"),
            },
            "no-software-attribute" => set("software", quote(""), &mut top),
            "no-rfc5780" => match flag_true() {
                Some(v) => set("rfc5780", (v == "false").to_string(), &mut top),
                None => bad("not a flag value"),
            },
            "user" => match value.split_once(':') {
                Some((name, secret)) if !name.is_empty() && !secret.is_empty() => {
                    users.push((name.into(), secret.into(), number));
                }
                _ => bad("expected user=NAME:PASSWORD or user=NAME:0xKEY"),
            },
            "denied-peer-ip" | "allowed-peer-ip" => match peer_prefixes(value) {
                Ok(p) => lists
                    .entry(if key == "denied-peer-ip" {
                        "denied-peer-ips"
                    } else {
                        "allowed-peer-ips"
                    })
                    .or_default()
                    .extend(p),
                Err(e) => bad(&e),
            },
            "verbose" | "v" => log_level = Some(log_level.map_or("debug", |l| l)),
            "Verbose" | "V" => log_level = Some("trace"),
            "prometheus" => prometheus = true,
            "prometheus-port" => match number_value() {
                Some(n) => prometheus_port = Some(n),
                None => bad("not a number"),
            },
            other => match not_carried(other) {
                Some(why) => bad(&format!("not carried over: {why}")),
                None => bad("not carried over: unknown to this tool"),
            },
        }
    }
    if !lists.contains_key("relay-ips") && !lists.contains_key("listening-ips") {
        notes.push(
            "no listening-ip or relay-ip: coturn then listens and relays on every address; this \
             server listens on every address too but needs relay-ips (the addresses to relay \
             on) set by hand"
                .into(),
        );
    }
    if let Some(level) = log_level {
        set("log-level", quote(level), &mut top);
    }
    if prometheus {
        set(
            "prometheus-port",
            prometheus_port.unwrap_or_else(|| "9641".into()),
            &mut top,
        );
        notes.push(
            "prometheus: metrics listen on 127.0.0.1 only (coturn: every address); set \
             prometheus-ip to change that"
                .into(),
        );
    } else if prometheus_port.is_some() {
        notes.push("prometheus-port without prometheus: metrics stay off, as in coturn".into());
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Migrated from coturn's {source} by turnserver migrate-config."
    );
    let _ = writeln!(
        out,
        "# Check it with: turnserver --check-config --config FILE. Every key is explained in"
    );
    let _ = writeln!(out, "# turnserver.toml.example.");
    out.push('\n');
    for key in ["listening-ips", "relay-ips"] {
        if let Some(v) = lists.get(key) {
            let _ = writeln!(out, "{key} = {}", list(v));
        }
    }
    if let Some(v) = lists.get("external-ip") {
        match v.as_slice() {
            [one] => {
                let _ = writeln!(out, "external-ip = {}", quote(one));
            }
            many => {
                let _ = writeln!(out, "external-ip = {}", list(many));
            }
        }
    }
    for (key, value) in &top {
        let _ = writeln!(out, "{key} = {value}");
    }
    if let Some(v) = lists.get("static-auth-secret") {
        match v.as_slice() {
            [one] => {
                let _ = writeln!(out, "static-auth-secret = {}", quote(one));
            }
            many => {
                let _ = writeln!(out, "static-auth-secret = {}", list(many));
            }
        }
    }
    for key in [
        "allowed-peer-ips",
        "denied-peer-ips",
        "alternate-servers",
        "tls-alternate-servers",
    ] {
        if let Some(v) = lists.get(key) {
            let _ = writeln!(out, "{key} = {}", list(v));
        }
    }
    if !notes.is_empty() {
        out.push('\n');
        let _ = writeln!(out, "# Not carried over:");
        for n in &notes {
            let _ = writeln!(out, "# - {n}");
        }
    }
    if !users.is_empty() {
        out.push_str("\n[users]\n");
        let mut seen = std::collections::BTreeSet::new();
        for (name, _, number) in &users {
            if !seen.insert(name.clone()) {
                let _ = writeln!(
                    out,
                    "# line {number}: a second user={name}:... line; coturn keeps the last, so \
                     does this file"
                );
            }
        }
        let mut last: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, secret, _) in &users {
            last.insert(name, secret);
        }
        for (name, secret) in last {
            let _ = writeln!(out, "{} = {}", toml_key(name), quote(secret));
        }
    }
    out
}

/// A TOML key: bare when it can be, quoted otherwise.
fn toml_key(name: &str) -> String {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        name.to_owned()
    } else {
        quote(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_prefixes() {
        let p = |a: &str, b: &str| range_to_prefixes(a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(
            p("10.0.0.0", "10.255.255.255").unwrap(),
            vec!["10.0.0.0/8".to_owned()]
        );
        assert_eq!(
            p("192.168.1.1", "192.168.1.1").unwrap(),
            vec!["192.168.1.1/32".to_owned()]
        );
        assert_eq!(
            p("10.0.0.1", "10.0.0.6").unwrap(),
            vec!["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(p("0.0.0.0", "255.255.255.255").unwrap(), vec!["0.0.0.0/0"]);
        assert_eq!(
            p("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff").unwrap(),
            vec!["::/0"]
        );
        assert_eq!(
            p("fc00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff").unwrap(),
            vec!["fc00::/7"]
        );
        assert!(p("10.0.0.2", "10.0.0.1").is_none());
        assert!(p("10.0.0.1", "::1").is_none());
    }

    #[test]
    fn tutorial_config_migrates_to_a_valid_one() {
        let coturn = "\
# a typical tutorial config
listening-ip=10.0.0.5
external-ip=203.0.113.5/10.0.0.5
listening-port=3478
min-port=49152
max-port=65535
verbose
fingerprint
lt-cred-mech
realm=example.org
user=someId:somePasswd
user=other:0x543e1aec5d3614f03141652d6ada51b2
denied-peer-ip=10.0.0.0-10.255.255.255
no-cli
total-quota=100
";
        let toml = migrate(coturn, "turnserver.conf");
        let cfg = config::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!(
            cfg.listening_ips,
            vec!["10.0.0.5".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(cfg.realm, "example.org");
        assert!(cfg.fingerprint && cfg.auth);
        assert_eq!(cfg.min_port, 49152);
        assert_eq!(cfg.max_port, 65535);
        assert_eq!(cfg.total_quota, 100);
        assert_eq!(cfg.log_level, "debug");
        assert_eq!(cfg.users.len(), 2);
        assert_eq!(cfg.denied_peer_ips.len(), 1);
        assert_eq!(cfg.external_ips.len(), 1);
        assert!(
            toml.contains("# - line 14: no-cli=: not carried over: no admin console"),
            "{toml}"
        );
    }

    #[test]
    fn every_line_is_accounted_for() {
        let toml = migrate(
            "--realm = \"x.org\"\nfoo-bar=1\nuser=broken\nmin-port=abc\nstatic-auth-secret=s1\n\
             static-auth-secret=s2\nprometheus\nlistening-ip 127.0.0.1\n\
             alternate-server=192.0.2.1:3478\nalternate-server=192.0.2.2\n\
             alt-listening-port=3500\nno-rfc5780\nalt-tls-listening-port=5350\n",
            "t",
        );
        assert!(toml.contains("realm = \"x.org\""), "{toml}");
        assert!(
            toml.contains("line 2: foo-bar=1: not carried over: unknown"),
            "{toml}"
        );
        assert!(toml.contains("line 3: user=broken"), "{toml}");
        assert!(
            toml.contains("line 4: min-port=abc: not a number"),
            "{toml}"
        );
        assert!(
            toml.contains("static-auth-secret = [\"s1\", \"s2\"]"),
            "{toml}"
        );
        assert!(toml.contains("prometheus-port = 9641"), "{toml}");
        assert!(
            toml.contains("alternate-servers = [\"192.0.2.1:3478\", \"192.0.2.2\"]"),
            "{toml}"
        );
        assert!(
            toml.contains(
                "line 13: alt-tls-listening-port=5350: not carried over: RFC 5780 is \
                           served over UDP only"
            ),
            "{toml}"
        );
        let cfg = config::parse(&toml).unwrap_or_else(|e| panic!("{e}\n{toml}"));
        assert_eq!((cfg.alt_listening_port, cfg.rfc5780), (3500, false));
        assert_eq!(cfg.auth_secrets.len(), 2);
        assert_eq!(cfg.alternate_servers.len(), 2);
    }
}
