//! `turnserver-bench`: a load generator for TURN servers (this one and coturn alike), on
//! loopback only.
//!
//! It opens `--clients` allocations with real long-term authentication (401, then a signed
//! Allocate, CreatePermission, ChannelBind), each from a UDP socket (or TCP connection) of its
//! own on a distinct 127.a.b.c source address, to UDP echo peers it runs itself on 127.0.0.1.
//! Then every client sends timestamped payloads through its allocation, paced (`--rate` per
//! client) or in bursts (`--rate 0`: as fast as echoes return, with `--window` packets in
//! flight per client), for `--duration` seconds (or `--count` packets), and the generator
//! reports sent, received, loss, relayed packets per second (two per round trip: client to
//! peer, peer to client) and round-trip latency percentiles (HDR histogram). With
//! `--server-pid` it reads the server's CPU time and RSS from `/proc` before and after the
//! load, and reports CPU per relayed packet.
//!
//! `--mode alloc` measures setups per second instead (401, Allocate, CreatePermission,
//! ChannelBind, `--concurrency` at a time) up to `--allocations`, holds them while the
//! server's RSS is read (memory per allocation), then deletes them. `--mode direct` sends to
//! the echo peers without a server: the generator's own loopback baseline.
//!
//! Work is spread over `--threads` threads, each a current-thread tokio runtime with its own
//! share of the clients and its own echo peer socket. Everything stops by itself: setups are
//! bounded by retransmission limits and `--setup-timeout`, traffic by `--duration`, echoes by
//! `--drain-ms`.

mod conn;
mod json;
mod load;
mod procfs;
mod setup;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::LocalSet;

pub use json::Json;
pub use load::{Framing, MARK_LEN};
pub use procfs::{Sample, UdpDrops};

use conn::Conn;
use load::{Counters, Plan};
use setup::{Params, Session, SetupError};

/// Largest payload the generator sends.
pub const MAX_PAYLOAD: usize = 8000;

/// What to measure.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Relayed traffic through allocations.
    Relay,
    /// Allocation setups per second, and memory per allocation held.
    Alloc,
    /// Traffic straight to the echo peers, no server: the generator's own baseline.
    Direct,
}

/// The client transport toward the server (the relay side is UDP).
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Arguments of `turnserver-bench`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "turnserver-bench",
    version,
    about = "Load generator for TURN servers (loopback only): relayed packets per second, \
             latency, allocations per second, server CPU and memory"
)]
pub struct Args {
    /// The server's listener (127.0.0.0/8 or ::1).
    #[arg(long, default_value = "127.0.0.1:3478")]
    pub server: SocketAddr,
    /// Username for the long-term credentials.
    #[arg(long, default_value = "")]
    pub user: String,
    /// Password for the long-term credentials.
    #[arg(long, default_value = "")]
    pub password: String,
    #[arg(long, value_enum, default_value_t = Mode::Relay)]
    pub mode: Mode,
    /// Client transport: udp, or tcp (STUN framing, padded ChannelData; the relay side stays
    /// UDP).
    #[arg(long, value_enum, default_value_t = Transport::Udp)]
    pub transport: Transport,
    /// Relay with Send and Data indications instead of a channel.
    #[arg(long)]
    pub indications: bool,
    /// Simulated clients (allocations), each with its own socket and source address.
    #[arg(long, default_value_t = 100)]
    pub clients: u32,
    /// Load generator threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Packets per second per client; 0 sends bursts (see --window).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Bursts: packets in flight per client.
    #[arg(long, default_value_t = 8)]
    pub window: u32,
    /// Payload bytes (at least 16: client, sequence number and send time).
    #[arg(long, default_value_t = 100)]
    pub size: usize,
    /// Seconds of traffic (relay, direct), or the longest the setups may go on (alloc).
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Packets per client, then stop (0: until --duration ends).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Alloc mode: allocations to set up (and hold, then delete).
    #[arg(long, default_value_t = 1000)]
    pub allocations: u32,
    /// Setups in progress at once (all modes).
    #[arg(long, default_value_t = 64)]
    pub concurrency: u32,
    /// Milliseconds to hold the allocations in alloc mode before the server's RSS is read.
    #[arg(long, default_value_t = 500)]
    pub hold_ms: u64,
    /// The server's process id: its CPU time and RSS are read from /proc before and after.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Index of the first source address (127.a.b.c counted from 127.1.0.1), so that runs
    /// against the same server use fresh addresses.
    #[arg(long, default_value_t = 0)]
    pub first_address: u32,
    /// Bursts: milliseconds without an echo after which a client's packets in flight are
    /// written off (lost) and its window opens again.
    #[arg(long, default_value_t = 200)]
    pub stall_ms: u64,
    /// Milliseconds to wait for the last echoes once sending stopped.
    #[arg(long, default_value_t = 1000)]
    pub drain_ms: u64,
    /// First retransmission timeout of requests over UDP, milliseconds (it doubles).
    #[arg(long, default_value_t = 500)]
    pub rto_ms: u64,
    /// Sends of a request over UDP before the setup fails.
    #[arg(long, default_value_t = 5)]
    pub sends: u32,
    /// Seconds within which setups must start (after that, the run goes on with the clients
    /// it has).
    #[arg(long, default_value_t = 60.0)]
    pub setup_timeout: f64,
    /// A label copied into the report.
    #[arg(long)]
    pub label: Option<String>,
}

