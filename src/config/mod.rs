//! Configuration: TOML text -> `RawConfig` (serde, unknown keys refused) -> `validate()` -> `Config`.
//!
//! Key names follow coturn's `turnserver.conf` so that operators recognise them. Every error names
//! the key and, where the TOML parser knows it, the line.
//!
//! Every raw field is wrapped in [`toml::Spanned`], so a value that parses as TOML but is refused
//! by validation (a port range upside down, a private address that is not a relay address, ...)
//! is reported with the 1-based line it was written on. Syntax errors, unknown keys and values of
//! the wrong TOML type are reported with the toml crate's own line/column text.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use toml::Spanned;

/// A user's long-term credential as stored in the config.
#[derive(Clone, PartialEq, Eq)]
pub enum UserKey {
    /// A plain password; the key is MD5(username ":" realm ":" password) (RFC 8489 9.2.2).
    Password(String),
    /// The precomputed 16-byte MD5 key ("0x" followed by 32 hex digits in the file).
    Ha1([u8; 16]),
}

impl std::fmt::Debug for UserKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UserKey::Password(_) => f.write_str("Password(..)"),
            UserKey::Ha1(_) => f.write_str("Ha1(..)"),
        }
    }
}

/// A shared secret (`static-auth-secret`); kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// One `external-ip` entry: the address advertised to clients, and optionally the private local
/// address it maps to (1:1 NAT). Without `private`, the mapping applies to every relay address
/// that no entry with a `private` address maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalIp {
    /// The address clients are told (in XOR-RELAYED-ADDRESS).
    pub public: IpAddr,
    /// The relay address this entry maps; `None` for the entry that covers the relay addresses
    /// no other entry maps.
    pub private: Option<IpAddr>,
}

/// Where the TLS certificate chain and private key are (`cert`, `pkey`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM file with the server certificate first, then the intermediates.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub pkey: PathBuf,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Addresses to listen on (`listening-ips`); may hold wildcards.
    pub listening_ips: Vec<IpAddr>,
    /// Port to listen on, for UDP and TCP (`listening-port`); never 0.
    pub listening_port: u16,
    /// No UDP listener (`no-udp`).
    pub no_udp: bool,
    /// No TCP listener (`no-tcp`); never true together with `no_udp`.
    pub no_tcp: bool,
    /// Port of the TLS listener (`tls-listening-port`); never 0, never `listening_port`.
    pub tls_listening_port: u16,
    /// The second UDP port of RFC 5780 NAT behaviour discovery (`alt-listening-port`, default
    /// `listening-port + 1`); bound only where [`Config::rfc5780`] finds a pair of addresses.
    /// When it is, never 0, `listening_port` or `tls_listening_port`.
    pub alt_listening_port: u16,
    /// Serve RFC 5780 where two addresses of one family are configured (`rfc5780`, default
    /// true; coturn's `no-rfc5780` turns it off).
    pub rfc5780: bool,
    /// Certificate chain and private key (PEM files) for TLS, when `cert` and `pkey` are both
    /// set and `no-tls` is not.
    pub tls: Option<TlsFiles>,
    /// The same files for DTLS on UDP `tls-listening-port`, when `cert` and `pkey` are both set
    /// and `no-dtls` is not.
    pub dtls: Option<TlsFiles>,
    /// Concrete local addresses relays are allocated on (`relay-ips`, else the listening
    /// addresses that are not wildcards); never empty, never a wildcard.
    pub relay_ips: Vec<IpAddr>,
    /// Public addresses advertised instead of relay addresses (`external-ip`), in file order.
    pub external_ips: Vec<ExternalIp>,
    /// Lowest relay port (`min-port`); at least 1024.
    pub min_port: u16,
    /// Highest relay port (`max-port`); at least `min_port`.
    pub max_port: u16,
    /// Realm for long-term credentials (`realm`).
    pub realm: String,
    /// Add FINGERPRINT to responses (`fingerprint`).
    pub fingerprint: bool,
    /// `true` unless the operator wrote `no-auth = true`.
    pub auth: bool,
    /// Sorted by name, unique.
    pub users: Vec<(String, UserKey)>,
    /// Servers an Allocate over UDP or TCP is redirected to with 300 Try Alternate
    /// (`alternate-servers`), in turn, among those of the client's address family. Empty: no
    /// redirection.
    pub alternate_servers: Vec<SocketAddr>,
    /// The same for TLS and DTLS clients (`tls-alternate-servers`).
    pub tls_alternate_servers: Vec<SocketAddr>,
    /// Shared secrets for TURN REST API credentials (`static-auth-secret` with
    /// `use-auth-secret`): the username is `EXPIRY[:USER]`, the password
    /// base64(HMAC-SHA1(secret, username)). Empty when off. Several secrets let one be rotated
    /// without downtime: a credential minted from any of them is accepted.
    pub auth_secrets: Vec<Secret>,
    /// Longest allocation lifetime granted, in seconds (`max-allocate-lifetime`); at least 60.
    pub max_allocate_lifetime: u32,
    /// Lifetime of an allocation whose request names none, in seconds
    /// (`default-allocate-lifetime`); at least 60, at most `max_allocate_lifetime`.
    pub default_allocate_lifetime: u32,
    /// Nonce lifetime in seconds (`stale-nonce`); at least 1.
    pub stale_nonce: u32,
    /// Allow peers on loopback addresses (`allow-loopback-peers`).
    pub allow_loopback_peers: bool,
    /// Peer address prefixes allowed although a default refusal covers them
    /// (`allowed-peer-ips`), as (network address, prefix length).
    pub allowed_peer_ips: Vec<(IpAddr, u8)>,
    /// Peer address prefixes refused whatever else says (`denied-peer-ips`).
    pub denied_peer_ips: Vec<(IpAddr, u8)>,
    /// Allocations one user may hold at once (`user-quota`); 0 means no limit.
    pub user_quota: u32,
    /// Allocations the server holds at once (`total-quota`); 0 means no limit but the port range.
    pub total_quota: u32,
    /// Allocations one client IP address may hold at once (`ip-quota`); 0 means no limit.
    pub ip_quota: u32,
    /// Bytes per second one allocation may relay in each direction (`max-bps`); 0: no limit.
    pub max_bps: u32,
    /// Permissions per allocation (`max-permissions`).
    pub max_permissions: u32,
    /// Channel bindings per allocation (`max-channels`).
    pub max_channels: u32,
    /// Open TCP and TLS connections at once (`max-connections`).
    pub max_connections: u32,
    /// Seconds a TCP or TLS connection without an allocation may stay silent
    /// (`idle-connection-timeout`).
    pub idle_connection_timeout: u32,
    /// SOFTWARE attribute value (`software`); empty means no SOFTWARE attribute.
    pub software: String,
    /// One of "error", "warn", "info", "debug", "trace" (`log-level`).
    pub log_level: String,
    /// Log lines as JSON objects rather than text (`log-format = "json"`).
    pub log_json: bool,
    /// Where the HTTP listener for metrics and the self-test page binds (`prometheus-ip`,
    /// `prometheus-port`); `None` when `prometheus-port` is absent.
    pub prometheus: Option<SocketAddr>,
    /// Relay threads (`workers`); 0 means one per CPU the process may run on.
    pub workers: u32,
    /// Send runs of same-size UDP datagrams to one destination as one GSO send where the
    /// kernel offers it (`udp-gso`, default on).
    pub udp_gso: bool,
}

/// Where the server serves RFC 5780 NAT behaviour discovery ([`Config::rfc5780`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rfc5780 {
    /// Pairs (A1, A2) of listening addresses of one family; each listens on UDP
    /// `listening-port` and `alt-listening-port`, and is the other's "other address".
    pub pairs: Vec<(IpAddr, IpAddr)>,
    /// Why it is off, or off for some addresses, one sentence each.
    pub off: Vec<String>,
}

/// A setting that differs between two configurations and only takes effect on restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartOnly(pub &'static str);

impl Config {
    /// The keys whose values differ in `new` but that a running server cannot change: the
    /// listeners, the relay addresses and ports, the certificate paths, turning authentication
    /// on or off, the metrics listener and the log format. Everything else applies on reload.
    pub fn restart_only_changes(&self, new: &Config) -> Vec<RestartOnly> {
        let mut keys = Vec::new();
        let mut differ = |key, changed: bool| {
            if changed {
                keys.push(RestartOnly(key));
            }
        };
        differ("listening-ips", self.listening_ips != new.listening_ips);
        differ("listening-port", self.listening_port != new.listening_port);
        differ("no-udp", self.no_udp != new.no_udp);
        differ("no-tcp", self.no_tcp != new.no_tcp);
        differ(
            "tls-listening-port",
            self.tls_listening_port != new.tls_listening_port,
        );
        differ(
            "alt-listening-port",
            self.alt_listening_port != new.alt_listening_port,
        );
        differ("rfc5780", self.rfc5780 != new.rfc5780);
        differ("cert / pkey / no-tls", self.tls != new.tls);
        differ("cert / pkey / no-dtls", self.dtls != new.dtls);
        differ("relay-ips", self.relay_ips != new.relay_ips);
        differ("external-ip", self.external_ips != new.external_ips);
        differ("min-port", self.min_port != new.min_port);
        differ("max-port", self.max_port != new.max_port);
        differ("lt-cred-mech / no-auth", self.auth != new.auth);
        differ(
            "prometheus-ip / prometheus-port",
            self.prometheus != new.prometheus,
        );
        differ("log-format", self.log_json != new.log_json);
        differ("workers", self.workers != new.workers);
        keys
    }

    /// Takes the settings listed by [`Config::restart_only_changes`] (but authentication on or
    /// off, which a reload refuses) from `running`, so that this configuration describes what a
    /// running server does after applying it.
    pub fn keep_restart_only(&mut self, running: &Config) {
        self.listening_ips = running.listening_ips.clone();
        self.listening_port = running.listening_port;
        self.no_udp = running.no_udp;
        self.no_tcp = running.no_tcp;
        self.tls_listening_port = running.tls_listening_port;
        self.alt_listening_port = running.alt_listening_port;
        self.rfc5780 = running.rfc5780;
        self.tls = running.tls.clone();
        self.dtls = running.dtls.clone();
        self.relay_ips = running.relay_ips.clone();
        self.external_ips = running.external_ips.clone();
        self.min_port = running.min_port;
        self.max_port = running.max_port;
        self.prometheus = running.prometheus;
        self.log_json = running.log_json;
        self.workers = running.workers;
    }
}

/// Default `listening-port`: the IANA STUN/TURN port.
const DEFAULT_LISTENING_PORT: u16 = 3478;
/// Default `tls-listening-port`: the IANA STUN/TURN over TLS port.
const DEFAULT_TLS_LISTENING_PORT: u16 = 5349;
/// Default `min-port`: the start of the IANA dynamic port range.
const DEFAULT_MIN_PORT: u16 = 49152;
/// Default `max-port`.
const DEFAULT_MAX_PORT: u16 = 65535;
/// Default `realm`.
/// The realm when the file names none.
pub const DEFAULT_REALM: &str = "turnserver.local";
/// Default `max-allocate-lifetime`, in seconds.
const DEFAULT_MAX_ALLOCATE_LIFETIME: u32 = 3600;
/// Default `default-allocate-lifetime`, in seconds (RFC 8656 section 3.2: 10 minutes).
const DEFAULT_ALLOCATE_LIFETIME: u32 = 600;
/// Default `stale-nonce`, in seconds.
const DEFAULT_STALE_NONCE: u32 = 600;
/// Default `max-permissions`: far above what a WebRTC session installs (one per remote
/// candidate address), low enough to bound an allocation's tables.
const DEFAULT_MAX_PERMISSIONS: u32 = 64;
/// Default `max-channels`.
const DEFAULT_MAX_CHANNELS: u32 = 64;
/// Default `max-connections`: as many as relay ports in the default range, which the unit
/// file's descriptor limit covers twice over.
const DEFAULT_MAX_CONNECTIONS: u32 = 16384;
/// Default `log-level`.
const DEFAULT_LOG_LEVEL: &str = "info";
/// The values `log-level` accepts.
const LOG_LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

/// Shortest allocation lifetime accepted for `default-allocate-lifetime` and
/// `max-allocate-lifetime`, in seconds.
const MIN_LIFETIME: u32 = 60;
/// Lowest `min-port` accepted: relays never take privileged ports.
const MIN_RELAY_PORT: u16 = 1024;
/// Longest realm and SOFTWARE value, in bytes (RFC 8489 sections 14.9 and 14.14).
const MAX_TEXT_BYTES: usize = 763;
/// Longest user name accepted, in bytes.
const MAX_USERNAME_BYTES: usize = 513;

