//! One simulated client's TURN setup with long-term credentials: an Allocate without
//! credentials (401 with REALM and NONCE), the signed Allocate (REQUESTED-TRANSPORT UDP),
//! CreatePermission for its echo peer and, unless it relays with Send indications, ChannelBind
//! of channel 0x4000 to that peer. Requests carry FINGERPRINT, as WebRTC clients' do; a 438
//! (stale nonce) is answered with the fresh nonce. Over UDP a request is retransmitted after the
//! RTO, doubling (RFC 8489 6.2.1); over TCP it is sent once and waited for as long.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use super::conn::Conn;
use crate::auth::long_term_key;
use crate::core::Rng;
use crate::wire::{AttrType, Class, MessageRef, MessageWriter, Method, PROTO_UDP, TransactionId};

/// The channel every client binds to its peer.
pub const CHANNEL: u16 = 0x4000;

/// What every setup shares.
#[derive(Debug, Clone)]
pub struct Params {
    pub server: SocketAddr,
    pub tcp: bool,
    pub user: String,
    pub password: String,
    /// First retransmission timeout (UDP); over TCP the whole wait is as long as all the
    /// retransmissions would take.
    pub rto: Duration,
    /// Sends of a request over UDP before giving up.
    pub sends: u32,
    /// Bind a channel (ChannelData relaying); without it the client relays with Send and Data
    /// indications.
    pub channel: bool,
}

impl Params {
    /// How long a request is waited for in all.
    fn patience(&self) -> Duration {
        let mut total = Duration::ZERO;
        let mut rto = self.rto;
        for _ in 0..self.sends.max(1) {
            total += rto;
            rto *= 2;
        }
        total
    }
}

/// The step a setup failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Connect,
    Challenge,
    Allocate,
    CreatePermission,
    ChannelBind,
    Refresh,
}

impl Step {
    pub fn name(self) -> &'static str {
        match self {
            Step::Connect => "connect",
            Step::Challenge => "challenge",
            Step::Allocate => "allocate",
            Step::CreatePermission => "create_permission",
            Step::ChannelBind => "channel_bind",
            Step::Refresh => "refresh",
        }
    }
}

/// Why a setup failed.
#[derive(Debug)]
pub enum SetupError {
    Io(Step, io::Error),
    Timeout(Step),
    /// An error response with this code.
    Refused(Step, u16),
    /// A response that does not say what it should.
    Protocol(Step, &'static str),
}

impl SetupError {
    /// A short key to count failures by: `step_timeout`, `step_401`, `step_io`, ...
    pub fn key(&self) -> String {
        match self {
            SetupError::Io(s, _) => format!("{}_io", s.name()),
            SetupError::Timeout(s) => format!("{}_timeout", s.name()),
            SetupError::Refused(s, code) => format!("{}_{code}", s.name()),
            SetupError::Protocol(s, _) => format!("{}_protocol", s.name()),
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SetupError::Io(s, e) => write!(f, "{}: {e}", s.name()),
            SetupError::Timeout(s) => write!(f, "{}: no answer", s.name()),
            SetupError::Refused(s, code) => write!(f, "{}: error {code}", s.name()),
            SetupError::Protocol(s, what) => write!(f, "{}: {what}", s.name()),
        }
    }
}

enum TxError {
    Timeout,
    Io(io::Error),
}

/// A client with its allocation.
pub struct Session {
    pub conn: Conn,
    /// The relayed transport address the server gave.
    pub relayed: SocketAddr,
    /// The peer it relays to.
    pub peer: SocketAddr,
    realm: String,
    nonce: Vec<u8>,
    key: [u8; 16],
    rng: Rng,
}

fn txid(rng: &mut Rng) -> TransactionId {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    t[8..].copy_from_slice(&rng.next_u64().to_le_bytes()[..4]);
    TransactionId(t)
}

/// Sends `req` and waits for the success or error response carrying `txid`; other traffic is
/// skipped.
async fn transact(
    conn: &mut Conn,
    req: &[u8],
    id: &TransactionId,
    p: &Params,
) -> Result<Vec<u8>, TxError> {
    let mut scratch = [0u8; 2048];
    let mut rto = p.rto;
    let sends = if conn.is_tcp() { 1 } else { p.sends.max(1) };
    for n in 0..sends {
        conn.send(req).await.map_err(TxError::Io)?;
        let wait = if conn.is_tcp() { p.patience() } else { rto };
        let deadline = Instant::now() + wait;
        loop {
            match timeout_at(deadline, conn.readable()).await {
                Err(_) => break,
                Ok(Err(e)) => return Err(TxError::Io(e)),
                Ok(Ok(())) => {}
            }
            while let Some(frame) = conn.recv(&mut scratch).map_err(TxError::Io)? {
                if let Some((_, Class::Success | Class::Error, t)) = MessageRef::header(frame)
                    && t == *id
                {
                    return Ok(frame.to_vec());
                }
            }
        }
        if n + 1 < sends {
            rto *= 2;
        }
    }
    Err(TxError::Timeout)
}

/// Connects from `local` and sets up an allocation relaying to `peer`.
pub async fn setup(
    p: &Params,
    local: IpAddr,
    peer: SocketAddr,
    seed: u64,
) -> Result<Session, SetupError> {
    let connect = Conn::connect(p.tcp, local, p.server);
    let conn = match timeout_at(Instant::now() + p.patience(), connect).await {
        Err(_) => return Err(SetupError::Timeout(Step::Connect)),
        Ok(Err(e)) => return Err(SetupError::Io(Step::Connect, e)),
        Ok(Ok(c)) => c,
    };
    let mut s = Session {
        conn,
        relayed: peer,
        peer,
        realm: String::new(),
        nonce: Vec::new(),
        key: [0; 16],
        rng: Rng::new(seed),
    };

    // 1. The challenge: an Allocate without credentials.
    let id = txid(&mut s.rng);
    let mut buf = [0u8; 512];
    let n = {
        let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, &id);
        w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24)
            .add_fingerprint();
        w.finish().expect("fits")
    };
    let r = match transact(&mut s.conn, &buf[..n], &id, p).await {
        Ok(r) => r,
        Err(TxError::Timeout) => return Err(SetupError::Timeout(Step::Challenge)),
        Err(TxError::Io(e)) => return Err(SetupError::Io(Step::Challenge, e)),
    };
    let m = MessageRef::parse(&r).map_err(|_| SetupError::Protocol(Step::Challenge, "bad STUN"))?;
    match m.error_code() {
        Ok(Some((401, _))) => {}
        Ok(Some((code, _))) => return Err(SetupError::Refused(Step::Challenge, code)),
        _ => {
            return Err(SetupError::Protocol(
                Step::Challenge,
                "no 401 to an unsigned Allocate",
            ));
        }
    }
    let (Ok(Some(realm)), Ok(Some(nonce))) = (m.realm(), m.nonce()) else {
        return Err(SetupError::Protocol(
            Step::Challenge,
            "401 without REALM and NONCE",
        ));
    };
    s.realm = realm.to_string();
    s.nonce = nonce.to_vec();
    s.key = long_term_key(&p.user, &s.realm, &p.password);

    // 2. The signed Allocate.
    let r = s
        .request(p, Step::Allocate, Method::ALLOCATE, |w| {
            w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24);
        })
        .await?;
    let m = MessageRef::parse(&r).map_err(|_| SetupError::Protocol(Step::Allocate, "bad STUN"))?;
    s.relayed = match m.xor_address(AttrType::XOR_RELAYED_ADDRESS) {
        Ok(Some(a)) => a,
        _ => {
            return Err(SetupError::Protocol(
                Step::Allocate,
                "no XOR-RELAYED-ADDRESS",
            ));
        }
    };

    // 3. CreatePermission for the peer.
    s.request(p, Step::CreatePermission, Method::CREATE_PERMISSION, |w| {
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
    })
    .await?;

    // 4. ChannelBind.
    if p.channel {
        s.request(p, Step::ChannelBind, Method::CHANNEL_BIND, |w| {
            w.add_u32(AttrType::CHANNEL_NUMBER, u32::from(CHANNEL) << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        })
        .await?;
    }
    Ok(s)
}