impl Args {
    fn framing(&self) -> Framing {
        match (self.mode, self.indications) {
            (Mode::Direct, _) => Framing::Direct,
            (_, true) => Framing::Indication,
            (_, false) => Framing::Channel,
        }
    }

    fn tcp(&self) -> bool {
        self.transport == Transport::Tcp
    }

    /// Refuses arguments that make no sense or leave loopback.
    pub fn validate(&self) -> Result<(), String> {
        if !self.server.ip().is_loopback() {
            return Err(format!(
                "--server {} is not a loopback address (127.0.0.0/8 or ::1)",
                self.server
            ));
        }
        if self.mode != Mode::Direct && self.user.is_empty() {
            return Err("--user and --password are needed".into());
        }
        if !(MARK_LEN..=MAX_PAYLOAD).contains(&self.size) {
            return Err(format!("--size must be {MARK_LEN} to {MAX_PAYLOAD} bytes"));
        }
        if self.clients == 0 || self.threads == 0 || self.threads > 64 || self.concurrency == 0 {
            return Err("--clients and --concurrency must be at least 1, --threads 1 to 64".into());
        }
        if !(self.duration > 0.0 && self.duration <= 3600.0) {
            return Err("--duration must be above 0 and at most 3600 seconds".into());
        }
        if !(self.rate >= 0.0 && self.rate <= 1e6) {
            return Err("--rate must be 0 (bursts) to 1000000 packets per second".into());
        }
        if self.rate == 0.0 && self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if self.mode == Mode::Direct && self.tcp() {
            return Err("--mode direct is UDP only".into());
        }
        if self.mode == Mode::Alloc && self.allocations == 0 {
            return Err("--allocations must be at least 1".into());
        }
        if self.rto_ms == 0
            || self.sends == 0
            || !self.setup_timeout.is_finite()
            || self.setup_timeout <= 0.0
        {
            return Err("--rto-ms, --sends and --setup-timeout must be above 0".into());
        }
        Ok(())
    }
}

/// A client ready to send.
enum Client {
    Turn(u32, Session),
    Direct(u32, Conn, SocketAddr),
}

/// Setup outcomes of one thread.
struct Tally {
    ok: u64,
    failed: BTreeMap<String, u64>,
    first_error: Option<String>,
    /// Nanoseconds per successful setup.
    time: Histogram<u64>,
    /// When the last setup finished.
    last: Option<Instant>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            ok: 0,
            failed: BTreeMap::new(),
            first_error: None,
            time: load::histogram(),
            last: None,
        }
    }

    fn fail(&mut self, e: &SetupError) {
        *self.failed.entry(e.key()).or_insert(0) += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e.to_string());
        }
    }

    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        for (k, v) in o.failed {
            *self.failed.entry(k).or_insert(0) += v;
        }
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
        let _ = self.time.add(&o.time);
        self.last = self.last.max(o.last);
    }

    fn failures(&self) -> u64 {
        self.failed.values().sum()
    }
}

/// Traffic counters of one thread, sent to the main thread.
struct Totals {
    sent: u64,
    received: u64,
    send_errors: u64,
    recv_errors: u64,
    conn_errors: u64,
    unexpected: u64,
    corrupt: u64,
    stalls: u64,
    peer_echoed: u64,
    peer_errors: u64,
    last_send_ns: u64,
    latency: Histogram<u64>,
}

impl Totals {
    fn of(c: &Counters) -> Totals {
        Totals {
            sent: c.sent.get(),
            received: c.received.get(),
            send_errors: c.send_errors.get(),
            recv_errors: c.recv_errors.get(),
            conn_errors: c.conn_errors.get(),
            unexpected: c.unexpected.get(),
            corrupt: c.corrupt.get(),
            stalls: c.stalls.get(),
            peer_echoed: c.peer_echoed.get(),
            peer_errors: c.peer_errors.get(),
            last_send_ns: c.last_send_ns.get(),
            latency: c.latency.borrow().clone(),
        }
    }

