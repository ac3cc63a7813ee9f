//! Requests over the control connection: transactions, long-term credentials (RFC 8489 9.2)
//! and the probe's reading of the server's answers.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::auth::long_term_key;
use crate::wire::{
    AttrType, Class, ErrorCode, FAMILY_IPV6, MessageRef, MessageWriter, Method, PROTO_UDP,
    TransactionId, decode_address,
};

use super::conn::{Control, NetError};

/// Why the probe failed, as a sentence for the operator.
#[derive(Debug, Clone)]
pub struct Fail {
    pub reason: String,
    /// The control connection is unusable (no answer, closed): no clean-up is attempted.
    pub dead: bool,
}

impl Fail {
    pub fn new(reason: impl Into<String>) -> Fail {
        Fail {
            reason: reason.into(),
            dead: false,
        }
    }

    fn dead(reason: impl Into<String>) -> Fail {
        Fail {
            reason: reason.into(),
            dead: true,
        }
    }
}

/// Text the server sent (reason phrases, realms, SOFTWARE), made safe to print on one line:
/// control characters replaced, length bounded.
pub fn clean(s: &str) -> String {
    let mut out: String = s
        .chars()
        .take(200)
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect();
    if s.chars().nth(200).is_some() {
        out.push('…');
    }
    out
}

/// A fresh random transaction ID.
pub fn new_txid() -> Result<TransactionId, Fail> {
    let mut t = [0u8; 12];
    getrandom::fill(&mut t)
        .map_err(|e| Fail::new(format!("cannot get random bytes for a transaction ID: {e}")))?;
    Ok(TransactionId(t))
}

/// The name of a method as the RFCs write it.
pub fn method_name(m: Method) -> &'static str {
    match m {
        Method::BINDING => "Binding",
        Method::ALLOCATE => "Allocate",
        Method::REFRESH => "Refresh",
        Method::CREATE_PERMISSION => "CreatePermission",
        Method::CHANNEL_BIND => "ChannelBind",
        _ => "request",
    }
}

/// The error code and reason phrase of an error response (the standard phrase when the
/// server sent none).
pub fn error_of(m: &MessageRef) -> Result<(u16, String), Fail> {
    match m.error_code() {
        Ok(Some((code, reason))) => {
            let reason = if reason.trim().is_empty() {
                ErrorCode(code).reason().to_string()
            } else {
                clean(reason)
            };
            Ok((code, reason))
        }
        Ok(None) => Err(Fail::new(format!(
            "the server answered {} with an error response without ERROR-CODE",
            method_name(m.method())
        ))),
        Err(e) => Err(Fail::new(format!(
            "the server answered {} with a malformed ERROR-CODE ({e})",
            method_name(m.method())
        ))),
    }
}

/// A sentence for an error response the probe has no special reading for.
pub fn refused(method: Method, code: u16, reason: &str, m: &MessageRef) -> String {
    let name = method_name(method);
    let hint = match code {
        300 => match m.get(AttrType::ALTERNATE_SERVER).map(decode_address) {
            Some(Ok(a)) => format!(": the server redirects to {a}; probe that address"),
            _ => ": the server redirects to another server".into(),
        },
        420 => ": the server does not understand an attribute the probe sent".into(),
        437 => ": the server already has an allocation for the probe's address and port".into(),
        440 => ": the server cannot relay this address family".into(),
        442 => ": the server does not relay UDP".into(),
        486 => ": the allocation quota of this user is reached".into(),
        508 => ": the server has no relay capacity (ports) left".into(),
        _ => String::new(),
    };
    format!("{name} refused: {code} {reason}{hint}")
}

/// Long-term credentials in use: the realm and nonce the server gave, and the key.
struct Auth {
    user: String,
    realm: String,
    nonce: Vec<u8>,
    key: [u8; 16],
}

/// What the Allocate step found.
pub struct Allocation {
    pub relayed: SocketAddr,
    pub lifetime: Option<u32>,
    /// The realm, when the server asked for credentials.
    pub realm: Option<String>,
    pub software: Option<String>,
}

/// The answer to a request: the success response, or an error response the caller reads.
pub enum Answer {
    Success,
    Error {
        code: u16,
        reason: String,
        message: Vec<u8>,
    },
}