/// The `SOFTWARE` attribute value sent when the config does not set `software`.
fn default_software() -> String {
    format!("turnserver {}", env!("CARGO_PKG_VERSION"))
}

/// Reads and validates the configuration file at `path`.
///
/// # Errors
///
/// An unreadable file gives an error naming the path and the OS error; every other error is the
/// one [`parse`] gives, prefixed with the path.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        file: Some(path.to_path_buf()),
        line: None,
        key: None,
        kind: ErrorKind::Read(err),
    })?;
    parse(&text).map_err(|mut err| {
        err.file = Some(path.to_path_buf());
        err
    })
}

/// Parses and validates configuration text.
///
/// # Errors
///
/// Invalid TOML, an unknown key, a value of the wrong type, or a value or combination of values
/// that validation refuses; the error names the key and, when known, the line.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(text).map_err(|err| toml_error(text, &err))?;
    raw.validate(text)
}

/// Why a configuration was refused.
///
/// The message names the offending key and, when known, the 1-based line
/// (`line 7: min-port (60000) is greater than max-port (50000)`).
#[derive(Debug)]
pub struct ConfigError {
    file: Option<PathBuf>,
    line: Option<usize>,
    key: Option<String>,
    kind: ErrorKind,
}

#[derive(Debug)]
enum ErrorKind {
    /// The file could not be read.
    Read(std::io::Error),
    /// The toml crate refused the text; its message carries its own line/column context.
    Toml(String),
    /// The text is valid TOML but a value was refused.
    Invalid(String),
}

impl ConfigError {
    /// The 1-based line of the offending value, when known.
    #[must_use]
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// The offending key (`min-port`, `users.alice`), when known.
    #[must_use]
    pub fn key(&self) -> Option<&str> {
        self.key.as_deref()
    }

    /// The file the configuration was loaded from, when it came from [`load`].
    #[must_use]
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self.file.as_deref().map(Path::display);
        if let ErrorKind::Read(err) = &self.kind {
            return match file {
                Some(file) => write!(f, "cannot read {file}: {err}"),
                None => write!(f, "cannot read the configuration: {err}"),
            };
        }
        if let Some(file) = file {
            write!(f, "{file}: ")?;
        }
        match (&self.kind, &self.key, self.line) {
            // The toml text shows the offending line, which for a value in a multi-line array or
            // a table does not always show the key: name it unless the message already does.
            (ErrorKind::Toml(text), Some(key), _) if !text.contains(&format!("`{key}`")) => {
                write!(f, "{key}: {text}")
            }
            (ErrorKind::Toml(text), _, _) => f.write_str(text),
            (ErrorKind::Invalid(message), _, Some(line)) => write!(f, "line {line}: {message}"),
            (ErrorKind::Invalid(message), _, None) => f.write_str(message),
            (ErrorKind::Read(_), _, _) => Ok(()),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Read(err) => Some(err),
            ErrorKind::Toml(_) | ErrorKind::Invalid(_) => None,
        }
    }
}

/// Converts a toml crate error, keeping its text and adding the line and the key it concerns.
fn toml_error(text: &str, err: &toml::de::Error) -> ConfigError {
    let span = err.span();
    ConfigError {
        file: None,
        line: span.as_ref().map(|span| line_at(text, span.start)),
        key: span.and_then(|span| key_at(text, span.start)),
        kind: ErrorKind::Toml(err.to_string().trim_end().to_owned()),
    }
}

/// The 1-based line holding byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&byte| byte == b'\n')
        .count()
        + 1
}

/// The dotted key whose name or value covers byte `offset` of `text`, if `text` is valid TOML.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut path = key_path(root.get_ref(), offset)?;
    path.reverse();
    Some(path.join("."))
}

/// The key path (innermost first) covering `offset`. A `[table]`'s span is only its header, so
/// tables are searched inside before their own span is tried.
fn key_path(table: &toml::de::DeTable<'_>, offset: usize) -> Option<Vec<String>> {
    let covers = |span: Range<usize>| span.start <= offset && offset < span.end.max(span.start + 1);
    for (key, value) in table {
        if let toml::de::DeValue::Table(inner) = value.get_ref()
            && let Some(mut path) = key_path(inner, offset)
        {
            path.push(key.get_ref().to_string());
            return Some(path);
        }
        if covers(key.span()) || covers(value.span()) {
            return Some(vec![key.get_ref().to_string()]);
        }
    }
    None
}

/// A value written as one string or as an array of strings (`external-ip`,
/// `static-auth-secret`).
#[derive(Debug)]
enum StringOrList {
    One(String),
    Many(Vec<Spanned<String>>),
}

impl<'de> Deserialize<'de> for StringOrList {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;

        impl<'de> Visitor<'de> for FieldVisitor {
            type Value = StringOrList;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, or an array of strings")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
                Ok(StringOrList::One(value.to_owned()))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = seq.next_element::<Spanned<String>>()? {
                    entries.push(entry);
                }
                Ok(StringOrList::Many(entries))
            }
        }

        deserializer.deserialize_any(FieldVisitor)
    }
}

/// The configuration file as written, before validation. Every key is optional; absent keys take
/// their defaults in [`RawConfig::validate`].
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    listening_ips: Option<Spanned<Vec<Spanned<String>>>>,
    listening_port: Option<Spanned<u16>>,
    no_udp: Option<Spanned<bool>>,
    no_tcp: Option<Spanned<bool>>,
    tls_listening_port: Option<Spanned<u16>>,
    alt_listening_port: Option<Spanned<u16>>,
    rfc5780: Option<Spanned<bool>>,
    cert: Option<Spanned<String>>,
    pkey: Option<Spanned<String>>,
    no_tls: Option<Spanned<bool>>,
    no_dtls: Option<Spanned<bool>>,
    relay_ips: Option<Spanned<Vec<Spanned<String>>>>,
    external_ip: Option<Spanned<StringOrList>>,
    min_port: Option<Spanned<u16>>,
    max_port: Option<Spanned<u16>>,
    realm: Option<Spanned<String>>,
    fingerprint: Option<Spanned<bool>>,
    lt_cred_mech: Option<Spanned<bool>>,
    no_auth: Option<Spanned<bool>>,
    use_auth_secret: Option<Spanned<bool>>,
    alternate_servers: Option<Spanned<Vec<Spanned<String>>>>,
    tls_alternate_servers: Option<Spanned<Vec<Spanned<String>>>>,
    static_auth_secret: Option<Spanned<StringOrList>>,
    users: Option<Spanned<BTreeMap<Spanned<String>, Spanned<String>>>>,
    max_allocate_lifetime: Option<Spanned<u32>>,
    default_allocate_lifetime: Option<Spanned<u32>>,
    stale_nonce: Option<Spanned<u32>>,
    allow_loopback_peers: Option<Spanned<bool>>,
    allowed_peer_ips: Option<Spanned<Vec<Spanned<String>>>>,
    denied_peer_ips: Option<Spanned<Vec<Spanned<String>>>>,
    user_quota: Option<Spanned<u32>>,
    total_quota: Option<Spanned<u32>>,
    ip_quota: Option<Spanned<u32>>,
    max_bps: Option<Spanned<u32>>,
    max_permissions: Option<Spanned<u32>>,
    max_channels: Option<Spanned<u32>>,
    max_connections: Option<Spanned<u32>>,
    idle_connection_timeout: Option<Spanned<u32>>,
    software: Option<Spanned<String>>,
    log_level: Option<Spanned<String>>,
    log_format: Option<Spanned<String>>,
    prometheus_port: Option<Spanned<u16>>,
    prometheus_ip: Option<Spanned<String>>,
    workers: Option<Spanned<u32>>,
    udp_gso: Option<Spanned<bool>>,
}

/// Builds validation errors that carry the line of the offending value.
struct Checker<'a> {
    text: &'a str,
}