    fn merge(&mut self, o: Totals) {
        self.sent += o.sent;
        self.received += o.received;
        self.send_errors += o.send_errors;
        self.recv_errors += o.recv_errors;
        self.conn_errors += o.conn_errors;
        self.unexpected += o.unexpected;
        self.corrupt += o.corrupt;
        self.stalls += o.stalls;
        self.peer_echoed += o.peer_echoed;
        self.peer_errors += o.peer_errors;
        self.last_send_ns = self.last_send_ns.max(o.last_send_ns);
        let _ = self.latency.add(&o.latency);
    }
}

/// From the main thread to a worker.
enum Cmd {
    /// Relay, direct: send traffic. Alloc: set up allocations until the deadline.
    Go(Plan),
    /// Delete the allocations and stop.
    Release,
}

/// From a worker to the main thread.
enum Msg {
    Ready(Tally),
    Done(Totals, Tally),
    Released(u64),
    Failed(String),
}

struct Shared {
    args: Args,
    params: Params,
    seed: u64,
    /// Alloc mode: the next allocation index to set up.
    next: AtomicU32,
}

/// Sets up clients, taking indices from `next` until it gives none or `stop_at` has passed.
async fn puller(
    shared: Arc<Shared>,
    next: Rc<dyn Fn() -> Option<u32>>,
    peer: SocketAddr,
    stop_at: Instant,
) -> (Vec<Client>, Tally) {
    let mut clients = Vec::new();
    let mut tally = Tally::new();
    let a = &shared.args;
    while Instant::now() < stop_at {
        let Some(i) = next() else { break };
        let idx = a.first_address.wrapping_add(i);
        let ip = conn::source_ip(a.server, idx);
        let t0 = Instant::now();
        let r = if a.mode == Mode::Direct {
            Conn::connect(false, ip, peer)
                .await
                .map(|c| Client::Direct(i, c, peer))
                .map_err(|e| SetupError::Io(setup::Step::Connect, e))
        } else {
            let seed = shared.seed ^ u64::from(idx).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            setup::setup(&shared.params, ip, peer, seed)
                .await
                .map(|s| Client::Turn(i, s))
        };
        let t1 = Instant::now();
        match r {
            Ok(c) => {
                tally.ok += 1;
                tally
                    .time
                    .saturating_record((t1 - t0).as_nanos().max(1) as u64);
                tally.last = Some(t1);
                clients.push(c);
            }
            Err(e) => tally.fail(&e),
        }
    }
    (clients, tally)
}

/// Runs `pullers` pullers at once and gathers their clients.
async fn setup_many(
    shared: &Arc<Shared>,
    next: Rc<dyn Fn() -> Option<u32>>,
    pullers: usize,
    peer: SocketAddr,
    stop_at: Instant,
) -> (Vec<Client>, Tally) {
    let mut handles = Vec::new();
    for _ in 0..pullers.max(1) {
        handles.push(tokio::task::spawn_local(puller(
            shared.clone(),
            next.clone(),
            peer,
            stop_at,
        )));
    }
    let mut clients = Vec::new();
    let mut tally = Tally::new();
    for h in handles {
        if let Ok((c, t)) = h.await {
            clients.extend(c);
            tally.merge(t);
        }
    }
    (clients, tally)
}

/// Sends the traffic of every client; gives the clients back.
async fn run_traffic(clients: Vec<Client>, plan: Rc<Plan>, c: Rc<Counters>) -> Vec<Client> {
    let mut handles = Vec::new();
    for mut client in clients {
        let (plan, c) = (plan.clone(), c.clone());
        handles.push(tokio::task::spawn_local(async move {
            let _ = match &mut client {
                Client::Turn(i, s) => load::drive(&mut s.conn, *i, s.peer, &plan, &c).await,
                Client::Direct(i, conn, peer) => load::drive(conn, *i, *peer, &plan, &c).await,
            };
            client
        }));
    }
    let mut back = Vec::new();
    for h in handles {
        if let Ok(c) = h.await {
            back.push(c);
        }
    }
    back
}

/// Deletes every allocation, `conc` at a time; returns the failures.
async fn release_all(shared: &Arc<Shared>, clients: Vec<Client>, conc: usize) -> u64 {
    let queue = Rc::new(RefCell::new(clients));
    let mut handles = Vec::new();
    for _ in 0..conc.max(1) {
        let (queue, shared) = (queue.clone(), shared.clone());
        handles.push(tokio::task::spawn_local(async move {
            let mut failed = 0;
            loop {
                let next = queue.borrow_mut().pop();
                match next {
                    Some(Client::Turn(_, mut s)) => {
                        if s.release(&shared.params).await.is_err() {
                            failed += 1;
                        }
                    }
                    Some(Client::Direct(..)) => {}
                    None => return failed,
                }
            }
        }));
    }
    let mut failed = 0;
    for h in handles {
        failed += h.await.unwrap_or(0);
    }
    failed
}

