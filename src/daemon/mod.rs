//! The daemon around the drivers: logging, signals, reload, graceful shutdown, the systemd
//! notification protocol and watchdog, and the operator's HTTP listener (metrics, health,
//! self-test page).
//!
//! One supervisor task owns the process's life. It binds everything first (a bad address
//! refuses start), tells systemd `READY=1` once the driver answers, then waits for signals:
//! SIGHUP reloads the configuration file, SIGTERM or SIGINT stops. Reload and metrics talk to
//! the driver through its command channel ([`crate::net::Handle`]), never through shared state.

pub mod http;
pub mod metrics;
pub mod systemd;

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

use crate::config::{self, Config};
use crate::net::{self, Handle, Listeners, tls::CertStore};

/// How long shutdown may take before the process exits anyway.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// The self-test page; `__DEFAULT_URLS__` is replaced by a JSON array of this server's URLs.
const SELF_TEST_PAGE: &str = include_str!("selftest.html");

/// Process-wide figures that are not a driver's: reload outcomes.
pub struct Status {
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
    pub last_reload_ok: AtomicBool,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
            last_reload_ok: AtomicBool::new(true),
        }
    }
}

/// What the command line says about running.
pub struct Options {
    pub config_path: PathBuf,
    /// `--log-level`: wins over the file's `log-level`, also on reload.
    pub log_level: Option<String>,
    /// `--log-format json|text`: wins over the file's `log-format`.
    pub log_json: Option<bool>,
}

type FilterHandle = reload::Handle<EnvFilter, Registry>;

fn filter(level: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(format!("turnserver={level},warn"))
        .map_err(|e| format!("bad log level {level:?}: {e}"))
}

fn init_logging(level: &str, json: bool) -> Result<FilterHandle, String> {
    let (layer, handle) = reload::Layer::new(filter(level)?);
    let registry = tracing_subscriber::registry().with(layer);
    let result = if json {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_thread_names(true)
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_thread_names(true)
                    .with_writer(std::io::stderr)
                    .with_ansi(std::io::stderr().is_terminal()),
            )
            .try_init()
    };
    result.map_err(|e| format!("cannot set up logging: {e}"))?;
    Ok(handle)
}

/// The URLs a client would put in `iceServers` for this server, as a JSON array, for the
/// self-test page to offer.
fn default_urls(cfg: &Config) -> String {
    let host: IpAddr = cfg
        .external_ips
        .first()
        .map(|e| e.public)
        .or_else(|| {
            cfg.listening_ips
                .iter()
                .copied()
                .find(|ip| !ip.is_unspecified())
        })
        .unwrap_or(cfg.relay_ips[0]);
    let host = match host {
        IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let mut urls = Vec::new();
    if !cfg.no_udp {
        urls.push(format!("turn:{host}:{}?transport=udp", cfg.listening_port));
    }
    if !cfg.no_tcp {
        urls.push(format!("turn:{host}:{}?transport=tcp", cfg.listening_port));
    }
    if cfg.tls.is_some() {
        urls.push(format!(
            "turns:{host}:{}?transport=tcp",
            cfg.tls_listening_port
        ));
    }
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("[{}]", quoted.join(","))
}

fn bind_http(addr: SocketAddr) -> Result<std::net::TcpListener, String> {
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(64)?;
        Ok(s.into())
    };
    bind().map_err(|e| format!("cannot listen on prometheus {addr}: {e}"))
}

/// The number of relay threads for `workers` (0: one per CPU this process may use).
pub fn worker_count(workers: u32) -> usize {
    match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n as usize,
    }
}

/// A worker thread's end, reported to the supervisor also when the thread panics.
struct ExitNotice {
    index: usize,
    tx: tokio::sync::mpsc::UnboundedSender<(usize, Result<(), String>)>,
    result: Option<Result<(), String>>,
}

impl Drop for ExitNotice {
    fn drop(&mut self) {
        let result = self
            .result
            .take()
            .unwrap_or_else(|| Err("the thread panicked".into()));
        let _ = self.tx.send((self.index, result));
    }
}