impl Checker<'_> {
    fn error(&self, key: &str, span: Option<Range<usize>>, message: String) -> ConfigError {
        ConfigError {
            file: None,
            line: span.map(|span| line_at(self.text, span.start)),
            key: Some(key.to_owned()),
            kind: ErrorKind::Invalid(message),
        }
    }

    /// Parses one address of a `listening-ips` / `relay-ips` array.
    fn ip(&self, key: &str, value: &Spanned<String>) -> Result<IpAddr, ConfigError> {
        let text = value.get_ref();
        let ip: IpAddr = text.parse().map_err(|_| {
            self.error(
                key,
                Some(value.span()),
                format!("{key}: {text:?} is not an IP address"),
            )
        })?;
        if ip.is_multicast() {
            return Err(self.error(
                key,
                Some(value.span()),
                format!("{key}: {ip} is a multicast address"),
            ));
        }
        Ok(ip)
    }

    /// Parses an array of address prefixes ("10.0.0.0/8", "2001:db8::/32", or one address).
    fn cidr_list(
        &self,
        key: &str,
        values: &[Spanned<String>],
    ) -> Result<Vec<(IpAddr, u8)>, ConfigError> {
        let mut out = Vec::with_capacity(values.len());
        for value in values {
            let text = value.get_ref();
            let bad =
                |why: &str| self.error(key, Some(value.span()), format!("{key}: {text:?} {why}"));
            let (addr, len) = match text.split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (text.as_str(), None),
            };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| bad("is not an address or an address/prefix-length"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                None => max,
                Some(l) => l
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| bad("has a prefix length out of range"))?,
            };
            out.push((ip, len));
        }
        Ok(out)
    }

    /// Parses an array of `IP[:PORT]` servers (IPv6 as `[IP]:PORT`), `default_port` when the
    /// port is left out; at most 16.
    fn server_list(
        &self,
        key: &str,
        values: &[Spanned<String>],
        default_port: u16,
    ) -> Result<Vec<SocketAddr>, ConfigError> {
        if values.len() > 16 {
            return Err(self.error(key, None, format!("{key}: at most 16 servers")));
        }
        let mut out = Vec::new();
        for value in values {
            let text = value.get_ref().trim();
            let addr = text
                .parse::<SocketAddr>()
                .ok()
                .or_else(|| {
                    let ip = text.trim_start_matches('[').trim_end_matches(']');
                    ip.parse::<IpAddr>()
                        .ok()
                        .map(|ip| SocketAddr::new(ip, default_port))
                })
                .filter(|a| !a.ip().is_unspecified() && a.port() != 0);
            match addr {
                Some(a) => out.push(a),
                None => {
                    return Err(self.error(
                        key,
                        Some(value.span()),
                        format!("{key}: {text:?} is not IP, IP:PORT or [IPv6]:PORT"),
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Parses an array of addresses, refusing duplicates.
    fn ip_list(&self, key: &str, values: &[Spanned<String>]) -> Result<Vec<IpAddr>, ConfigError> {
        let mut ips: Vec<IpAddr> = Vec::with_capacity(values.len());
        for value in values {
            let ip = self.ip(key, value)?;
            if ips.contains(&ip) {
                return Err(self.error(
                    key,
                    Some(value.span()),
                    format!("{key}: {ip} is listed twice"),
                ));
            }
            ips.push(ip);
        }
        Ok(ips)
    }
}

/// Whether `ip` is in a private range: 10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7,
/// fe80::/10 (loopback is not: it is for tests on one host).
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_private() || v4.is_link_local() || (o[0] == 100 && (o[1] & 0xC0) == 64)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            (first & 0xFE00) == 0xFC00 || (first & 0xFFC0) == 0xFE80
        }
    }
}

/// The value of an optional field, or `default` when the key is absent.
fn value_or<T: Clone>(field: &Option<Spanned<T>>, default: T) -> T {
    field
        .as_ref()
        .map_or(default, |spanned| spanned.get_ref().clone())
}

/// The byte span of an optional field, when the key is present.
fn span_of<T>(field: &Option<Spanned<T>>) -> Option<Range<usize>> {
    field.as_ref().map(Spanned::span)
}

/// Whether the key is present with the value `true`.
fn is_set_true(field: &Option<Spanned<bool>>) -> bool {
    field.as_ref().is_some_and(|spanned| *spanned.get_ref())
}

/// Whether the key is present with the value `false`.
fn is_set_false(field: &Option<Spanned<bool>>) -> bool {
    field.as_ref().is_some_and(|spanned| !*spanned.get_ref())
}

/// "IPv4" or "IPv6", for messages.
fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// Decodes the 32 hex digits of an HA1 key.
fn decode_ha1(hex: &str) -> Option<[u8; 16]> {
    fn nibble(digit: u8) -> Option<u8> {
        char::from(digit)
            .to_digit(16)
            .and_then(|value| u8::try_from(value).ok())
    }
    let digits = hex.as_bytes();
    if digits.len() != 32 {
        return None;
    }
    let mut key = [0u8; 16];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(key)
}

impl RawConfig {
    /// Applies defaults and checks every value and every combination of values.
    fn validate(self, text: &str) -> Result<Config, ConfigError> {
        let check = Checker { text };

        // Listeners.
        let listening_ips = match &self.listening_ips {
            Some(list) => {
                if list.get_ref().is_empty() {
                    return Err(check.error(
                        "listening-ips",
                        Some(list.span()),
                        "listening-ips is empty; list at least one address to listen on".into(),
                    ));
                }
                check.ip_list("listening-ips", list.get_ref())?
            }
            None => vec![IpAddr::from([0, 0, 0, 0])],
        };
        let listening_port = value_or(&self.listening_port, DEFAULT_LISTENING_PORT);
        if listening_port == 0 {
            return Err(check.error(
                "listening-port",
                span_of(&self.listening_port),
                "listening-port is 0; give the port to listen on (the standard one is 3478)".into(),
            ));
        }
        let no_udp = value_or(&self.no_udp, false);
        let no_tcp = value_or(&self.no_tcp, false);
        if no_udp && no_tcp {
            return Err(check.error(
                "no-tcp",
                span_of(&self.no_tcp),
                "no-udp and no-tcp are both true; the server would listen on nothing".into(),
            ));
        }

        // TLS.
        let tls_listening_port = value_or(&self.tls_listening_port, DEFAULT_TLS_LISTENING_PORT);
        if tls_listening_port == 0 || tls_listening_port == listening_port {
            return Err(check.error(
                "tls-listening-port",
                span_of(&self.tls_listening_port),
                format!(
                    "tls-listening-port {tls_listening_port} must be a port other than 0 and \
                     listening-port (the standard one is 5349)"
                ),
            ));
        }
        let rfc5780 = value_or(&self.rfc5780, true);
        let alt_listening_port =
            self.alt_listening_port(&check, &listening_ips, listening_port, tls_listening_port)?;
        let no_tls = value_or(&self.no_tls, false);
        let no_dtls = value_or(&self.no_dtls, false);
        let files = match (&self.cert, &self.pkey) {
            (None, None) => None,
            (Some(cert), Some(pkey)) => {
                for (key, v) in [("cert", cert), ("pkey", pkey)] {
                    if v.get_ref().is_empty() {
                        return Err(check.error(
                            key,
                            Some(v.span()),
                            format!("{key} is empty; give the path of a PEM file"),
                        ));
                    }
                }
                Some(TlsFiles {
                    cert: PathBuf::from(cert.get_ref()),
                    pkey: PathBuf::from(pkey.get_ref()),
                })
            }
            (Some(cert), None) => {
                return Err(check.error(
                    "pkey",
                    Some(cert.span()),
                    "cert is set but pkey is not; TLS needs both the certificate chain and its \
                     private key"
                        .into(),
                ));
            }
            (None, Some(pkey)) => {
                return Err(check.error(
                    "cert",
                    Some(pkey.span()),
                    "pkey is set but cert is not; TLS needs both the certificate chain and its \
                     private key"
                        .into(),
                ));
            }
        };

        let tls = files.clone().filter(|_| !no_tls);
        let dtls = files.filter(|_| !no_dtls);

        // Relay addresses.
        let relay_span = span_of(&self.relay_ips);
        let mut relay_ips = match &self.relay_ips {
            Some(list) => check.ip_list("relay-ips", list.get_ref())?,
            None => Vec::new(),
        };
        if let Some((ip, value)) = relay_ips
            .iter()
            .zip(self.relay_ips.iter().flat_map(Spanned::get_ref))
            .find(|(ip, _)| ip.is_unspecified())
        {
            return Err(check.error(
                "relay-ips",
                Some(value.span()),
                format!(
                    "relay-ips: {ip} is a wildcard address; a relay needs a concrete local address"
                ),
            ));
        }
        if relay_ips.is_empty() {
            relay_ips = listening_ips
                .iter()
                .copied()
                .filter(|ip| !ip.is_unspecified())
                .collect();
        }
        if relay_ips.is_empty() {
            return Err(check.error(
                "relay-ips",
                relay_span.or_else(|| span_of(&self.listening_ips)),
                "relay-ips is required when listening on a wildcard address (0.0.0.0 or ::); \
                 list the local addresses to allocate relays on"
                    .into(),
            ));
        }

        let external_ips = self.external_ips(&check, &relay_ips)?;

        // Relay port range.
        let min_port = value_or(&self.min_port, DEFAULT_MIN_PORT);
        let max_port = value_or(&self.max_port, DEFAULT_MAX_PORT);
        if min_port < MIN_RELAY_PORT {
            return Err(check.error(
                "min-port",
                span_of(&self.min_port),
                format!(
                    "min-port ({min_port}) is below {MIN_RELAY_PORT}; relays do not use privileged ports"
                ),
            ));
        }
        if min_port > max_port {
            return Err(check.error(
                "min-port",
                span_of(&self.min_port).or_else(|| span_of(&self.max_port)),
                format!("min-port ({min_port}) is greater than max-port ({max_port})"),
            ));
        }

        // Realm.
        let realm = value_or(&self.realm, DEFAULT_REALM.to_owned());
        let realm_span = span_of(&self.realm);
        if realm.is_empty() {
            return Err(check.error("realm", realm_span, "realm is empty".into()));
        }
        if realm.len() > MAX_TEXT_BYTES {
            return Err(check.error(
                "realm",
                realm_span,
                format!(
                    "realm is {} bytes long; the limit is {MAX_TEXT_BYTES}",
                    realm.len()
                ),
            ));
        }
        if realm.chars().any(char::is_control) {
            return Err(check.error(
                "realm",
                realm_span,
                format!("realm {realm:?} contains a control character"),
            ));
        }

        let fingerprint = value_or(&self.fingerprint, true);

        // Authentication.
        if is_set_true(&self.lt_cred_mech) && is_set_true(&self.no_auth) {
            return Err(check.error(
                "no-auth",
                span_of(&self.no_auth),
                "no-auth = true contradicts lt-cred-mech = true; keep only one of them".into(),
            ));
        }
        if is_set_false(&self.lt_cred_mech) && !is_set_true(&self.no_auth) {
            return Err(check.error(
                "lt-cred-mech",
                span_of(&self.lt_cred_mech),
                "lt-cred-mech = false would turn authentication off; that needs the explicit \
                 no-auth = true, so that an open relay is never configured by accident"
                    .into(),
            ));
        }
        let auth = !value_or(&self.no_auth, false);
        let auth_secrets = self.auth_secrets(&check, auth)?;
        let alternate_servers = match &self.alternate_servers {
            Some(list) => check.server_list("alternate-servers", list.get_ref(), 3478)?,
            None => Vec::new(),
        };
        let tls_alternate_servers = match &self.tls_alternate_servers {
            Some(list) => check.server_list("tls-alternate-servers", list.get_ref(), 5349)?,
            None => Vec::new(),
        };
        let users = self.users(&check, auth && auth_secrets.is_empty())?;

        // Lifetimes.
        let max_allocate_lifetime =
            value_or(&self.max_allocate_lifetime, DEFAULT_MAX_ALLOCATE_LIFETIME);
        let default_allocate_lifetime =
            value_or(&self.default_allocate_lifetime, DEFAULT_ALLOCATE_LIFETIME);
        let stale_nonce = value_or(&self.stale_nonce, DEFAULT_STALE_NONCE);
        for (key, value, field) in [
            (
                "max-allocate-lifetime",
                max_allocate_lifetime,
                &self.max_allocate_lifetime,
            ),
            (
                "default-allocate-lifetime",
                default_allocate_lifetime,
                &self.default_allocate_lifetime,
            ),
        ] {
            if value < MIN_LIFETIME {
                return Err(check.error(
                    key,
                    span_of(field),
                    format!("{key} ({value}) is less than {MIN_LIFETIME} seconds"),
                ));
            }
        }
        if default_allocate_lifetime > max_allocate_lifetime {
            return Err(check.error(
                "default-allocate-lifetime",
                span_of(&self.default_allocate_lifetime)
                    .or_else(|| span_of(&self.max_allocate_lifetime)),
                format!(
                    "default-allocate-lifetime ({default_allocate_lifetime}) is greater than \
                     max-allocate-lifetime ({max_allocate_lifetime})"
                ),
            ));
        }
        if stale_nonce == 0 {
            return Err(check.error(
                "stale-nonce",
                span_of(&self.stale_nonce),
                "stale-nonce is 0; a nonce must live at least 1 second".into(),
            ));
        }

        let allow_loopback_peers = value_or(&self.allow_loopback_peers, false);
        let allowed_peer_ips = match &self.allowed_peer_ips {
            Some(list) => check.cidr_list("allowed-peer-ips", list.get_ref())?,
            None => Vec::new(),
        };
        let denied_peer_ips = match &self.denied_peer_ips {
            Some(list) => check.cidr_list("denied-peer-ips", list.get_ref())?,
            None => Vec::new(),
        };
        let user_quota = value_or(&self.user_quota, 0);
        let total_quota = value_or(&self.total_quota, 0);
        let ip_quota = value_or(&self.ip_quota, 0);
        let max_bps = value_or(&self.max_bps, 0);
        let max_permissions = value_or(&self.max_permissions, DEFAULT_MAX_PERMISSIONS);
        let max_channels = value_or(&self.max_channels, DEFAULT_MAX_CHANNELS);
        let max_connections = value_or(&self.max_connections, DEFAULT_MAX_CONNECTIONS);
        let idle_connection_timeout = value_or(&self.idle_connection_timeout, 30);
        if idle_connection_timeout == 0 {
            return Err(check.error(
                "idle-connection-timeout",
                span_of(&self.idle_connection_timeout),
                "idle-connection-timeout is 0; give the seconds a connection may wait".into(),
            ));
        }
        if max_connections == 0 {
            return Err(check.error(
                "max-connections",
                span_of(&self.max_connections),
                "max-connections is 0; TCP and TLS clients could not connect (turn the \
                 listeners off with no-tcp / no-tls instead)"
                    .into(),
            ));
        }
        for (key, field, value) in [
            ("max-permissions", &self.max_permissions, max_permissions),
            ("max-channels", &self.max_channels, max_channels),
        ] {
            if !(1..=4096).contains(&value) {
                return Err(check.error(
                    key,
                    span_of(field),
                    format!("{key} {value} is out of range (1 to 4096)"),
                ));
            }
        }

        let software = value_or(&self.software, default_software());
        if software.len() > MAX_TEXT_BYTES {
            return Err(check.error(
                "software",
                span_of(&self.software),
                format!(
                    "software is {} bytes long; the limit is {MAX_TEXT_BYTES}",
                    software.len()
                ),
            ));
        }

        let log_level = value_or(&self.log_level, DEFAULT_LOG_LEVEL.to_owned());
        if !LOG_LEVELS.contains(&log_level.as_str()) {
            return Err(check.error(
                "log-level",
                span_of(&self.log_level),
                format!(
                    "log-level {log_level:?} is not one of {}",
                    LOG_LEVELS.join(", ")
                ),
            ));
        }

        let log_json = match self.log_format.as_ref().map(|f| f.get_ref().as_str()) {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(check.error(
                    "log-format",
                    span_of(&self.log_format),
                    format!("log-format {other:?} is not \"text\" or \"json\""),
                ));
            }
        };
        let prometheus = match &self.prometheus_port {
            None => None,
            Some(port) if *port.get_ref() == 0 => {
                return Err(check.error(
                    "prometheus-port",
                    Some(port.span()),
                    "prometheus-port is 0; leave the key out to turn the metrics listener off"
                        .into(),
                ));
            }
            Some(port) => {
                let ip = match &self.prometheus_ip {
                    Some(ip) => check.ip("prometheus-ip", ip)?,
                    None => IpAddr::from([127, 0, 0, 1]),
                };
                Some(SocketAddr::new(ip, *port.get_ref()))
            }
        };
        if prometheus.is_none() && self.prometheus_ip.is_some() {
            return Err(check.error(
                "prometheus-ip",
                span_of(&self.prometheus_ip),
                "prometheus-ip is set but prometheus-port is not; set the port to turn the \
                 metrics listener on"
                    .into(),
            ));
        }

        let workers = value_or(&self.workers, 0);
        if workers > 256 {
            return Err(check.error(
                "workers",
                span_of(&self.workers),
                format!("workers {workers} is more than 256"),
            ));
        }

        Ok(Config {
            listening_ips,
            listening_port,
            no_udp,
            no_tcp,
            tls_listening_port,
            alt_listening_port,
            rfc5780,
            tls,
            dtls,
            relay_ips,
            external_ips,
            min_port,
            max_port,
            realm,
            fingerprint,
            auth,
            users,
            alternate_servers,
            tls_alternate_servers,
            auth_secrets,
            max_allocate_lifetime,
            default_allocate_lifetime,
            stale_nonce,
            allow_loopback_peers,
            allowed_peer_ips,
            denied_peer_ips,
            user_quota,
            total_quota,
            ip_quota,
            max_bps,
            max_permissions,
            max_channels,
            max_connections,
            idle_connection_timeout,
            software,
            log_level,
            log_json,
            prometheus,
            workers,
            udp_gso: value_or(&self.udp_gso, true),
        })
    }

    /// The `alt-listening-port` (default `listening-port + 1`, as coturn's). It is checked (not
    /// 0, not beyond 65535, not `listening-port` or `tls-listening-port`) when written in the
    /// file, or when RFC 5780 could be served: `rfc5780` on, UDP on, and two concrete listening
    /// addresses of one family. Otherwise the port is never bound and a default that would
    /// collide refuses nothing.
    fn alt_listening_port(
        &self,
        check: &Checker<'_>,
        listening_ips: &[IpAddr],
        listening_port: u16,
        tls_listening_port: u16,
    ) -> Result<u16, ConfigError> {
        const KEY: &str = "alt-listening-port";
        let concrete = |v4: bool| {
            listening_ips
                .iter()
                .filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == v4)
                .count()
        };
        let needed = value_or(&self.rfc5780, true)
            && !value_or(&self.no_udp, false)
            && (concrete(true) >= 2 || concrete(false) >= 2);
        let span = span_of(&self.alt_listening_port).or_else(|| span_of(&self.listening_port));
        let port = match &self.alt_listening_port {
            Some(port) => *port.get_ref(),
            None => match listening_port.checked_add(1) {
                Some(port) => port,
                None if needed => {
                    return Err(check.error(
                        KEY,
                        span,
                        format!(
                            "{KEY} defaults to listening-port + 1, which is beyond 65535; set                              {KEY} (or rfc5780 = false)"
                        ),
                    ));
                }
                None => listening_port,
            },
        };
        if self.alt_listening_port.is_none() && !needed {
            return Ok(port);
        }
        let how = if self.alt_listening_port.is_some() {
            ""
        } else {
            " (listening-port + 1 by default)"
        };
        let clash = if port == 0 {
            Some(format!("{KEY} is 0"))
        } else if port == listening_port {
            Some(format!("{KEY} {port}{how} is listening-port"))
        } else if port == tls_listening_port {
            Some(format!("{KEY} {port}{how} is tls-listening-port"))
        } else {
            None
        };
        match clash {
            Some(what) => Err(check.error(
                KEY,
                span,
                format!(
                    "{what}; RFC 5780 needs a second port of its own (set {KEY}, or \
                     rfc5780 = false)"
                ),
            )),
            None => Ok(port),
        }
    }

    /// Parses and checks `external-ip` against the (defaulted) relay addresses.
    fn external_ips(
        &self,
        check: &Checker<'_>,
        relay_ips: &[IpAddr],
    ) -> Result<Vec<ExternalIp>, ConfigError> {
        const KEY: &str = "external-ip";
        let Some(field) = &self.external_ip else {
            return Ok(Vec::new());
        };
        let entries: Vec<(&str, Range<usize>)> = match field.get_ref() {
            StringOrList::One(entry) => vec![(entry.as_str(), field.span())],
            StringOrList::Many(list) => list
                .iter()
                .map(|entry| (entry.get_ref().as_str(), entry.span()))
                .collect(),
        };

        let mut parsed: Vec<(ExternalIp, &str, Range<usize>)> = Vec::with_capacity(entries.len());
        for (entry, span) in entries {
            let parse_part = |part: &str| -> Result<IpAddr, ConfigError> {
                part.parse().map_err(|_| {
                    check.error(
                        KEY,
                        Some(span.clone()),
                        format!(
                            "{KEY}: {part:?} in {entry:?} is not an IP address \
                             (the form is \"PUBLIC\" or \"PUBLIC/PRIVATE\")"
                        ),
                    )
                })
            };
            let (public, private) = match entry.split_once('/') {
                Some((public, private)) => (parse_part(public)?, Some(parse_part(private)?)),
                None => (parse_part(entry)?, None),
            };
            if public.is_unspecified() || public.is_multicast() {
                return Err(check.error(
                    KEY,
                    Some(span),
                    format!("{KEY}: public address {public} in {entry:?} cannot be advertised"),
                ));
            }
            if let Some(private) = private {
                if public.is_ipv4() != private.is_ipv4() {
                    return Err(check.error(
                        KEY,
                        Some(span),
                        format!(
                            "{KEY}: {entry:?} maps {} address {public} to {} address {private}; \
                             both must be of the same family",
                            family(public),
                            family(private)
                        ),
                    ));
                }
                if !relay_ips.contains(&private) {
                    return Err(check.error(
                        KEY,
                        Some(span),
                        format!(
                            "{KEY}: private address {private} in {entry:?} is not one of the relay \
                             IPs ({})",
                            join(relay_ips)
                        ),
                    ));
                }
            }
            let mapping = ExternalIp { public, private };
            if let Some((_, earlier, _)) =
                parsed.iter().find(|(other, _, _)| other.public == public)
            {
                return Err(check.error(
                    KEY,
                    Some(span),
                    format!(
                        "{KEY}: public address {public} appears in both {earlier:?} and {entry:?}"
                    ),
                ));
            }
            if let Some((_, earlier, _)) =
                parsed.iter().find(|(other, _, _)| other.private == private)
            {
                let message = match private {
                    Some(private) => format!(
                        "{KEY}: private address {private} is mapped by both {earlier:?} and {entry:?}"
                    ),
                    None => format!(
                        "{KEY}: {earlier:?} and {entry:?} both lack a private address; at most one \
                         entry may apply to every relay IP, give the others as \"PUBLIC/PRIVATE\""
                    ),
                };
                return Err(check.error(KEY, Some(span), message));
            }
            parsed.push((mapping, entry, span));
        }

        // An entry without PRIVATE covers every relay address no other entry maps: those must be
        // of its family, or clients would be told an address their relay cannot have.
        if let Some((catch_all, entry, span)) = parsed.iter().find(|(m, _, _)| m.private.is_none())
        {
            let unmapped_other_family = relay_ips.iter().find(|ip| {
                ip.is_ipv4() != catch_all.public.is_ipv4()
                    && !parsed.iter().any(|(m, _, _)| m.private == Some(**ip))
            });
            if let Some(ip) = unmapped_other_family {
                return Err(check.error(
                    KEY,
                    Some(span.clone()),
                    format!(
                        "{KEY}: {entry:?} has no private address, so it applies to every relay IP, \
                         but relay IP {ip} is {}; write it as \"PUBLIC/PRIVATE\"",
                        family(*ip)
                    ),
                ));
            }
        }
        Ok(parsed.into_iter().map(|(mapping, _, _)| mapping).collect())
    }

    /// Parses and checks `static-auth-secret` and `use-auth-secret`: the secrets, or none when
    /// shared-secret credentials are off.
    fn auth_secrets(&self, check: &Checker<'_>, auth: bool) -> Result<Vec<Secret>, ConfigError> {
        const KEY: &str = "static-auth-secret";
        const MAX_SECRETS: usize = 8;
        let secrets: Vec<(&str, Range<usize>)> = match &self.static_auth_secret {
            None => Vec::new(),
            Some(field) => match field.get_ref() {
                StringOrList::One(s) => vec![(s.as_str(), field.span())],
                StringOrList::Many(list) => list
                    .iter()
                    .map(|s| (s.get_ref().as_str(), s.span()))
                    .collect(),
            },
        };
        let on = value_or(&self.use_auth_secret, !secrets.is_empty());
        if !on && !secrets.is_empty() {
            return Err(check.error(
                "use-auth-secret",
                span_of(&self.use_auth_secret),
                "use-auth-secret = false but static-auth-secret is set; remove one of them".into(),
            ));
        }
        if !on {
            return Ok(Vec::new());
        }
        if !auth {
            return Err(check.error(
                KEY,
                span_of(&self.static_auth_secret),
                "static-auth-secret needs authentication, but no-auth = true".into(),
            ));
        }
        if secrets.is_empty() {
            return Err(check.error(
                "use-auth-secret",
                span_of(&self.use_auth_secret).or_else(|| span_of(&self.static_auth_secret)),
                "use-auth-secret = true needs static-auth-secret (a string, or a list of \
                 strings to rotate secrets)"
                    .into(),
            ));
        }
        if secrets.len() > MAX_SECRETS {
            return Err(check.error(
                KEY,
                span_of(&self.static_auth_secret),
                format!("{KEY}: {} secrets; at most {MAX_SECRETS}", secrets.len()),
            ));
        }
        let mut out = Vec::new();
        for (secret, span) in secrets {
            if secret.is_empty() {
                return Err(check.error(KEY, Some(span), format!("{KEY}: a secret is empty")));
            }
            out.push(Secret(secret.to_owned()));
        }
        Ok(out)
    }

    /// Parses and checks `[users]`; `auth` says whether authentication is on.
    fn users(
        &self,
        check: &Checker<'_>,
        auth: bool,
    ) -> Result<Vec<(String, UserKey)>, ConfigError> {
        const KEY: &str = "users";
        let table = self.users.as_ref();
        if auth && table.is_none_or(|table| table.get_ref().is_empty()) {
            return Err(check.error(
                KEY,
                table.map(Spanned::span),
                "[users] is empty but authentication is on; add a user, set static-auth-secret, or \
                 set no-auth = true"
                    .into(),
            ));
        }
        let mut users = Vec::new();
        for (name, value) in table.iter().flat_map(|table| table.get_ref()) {
            let name_text = name.get_ref();
            let key = format!("{KEY}.{name_text}");
            let name_problem = if name_text.is_empty() {
                Some("a user name is empty".to_owned())
            } else if name_text.len() > MAX_USERNAME_BYTES {
                Some(format!(
                    "user name {name_text:?} is {} bytes long; the limit is {MAX_USERNAME_BYTES}",
                    name_text.len()
                ))
            } else if name_text.contains(':') {
                Some(format!(
                    "user name {name_text:?} contains ':', which the long-term credential key \
                     (user:realm:password) cannot hold"
                ))
            } else if name_text.chars().any(char::is_control) {
                Some(format!(
                    "user name {name_text:?} contains a control character"
                ))
            } else {
                None
            };
            if let Some(problem) = name_problem {
                return Err(check.error(KEY, Some(name.span()), format!("{KEY}: {problem}")));
            }
            let secret = value.get_ref();
            let user_key = if secret.is_empty() {
                return Err(check.error(
                    &key,
                    Some(value.span()),
                    format!("{key}: the password is empty"),
                ));
            } else if let Some(hex) = secret.strip_prefix("0x") {
                UserKey::Ha1(decode_ha1(hex).ok_or_else(|| {
                    check.error(
                        &key,
                        Some(value.span()),
                        format!(
                            "{key}: a value starting with \"0x\" is an HA1 key and must be \"0x\" \
                             followed by 32 hex digits (MD5 of user:realm:password)"
                        ),
                    )
                })?)
            } else {
                UserKey::Password(secret.clone())
            };
            users.push((name_text.clone(), user_key));
        }
        users.sort_by(|(a, _), (b, _)| a.cmp(b));
        Ok(users)
    }
}