/// One load thread.
fn worker(
    t: usize,
    shared: Arc<Shared>,
    peer: std::net::UdpSocket,
    cmds: mpsc::Receiver<Cmd>,
    msgs: mpsc::Sender<(usize, Msg)>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = msgs.send((t, Msg::Failed(format!("cannot start a runtime: {e}"))));
            return;
        }
    };
    let local = LocalSet::new();
    let counters = Rc::new(Counters::default());
    let peer_addr = match peer.local_addr() {
        Ok(a) => a,
        Err(e) => {
            let _ = msgs.send((t, Msg::Failed(format!("echo peer: {e}"))));
            return;
        }
    };
    let peer = {
        let _g = rt.enter();
        match tokio::net::UdpSocket::from_std(peer) {
            Ok(p) => p,
            Err(e) => {
                let _ = msgs.send((t, Msg::Failed(format!("echo peer: {e}"))));
                return;
            }
        }
    };
    local.spawn_local(load::echo(peer, counters.clone()));
    let a = &shared.args;
    let threads = a.threads;
    let pullers = (a.concurrency as usize).div_ceil(threads);
    let send = |m: Msg| {
        let _ = msgs.send((t, m));
    };

    let mut clients = Vec::new();
    if a.mode != Mode::Alloc {
        // This thread's clients: every threads-th index.
        let mine: Vec<u32> = (0..a.clients)
            .filter(|i| *i as usize % threads == t)
            .collect();
        let pos = Rc::new(std::cell::Cell::new(0usize));
        let next: Rc<dyn Fn() -> Option<u32>> = Rc::new(move || {
            let i = pos.get();
            pos.set(i + 1);
            mine.get(i).copied()
        });
        let stop_at = Instant::now() + Duration::from_secs_f64(a.setup_timeout);
        let (c, tally) =
            local.block_on(&rt, setup_many(&shared, next, pullers, peer_addr, stop_at));
        clients = c;
        send(Msg::Ready(tally));
    } else {
        send(Msg::Ready(Tally::new()));
    }

    let Ok(Cmd::Go(plan)) = cmds.recv() else {
        return;
    };
    if a.mode == Mode::Alloc {
        let total = a.allocations;
        let sh = shared.clone();
        let next: Rc<dyn Fn() -> Option<u32>> = Rc::new(move || {
            let i = sh.next.fetch_add(1, Ordering::Relaxed);
            (i < total).then_some(i)
        });
        tokio_sleep_until(&local, &rt, plan.start);
        let (c, tally) =
            local.block_on(&rt, setup_many(&shared, next, pullers, peer_addr, plan.end));
        clients = c;
        send(Msg::Done(Totals::of(&counters), tally));
    } else {
        let plan = Rc::new(plan);
        clients = local.block_on(&rt, run_traffic(clients, plan, counters.clone()));
        send(Msg::Done(Totals::of(&counters), Tally::new()));
    }

    let Ok(Cmd::Release) = cmds.recv() else {
        return;
    };
    let failed = local.block_on(&rt, release_all(&shared, clients, pullers));
    send(Msg::Released(failed));
}

fn tokio_sleep_until(local: &LocalSet, rt: &tokio::runtime::Runtime, t: Instant) {
    local.block_on(rt, async move {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
    });
}

/// Everything measured in one run.
struct Outcome {
    setup: Tally,
    setup_s: f64,
    totals: Option<Totals>,
    /// Seconds over which traffic was sent, or setups were made (alloc).
    window_s: f64,
    released_failures: u64,
    server: Option<(Sample, Sample)>,
    /// Alloc mode: the server's RSS once the allocations were deleted.
    server_rss_released_kb: Option<u64>,
    server_error: Option<String>,
    generator: (Sample, Sample),
    /// Datagrams dropped on full receive buffers during the traffic, by socket role.
    udp_drops: UdpDrops,
}