impl Session {
    /// A signed request; a 438 is retried with the fresh nonce (twice at most). Returns the
    /// success response.
    async fn request(
        &mut self,
        p: &Params,
        step: Step,
        method: Method,
        add: impl Fn(&mut MessageWriter),
    ) -> Result<Vec<u8>, SetupError> {
        for _ in 0..3 {
            let id = txid(&mut self.rng);
            let mut buf = [0u8; 512];
            let n = {
                let mut w = MessageWriter::new(&mut buf, method, Class::Request, &id);
                add(&mut w);
                w.add(AttrType::USERNAME, p.user.as_bytes())
                    .add(AttrType::REALM, self.realm.as_bytes())
                    .add(AttrType::NONCE, &self.nonce)
                    .add_integrity(&self.key)
                    .add_fingerprint();
                w.finish().expect("fits")
            };
            let r = match transact(&mut self.conn, &buf[..n], &id, p).await {
                Ok(r) => r,
                Err(TxError::Timeout) => return Err(SetupError::Timeout(step)),
                Err(TxError::Io(e)) => return Err(SetupError::Io(step, e)),
            };
            let m = MessageRef::parse(&r).map_err(|_| SetupError::Protocol(step, "bad STUN"))?;
            match m.error_code() {
                Ok(None) if m.class() == Class::Success => return Ok(r),
                Ok(Some((438, _))) => match m.nonce() {
                    Ok(Some(nonce)) => self.nonce = nonce.to_vec(),
                    _ => return Err(SetupError::Protocol(step, "438 without NONCE")),
                },
                Ok(Some((code, _))) => return Err(SetupError::Refused(step, code)),
                _ => return Err(SetupError::Protocol(step, "neither success nor error")),
            }
        }
        Err(SetupError::Refused(step, 438))
    }

    /// Deletes the allocation (Refresh with LIFETIME 0); over TCP closing the connection is
    /// enough, and the caller drops it.
    pub async fn release(&mut self, p: &Params) -> Result<(), SetupError> {
        if self.conn.is_tcp() {
            return Ok(());
        }
        let quick = Params {
            sends: p.sends.min(3),
            ..p.clone()
        };
        match self
            .request(&quick, Step::Refresh, Method::REFRESH, |w| {
                w.add_u32(AttrType::LIFETIME, 0);
            })
            .await
        {
            // A retransmission of a Refresh that already deleted it.
            Err(SetupError::Refused(Step::Refresh, 437)) | Ok(_) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