/// The probe's side of the conversation with the server.
pub struct Session {
    pub ctl: Control,
    /// `HOST:PORT` as given.
    pub label: String,
    /// The per-step timeout, and how the operator wrote it (for messages).
    pub timeout: Duration,
    pub timeout_text: String,
    credentials: Option<(String, String)>,
    expected_realm: Option<String>,
    auth: Option<Auth>,
}

impl Session {
    pub fn new(
        ctl: Control,
        label: String,
        timeout: Duration,
        timeout_text: String,
        credentials: Option<(String, String)>,
        expected_realm: Option<String>,
    ) -> Session {
        Session {
            ctl,
            label,
            timeout,
            timeout_text,
            credentials,
            expected_realm,
            auth: None,
        }
    }

    /// The deadline of a step starting now.
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// A failure of the control connection, in words.
    pub fn net_fail(&self, e: NetError, name: &str) -> Fail {
        let transport = self.ctl.transport().name();
        match e {
            NetError::Timeout => {
                let mut s = format!(
                    "no answer from {} over {transport} within {} s: is the server running and the port open?",
                    self.label, self.timeout_text
                );
                if self.ctl.port_unreachable {
                    s.push_str(
                        " (ICMP port unreachable came back: nothing listens on that UDP port)",
                    );
                } else if name != "Binding" {
                    s.push_str(&format!(" (waiting for the answer to {name})"));
                }
                Fail::dead(s)
            }
            NetError::Closed => Fail::dead(format!(
                "the server closed the {transport} connection during {name}"
            )),
            NetError::Garbage => Fail::dead(format!(
                "the server sent bytes that are neither STUN nor ChannelData over {transport} during {name}"
            )),
            NetError::Io(e) => Fail::dead(format!(
                "{name}: {transport} socket error talking to {}: {e}",
                self.label
            )),
        }
    }

    /// One transaction: writes the request (signed if `auth`), returns the raw response.
    fn transaction(
        &mut self,
        method: Method,
        add: &dyn Fn(&mut MessageWriter),
        signed: bool,
        deadline: Instant,
    ) -> Result<Vec<u8>, Fail> {
        let txid = new_txid()?;
        let mut buf = vec![0u8; 1024];
        let mut w = MessageWriter::new(&mut buf, method, Class::Request, &txid);
        add(&mut w);
        if let Some(a) = self.auth.as_ref().filter(|_| signed) {
            w.add(AttrType::USERNAME, a.user.as_bytes())
                .add(AttrType::REALM, a.realm.as_bytes())
                .add(AttrType::NONCE, &a.nonce)
                .add_integrity(&a.key);
        }
        w.add_fingerprint();
        let Some(n) = w.finish() else {
            return Err(Fail::new(format!(
                "the {} request does not fit in a message (username, realm or nonce too long)",
                method_name(method)
            )));
        };
        buf.truncate(n);
        let r = self
            .ctl
            .transact(&buf, &txid, deadline)
            .map_err(|e| self.net_fail(e, method_name(method)))?;
        // A malformed answer is a failure, not something to wait past.
        if let Err(e) = MessageRef::parse(&r) {
            return Err(Fail::new(format!(
                "the answer to {} is not a well-formed STUN message ({e})",
                method_name(method)
            )));
        }
        Ok(r)
    }

    /// A Binding request without credentials: the XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS) of
    /// the answer.
    pub fn binding(&mut self, deadline: Instant) -> Result<SocketAddr, Fail> {
        let r = self.transaction(Method::BINDING, &|_| {}, false, deadline)?;
        let Ok(m) = MessageRef::parse(&r) else {
            return Err(Fail::new("unparsable answer"));
        };
        if m.class() == Class::Error {
            let (code, reason) = error_of(&m)?;
            return Err(Fail::new(refused(Method::BINDING, code, &reason, &m)));
        }
        match m.xor_address(AttrType::XOR_MAPPED_ADDRESS) {
            Ok(Some(a)) => Ok(a),
            Err(e) => Err(Fail::new(format!(
                "the Binding response has a malformed XOR-MAPPED-ADDRESS ({e})"
            ))),
            Ok(None) => match m.get(AttrType::MAPPED_ADDRESS).map(decode_address) {
                Some(Ok(a)) => Ok(a),
                _ => Err(Fail::new(
                    "the Binding response carries no XOR-MAPPED-ADDRESS",
                )),
            },
        }
    }