/// Runs the benchmark and prints the report; success when traffic was relayed (or
/// allocations made).
pub fn run(args: &Args) -> ExitCode {
    if let Err(e) = args.validate() {
        eprintln!("turnserver-bench: {e}");
        return ExitCode::from(2);
    }
    match measure(args) {
        Ok(o) => {
            let report = report(args, &o);
            if args.json {
                println!("{report}");
            } else {
                print_text(args, &o, &report);
            }
            let ok = match args.mode {
                Mode::Alloc => o.setup.ok > 0,
                _ => o.totals.as_ref().is_some_and(|t| t.received > 0),
            };
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            if args.json {
                let mut j = Json::obj();
                j.set("error", e.as_str());
                println!("{j}");
            } else {
                eprintln!("turnserver-bench: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

fn measure(args: &Args) -> Result<Outcome, String> {
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let shared = Arc::new(Shared {
        args: args.clone(),
        params: Params {
            server: args.server,
            tcp: args.tcp(),
            user: args.user.clone(),
            password: args.password.clone(),
            rto: Duration::from_millis(args.rto_ms),
            sends: args.sends,
            channel: !args.indications,
        },
        seed: u64::from_le_bytes(seed),
        next: AtomicU32::new(0),
    });
    let threads = args.threads;
    let (msg_tx, msg_rx) = mpsc::channel();
    let mut cmd_txs = Vec::new();
    let mut joins = Vec::new();
    let mut peer_ports = Vec::new();
    for t in 0..threads {
        let peer = conn::bind_udp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0), 4 << 20)
            .map_err(|e| format!("cannot bind an echo peer on 127.0.0.1: {e}"))?;
        peer_ports.push(peer.local_addr().map_or(0, |a| a.port()));
        let (cmd_tx, cmd_rx) = mpsc::channel();
        cmd_txs.push(cmd_tx);
        let (shared, msg_tx) = (shared.clone(), msg_tx.clone());
        joins.push(
            std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || worker(t, shared, peer, cmd_rx, msg_tx))
                .map_err(|e| format!("cannot start a thread: {e}"))?,
        );
    }
    drop(msg_tx);
    // Each wait is bounded: setups by --setup-timeout plus the longest transaction chain,
    // traffic by --duration and --drain-ms.
    let patience = Duration::from_secs_f64(args.setup_timeout)
        + Duration::from_millis(args.rto_ms) * (1u32 << args.sends.min(10)) * 4
        + Duration::from_secs_f64(args.duration)
        + Duration::from_millis(args.drain_ms + args.stall_ms)
        + Duration::from_secs(30);
    let wait_all = |what: &str| -> Result<Vec<Msg>, String> {
        let mut got: Vec<Option<Msg>> = (0..threads).map(|_| None).collect();
        let deadline = Instant::now() + patience;
        for _ in 0..threads {
            let left = deadline.saturating_duration_since(Instant::now());
            match msg_rx.recv_timeout(left) {
                Ok((_, Msg::Failed(e))) => return Err(e),
                Ok((t, m)) => got[t] = Some(m),
                Err(_) => return Err(format!("a load thread did not finish {what} in time")),
            }
        }
        Ok(got.into_iter().flatten().collect())
    };

    let t_setup = Instant::now();
    let mut setup = Tally::new();
    for m in wait_all("its setups")? {
        if let Msg::Ready(t) = m {
            setup.merge(t);
        }
    }
    let setup_s = t_setup.elapsed().as_secs_f64();
    if args.mode != Mode::Alloc && setup.ok == 0 {
        let why = setup.first_error.clone().unwrap_or_default();
        return Err(format!("no client could set up an allocation ({why})"));
    }

    let read_server = |pid: Option<u32>| pid.map(Sample::read);
    let server_before = read_server(args.server_pid);
    let gen_before = Sample::read(0).unwrap_or_default();
    let drops_before = UdpDrops::read(args.server, &peer_ports);
    let epoch = Instant::now();
    let start = epoch + Duration::from_millis(20);
    let plan = Plan {
        epoch,
        start,
        end: start + Duration::from_secs_f64(args.duration),
        rate: args.rate,
        window: args.window,
        count: args.count,
        size: args.size,
        stall: Duration::from_millis(args.stall_ms),
        drain: Duration::from_millis(args.drain_ms),
        framing: args.framing(),
        tcp: args.tcp(),
    };
    for c in &cmd_txs {
        let _ = c.send(Cmd::Go(plan.clone()));
    }
    let mut totals: Option<Totals> = None;
    for m in wait_all("its traffic")? {
        if let Msg::Done(t, tally) = m {
            setup.merge(tally);
            match &mut totals {
                Some(all) => all.merge(t),
                None => totals = Some(t),
            }
        }
    }
    let gen_after = Sample::read(0).unwrap_or_default();
    let udp_drops = UdpDrops::read(args.server, &peer_ports).since(&drops_before);
    let server_after = read_server(args.server_pid);
    let window_s = match args.mode {
        Mode::Alloc => setup
            .last
            .map_or(0.0, |l| l.saturating_duration_since(start).as_secs_f64()),
        _ => {
            let last = totals.as_ref().map_or(0, |t| t.last_send_ns);
            (Duration::from_nanos(last).saturating_sub(start - epoch)).as_secs_f64()
        }
    };
    if args.mode == Mode::Alloc && args.hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(args.hold_ms));
    }
    let server_held = read_server(args.server_pid);

    for c in &cmd_txs {
        let _ = c.send(Cmd::Release);
    }
    let mut released_failures = 0;
    for m in wait_all("deleting its allocations")? {
        if let Msg::Released(n) = m {
            released_failures += n;
        }
    }
    for j in joins {
        let _ = j.join();
    }
    let mut server_rss_released_kb = None;
    if args.mode == Mode::Alloc {
        std::thread::sleep(Duration::from_millis(200));
        server_rss_released_kb = read_server(args.server_pid)
            .and_then(Result::ok)
            .map(|s| s.rss_kb);
    }
    let mut server_error = None;
    let server = match (server_before, server_after, server_held) {
        (Some(Ok(b)), Some(Ok(mut a)), Some(Ok(h))) => {
            if args.mode == Mode::Alloc {
                a.rss_kb = h.rss_kb;
            }
            Some((b, a))
        }
        (Some(Err(e)), _, _) | (_, Some(Err(e)), _) | (_, _, Some(Err(e))) => {
            server_error = Some(format!("cannot read /proc for the server: {e}"));
            None
        }
        _ => None,
    };
    Ok(Outcome {
        setup,
        setup_s,
        totals,
        window_s,
        released_failures,
        server,
        server_rss_released_kb,
        server_error,
        generator: (gen_before, gen_after),
        udp_drops,
    })
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn latency_json(h: &Histogram<u64>) -> Json {
    let mut l = Json::obj();
    if h.is_empty() {
        return Json::Null;
    }
    l.set("p50", us(h.value_at_quantile(0.5)))
        .set("p90", us(h.value_at_quantile(0.9)))
        .set("p99", us(h.value_at_quantile(0.99)))
        .set("p999", us(h.value_at_quantile(0.999)))
        .set("min", us(h.min()))
        .set("max", us(h.max()))
        .set("mean", h.mean() / 1000.0);
    l
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Relay => "relay",
        Mode::Alloc => "alloc",
        Mode::Direct => "direct",
    }
}