/// Comma-separated addresses.
fn join(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn on_off(flag: bool) -> &'static str {
    if flag { "on" } else { "off" }
}

impl Config {
    /// A multi-line, human-readable account of what the server will do with this configuration,
    /// printed by `turnserver --check-config`.
    #[must_use]
    /// The address clients are told for relay address `relay`: the `public` of the
    /// `external-ip` entry that maps it, else of the entry without a private address, else
    /// `relay` itself.
    pub fn advertised(&self, relay: IpAddr) -> IpAddr {
        self.external_ips
            .iter()
            .find(|e| e.private == Some(relay))
            .or_else(|| {
                self.external_ips
                    .iter()
                    .find(|e| e.private.is_none() && e.public.is_ipv4() == relay.is_ipv4())
            })
            .map_or(relay, |e| e.public)
    }

    /// Where RFC 5780 NAT behaviour discovery is served: pairs of UDP listening addresses of
    /// one family, and why the other addresses do not serve it. Concrete listening addresses
    /// pair up in file order, per family (the first two IPv4 addresses, the next two, ...).
    /// A wildcard cannot serve it: a response from the other address needs that address as
    /// its source, which a socket bound to the wildcard does not choose. Nor can a pair whose
    /// two addresses `external-ip` advertises as one: behind that NAT they look like one.
    pub fn rfc5780(&self) -> Rfc5780 {
        let mut plan = Rfc5780::default();
        if !self.rfc5780 {
            plan.off.push("off (rfc5780 = false)".into());
            return plan;
        }
        if self.no_udp {
            plan.off.push("off: no UDP listener (no-udp = true)".into());
            return plan;
        }
        for ip in self.listening_ips.iter().filter(|ip| ip.is_unspecified()) {
            plan.off.push(format!(
                "not on the wildcard {ip}: a response from the other address needs a concrete \
                 source address; list the addresses in listening-ips"
            ));
        }
        for v4 in [true, false] {
            let ips: Vec<IpAddr> = self
                .listening_ips
                .iter()
                .copied()
                .filter(|ip| !ip.is_unspecified() && ip.is_ipv4() == v4)
                .collect();
            for pair in ips.chunks(2) {
                match *pair {
                    [a, b] if self.advertised(a) == self.advertised(b) => plan.off.push(format!(
                        "not on {a} and {b}: external-ip advertises both as {}",
                        self.advertised(a)
                    )),
                    [a, b] => plan.pairs.push((a, b)),
                    [a] if ips.len() == 1 => plan.off.push(format!(
                        "not on {a}: it is the only {} listening address; RFC 5780 needs two \
                         addresses of one family (listening-ips)",
                        family(a)
                    )),
                    [a] => plan.off.push(format!(
                        "not on {a}: no {} listening address left to pair it with",
                        family(a)
                    )),
                    _ => {}
                }
            }
        }
        plan
    }