/// Starts one relay thread: a current-thread runtime serving `listeners`.
fn spawn_worker(
    cfg: Config,
    listeners: Listeners,
    shard: net::Shard,
    commands: net::Commands,
    exits: tokio::sync::mpsc::UnboundedSender<(usize, Result<(), String>)>,
) -> std::io::Result<()> {
    let index = shard.index;
    std::thread::Builder::new()
        .name(format!("relay-{index}"))
        .spawn(move || {
            let mut notice = ExitNotice {
                index,
                tx: exits,
                result: None,
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    notice.result = Some(Err(format!("cannot start a runtime: {e}")));
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            let result = local.block_on(&rt, net::serve(&cfg, listeners, shard, commands));
            notice.result = Some(result.map_err(|e| e.to_string()));
        })
        .map(drop)
}

/// Runs the server until SIGTERM or SIGINT. `cfg` is the validated configuration read from
/// `opts.config_path`.
pub fn run(opts: Options, cfg: Config) -> ExitCode {
    let level = opts.log_level.clone().unwrap_or(cfg.log_level.clone());
    let log_filter = match init_logging(&level, opts.log_json.unwrap_or(cfg.log_json)) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("turnserver: {e}");
            return ExitCode::FAILURE;
        }
    };
    let span = usize::from(cfg.max_port - cfg.min_port) + 1;
    let workers = worker_count(cfg.workers).min(span);
    let listeners = match Listeners::bind_all(&cfg, workers) {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let http = match cfg.prometheus.map(bind_http).transpose() {
        Ok(h) => h,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let shards = match net::Shard::all(workers, &cfg) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "no randomness for the nonce secret");
            return ExitCode::FAILURE;
        }
    };
    info!(version = env!("CARGO_PKG_VERSION"), config = %opts.config_path.display(), workers, "starting");
    let certs = listeners[0].certificates();
    let (exits_tx, exits) = tokio::sync::mpsc::unbounded_channel();
    let mut drivers = Vec::new();
    for (l, shard) in listeners.into_iter().zip(shards) {
        let (handle, commands) = net::control::channel();
        if let Err(e) = spawn_worker(cfg.clone(), l, shard, commands, exits_tx.clone()) {
            error!(error = %e, "cannot start a relay thread");
            return ExitCode::FAILURE;
        }
        drivers.push(handle);
    }
    drop(exits_tx);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    let sup = Supervisor {
        opts,
        running: cfg,
        log_filter,
        certs,
        drivers,
        notifier: systemd::Notifier::from_env(),
        status: Arc::new(Status::default()),
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, sup.supervise(http, exits))
}

/// Everything reload needs.
struct Supervisor {
    opts: Options,
    /// The configuration in force (settings that need a restart stay as they started).
    running: Config,
    log_filter: FilterHandle,
    certs: Option<Arc<CertStore>>,
    drivers: Vec<Handle>,
    notifier: systemd::Notifier,
    status: Arc<Status>,
}

fn hook(kind: SignalKind, name: &str) -> Option<Signal> {
    signal(kind)
        .map_err(|e| error!(error = %e, "cannot watch {name}"))
        .ok()
}

async fn next(s: &mut Option<Signal>) {
    match s {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

type Exits = tokio::sync::mpsc::UnboundedReceiver<(usize, Result<(), String>)>;

impl Supervisor {
    async fn supervise(
        mut self,
        http: Option<std::net::TcpListener>,
        mut exits: Exits,
    ) -> ExitCode {
        // Watch the signals first: SIGHUP's default action is to terminate.
        let mut term = hook(SignalKind::terminate(), "SIGTERM");
        let mut int = hook(SignalKind::interrupt(), "SIGINT");
        let mut hup = hook(SignalKind::hangup(), "SIGHUP");

        // Ready once every driver answers (its listeners are bound and its loop runs).
        for d in &self.drivers {
            if !d.ping().await {
                let outcome = exits.recv().await;
                error!(?outcome, "a relay thread did not start");
                return ExitCode::FAILURE;
            }
        }
        let mut http_task = None;
        if let Some(listener) = http {
            let addr = self.running.prometheus.expect("bound only when configured");
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    error!(error = %e, "cannot use the prometheus listener");
                    return ExitCode::FAILURE;
                }
            };
            if !addr.ip().is_loopback() {
                warn!(listener = %addr, "metrics and the self-test page are served without authentication on a non-loopback address");
            }
            info!(listener = %addr, "serving /metrics, /health and the self-test page at /");
            let site = Rc::new(http::Site {
                drivers: self.drivers.clone(),
                status: self.status.clone(),
                page: SELF_TEST_PAGE.replace("__DEFAULT_URLS__", &default_urls(&self.running)),
            });
            http_task = Some(tokio::task::spawn_local(http::serve(listener, site)));
        }
        self.notifier
            .notify(&format!("READY=1\nSTATUS={}", self.status_line()));
        let mut watchdog = systemd::watchdog_interval().map(|period| {
            info!(period_ms = period.as_millis() as u64, "systemd watchdog on");
            tokio::time::interval(period)
        });
        for &relay in &self.running.relay_ips {
            info!(%relay, advertised = %self.running.advertised(relay), "relay address");
        }
        let nat = self.running.rfc5780();
        let (p1, p2) = (self.running.listening_port, self.running.alt_listening_port);
        for (a, b) in &nat.pairs {
            let (shown_a, shown_b) = (self.running.advertised(*a), self.running.advertised(*b));
            info!(
                "RFC 5780 NAT behaviour discovery on udp {a}:{p1}, {a}:{p2}, {b}:{p1} and \
                 {b}:{p2} (OTHER-ADDRESS {shown_b}:{p2} for {a}, {shown_a}:{p2} for {b})"
            );
        }
        for why in &nat.off {
            info!("RFC 5780 NAT behaviour discovery {why}");
        }
        for ip in self.running.unmapped_private_relays() {
            warn!(relay = %ip, "relay address is private and no external-ip maps it: clients outside its network get a relay candidate they cannot reach (behind 1:1 NAT, set external-ip = \"PUBLIC/{ip}\")");
        }
        info!(workers = self.drivers.len(), "ready");

        let why = loop {
            tokio::select! {
                _ = next(&mut term) => break "SIGTERM",
                _ = next(&mut int) => break "SIGINT",
                _ = next(&mut hup) => self.reload().await,
                _ = async { match watchdog.as_mut() { Some(w) => w.tick().await, None => std::future::pending().await } } => {
                    self.watchdog().await;
                }
                outcome = exits.recv() => {
                    error!(?outcome, "a relay thread stopped unexpectedly");
                    return ExitCode::FAILURE;
                }
            }
        };
        info!(signal = why, "shutting down");
        self.notifier.notify("STOPPING=1\nSTATUS=shutting down");
        if let Some(t) = http_task {
            t.abort();
        }
        for d in &self.drivers {
            d.shutdown();
        }
        let all_stopped = async {
            let mut failed = false;
            for _ in 0..self.drivers.len() {
                match exits.recv().await {
                    Some((_, Ok(()))) => {}
                    Some((worker, Err(e))) => {
                        error!(worker, error = %e, "a relay thread failed while stopping");
                        failed = true;
                    }
                    None => break,
                }
            }
            failed
        };
        tokio::select! {
            outcome = tokio::time::timeout(SHUTDOWN_TIMEOUT, all_stopped) => match outcome {
                Ok(false) => {
                    info!("shutdown complete");
                    ExitCode::SUCCESS
                }
                Ok(true) => ExitCode::FAILURE,
                Err(_) => {
                    warn!(timeout_s = SHUTDOWN_TIMEOUT.as_secs(), "shutdown took too long; exiting");
                    ExitCode::SUCCESS
                }
            },
            _ = next(&mut term) => { warn!("second signal: exiting now"); ExitCode::SUCCESS }
            _ = next(&mut int) => { warn!("second signal: exiting now"); ExitCode::SUCCESS }
        }
    }
}