/// The whole report as one JSON object (also the source of the text report).
fn report(args: &Args, o: &Outcome) -> Json {
    let mut j = Json::obj();
    j.set("label", args.label.clone())
        .set("mode", mode_name(args.mode))
        .set("transport", if args.tcp() { "tcp" } else { "udp" })
        .set(
            "framing",
            match args.framing() {
                Framing::Channel => "channel",
                Framing::Indication => "indication",
                Framing::Direct => "direct",
            },
        )
        .set("server", args.server.to_string())
        .set("threads", args.threads);
    let mut failed = Json::obj();
    for (k, v) in &o.setup.failed {
        failed.set(k, *v);
    }
    let cpu = |(b, a): &(Sample, Sample)| {
        (
            a.utime.saturating_sub(b.utime) as f64 / procfs::TICKS_PER_SECOND,
            a.stime.saturating_sub(b.stime) as f64 / procfs::TICKS_PER_SECOND,
        )
    };
    let (gu, gs) = cpu(&o.generator);
    match args.mode {
        Mode::Alloc => {
            let ok = o.setup.ok;
            j.set("allocations_requested", args.allocations)
                .set("concurrency", args.concurrency)
                .set("allocations", ok)
                .set("failed", o.setup.failures())
                .set("failures", failed)
                .set("first_error", o.setup.first_error.clone())
                .set("elapsed_s", o.window_s)
                .set(
                    "allocations_per_s",
                    if o.window_s > 0.0 {
                        ok as f64 / o.window_s
                    } else {
                        f64::NAN
                    },
                )
                .set("setup_ms", {
                    let h = &o.setup.time;
                    let mut l = Json::obj();
                    if !h.is_empty() {
                        l.set("p50", h.value_at_quantile(0.5) as f64 / 1e6)
                            .set("p99", h.value_at_quantile(0.99) as f64 / 1e6)
                            .set("max", h.max() as f64 / 1e6);
                    }
                    l
                })
                .set("release_failures", o.released_failures);
        }
        _ => {
            let t = o.totals.as_ref();
            let g = |f: fn(&Totals) -> u64| t.map_or(0, f);
            let (sent, received) = (g(|t| t.sent), g(|t| t.received));
            let lost = sent.saturating_sub(received);
            let w = o.window_s;
            let relayed_per_rt = if args.mode == Mode::Direct { 0 } else { 2 };
            let rate = |n: u64| if w > 0.0 { n as f64 / w } else { f64::NAN };
            j.set("clients", o.setup.ok)
                .set("clients_requested", args.clients)
                .set("setup_failed", o.setup.failures())
                .set("setup_failures", failed)
                .set("first_error", o.setup.first_error.clone())
                .set("setup_s", o.setup_s)
                .set("size", args.size)
                .set("load", if args.rate > 0.0 { "paced" } else { "burst" })
                .set("rate_per_client", args.rate)
                .set(
                    "window",
                    if args.rate > 0.0 {
                        None
                    } else {
                        Some(args.window)
                    },
                )
                .set("count_per_client", (args.count > 0).then_some(args.count))
                .set("duration_s", args.duration)
                .set("elapsed_s", w)
                .set(
                    "offered_pps",
                    (args.rate > 0.0).then_some(args.rate * o.setup.ok as f64),
                )
                .set("sent", sent)
                .set("received", received)
                .set("lost", lost)
                .set(
                    "loss_pct",
                    if sent > 0 {
                        100.0 * lost as f64 / sent as f64
                    } else {
                        0.0
                    },
                )
                .set("send_errors", g(|t| t.send_errors))
                .set("recv_errors", g(|t| t.recv_errors))
                .set("conn_errors", g(|t| t.conn_errors))
                .set("unexpected", g(|t| t.unexpected))
                .set("corrupt", g(|t| t.corrupt))
                .set("stalls", g(|t| t.stalls))
                .set("peer_echoed", g(|t| t.peer_echoed))
                .set("peer_errors", g(|t| t.peer_errors))
                .set("round_trips_per_s", rate(received))
                .set("relayed_pps", rate(received * relayed_per_rt))
                .set(
                    "latency_us",
                    t.map_or(Json::Null, |t| latency_json(&t.latency)),
                )
                .set("udp_drops", {
                    let d = &o.udp_drops;
                    let mut dj = Json::obj();
                    dj.set("server_listener", d.server_listener)
                        .set("server_relays", d.server_relays)
                        .set("peers", d.peers)
                        .set("clients", d.clients);
                    dj
                })
                .set("release_failures", o.released_failures);
        }
    }
    let mut gen_j = Json::obj();
    gen_j
        .set("cpu_user_s", gu)
        .set("cpu_sys_s", gs)
        .set("cpu_s", gu + gs);
    j.set("generator", gen_j);
    if let (Some(s), false) = (&o.server, args.mode == Mode::Direct) {
        let (u, k) = cpu(s);
        let mut sj = Json::obj();
        sj.set("pid", args.server_pid)
            .set("threads", s.1.threads)
            .set("cpu_user_s", u)
            .set("cpu_sys_s", k)
            .set("cpu_s", u + k)
            .set("rss_kb_before", s.0.rss_kb)
            .set("rss_kb_after", s.1.rss_kb);
        match args.mode {
            Mode::Alloc => {
                let n = o.setup.ok;
                let per = |x: f64| if n > 0 { x / n as f64 } else { f64::NAN };
                sj.set(
                    "rss_bytes_per_allocation",
                    per((s.1.rss_kb as f64 - s.0.rss_kb as f64) * 1024.0),
                )
                .set("rss_kb_released", o.server_rss_released_kb)
                .set("cpu_us_per_allocation", per((u + k) * 1e6));
            }
            _ => {
                let relayed = o.totals.as_ref().map_or(0, |t| t.received * 2);
                let per = |x: f64| {
                    if relayed > 0 {
                        x / relayed as f64
                    } else {
                        f64::NAN
                    }
                };
                sj.set("relayed_packets", relayed)
                    .set("cpu_us_per_packet", per((u + k) * 1e6))
                    .set("user_us_per_packet", per(u * 1e6))
                    .set("sys_us_per_packet", per(k * 1e6))
                    .set(
                        "packets_per_cpu_s",
                        if u + k > 0.0 {
                            relayed as f64 / (u + k)
                        } else {
                            f64::NAN
                        },
                    );
            }
        }
        j.set("server_process", sj);
    } else if let Some(e) = &o.server_error {
        j.set("server_process_error", e.as_str());
    }
    j
}