    /// Relay addresses in private ranges (RFC 1918, shared address space 100.64.0.0/10, IPv6
    /// unique-local and link-local) that no `external-ip` maps: clients outside their network
    /// would be given a relay candidate they cannot reach. This is the usual reason a browser
    /// behind a cloud's 1:1 NAT gets no working relay candidate.
    pub fn unmapped_private_relays(&self) -> Vec<IpAddr> {
        self.relay_ips
            .iter()
            .copied()
            .filter(|ip| is_private(*ip) && self.advertised(*ip) == *ip)
            .collect()
    }

    pub fn summary(&self) -> String {
        use std::fmt::Write as _;

        let mut out = String::new();
        let transports = match (self.no_udp, self.no_tcp) {
            (false, false) => "udp, tcp",
            (true, false) => "tcp",
            (false, true) => "udp",
            (true, true) => "none",
        };
        // Writing to a String cannot fail, so the fmt::Results below are discarded.
        let _ = writeln!(out, "listeners:");
        for ip in &self.listening_ips {
            let addr = SocketAddr::new(*ip, self.listening_port);
            let _ = writeln!(out, "  {addr} ({transports})");
        }
        for ip in self.rfc5780().pairs.iter().flat_map(|&(a, b)| [a, b]) {
            let addr = SocketAddr::new(ip, self.alt_listening_port);
            let _ = writeln!(out, "  {addr} (udp, RFC 5780 alternate port)");
        }
        if let Some(tls) = &self.tls {
            for ip in &self.listening_ips {
                let addr = SocketAddr::new(*ip, self.tls_listening_port);
                let _ = writeln!(out, "  {addr} (tls)");
            }
            let _ = writeln!(
                out,
                "tls certificate: {} (key {})",
                tls.cert.display(),
                tls.pkey.display()
            );
        } else {
            let _ = writeln!(out, "tls: off (set cert and pkey to enable)");
        }
        if self.dtls.is_some() {
            for ip in &self.listening_ips {
                let addr = SocketAddr::new(*ip, self.tls_listening_port);
                let _ = writeln!(out, "  {addr} (dtls)");
            }
        }
        let nat = self.rfc5780();
        for (a, b) in &nat.pairs {
            let (p1, p2) = (self.listening_port, self.alt_listening_port);
            let _ = writeln!(
                out,
                "rfc 5780 nat discovery: {a} and {b}, udp ports {p1} and {p2} (advertised as {} \
                 and {})",
                self.advertised(*a),
                self.advertised(*b)
            );
        }
        for why in &nat.off {
            let _ = writeln!(out, "rfc 5780 nat discovery: {why}");
        }
        let _ = writeln!(out, "relay ips: {}", join(&self.relay_ips));
        for ip in self.unmapped_private_relays() {
            let _ = writeln!(
                out,
                "warning: relay ip {ip} is private and no external-ip maps it; clients outside \
                 its network get a relay address they cannot reach (behind 1:1 NAT: \
                 external-ip = \"PUBLIC/{ip}\")"
            );
        }
        let port_count = u32::from(self.max_port) - u32::from(self.min_port) + 1;
        let _ = writeln!(
            out,
            "relay ports: {}-{} ({port_count} ports)",
            self.min_port, self.max_port
        );
        if self.external_ips.is_empty() {
            let _ = writeln!(
                out,
                "external-ip: none (relay addresses are advertised as-is)"
            );
        } else {
            let _ = writeln!(out, "external-ip:");
            for mapping in &self.external_ips {
                match mapping.private {
                    Some(private) => {
                        let _ = writeln!(out, "  {private} advertised as {}", mapping.public);
                    }
                    None => {
                        let _ = writeln!(
                            out,
                            "  every other relay ip advertised as {}",
                            mapping.public
                        );
                    }
                }
            }
        }
        let _ = writeln!(out, "realm: {}", self.realm);
        if self.auth {
            let count = self.users.len();
            let plural = if count == 1 { "" } else { "s" };
            let _ = writeln!(
                out,
                "authentication: on (long-term credentials, {count} user{plural})"
            );
            if !self.auth_secrets.is_empty() {
                let n = self.auth_secrets.len();
                let _ = writeln!(
                    out,
                    "shared-secret credentials (TURN REST API): on, {n} secret{}",
                    if n == 1 { "" } else { "s" }
                );
            }
        } else {
            let _ = writeln!(
                out,
                "authentication: OFF (no-auth = true): anyone who reaches the server can relay"
            );
        }
        let _ = writeln!(out, "fingerprint: {}", on_off(self.fingerprint));
        let _ = writeln!(
            out,
            "allocation lifetime: default {} s, max {} s",
            self.default_allocate_lifetime, self.max_allocate_lifetime
        );
        let _ = writeln!(out, "nonce lifetime: {} s", self.stale_nonce);
        let _ = writeln!(
            out,
            "loopback peers: {}",
            if self.allow_loopback_peers {
                "allowed"
            } else {
                "refused"
            }
        );
        if self.software.is_empty() {
            let _ = writeln!(out, "software: none (no SOFTWARE attribute)");
        } else {
            let _ = writeln!(out, "software: {}", self.software);
        }
        let _ = writeln!(
            out,
            "log level: {} ({})",
            self.log_level,
            if self.log_json { "json" } else { "text" }
        );
        if self.workers == 0 {
            let _ = writeln!(out, "workers: one per CPU");
        } else {
            let _ = writeln!(out, "workers: {}", self.workers);
        }
        if !self.alternate_servers.is_empty() || !self.tls_alternate_servers.is_empty() {
            let _ = writeln!(
                out,
                "allocations redirected (300 Try Alternate) to: {:?} (udp, tcp), {:?} (tls, dtls)",
                self.alternate_servers, self.tls_alternate_servers
            );
        }
        let _ = writeln!(
            out,
            "udp segmentation offload: {}",
            if self.udp_gso {
                "where the kernel offers it"
            } else {
                "off"
            }
        );
        match self.prometheus {
            Some(addr) => {
                let _ = writeln!(out, "metrics and self-test page: http://{addr}/");
            }
            None => {
                let _ = writeln!(out, "metrics: off (no prometheus-port)");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../turnserver.toml.example");

    /// `top` followed by one user, so that authentication has someone to accept.
    fn with_users(top: &str) -> String {
        format!("{top}\n[users]\nalice = \"alice-password\"\n")
    }

    /// `top` followed by a concrete listening address and one user.
    fn valid(top: &str) -> String {
        with_users(&format!("{top}\nlistening-ips = [\"127.0.0.1\"]"))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("test address")
    }

    /// Parses `text`, expecting a refusal for `key` on `line`, whose message contains `needle`.
    #[track_caller]
    fn refused(text: &str, key: &str, line: Option<usize>, needle: &str) -> ConfigError {
        let err = match parse(text) {
            Ok(config) => panic!("accepted, expected a refusal for {key}: {config:?}"),
            Err(err) => err,
        };
        let message = err.to_string();
        assert_eq!(err.key(), Some(key), "key of: {message}");
        assert_eq!(err.line(), line, "line of: {message}");
        assert!(message.contains(key), "{message:?} does not name {key}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        if let (Some(line), ErrorKind::Invalid(_)) = (line, &err.kind) {
            assert!(
                message.starts_with(&format!("line {line}: ")),
                "{message:?} does not start with its line"
            );
        }
        err
    }

    #[test]
    fn defaults() {
        let config = parse(&valid("")).expect("minimal config");
        assert_eq!(config.listening_ips, vec![ip("127.0.0.1")]);
        assert_eq!(config.listening_port, 3478);
        assert!(!config.no_udp);
        assert!(!config.no_tcp);
        assert_eq!(config.relay_ips, vec![ip("127.0.0.1")]);
        assert!(config.external_ips.is_empty());
        assert_eq!((config.min_port, config.max_port), (49152, 65535));
        assert_eq!(config.realm, "turnserver.local");
        assert!(config.fingerprint);
        assert!(config.auth);
        assert_eq!(
            config.users,
            vec![(
                "alice".to_owned(),
                UserKey::Password("alice-password".into())
            )]
        );
        assert_eq!(config.max_allocate_lifetime, 3600);
        assert_eq!(config.default_allocate_lifetime, 600);
        assert_eq!(config.stale_nonce, 600);
        assert!(!config.allow_loopback_peers);
        assert_eq!(
            config.software,
            format!("turnserver {}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(config.log_level, "info");
    }

    #[test]
    fn default_listening_ip_is_the_ipv4_wildcard() {
        let config = parse(&with_users("relay-ips = [\"10.0.0.5\"]")).expect("valid");
        assert_eq!(config.listening_ips, vec![ip("0.0.0.0")]);
        assert_eq!(config.relay_ips, vec![ip("10.0.0.5")]);
    }

    #[test]
    fn every_key_set() {
        let text = r#"
listening-ips = ["10.0.0.5", "::1"]
listening-port = 3479
no-udp = true
no-tcp = false
relay-ips = ["10.0.0.5", "::1"]
external-ip = ["203.0.113.7/10.0.0.5"]
min-port = 40000
max-port = 40100
realm = "example.org"
fingerprint = false
lt-cred-mech = true
no-auth = false
max-allocate-lifetime = 7200
default-allocate-lifetime = 1200
stale-nonce = 300
allow-loopback-peers = true
software = ""
log-level = "debug"

[users]
zed = "z"
bob = "b"
"#;
        let config = parse(text).expect("valid");
        assert_eq!(config.listening_ips, vec![ip("10.0.0.5"), ip("::1")]);
        assert_eq!(config.listening_port, 3479);
        assert!(config.no_udp && !config.no_tcp);
        assert_eq!(config.relay_ips, vec![ip("10.0.0.5"), ip("::1")]);
        assert_eq!(
            config.external_ips,
            vec![ExternalIp {
                public: ip("203.0.113.7"),
                private: Some(ip("10.0.0.5"))
            }]
        );
        assert_eq!((config.min_port, config.max_port), (40000, 40100));
        assert_eq!(config.realm, "example.org");
        assert!(!config.fingerprint);
        assert!(config.auth);
        assert_eq!(config.max_allocate_lifetime, 7200);
        assert_eq!(config.default_allocate_lifetime, 1200);
        assert_eq!(config.stale_nonce, 300);
        assert!(config.allow_loopback_peers);
        assert_eq!(config.software, "");
        assert_eq!(config.log_level, "debug");
        let names: Vec<&str> = config.users.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["bob", "zed"]);
    }

    #[test]
    fn example_file_parses_as_the_local_demo() {
        let config = parse(EXAMPLE).unwrap_or_else(|err| panic!("example refused: {err}"));
        assert_eq!(config.listening_ips, vec![ip("127.0.0.1")]);
        assert_eq!(config.listening_port, 3478);
        assert_eq!(config.relay_ips, vec![ip("127.0.0.1")]);
        assert_eq!((config.min_port, config.max_port), (49152, 65535));
        assert_eq!(config.realm, "turnserver.local");
        assert!(config.fingerprint);
        assert!(config.auth);
        assert!(config.allow_loopback_peers);
        assert_eq!(
            config.users,
            vec![("demo".to_owned(), UserKey::Password("demo-password".into()))]
        );
    }

    #[test]
    fn tls_keys() {
        let base = "listening-ips = [\"127.0.0.1\"]\n[users]\na = \"b\"\n";
        let config = parse(base).unwrap();
        assert_eq!(config.tls_listening_port, 5349);
        assert_eq!(config.tls, None);
        let config = parse(&format!(
            "cert = \"/c.pem\"\npkey = \"/k.pem\"\ntls-listening-port = 443\n{base}"
        ))
        .unwrap();
        assert_eq!(config.tls_listening_port, 443);
        assert_eq!(
            config.tls,
            Some(TlsFiles {
                cert: "/c.pem".into(),
                pkey: "/k.pem".into()
            })
        );
        assert!(config.summary().contains("127.0.0.1:443 (tls)"));
        assert_eq!(config.dtls, config.tls);
        let off = parse(&format!(
            "cert = \"/c.pem\"\npkey = \"/k.pem\"\nno-tls = true\n{base}"
        ))
        .unwrap();
        assert_eq!(off.tls, None);
        assert!(off.dtls.is_some());
        let off = parse(&format!(
            "cert = \"/c.pem\"\npkey = \"/k.pem\"\nno-dtls = true\n{base}"
        ))
        .unwrap();
        assert!(off.tls.is_some());
        assert_eq!(off.dtls, None);
        let err = parse(&format!("\ncert = \"/c.pem\"\n{base}")).unwrap_err();
        assert_eq!(err.key(), Some("pkey"));
        assert_eq!(err.line(), Some(2));
        let err = parse(&format!("pkey = \"/k.pem\"\n{base}")).unwrap_err();
        assert_eq!(err.key(), Some("cert"));
        let err = parse(&format!("tls-listening-port = 3478\n{base}")).unwrap_err();
        assert_eq!(err.key(), Some("tls-listening-port"));
        assert_eq!(err.line(), Some(1));
        let err = parse(&format!("cert = \"\"\npkey = \"/k\"\n{base}")).unwrap_err();
        assert_eq!(err.key(), Some("cert"));
    }

    #[test]
    fn peer_lists_and_quotas() {
        let base = "listening-ips = [\"127.0.0.1\"]\n[users]\na = \"b\"\n";
        let c = parse(base).unwrap();
        assert_eq!((c.user_quota, c.total_quota, c.ip_quota), (0, 0, 0));
        assert_eq!((c.max_permissions, c.max_channels), (64, 64));
        assert!(c.allowed_peer_ips.is_empty() && c.denied_peer_ips.is_empty());
        let c = parse(&format!(
            "allowed-peer-ips = [\"10.1.0.0/16\", \"192.168.1.7\", \"fd00::/8\"]\n\
             denied-peer-ips = [\"10.1.2.0/24\"]\nuser-quota = 2\ntotal-quota = 100\n\
             ip-quota = 5\nmax-permissions = 10\nmax-channels = 8\n{base}"
        ))
        .unwrap();
        assert_eq!(
            c.allowed_peer_ips,
            vec![
                ("10.1.0.0".parse().unwrap(), 16),
                ("192.168.1.7".parse().unwrap(), 32),
                ("fd00::".parse().unwrap(), 8)
            ]
        );
        assert_eq!(c.denied_peer_ips, vec![("10.1.2.0".parse().unwrap(), 24)]);
        assert_eq!((c.user_quota, c.total_quota, c.ip_quota), (2, 100, 5));
        assert_eq!((c.max_permissions, c.max_channels), (10, 8));
        for (text, key) in [
            ("allowed-peer-ips = [\"10.0.0.0/33\"]", "allowed-peer-ips"),
            ("denied-peer-ips = [\"nope\"]", "denied-peer-ips"),
            ("max-channels = 0", "max-channels"),
            ("max-permissions = 5000", "max-permissions"),
        ] {
            let err = parse(&format!("\n{text}\n{base}")).unwrap_err();
            assert_eq!(err.key(), Some(key), "{text}");
            assert_eq!(err.line(), Some(2), "{text}");
        }
    }

    #[test]
    fn example_file_documents_every_key() {
        for key in [
            "listening-ips",
            "listening-port",
            "no-udp",
            "no-tcp",
            "tls-listening-port",
            "cert",
            "pkey",
            "no-tls",
            "no-dtls",
            "relay-ips",
            "external-ip",
            "min-port",
            "max-port",
            "realm",
            "fingerprint",
            "lt-cred-mech",
            "no-auth",
            "[users]",
            "max-allocate-lifetime",
            "default-allocate-lifetime",
            "stale-nonce",
            "allow-loopback-peers",
            "allowed-peer-ips",
            "denied-peer-ips",
            "user-quota",
            "total-quota",
            "ip-quota",
            "max-bps",
            "max-permissions",
            "max-channels",
            "max-connections",
            "idle-connection-timeout",
            "software",
            "log-level",
            "log-format",
            "prometheus-port",
            "prometheus-ip",
            "workers",
            "udp-gso",
            "use-auth-secret",
            "static-auth-secret",
            "alternate-servers",
            "tls-alternate-servers",
        ] {
            let assignment = format!("{key} =");
            let present = EXAMPLE.lines().any(|line| {
                let line = line.trim_start_matches('#').trim_start();
                line.starts_with(&assignment) || line == key
            });
            assert!(present, "{key} is not in turnserver.toml.example");
        }
    }

    #[test]
    fn example_file_commented_defaults_are_valid() {
        // Uncommenting a `# key = default` line must keep the example valid and unchanged.
        let uncommented: String = EXAMPLE
            .lines()
            .map(|line| match line.strip_prefix("# ") {
                Some(rest)
                    if [
                        "no-",
                        "relay-ips",
                        "lt-cred",
                        "stale",
                        "default-",
                        "max-allocate",
                        "log-",
                    ]
                    .iter()
                    .any(|prefix| rest.starts_with(prefix))
                        && rest.contains(" = ") =>
                {
                    rest
                }
                _ => line,
            })
            .collect::<Vec<_>>()
            .join("\n");
        assert_ne!(uncommented, EXAMPLE);
        let config = parse(&uncommented).unwrap_or_else(|err| panic!("refused: {err}"));
        let example = parse(EXAMPLE).expect("example parses");
        assert_eq!(config.summary(), example.summary());
    }

    #[test]
    fn listening_port_zero_refused() {
        refused(
            &valid("listening-port = 0"),
            "listening-port",
            Some(1),
            "is 0",
        );
    }

    #[test]
    fn listening_port_out_of_range_names_key() {
        let err = refused(
            &valid("\nlistening-port = 70000"),
            "listening-port",
            Some(2),
            "70000",
        );
        assert!(err.to_string().contains("TOML parse error at line 2"));
    }

    #[test]
    fn no_udp_and_no_tcp_refused() {
        refused(
            &valid("no-udp = true\nno-tcp = true"),
            "no-tcp",
            Some(2),
            "no-udp and no-tcp are both true",
        );
    }

    #[test]
    fn bad_listening_ip_names_key_and_value() {
        refused(
            &with_users("listening-ips = [\"127.0.0.1\", \"127.0.0.300\"]"),
            "listening-ips",
            Some(1),
            "\"127.0.0.300\" is not an IP address",
        );
    }

    #[test]
    fn bad_ip_on_a_later_line_of_an_array() {
        refused(
            &with_users("listening-ips = [\n  \"127.0.0.1\",\n  \"localhost\",\n]"),
            "listening-ips",
            Some(3),
            "\"localhost\"",
        );
    }

    #[test]
    fn listening_ips_empty_or_duplicated_refused() {
        refused(
            &with_users("listening-ips = []"),
            "listening-ips",
            Some(1),
            "is empty",
        );
        refused(
            &with_users("listening-ips = [\"::1\", \"::1\"]"),
            "listening-ips",
            Some(1),
            "::1 is listed twice",
        );
    }

    #[test]
    fn listening_ip_of_wrong_type_names_key() {
        refused(
            &with_users("listening-ips = [\n  \"127.0.0.1\",\n  7,\n]"),
            "listening-ips",
            Some(3),
            "invalid type: integer",
        );
    }

    #[test]
    fn relay_ips_wildcard_refused() {
        refused(
            &valid("relay-ips = [\"10.0.0.5\", \"0.0.0.0\"]"),
            "relay-ips",
            Some(1),
            "0.0.0.0 is a wildcard",
        );
        refused(
            &valid("relay-ips = [\"::\"]"),
            "relay-ips",
            Some(1),
            ":: is a wildcard",
        );
    }

    #[test]
    fn bad_relay_ip_names_key_and_value() {
        refused(
            &valid("relay-ips = [\"10.0.0.x\"]"),
            "relay-ips",
            Some(1),
            "\"10.0.0.x\" is not an IP address",
        );
    }

    #[test]
    fn relay_ips_required_on_wildcard() {
        let err = refused(
            &with_users("# comment\nlistening-ips = [\"0.0.0.0\", \"::\"]"),
            "relay-ips",
            Some(2),
            "relay-ips is required when listening on a wildcard address",
        );
        assert!(err.to_string().starts_with("line 2: "));
        // With the default listening address there is no line to point at.
        refused(
            &with_users(""),
            "relay-ips",
            None,
            "relay-ips is required when listening on a wildcard address",
        );
    }

    #[test]
    fn relay_ips_default_to_concrete_listening_ips() {
        let config = parse(&with_users(
            "listening-ips = [\"0.0.0.0\", \"10.0.0.5\", \"2001:db8::5\"]",
        ))
        .expect("valid");
        assert_eq!(config.relay_ips, vec![ip("10.0.0.5"), ip("2001:db8::5")]);
    }

    #[test]
    fn external_ip_single_string() {
        let config = parse(&valid("external-ip = \"203.0.113.7\"")).expect("valid");
        assert_eq!(
            config.external_ips,
            vec![ExternalIp {
                public: ip("203.0.113.7"),
                private: None
            }]
        );
        let config = parse(&valid("external-ip = \"203.0.113.7/127.0.0.1\"")).expect("valid");
        assert_eq!(
            config.external_ips,
            vec![ExternalIp {
                public: ip("203.0.113.7"),
                private: Some(ip("127.0.0.1"))
            }]
        );
    }

    #[test]
    fn external_ip_array() {
        let text = with_users(
            "listening-ips = [\"10.0.0.5\", \"10.0.0.6\", \"2001:db8:10::5\"]\n\
             external-ip = [\n\
               \"203.0.113.5/10.0.0.5\",\n\
               \"2001:db8::5/2001:db8:10::5\",\n\
               \"203.0.113.9\",\n\
             ]",
        );
        let config = parse(&text).expect("valid");
        assert_eq!(
            config.external_ips,
            vec![
                ExternalIp {
                    public: ip("203.0.113.5"),
                    private: Some(ip("10.0.0.5"))
                },
                ExternalIp {
                    public: ip("2001:db8::5"),
                    private: Some(ip("2001:db8:10::5"))
                },
                ExternalIp {
                    public: ip("203.0.113.9"),
                    private: None
                },
            ]
        );
        let config = parse(&valid("external-ip = []")).expect("valid");
        assert!(config.external_ips.is_empty());
    }

    #[test]
    fn external_ip_private_must_be_a_relay_ip() {
        refused(
            &valid("external-ip = \"203.0.113.7/10.0.0.9\""),
            "external-ip",
            Some(1),
            "private address 10.0.0.9 in \"203.0.113.7/10.0.0.9\" is not one of the relay IPs (127.0.0.1)",
        );
    }

    #[test]
    fn external_ip_at_most_one_entry_without_private() {
        refused(
            &valid("external-ip = [\n\"203.0.113.7\",\n\"203.0.113.8\",\n]"),
            "external-ip",
            Some(3),
            "both lack a private address",
        );
    }

    #[test]
    fn external_ip_families_must_match() {
        refused(
            &with_users("listening-ips = [\"10.0.0.5\"]\nexternal-ip = [\"2001:db8::7/10.0.0.5\"]"),
            "external-ip",
            Some(2),
            "same family",
        );
    }

    #[test]
    fn external_ip_without_private_must_match_unmapped_relay_families() {
        refused(
            &with_users(
                "listening-ips = [\"10.0.0.5\", \"2001:db8::5\"]\nexternal-ip = \"203.0.113.7\"",
            ),
            "external-ip",
            Some(2),
            "relay IP 2001:db8::5 is IPv6",
        );
    }

    #[test]
    fn external_ip_bad_address_names_value() {
        refused(
            &valid("external-ip = \"203.0.113.7/nat\""),
            "external-ip",
            Some(1),
            "\"nat\" in \"203.0.113.7/nat\" is not an IP address",
        );
        refused(
            &valid("external-ip = \"\""),
            "external-ip",
            Some(1),
            "is not an IP address",
        );
        refused(
            &valid("external-ip = \"0.0.0.0\""),
            "external-ip",
            Some(1),
            "cannot be advertised",
        );
    }

    #[test]
    fn external_ip_duplicates_refused() {
        refused(
            &valid("external-ip = [\"203.0.113.7/127.0.0.1\", \"203.0.113.8/127.0.0.1\"]"),
            "external-ip",
            Some(1),
            "private address 127.0.0.1 is mapped by both",
        );
        refused(
            &valid("external-ip = [\"203.0.113.7/127.0.0.1\", \"203.0.113.7\"]"),
            "external-ip",
            Some(1),
            "public address 203.0.113.7 appears in both",
        );
    }

    #[test]
    fn external_ip_of_wrong_type_names_key() {
        refused(
            &valid("external-ip = 7"),
            "external-ip",
            Some(1),
            "a string, or an array of strings",
        );
    }

    #[test]
    fn auth_secrets_parse_and_are_checked() {
        let one = parse(&valid("static-auth-secret = \"north\"")).expect("valid");
        assert_eq!(one.auth_secrets, vec![Secret("north".into())]);
        assert!(!format!("{one:?}").contains("north"));
        let two = parse(&valid(
            "static-auth-secret = [\"a\", \"b\"]\nuse-auth-secret = true",
        ))
        .expect("valid");
        assert_eq!(
            two.auth_secrets,
            vec![Secret("a".into()), Secret("b".into())]
        );
        assert!(
            two.summary()
                .contains("shared-secret credentials (TURN REST API): on, 2 secrets")
        );
        // Secrets alone are enough: [users] may be empty.
        let alone =
            parse("listening-ips = [\"127.0.0.1\"]\nstatic-auth-secret = \"s\"").expect("valid");
        assert!(alone.users.is_empty() && alone.auth);
        assert!(parse(&valid("")).expect("valid").auth_secrets.is_empty());
        for (text, key, line, needle) in [
            (
                "use-auth-secret = true",
                "use-auth-secret",
                Some(1),
                "needs static-auth-secret",
            ),
            (
                "use-auth-secret = false\nstatic-auth-secret = \"s\"",
                "use-auth-secret",
                Some(1),
                "remove one",
            ),
            (
                "static-auth-secret = [\"a\", \"\"]",
                "static-auth-secret",
                Some(1),
                "empty",
            ),
            (
                "static-auth-secret = 5",
                "static-auth-secret",
                Some(1),
                "a string",
            ),
        ] {
            refused(&valid(text), key, line, needle);
        }
        refused(
            "listening-ips = [\"127.0.0.1\"]\nno-auth = true\nstatic-auth-secret = \"s\"",
            "static-auth-secret",
            Some(3),
            "no-auth",
        );
    }

    #[test]
    fn min_port_greater_than_max_port_refused() {
        let err = refused(
            &valid("# ports\n\n\n\n\nmax-port = 50000\nmin-port = 60000"),
            "min-port",
            Some(7),
            "min-port (60000) is greater than max-port (50000)",
        );
        assert_eq!(
            err.to_string(),
            "line 7: min-port (60000) is greater than max-port (50000)"
        );
        // Only max-port written: the line points at it.
        refused(
            &valid("max-port = 40000"),
            "min-port",
            Some(1),
            "min-port (49152) is greater than max-port (40000)",
        );
    }

    #[test]
    fn min_port_below_1024_refused() {
        refused(&valid("min-port = 1023"), "min-port", Some(1), "below 1024");
        let config = parse(&valid("min-port = 1024\nmax-port = 1024")).expect("valid");
        assert_eq!((config.min_port, config.max_port), (1024, 1024));
    }

    #[test]
    fn realm_checks() {
        refused(&valid("realm = \"\""), "realm", Some(1), "realm is empty");
        let long = "r".repeat(764);
        refused(
            &valid(&format!("realm = \"{long}\"")),
            "realm",
            Some(1),
            "764 bytes",
        );
        let config = parse(&valid(&format!("realm = \"{}\"", "r".repeat(763)))).expect("valid");
        assert_eq!(config.realm.len(), 763);
        refused(
            &valid("realm = \"bad\\u0007realm\""),
            "realm",
            Some(1),
            "control character",
        );
    }

    #[test]
    fn lt_cred_mech_false_needs_no_auth() {
        let err = refused(
            &valid("lt-cred-mech = false"),
            "lt-cred-mech",
            Some(1),
            "needs the explicit no-auth = true",
        );
        assert!(err.to_string().starts_with("line 1: lt-cred-mech = false"));
    }

    #[test]
    fn lt_cred_mech_true_with_no_auth_refused() {
        refused(
            &valid("lt-cred-mech = true\nno-auth = true"),
            "no-auth",
            Some(2),
            "contradicts lt-cred-mech = true",
        );
    }

    #[test]
    fn no_auth_turns_authentication_off() {
        let config = parse("listening-ips = [\"127.0.0.1\"]\nno-auth = true").expect("valid");
        assert!(!config.auth);
        assert!(config.users.is_empty());
        let config = parse("listening-ips = [\"127.0.0.1\"]\nno-auth = true\nlt-cred-mech = false")
            .expect("valid");
        assert!(!config.auth);
        let config = parse(&valid("no-auth = false\nlt-cred-mech = true")).expect("valid");
        assert!(config.auth);
    }

    #[test]
    fn users_required_while_auth_is_on() {
        let message = "[users] is empty but authentication is on; add a user, set \
                       static-auth-secret, or set no-auth = true";
        refused(
            "listening-ips = [\"127.0.0.1\"]\n\n[users]\n",
            "users",
            Some(3),
            message,
        );
        refused("listening-ips = [\"127.0.0.1\"]\n", "users", None, message);
    }

    #[test]
    fn user_name_checks() {
        refused(
            "listening-ips = [\"127.0.0.1\"]\n[users]\n\"\" = \"pw\"",
            "users",
            Some(3),
            "a user name is empty",
        );
        refused(
            "listening-ips = [\"127.0.0.1\"]\n[users]\nok = \"pw\"\n\"a:b\" = \"pw\"",
            "users",
            Some(4),
            "contains ':'",
        );
        let long = "u".repeat(514);
        refused(
            &format!("listening-ips = [\"127.0.0.1\"]\n[users]\n{long} = \"pw\""),
            "users",
            Some(3),
            "514 bytes",
        );
        let name = "u".repeat(513);
        let config = parse(&format!(
            "listening-ips = [\"127.0.0.1\"]\n[users]\n{name} = \"pw\""
        ))
        .expect("valid");
        assert_eq!(config.users[0].0, name);
    }

    #[test]
    fn empty_password_refused() {
        refused(
            "listening-ips = [\"127.0.0.1\"]\n[users]\nbob = \"\"",
            "users.bob",
            Some(3),
            "the password is empty",
        );
    }

    #[test]
    fn password_of_wrong_type_names_user() {
        refused(
            "listening-ips = [\"127.0.0.1\"]\n[users]\nbob = 5",
            "users.bob",
            Some(3),
            "invalid type: integer",
        );
    }

    #[test]
    fn ha1_keys() {
        let text = "listening-ips = [\"127.0.0.1\"]\n[users]\n\
                    carol = \"0x00112233445566778899AABBCCDDEEFF\"\n\
                    bob = \"hunter2\"\n\
                    alice = \"0xbc807ee29df3c9ffa736523fb2c4e8ee\"\n";
        let config = parse(text).expect("valid");
        assert_eq!(
            config.users,
            vec![
                (
                    "alice".to_owned(),
                    UserKey::Ha1([
                        0xbc, 0x80, 0x7e, 0xe2, 0x9d, 0xf3, 0xc9, 0xff, 0xa7, 0x36, 0x52, 0x3f,
                        0xb2, 0xc4, 0xe8, 0xee
                    ])
                ),
                ("bob".to_owned(), UserKey::Password("hunter2".into())),
                (
                    "carol".to_owned(),
                    UserKey::Ha1([
                        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb,
                        0xcc, 0xdd, 0xee, 0xff
                    ])
                ),
            ]
        );
        // The HA1 key bytes never show in debug output.
        assert!(!format!("{config:?}").contains("hunter2"));
    }

    #[test]
    fn malformed_ha1_refused() {
        for bad in [
            "0x",
            "0x0011",
            "0x00112233445566778899aabbccddeeff00",
            "0x00112233445566778899aabbccddeeg0",
        ] {
            refused(
                &format!("listening-ips = [\"127.0.0.1\"]\n[users]\nbob = \"{bad}\""),
                "users.bob",
                Some(3),
                "32 hex digits",
            );
        }
        assert_eq!(decode_ha1("é0112233445566778899aabbccddeef"), None);
    }

    #[test]
    fn lifetime_checks() {
        refused(
            &valid("max-allocate-lifetime = 59"),
            "max-allocate-lifetime",
            Some(1),
            "max-allocate-lifetime (59) is less than 60 seconds",
        );
        refused(
            &valid("\ndefault-allocate-lifetime = 0"),
            "default-allocate-lifetime",
            Some(2),
            "default-allocate-lifetime (0) is less than 60 seconds",
        );
        refused(
            &valid("default-allocate-lifetime = 3601"),
            "default-allocate-lifetime",
            Some(1),
            "default-allocate-lifetime (3601) is greater than max-allocate-lifetime (3600)",
        );
        refused(
            &valid("max-allocate-lifetime = 300"),
            "default-allocate-lifetime",
            Some(1),
            "default-allocate-lifetime (600) is greater than max-allocate-lifetime (300)",
        );
        refused(
            &valid("stale-nonce = 0"),
            "stale-nonce",
            Some(1),
            "stale-nonce is 0",
        );
        refused(
            &valid("stale-nonce = -1"),
            "stale-nonce",
            Some(1),
            "invalid value",
        );
        let config = parse(&valid(
            "max-allocate-lifetime = 60\ndefault-allocate-lifetime = 60\nstale-nonce = 1",
        ))
        .expect("valid");
        assert_eq!(
            (
                config.max_allocate_lifetime,
                config.default_allocate_lifetime,
                config.stale_nonce
            ),
            (60, 60, 1)
        );
    }

    #[test]
    fn software_checks() {
        let config = parse(&valid("software = \"\"")).expect("valid");
        assert_eq!(config.software, "");
        let config = parse(&valid(&format!("software = \"{}\"", "s".repeat(763)))).expect("valid");
        assert_eq!(config.software.len(), 763);
        refused(
            &valid(&format!("software = \"{}\"", "s".repeat(764))),
            "software",
            Some(1),
            "764 bytes",
        );
    }

    #[test]
    fn log_format_and_metrics_listener() {
        let c = parse(&valid("")).expect("valid");
        assert!(!c.log_json);
        assert_eq!(c.prometheus, None);
        let c = parse(&valid("log-format = \"json\"\nprometheus-port = 9641")).expect("valid");
        assert!(c.log_json);
        assert_eq!(c.prometheus, Some("127.0.0.1:9641".parse().unwrap()));
        assert!(c.summary().contains("http://127.0.0.1:9641/"));
        let c = parse(&valid("prometheus-port = 9000\nprometheus-ip = \"::1\"")).expect("valid");
        assert_eq!(c.prometheus, Some("[::1]:9000".parse().unwrap()));
        refused(
            &valid("log-format = \"xml\""),
            "log-format",
            Some(1),
            "\"xml\" is not \"text\" or \"json\"",
        );
        refused(
            &valid("prometheus-port = 0"),
            "prometheus-port",
            Some(1),
            "leave the key out",
        );
        refused(
            &valid("prometheus-ip = \"127.0.0.1\""),
            "prometheus-ip",
            Some(1),
            "prometheus-port is not",
        );
        refused(
            &valid("prometheus-port = 1\nprometheus-ip = \"localhost\""),
            "prometheus-ip",
            Some(2),
            "localhost",
        );
    }

    #[test]
    fn restart_only_changes_are_named_and_kept() {
        let running = parse(&valid("min-port = 50000\nstale-nonce = 60")).expect("valid");
        let mut new = parse(&valid(
            "min-port = 50001\nstale-nonce = 120\nlog-format = \"json\"",
        ))
        .expect("valid");
        let keys: Vec<&str> = running
            .restart_only_changes(&new)
            .iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(keys, ["min-port", "log-format"]);
        new.keep_restart_only(&running);
        assert!(running.restart_only_changes(&new).is_empty());
        assert_eq!(
            (new.min_port, new.stale_nonce, new.log_json),
            (50000, 120, false)
        );
    }

    #[test]
    fn log_level_checks() {
        for level in LOG_LEVELS {
            let config = parse(&valid(&format!("log-level = \"{level}\""))).expect("valid");
            assert_eq!(config.log_level, level);
        }
        refused(
            &valid("log-level = \"verbose\""),
            "log-level",
            Some(1),
            "\"verbose\" is not one of error, warn, info, debug, trace",
        );
    }

    #[test]
    fn unknown_key_refused() {
        let err = parse(&valid("listening-port = 3478\nlisten-port = 3478")).expect_err("refused");
        let message = err.to_string();
        assert_eq!(err.key(), Some("listen-port"));
        assert_eq!(err.line(), Some(2));
        assert!(message.contains("unknown field `listen-port`"), "{message}");
        assert!(message.contains("TOML parse error at line 2"), "{message}");
        assert!(message.contains("`listening-port`"), "{message}");
    }

    #[test]
    fn unknown_table_refused() {
        let err = parse(&valid("[turn]\nport = 1\n")).expect_err("refused");
        let message = err.to_string();
        assert_eq!(err.key(), Some("turn"));
        assert!(message.contains("unknown field `turn`"), "{message}");
    }

    #[test]
    fn syntax_error_keeps_toml_text() {
        let err = parse("listening-port = 3478\nrealm = unquoted\n").expect_err("refused");
        let message = err.to_string();
        assert_eq!(err.line(), Some(2));
        assert!(
            message.contains("TOML parse error at line 2, column 9"),
            "{message}"
        );
        assert!(message.contains("realm = unquoted"), "{message}");
    }

    #[test]
    fn duplicate_key_refused() {
        let err = parse(&valid("min-port = 50000\nmin-port = 50001")).expect_err("refused");
        let message = err.to_string();
        assert_eq!(err.line(), Some(2));
        assert!(message.contains("duplicate key"), "{message}");
        assert!(message.contains("min-port"), "{message}");
    }

    #[test]
    fn load_reads_file_and_reports_path() {
        let dir =
            std::env::temp_dir().join(format!("turnserver-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");

        let good = dir.join("good.toml");
        std::fs::write(&good, EXAMPLE).expect("write");
        let config = load(&good).expect("example loads");
        assert_eq!(config.realm, "turnserver.local");

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, valid("min-port = 80")).expect("write");
        let err = load(&bad).expect_err("refused");
        assert_eq!(err.file(), Some(bad.as_path()));
        assert_eq!(
            err.to_string(),
            format!(
                "{}: line 1: min-port (80) is below 1024; relays do not use privileged ports",
                bad.display()
            )
        );

        let missing = dir.join("missing.toml");
        let err = load(&missing).expect_err("refused");
        let message = err.to_string();
        assert!(
            message.contains(&missing.display().to_string()),
            "{message}"
        );
        assert!(message.contains("os error"), "{message}");
        let source = std::error::Error::source(&err)
            .and_then(|source| source.downcast_ref::<std::io::Error>())
            .expect("the OS error is the source");
        assert_eq!(source.kind(), std::io::ErrorKind::NotFound);

        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn private_relays_without_external_ip_are_named() {
        let cfg = parse(&valid_at("10.0.0.5", "")).expect("valid");
        assert_eq!(cfg.unmapped_private_relays(), vec![ip("10.0.0.5")]);
        assert!(
            cfg.summary()
                .contains("warning: relay ip 10.0.0.5 is private")
        );
        let mapped = parse(&valid_at(
            "10.0.0.5",
            "external-ip = \"203.0.113.5/10.0.0.5\"",
        ))
        .expect("valid");
        assert!(mapped.unmapped_private_relays().is_empty());
        assert_eq!(mapped.advertised(ip("10.0.0.5")), ip("203.0.113.5"));
        let catch_all =
            parse(&valid_at("10.0.0.5", "external-ip = \"203.0.113.5\"")).expect("valid");
        assert!(catch_all.unmapped_private_relays().is_empty());
        for public_or_loopback in ["127.0.0.1", "192.0.2.1", "::1", "2001:db8::1"] {
            let cfg = parse(&valid_at(public_or_loopback, "")).expect("valid");
            assert!(
                cfg.unmapped_private_relays().is_empty(),
                "{public_or_loopback}"
            );
            assert!(!cfg.summary().contains("warning: relay ip"));
        }
        for private in [
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(is_private(ip(private)), "{private}");
        }
        for not in [
            "172.32.0.1",
            "100.128.0.1",
            "8.8.8.8",
            "2001:db8::1",
            "127.0.0.1",
        ] {
            assert!(!is_private(ip(not)), "{not}");
        }
    }

    #[test]
    fn rfc5780_pairs_and_why_not() {
        let two = |extra: &str| {
            with_users(&format!(
                "listening-ips = [\"192.0.2.1\", \"192.0.2.2\"]\n{extra}"
            ))
        };
        let c = parse(&two("")).expect("valid");
        assert!(c.rfc5780);
        assert_eq!((c.listening_port, c.alt_listening_port), (3478, 3479));
        assert_eq!(c.rfc5780().pairs, vec![(ip("192.0.2.1"), ip("192.0.2.2"))]);
        assert!(c.rfc5780().off.is_empty());
        assert!(
            c.summary().contains(
                "rfc 5780 nat discovery: 192.0.2.1 and 192.0.2.2, udp ports 3478 and 3479"
            )
        );
        assert!(
            c.summary()
                .contains("  192.0.2.2:3479 (udp, RFC 5780 alternate port)")
        );

        let c = parse(&two("rfc5780 = false")).expect("valid");
        assert!(c.rfc5780().pairs.is_empty());
        assert_eq!(c.rfc5780().off, ["off (rfc5780 = false)"]);
        let c = parse(&two("no-udp = true")).expect("valid");
        assert!(c.rfc5780().pairs.is_empty());
        assert!(c.rfc5780().off[0].contains("no-udp"));

        let c = parse(&valid("")).expect("valid");
        assert!(c.rfc5780().pairs.is_empty());
        assert!(c.rfc5780().off[0].contains("only IPv4 listening address"));
        assert!(
            c.summary()
                .contains("rfc 5780 nat discovery: not on 127.0.0.1")
        );

        // Pairs per family in file order; a wildcard and an odd one out are named.
        let c = parse(&with_users(
            "listening-ips = [\"0.0.0.0\", \"192.0.2.1\", \"2001:db8::1\", \"192.0.2.2\", \
             \"192.0.2.3\", \"2001:db8::2\"]",
        ))
        .expect("valid");
        let plan = c.rfc5780();
        assert_eq!(
            plan.pairs,
            vec![
                (ip("192.0.2.1"), ip("192.0.2.2")),
                (ip("2001:db8::1"), ip("2001:db8::2"))
            ]
        );
        assert_eq!(plan.off.len(), 2, "{:?}", plan.off);
        assert!(plan.off[0].contains("wildcard 0.0.0.0"), "{:?}", plan.off);
        assert!(plan.off[1].contains("192.0.2.3"), "{:?}", plan.off);

        // Advertised as two public addresses: served; as one: not.
        let c = parse(&two(
            "external-ip = [\"203.0.113.1/192.0.2.1\", \"203.0.113.2/192.0.2.2\"]",
        ))
        .expect("valid");
        assert_eq!(c.rfc5780().pairs.len(), 1);
        let c = parse(&two("external-ip = \"203.0.113.1\"")).expect("valid");
        assert!(c.rfc5780().pairs.is_empty());
        assert!(c.rfc5780().off[0].contains("advertises both as 203.0.113.1"));
    }

    #[test]
    fn alt_listening_port_checks() {
        let two = |extra: &str| {
            with_users(&format!(
                "listening-ips = [\"192.0.2.1\", \"192.0.2.2\"]\n{extra}"
            ))
        };
        let c = parse(&two("alt-listening-port = 4000")).expect("valid");
        assert_eq!(c.alt_listening_port, 4000);
        refused(
            &two("alt-listening-port = 3478"),
            "alt-listening-port",
            Some(2),
            "alt-listening-port 3478 is listening-port",
        );
        refused(
            &two("alt-listening-port = 5349"),
            "alt-listening-port",
            Some(2),
            "is tls-listening-port",
        );
        refused(
            &two("alt-listening-port = 0"),
            "alt-listening-port",
            Some(2),
            "alt-listening-port is 0",
        );
        refused(
            &two("alt-listening-port = 70000"),
            "alt-listening-port",
            Some(2),
            "invalid value",
        );
        // The default collides: named, with the way out.
        refused(
            &two("listening-port = 5348"),
            "alt-listening-port",
            Some(2),
            "5349 (listening-port + 1 by default) is tls-listening-port",
        );
        refused(
            &two("listening-port = 65535"),
            "alt-listening-port",
            Some(2),
            "beyond 65535",
        );
        // Where RFC 5780 cannot be served, a default that would collide refuses nothing; a
        // port written in the file is still checked.
        for ok in [
            valid("listening-port = 5348"),
            valid("listening-port = 65535"),
            two("listening-port = 5348\nrfc5780 = false"),
        ] {
            parse(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        refused(
            &valid("alt-listening-port = 3478"),
            "alt-listening-port",
            Some(1),
            "is listening-port",
        );
        refused(&two("rfc5780 = 1"), "rfc5780", Some(2), "invalid type");
    }

    #[test]
    fn rfc5780_keys_are_restart_only() {
        let two = "listening-ips = [\"192.0.2.1\", \"192.0.2.2\"]";
        let running = parse(&with_users(two)).expect("valid");
        let mut new = parse(&with_users(&format!(
            "{two}\nalt-listening-port = 4000\nrfc5780 = false"
        )))
        .expect("valid");
        let keys: Vec<&str> = running
            .restart_only_changes(&new)
            .iter()
            .map(|k| k.0)
            .collect();
        assert_eq!(keys, ["alt-listening-port", "rfc5780"]);
        new.keep_restart_only(&running);
        assert!(running.restart_only_changes(&new).is_empty());
    }

    /// A valid configuration listening (and relaying) on `addr`, with `extra` keys.
    fn valid_at(addr: &str, extra: &str) -> String {
        with_users(&format!("listening-ips = [\"{addr}\"]\n{extra}"))
    }

    #[test]
    fn summary_describes_the_server() {
        let text = with_users(
            "listening-ips = [\"10.0.0.5\", \"::1\"]\nno-tcp = true\n\
             external-ip = [\"203.0.113.5/10.0.0.5\"]",
        );
        let summary = parse(&text).expect("valid").summary();
        for needle in [
            "10.0.0.5:3478 (udp)",
            "[::1]:3478 (udp)",
            "relay ips: 10.0.0.5, ::1",
            "relay ports: 49152-65535 (16384 ports)",
            "10.0.0.5 advertised as 203.0.113.5",
            "realm: turnserver.local",
            "authentication: on (long-term credentials, 1 user)",
            "allocation lifetime: default 600 s, max 3600 s",
            "nonce lifetime: 600 s",
            "loopback peers: refused",
        ] {
            assert!(summary.contains(needle), "{needle:?} not in:\n{summary}");
        }

        let summary = parse(EXAMPLE).expect("valid").summary();
        assert!(summary.contains("127.0.0.1:3478 (udp, tcp)"), "{summary}");
        assert!(summary.contains("external-ip: none"), "{summary}");
        assert!(summary.contains("loopback peers: allowed"), "{summary}");

        let summary = parse("listening-ips = [\"127.0.0.1\"]\nno-auth = true\nsoftware = \"\"")
            .expect("valid")
            .summary();
        assert!(summary.contains("authentication: OFF"), "{summary}");
        assert!(summary.contains("software: none"), "{summary}");
    }
}