impl Supervisor {
    fn status_line(&self) -> String {
        let c = &self.running;
        format!(
            "relaying on {} ports {}-{}; {} user(s)",
            c.relay_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            c.min_port,
            c.max_port,
            c.users.len()
        )
    }

    /// Sends `WATCHDOG=1` if every driver's loop answers in time.
    async fn watchdog(&self) {
        for d in &self.drivers {
            if !matches!(
                tokio::time::timeout(Duration::from_secs(1), d.ping()).await,
                Ok(true)
            ) {
                warn!("a relay thread did not answer: withholding the watchdog ping");
                return;
            }
        }
        self.notifier.notify("WATCHDOG=1");
    }

    /// Reads the configuration file again and applies what can change while running.
    async fn reload(&mut self) {
        let started = Instant::now();
        self.notifier.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading",
            systemd::monotonic_usec()
        ));
        let ok = match self.try_reload().await {
            Ok(()) => {
                self.status.reloads_ok.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) => {
                self.status.reloads_failed.fetch_add(1, Ordering::Relaxed);
                error!(
                    config = %self.opts.config_path.display(),
                    "reload refused, the running configuration stays: {e}"
                );
                false
            }
        };
        self.status.last_reload_ok.store(ok, Ordering::Relaxed);
        if let Some(c) = &self.certs {
            c.reload_logged("SIGHUP");
        }
        if ok {
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                users = self.running.users.len(),
                realm = %self.running.realm,
                "configuration reloaded"
            );
        }
        self.notifier
            .notify(&format!("READY=1\nSTATUS={}", self.status_line()));
    }

    async fn try_reload(&mut self) -> Result<(), String> {
        let mut new = config::load(&self.opts.config_path).map_err(|e| e.to_string())?;
        if new.auth != self.running.auth {
            return Err(
                "turning authentication on or off (lt-cred-mech / no-auth) needs a \
                        restart"
                    .into(),
            );
        }
        for key in self.running.restart_only_changes(&new) {
            warn!(
                key = key.0,
                "changed in the file, but applies only on restart; the running value stays"
            );
        }
        new.keep_restart_only(&self.running);
        if self.opts.log_level.is_none() && new.log_level != self.running.log_level {
            let f = filter(&new.log_level)?;
            // Logged before the change, so that it shows when the level goes up.
            info!(from = %self.running.log_level, to = %new.log_level, "log level changed");
            self.log_filter
                .reload(f)
                .map_err(|e| format!("cannot change the log level: {e}"))?;
        }
        let new = Arc::new(new);
        for d in &self.drivers {
            match d.reconfigure(new.clone()).await {
                Some(ignored) if ignored.is_empty() => {}
                Some(ignored) => warn!(?ignored, "settings left as they were"),
                None => return Err("a relay thread has stopped".into()),
            }
        }
        self.running = Arc::unwrap_or_clone(new);
        Ok(())
    }
}
