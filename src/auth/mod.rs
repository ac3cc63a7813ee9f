//! Long-term credentials (RFC 8489 9.2) and stateless nonces.
//!
//! * [`long_term_key`]: key = MD5(username ":" realm ":" password) (RFC 8489 9.2.2).
//! * [`Users`]: the realm and the user table, holding keys only (plain passwords are hashed at
//!   load time and dropped).
//! * [`NonceMint`]: nonces that need no table. A nonce is its expiry time and a truncated
//!   HMAC-SHA1 over that time and the client's transport address (IP and port) under a
//!   per-process secret, so checking one is a MAC computation and a comparison in constant
//!   time. RFC 8489 9.2 asks for nonces limited in time, and 9.2.4 for a nonce never used for
//!   two source addresses and ports.
//!
//! No clock is read here: times are seconds passed in by the caller.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;

/// The long-term key of RFC 8489 9.2.2 for the MD5 password algorithm.
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// The realm, the keys of the users allowed to allocate, and the shared secrets that mint
/// TURN REST API credentials.
#[derive(Clone)]
pub struct Users {
    realm: Box<str>,
    keys: HashMap<Box<str>, [u8; 16]>,
    secrets: Vec<Box<[u8]>>,
}

/// What [`Users::verify`] found for a username and a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The message is signed with this key.
    Valid([u8; 16]),
    /// Neither a configured user nor (with shared secrets) a REST username.
    UnknownUser,
    /// A REST username whose expiry (Unix seconds) has passed.
    Expired(u64),
    /// A known user or a live REST username, but no key signs the message.
    BadIntegrity,
}

/// The password of a TURN REST API credential: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &[u8], username: &str) -> String {
    use base64::Engine;
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// The username of a TURN REST API credential: `EXPIRY` or `EXPIRY:USER`.
pub fn rest_username(expiry: u64, user: Option<&str>) -> String {
    match user {
        Some(u) if !u.is_empty() => format!("{expiry}:{u}"),
        _ => expiry.to_string(),
    }
}

/// The expiry of a REST username (`EXPIRY[:USER]`, EXPIRY in decimal Unix seconds), if it is
/// one.
pub fn rest_expiry(username: &str) -> Option<u64> {
    let digits = username.split_once(':').map_or(username, |(t, _)| t);
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users")
            .field("realm", &self.realm)
            .field("count", &self.keys.len())
            .finish()
    }
}

impl Users {
    pub fn new(realm: &str) -> Self {
        Users {
            realm: realm.into(),
            keys: HashMap::new(),
            secrets: Vec::new(),
        }
    }

    /// Accepts TURN REST API credentials minted from `secret` (see [`rest_password`]).
    pub fn add_secret(&mut self, secret: &str) {
        self.secrets.push(secret.as_bytes().into());
    }

    /// Whether shared secrets are configured.
    pub fn has_secrets(&self) -> bool {
        !self.secrets.is_empty()
    }

    /// Checks the credentials of a signed message from `username`: a configured user first;
    /// otherwise, with shared secrets, a REST username that has not expired at `unix_now`,
    /// under each secret in turn. `signed_with` tells whether the message's integrity verifies
    /// under a key.
    pub fn verify(
        &self,
        username: &str,
        unix_now: u64,
        signed_with: impl Fn(&[u8; 16]) -> bool,
    ) -> Verdict {
        if let Some(key) = self.keys.get(username) {
            return if signed_with(key) {
                Verdict::Valid(*key)
            } else {
                Verdict::BadIntegrity
            };
        }
        if self.secrets.is_empty() {
            return Verdict::UnknownUser;
        }
        let Some(expiry) = rest_expiry(username) else {
            return Verdict::UnknownUser;
        };
        if expiry <= unix_now {
            return Verdict::Expired(expiry);
        }
        for secret in &self.secrets {
            let key = long_term_key(username, &self.realm, &rest_password(secret, username));
            if signed_with(&key) {
                return Verdict::Valid(key);
            }
        }
        Verdict::BadIntegrity
    }