    /// Checks the MESSAGE-INTEGRITY of an answer to a signed request; `required` for success
    /// responses, which the server must sign (RFC 8489 9.2.4).
    fn check_integrity(&self, m: &MessageRef, required: bool) -> Result<(), Fail> {
        let Some(a) = &self.auth else { return Ok(()) };
        let name = method_name(m.method());
        match m.integrity() {
            None if required => Err(Fail::new(format!(
                "the {name} response carries no MESSAGE-INTEGRITY although the request was signed"
            ))),
            None => Ok(()),
            Some(_) if m.verify(&a.key) => Ok(()),
            Some(_) => Err(Fail::new(format!(
                "the {name} response fails its MESSAGE-INTEGRITY check: it was not signed with the key of {} in realm {} (a middlebox changed it, or another server answered)",
                a.user,
                clean(&a.realm)
            ))),
        }
    }

    /// A signed request (after [`Self::allocate`] set up credentials): retried once with the
    /// new nonce on 438 Stale Nonce. Success responses must pass the integrity check.
    pub fn request(
        &mut self,
        method: Method,
        add: &dyn Fn(&mut MessageWriter),
        deadline: Instant,
    ) -> Result<Answer, Fail> {
        let mut stale = 0;
        loop {
            let r = self.transaction(method, add, true, deadline)?;
            let Ok(m) = MessageRef::parse(&r) else {
                return Err(Fail::new("unparsable answer"));
            };
            if m.class() == Class::Success {
                self.check_integrity(&m, true)?;
                return Ok(Answer::Success);
            }
            let (code, reason) = error_of(&m)?;
            if code == 438
                && stale == 0
                && let Ok(Some(nonce)) = m.nonce()
                && let Some(a) = self.auth.as_mut()
            {
                a.nonce = nonce.to_vec();
                stale += 1;
                continue;
            }
            if code == 438 && stale > 0 {
                return Err(Fail::new(format!(
                    "{} refused with 438 Stale Nonce again right after a fresh nonce: the server does not accept the nonces it issues (a clock problem, or a load balancer spreading one client over several servers)",
                    method_name(method)
                )));
            }
            if code != 401 {
                self.check_integrity(&m, false)?;
            }
            return Ok(Answer::Error {
                code,
                reason,
                message: r,
            });
        }
    }

    /// Allocate a UDP relay (IPv6 when `ipv6`): first without credentials, expecting 401 with
    /// REALM and NONCE, then with them; 438 retried once.
    pub fn allocate(&mut self, ipv6: bool, deadline: Instant) -> Result<Allocation, Fail> {
        let add = move |w: &mut MessageWriter| {
            w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24);
            if ipv6 {
                w.add_u32(
                    AttrType::REQUESTED_ADDRESS_FAMILY,
                    u32::from(FAMILY_IPV6) << 24,
                );
            }
        };
        let r = self.transaction(Method::ALLOCATE, &add, false, deadline)?;
        let Ok(m) = MessageRef::parse(&r) else {
            return Err(Fail::new("unparsable answer"));
        };
        if m.class() == Class::Success {
            return allocation(&m, None);
        }
        let (code, reason) = error_of(&m)?;
        if code != 401 {
            return Err(Fail::new(refused(Method::ALLOCATE, code, &reason, &m)));
        }
        let realm = self.challenge(&m)?;
        let Some((user, password)) = self.credentials.clone() else {
            return Err(Fail::new(format!(
                "the server requires credentials (401 Unauthorized, realm {}): give --user and --password",
                clean(&realm)
            )));
        };
        let Ok(Some(nonce)) = m.nonce() else {
            return Err(Fail::new("the 401 challenge carries no NONCE"));
        };
        self.auth = Some(Auth {
            key: long_term_key(&user, &realm, &password),
            user,
            realm,
            nonce: nonce.to_vec(),
        });

