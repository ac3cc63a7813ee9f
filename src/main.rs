//! The `turnserver` binary: command line, logging, runtime, signals. The work is in the library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

use turnserver::config;
use turnserver::net::{self, Listeners};

/// A TURN/STUN relay server (RFC 8489, RFC 8656).
#[derive(Parser, Debug)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML).
    #[arg(short, long, default_value = "/etc/turnserver.toml")]
    config: PathBuf,
    /// Validate the configuration, print what it means, and exit (0 valid, 1 not).
    #[arg(long)]
    check_config: bool,
    /// Log level (error, warn, info, debug, trace), overriding the file's `log-level`.
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Checks a TURN server from outside: Binding, Allocate, CreatePermission, ChannelBind and a
    /// relayed round trip, each step timed; exit code 0 when every step passed.
    Probe(turnserver::probe::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Probe(args)) = &cli.command {
        return turnserver::probe::run(args);
    }
    let cfg = match config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("turnserver: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.check_config {
        let certificates = [
            cfg.tls
                .as_ref()
                .map(|f| turnserver::net::tls::load(f).map(drop)),
            cfg.dtls
                .as_ref()
                .map(|f| turnserver::net::dtls::load(f).map(drop)),
        ];
        if let Some(Err(e)) = certificates.into_iter().flatten().find(Result::is_err) {
            eprintln!("turnserver: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
        println!("{}: OK", cli.config.display());
        println!("{}", cfg.summary());
        return ExitCode::SUCCESS;
    }
    let level = cli.log_level.as_deref().unwrap_or(&cfg.log_level);
    let filter = match EnvFilter::try_new(format!("turnserver={level},warn")) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("turnserver: bad log level {level:?}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let listeners = match Listeners::bind(&cfg) {
        Ok(l) => l,
        Err(e) => {
            error!("{e}");
            return ExitCode::FAILURE;
        }
    };
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
    let local = tokio::task::LocalSet::new();
    info!(version = env!("CARGO_PKG_VERSION"), config = %cli.config.display(), "starting");
    let result = local.block_on(&rt, net::serve(&cfg, listeners, shutdown_signal()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = %e, "server failed");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %e, "cannot watch SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
