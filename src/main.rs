//! The `turnserver` binary: command line, logging, runtime, signals. The work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use turnserver::{config, daemon};

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
    /// Log format, `text` or `json` (one object per line), overriding the file's `log-format`.
    #[arg(long)]
    log_format: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Checks a TURN server from outside: Binding, Allocate, CreatePermission, ChannelBind and a
    /// relayed round trip, each step timed; exit code 0 when every step passed.
    Probe(turnserver::probe::Args),
    /// Mints a TURN REST API credential (username EXPIRY[:USER], password
    /// base64(HMAC-SHA1(secret, username))) and prints it as an iceServers entry (JSON).
    Credentials(turnserver::credentials::Args),
    /// Prints the [users] line that stores a user's key (HA1, MD5 of user:realm:password)
    /// instead of the password; the password is read from standard input unless given.
    HashPassword(turnserver::hash_password::Args),
    /// Translates a coturn turnserver.conf into this server's TOML configuration, with a
    /// comment for every line that could not be carried over; exit code 3 when the result
    /// needs editing before it validates.
    MigrateConfig(turnserver::migrate::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match &cli.command {
        Some(Command::Probe(args)) => return turnserver::probe::run(args),
        Some(Command::Credentials(args)) => return turnserver::credentials::run(args),
        Some(Command::HashPassword(args)) => return turnserver::hash_password::run(args),
        Some(Command::MigrateConfig(args)) => return turnserver::migrate::run(args),
        None => {}
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
    let log_json = match cli.log_format.as_deref() {
        None => None,
        Some("json") => Some(true),
        Some("text") => Some(false),
        Some(other) => {
            eprintln!("turnserver: --log-format {other:?} is not \"text\" or \"json\"");
            return ExitCode::FAILURE;
        }
    };
    daemon::run(
        daemon::Options {
            config_path: cli.config,
            log_level: cli.log_level,
            log_json,
        },
        cfg,
    )
}