        // Signed attempts: a 401 with the nonce just used means the credentials are wrong; a
        // 401 with a new nonce is retried (some servers rotate nonces that way), but not
        // forever.
        let mut new_nonces = 0;
        let mut stale = 0;
        loop {
            let sent_nonce = self.auth.as_ref().map(|a| a.nonce.clone());
            let r = self.transaction(Method::ALLOCATE, &add, true, deadline)?;
            let Ok(m) = MessageRef::parse(&r) else {
                return Err(Fail::new("unparsable answer"));
            };
            if m.class() == Class::Success {
                self.check_integrity(&m, true)?;
                let realm = self.auth.as_ref().map(|a| a.realm.clone());
                return allocation(&m, realm);
            }
            let (code, reason) = error_of(&m)?;
            let realm = self
                .auth
                .as_ref()
                .map_or(String::new(), |a| clean(&a.realm));
            let user = self.auth.as_ref().map_or(String::new(), |a| a.user.clone());
            match code {
                438 if stale == 0 => {
                    stale += 1;
                    self.challenge(&m)?;
                    self.take_nonce(&m)?;
                }
                438 => {
                    return Err(Fail::new(
                        "Allocate refused with 438 Stale Nonce again right after a fresh nonce: the server does not accept the nonces it issues (a clock problem, or a load balancer spreading one client over several servers)",
                    ));
                }
                401 => {
                    let nonce = m.nonce().ok().flatten();
                    let fresh = nonce.is_some_and(|n| Some(n) != sent_nonce.as_deref());
                    if !fresh {
                        return Err(Fail::new(format!(
                            "wrong username or password for realm {realm}: the server refused the credentials of {user} (401 {reason})"
                        )));
                    }
                    new_nonces += 1;
                    if new_nonces > 2 {
                        return Err(Fail::new(format!(
                            "401 loop: the server answered {} signed Allocate requests with 401 {reason}, each time with a new nonce; the username or password of {user} may be wrong for realm {realm}, or the server does not accept the nonces it issues",
                            new_nonces
                        )));
                    }
                    self.challenge(&m)?;
                    self.take_nonce(&m)?;
                }
                _ => {
                    self.check_integrity(&m, false)?;
                    return Err(Fail::new(refused(Method::ALLOCATE, code, &reason, &m)));
                }
            }
        }
    }

    /// Reads the REALM of a 401 or 438 and checks it against `--realm`; a changed realm
    /// changes the key.
    fn challenge(&mut self, m: &MessageRef) -> Result<String, Fail> {
        let realm = match m.realm() {
            Ok(Some(r)) => r.to_string(),
            Ok(None) | Err(_) => {
                let (code, _) = error_of(m)?;
                return Err(Fail::new(format!(
                    "the server answered Allocate with {code} but without a usable REALM: not a long-term credential challenge"
                )));
            }
        };
        if let Some(want) = &self.expected_realm
            && *want != realm
        {
            return Err(Fail::new(format!(
                "wrong realm: the server's realm is {:?}, not {want:?} as --realm says",
                clean(&realm)
            )));
        }
        if let (Some(a), Some((_, password))) = (self.auth.as_mut(), &self.credentials)
            && a.realm != realm
        {
            a.key = long_term_key(&a.user, &realm, password);
            a.realm = realm.clone();
        }
        Ok(realm)
    }

    fn take_nonce(&mut self, m: &MessageRef) -> Result<(), Fail> {
        let Ok(Some(nonce)) = m.nonce() else {
            return Err(Fail::new("the server's challenge carries no usable NONCE"));
        };
        if let Some(a) = self.auth.as_mut() {
            a.nonce = nonce.to_vec();
        }
        Ok(())
    }

    /// The user whose credentials are in use, if the server asked for them.
    pub fn user(&self) -> Option<&str> {
        self.auth.as_ref().map(|a| a.user.as_str())
    }
}

fn allocation(m: &MessageRef, realm: Option<String>) -> Result<Allocation, Fail> {
    let relayed = match m.xor_address(AttrType::XOR_RELAYED_ADDRESS) {
        Ok(Some(a)) => a,
        Ok(None) => {
            return Err(Fail::new(
                "the Allocate success response carries no XOR-RELAYED-ADDRESS",
            ));
        }
        Err(e) => {
            return Err(Fail::new(format!(
                "the Allocate success response has a malformed XOR-RELAYED-ADDRESS ({e})"
            )));
        }
    };
    Ok(Allocation {
        relayed,
        lifetime: m.lifetime().ok().flatten(),
        realm,
        software: m.software().ok().flatten().map(clean),
    })
}