fn get<'a>(j: &'a Json, key: &str) -> Option<&'a Json> {
    match j {
        Json::Obj(v) => v.iter().find(|(k, _)| k == key).map(|(_, v)| v),
        _ => None,
    }
}

fn num(j: &Json, key: &str) -> f64 {
    match get(j, key) {
        Some(Json::Int(n)) => *n as f64,
        Some(Json::Num(x)) => *x,
        _ => f64::NAN,
    }
}

fn print_text(args: &Args, o: &Outcome, j: &Json) {
    let transport = if args.tcp() { "tcp" } else { "udp" };
    let framing = match args.framing() {
        Framing::Channel => "ChannelData",
        Framing::Indication => "Send/Data indications",
        Framing::Direct => "no server",
    };
    match args.mode {
        Mode::Alloc => {
            println!(
                "turnserver-bench: allocation setups over {transport} against {}, {} at a time, \
                 {} threads",
                args.server, args.concurrency, args.threads
            );
            println!(
                "setups       {} of {} (401, Allocate, CreatePermission{}) in {:.3} s: {:.0} per second",
                o.setup.ok,
                args.allocations,
                if args.indications {
                    ""
                } else {
                    ", ChannelBind"
                },
                o.window_s,
                num(j, "allocations_per_s")
            );
            if let Some(sm @ Json::Obj(s)) = get(j, "setup_ms")
                && !s.is_empty()
            {
                println!(
                    "setup time   p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
                    num(sm, "p50"),
                    num(sm, "p99"),
                    num(sm, "max")
                );
            }
        }
        _ => {
            let load = if args.rate > 0.0 {
                format!("paced at {} packets/s per client", args.rate)
            } else {
                format!("bursts (window {} per client)", args.window)
            };
            println!(
                "turnserver-bench: {} over {transport} ({framing}) against {}, {} clients, {} threads, \
                 {}-byte payloads, {load}, {} s",
                mode_name(args.mode),
                args.server,
                o.setup.ok,
                args.threads,
                args.size,
                args.duration
            );
            println!(
                "setup        {} clients ready in {:.3} s",
                o.setup.ok, o.setup_s
            );
            println!(
                "traffic      sent {}, received {}, lost {} ({:.4}%){}",
                num(j, "sent"),
                num(j, "received"),
                num(j, "lost"),
                num(j, "loss_pct"),
                match num(j, "send_errors") {
                    0.0 => String::new(),
                    n => format!(", {n} send errors"),
                }
            );
            if args.mode == Mode::Direct {
                println!(
                    "throughput   {:.0} round trips/s over {:.3} s (no server)",
                    num(j, "round_trips_per_s"),
                    o.window_s
                );
            } else {
                println!(
                    "throughput   {:.0} relayed packets/s ({:.0} round trips/s over {:.3} s)",
                    num(j, "relayed_pps"),
                    num(j, "round_trips_per_s"),
                    o.window_s
                );
            }
            let d = &o.udp_drops;
            if d.server_listener + d.server_relays + d.peers + d.clients > 0 {
                println!(
                    "udp drops    full receive buffers: server listener {}, server relay sockets {}, \
                     echo peers {}, clients {}",
                    d.server_listener, d.server_relays, d.peers, d.clients
                );
            }
            if let Some(l) = get(j, "latency_us").filter(|l| !matches!(l, Json::Null)) {
                println!(
                    "latency      round trip p50 {:.1} us, p90 {:.1} us, p99 {:.1} us, p99.9 {:.1} us, max {:.1} us",
                    num(l, "p50"),
                    num(l, "p90"),
                    num(l, "p99"),
                    num(l, "p999"),
                    num(l, "max")
                );
            }
        }
    }
    if o.setup.failures() > 0 {
        println!(
            "failures     {} setups failed ({}), first: {}",
            o.setup.failures(),
            o.setup
                .failed
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            o.setup.first_error.as_deref().unwrap_or("?")
        );
    }
    if let Some(s) = get(j, "server_process") {
        let per = match args.mode {
            Mode::Alloc => format!(
                "{:.1} us per allocation; rss {} -> {} kB: {:.0} bytes per allocation",
                num(s, "cpu_us_per_allocation"),
                num(s, "rss_kb_before"),
                num(s, "rss_kb_after"),
                num(s, "rss_bytes_per_allocation")
            ),
            _ => format!(
                "{:.3} us per relayed packet (user {:.3}, sys {:.3}), {:.0} packets per cpu-second; \
                 rss {} -> {} kB",
                num(s, "cpu_us_per_packet"),
                num(s, "user_us_per_packet"),
                num(s, "sys_us_per_packet"),
                num(s, "packets_per_cpu_s"),
                num(s, "rss_kb_before"),
                num(s, "rss_kb_after")
            ),
        };
        println!(
            "server       pid {}: cpu {:.2} s (user {:.2}, sys {:.2}), {per}",
            num(s, "pid"),
            num(s, "cpu_s"),
            num(s, "cpu_user_s"),
            num(s, "cpu_sys_s")
        );
    }
    if let Some(Json::Str(e)) = get(j, "server_process_error") {
        println!("server       {e}");
    }
    let g = get(j, "generator").expect("there");
    println!(
        "generator    cpu {:.2} s (user {:.2}, sys {:.2})",
        num(g, "cpu_s"),
        num(g, "cpu_user_s"),
        num(g, "cpu_sys_s")
    );
}