    /// Adds a user with a plain password (hashed here, not kept).
    pub fn add_password(&mut self, name: &str, password: &str) {
        let key = long_term_key(name, &self.realm, password);
        self.keys.insert(name.into(), key);
    }

    /// Adds a user by its precomputed key.
    pub fn add_key(&mut self, name: &str, key: [u8; 16]) {
        self.keys.insert(name.into(), key);
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn key(&self, name: &str) -> Option<&[u8; 16]> {
        self.keys.get(name)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Length of a nonce issued by [`NonceMint`]: 8 hex digits of expiry, 24 of MAC.
pub const NONCE_LEN: usize = 32;

/// What [`NonceMint::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceCheck {
    Valid,
    /// Expired, issued to another address, or not one of ours: the client gets 438 and a
    /// fresh nonce.
    Stale,
}

/// Issues and checks stateless nonces.
#[derive(Clone)]
pub struct NonceMint {
    secret: [u8; 32],
    lifetime: u32,
}

impl NonceMint {
    /// `secret` must come from a cryptographic random source; `lifetime` is the `stale-nonce`
    /// setting in seconds.
    pub fn new(secret: [u8; 32], lifetime: u32) -> Self {
        NonceMint { secret, lifetime }
    }

    fn mac(&self, expiry: u32, client: SocketAddr) -> Hmac<Sha1> {
        // A 32-byte key always fits HMAC; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(&self.secret)
            .expect("HMAC accepts keys of any length");
        mac.update(&expiry.to_be_bytes());
        match client.ip() {
            IpAddr::V4(a) => mac.update(&a.octets()),
            IpAddr::V6(a) => mac.update(&a.octets()),
        }
        mac.update(&client.port().to_be_bytes());
        mac
    }

    /// Changes how long nonces issued from now on stay valid. Nonces already issued with a
    /// longer life are then refused as stale (438), and their clients retry with a new one.
    pub fn set_lifetime(&mut self, lifetime: u32) {
        self.lifetime = lifetime;
    }

    /// Writes a nonce valid until `now + lifetime` for the client at `client`.
    pub fn issue(&self, now: u64, client: SocketAddr, out: &mut [u8; NONCE_LEN]) {
        let expiry = (now + self.lifetime as u64).min(u32::MAX as u64) as u32;
        let tag = self.mac(expiry, client).finalize().into_bytes();
        hex_into(&expiry.to_be_bytes(), &mut out[..8]);
        hex_into(&tag[..12], &mut out[8..]);
    }

    /// Checks a nonce received from the client at `client` at time `now`.
    pub fn check(&self, nonce: &[u8], now: u64, client: SocketAddr) -> NonceCheck {
        let mut raw = [0u8; NONCE_LEN / 2];
        if nonce.len() != NONCE_LEN || !unhex_into(nonce, &mut raw) {
            return NonceCheck::Stale;
        }
        let expiry = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        if self
            .mac(expiry, client)
            .verify_truncated_left(&raw[4..])
            .is_err()
        {
            return NonceCheck::Stale;
        }
        if (expiry as u64) <= now || expiry as u64 > now + self.lifetime as u64 {
            return NonceCheck::Stale;
        }
        NonceCheck::Valid
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
}

fn unhex_into(text: &[u8], out: &mut [u8]) -> bool {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        match (nibble(pair[0]), nibble(pair[1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn rest_credentials_match_an_independent_computation() {
        // Computed with Python's hmac, hashlib and base64 modules.
        assert_eq!(
            rest_password(b"north", "1700000000:alice"),
            "Cd/49soE35ICqcJF/bCTn8Z4OyE="
        );
        assert_eq!(
            rest_username(1_700_000_000, Some("alice")),
            "1700000000:alice"
        );
        assert_eq!(rest_username(1_700_000_000, None), "1700000000");
        assert_eq!(rest_expiry("1700000000:alice"), Some(1_700_000_000));
        assert_eq!(rest_expiry("1700000000"), Some(1_700_000_000));
        assert_eq!(rest_expiry("1700000000:a:b"), Some(1_700_000_000));
        for not in [
            "alice",
            ":alice",
            "17x:alice",
            "",
            "-5:alice",
            "99999999999999999999999",
        ] {
            assert_eq!(rest_expiry(not), None, "{not:?}");
        }
    }

    #[test]
    fn verify_tries_users_then_each_secret_and_refuses_expired_names() {
        let mut users = Users::new("example.org");
        users.add_password("bob", "pw");
        let bob = long_term_key("bob", "example.org", "pw");
        assert_eq!(users.verify("bob", 0, |k| *k == bob), Verdict::Valid(bob));
        assert_eq!(users.verify("bob", 0, |_| false), Verdict::BadIntegrity);
        // No secrets: a REST-shaped name is just an unknown user.
        assert_eq!(
            users.verify("1700000000:alice", 0, |_| true),
            Verdict::UnknownUser
        );

        users.add_secret("old");
        users.add_secret("north");
        let name = "1700000000:alice";
        let key = long_term_key(name, "example.org", &rest_password(b"north", name));
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "d9a6a3d964467baeffd2fce41704a913");
        let now = 1_699_999_000;
        assert_eq!(users.verify(name, now, |k| *k == key), Verdict::Valid(key));
        assert_eq!(users.verify(name, now, |_| false), Verdict::BadIntegrity);
        assert_eq!(
            users.verify(name, 1_700_000_000, |k| *k == key),
            Verdict::Expired(1_700_000_000)
        );
        assert_eq!(users.verify("carol", now, |_| true), Verdict::UnknownUser);
        // A static user named like a REST credential is the static user.
        users.add_password("1700000000:alice", "static");
        assert_eq!(
            users.verify(name, now, |k| *k == key),
            Verdict::BadIntegrity
        );
    }

    use super::*;

    #[test]
    fn key_matches_rfc5769_example() {
        // RFC 5769 2.4's credentials; the key is checked against the vector's
        // MESSAGE-INTEGRITY in the codec tests. Here: a plain ASCII case.
        let k = long_term_key("user", "realm", "pass");
        let mut h = Md5::new();
        h.update(b"user:realm:pass");
        let want: [u8; 16] = h.finalize().into();
        assert_eq!(k, want);
    }

    #[test]
    fn users_hold_keys() {
        let mut u = Users::new("example.org");
        u.add_password("alice", "secret");
        u.add_key("bob", [7; 16]);
        assert_eq!(
            u.key("alice"),
            Some(&long_term_key("alice", "example.org", "secret"))
        );
        assert_eq!(u.key("bob"), Some(&[7; 16]));
        assert_eq!(u.key("carol"), None);
        assert_eq!(u.len(), 2);
    }

    #[test]
    fn nonce_valid_then_stale() {
        let mint = NonceMint::new([9; 32], 600);
        let ip: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let mut n = [0u8; NONCE_LEN];
        mint.issue(1000, ip, &mut n);
        assert!(n.iter().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(mint.check(&n, 1000, ip), NonceCheck::Valid);
        assert_eq!(mint.check(&n, 1599, ip), NonceCheck::Valid);
        assert_eq!(mint.check(&n, 1600, ip), NonceCheck::Stale);
        // Bound to the client's address and port, and to the secret.
        let other: SocketAddr = "192.0.2.2:5000".parse().unwrap();
        assert_eq!(mint.check(&n, 1000, other), NonceCheck::Stale);
        let other_port: SocketAddr = "192.0.2.1:5001".parse().unwrap();
        assert_eq!(mint.check(&n, 1000, other_port), NonceCheck::Stale);
        let mint2 = NonceMint::new([8; 32], 600);
        assert_eq!(mint2.check(&n, 1000, ip), NonceCheck::Stale);
        // Tampered, truncated, garbage.
        let mut t = n;
        t[0] = if t[0] == b'f' { b'e' } else { b'f' };
        assert_eq!(mint.check(&t, 1000, ip), NonceCheck::Stale);
        assert_eq!(mint.check(&n[..31], 1000, ip), NonceCheck::Stale);
        assert_eq!(mint.check(&[b'z'; 32], 1000, ip), NonceCheck::Stale);
    }
}
