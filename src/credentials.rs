//! `turnserver credentials`: mints a TURN REST API credential from a shared secret and prints
//! it as an `iceServers` entry, so that an operator can try shared-secret authentication (in
//! the self-test page, `turnserver probe`, or a browser) without writing the application side.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::auth::{rest_password, rest_username};
use crate::config::{self, Config};
use crate::probe::report::push_json_str;

/// Arguments of `turnserver credentials`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The shared secret (one of `static-auth-secret`). Without it, the first secret of
    /// `--config` is used.
    #[arg(long, value_name = "SECRET")]
    pub secret: Option<String>,
    /// A server configuration to take the secret and the server URLs from.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The application's user name, appended to the expiry (`EXPIRY:USER`); optional.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Seconds the credential stays valid.
    #[arg(long, value_name = "SECONDS", default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=31_536_000))]
    pub ttl: u64,
    /// A server URL for the entry (repeatable), e.g. `turn:turn.example.org:3478?transport=udp`.
    /// Default: from `--config` (its external or listening address and ports), else
    /// `turn:127.0.0.1:3478` over UDP and TCP.
    #[arg(long = "url", value_name = "URL")]
    pub urls: Vec<String>,
}

/// Runs the command: prints the entry, or why it cannot.
pub fn run(args: &Args) -> ExitCode {
    match entry(args, SystemTime::now()) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnserver credentials: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The `iceServers` entry as one JSON object: `urls`, `username`, `credential`, and the
/// expiry (`expires`, Unix seconds) for the reader.
pub fn entry(args: &Args, now: SystemTime) -> Result<String, String> {
    let cfg = match &args.config {
        Some(path) => Some(config::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let secret = match (&args.secret, &cfg) {
        (Some(s), _) if !s.is_empty() => s.clone(),
        (Some(_), _) => return Err("--secret is empty".into()),
        (None, Some(c)) => c
            .auth_secrets
            .first()
            .map(|s| s.expose().to_owned())
            .ok_or_else(|| {
                "the configuration has no static-auth-secret; pass --secret".to_owned()
            })?,
        (None, None) => return Err("pass --secret SECRET or --config FILE".into()),
    };
    if args
        .user
        .as_deref()
        .is_some_and(|u| u.chars().any(char::is_control))
    {
        return Err("--user contains a control character".into());
    }
    let unix = now
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the system clock is before 1970".to_owned())?
        .as_secs();
    let expires = unix + args.ttl;
    let username = rest_username(expires, args.user.as_deref());
    let credential = rest_password(secret.as_bytes(), &username);
    let urls = if args.urls.is_empty() {
        default_urls(cfg.as_ref())
    } else {
        args.urls.clone()
    };
    let mut json = String::from("{\"urls\": [");
    for (i, url) in urls.iter().enumerate() {
        if i > 0 {
            json.push_str(", ");
        }
        push_json_str(&mut json, url);
    }
    json.push_str("], \"username\": ");
    push_json_str(&mut json, &username);
    json.push_str(", \"credential\": ");
    push_json_str(&mut json, &credential);
    json.push_str(&format!(", \"expires\": {expires}}}"));
    Ok(json)
}

/// URLs a client would use for the server `cfg` describes: its first external address, else
/// its first listening address (127.0.0.1 for a wildcard), with every transport it serves.
fn default_urls(cfg: Option<&Config>) -> Vec<String> {
    let Some(cfg) = cfg else {
        return vec![
            "turn:127.0.0.1:3478?transport=udp".into(),
            "turn:127.0.0.1:3478?transport=tcp".into(),
        ];
    };
    let ip = cfg
        .external_ips
        .first()
        .map(|e| e.public)
        .or_else(|| cfg.listening_ips.first().copied())
        .filter(|ip| !ip.is_unspecified())
        .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    let host = match ip {
        std::net::IpAddr::V6(v6) => format!("[{v6}]"),
        v4 => v4.to_string(),
    };
    let port = cfg.listening_port;
    let mut urls = Vec::new();
    if !cfg.no_udp {
        urls.push(format!("turn:{host}:{port}?transport=udp"));
    }
    if !cfg.no_tcp {
        urls.push(format!("turn:{host}:{port}?transport=tcp"));
    }
    if cfg.tls.is_some() {
        urls.push(format!(
            "turns:{host}:{}?transport=tcp",
            cfg.tls_listening_port
        ));
    }
    urls
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn args(secret: &str, user: Option<&str>, ttl: u64) -> Args {
        Args {
            secret: Some(secret.into()),
            config: None,
            user: user.map(Into::into),
            ttl,
            urls: Vec::new(),
        }
    }

    #[test]
    fn entry_carries_the_minted_credential() {
        let now = UNIX_EPOCH + Duration::from_secs(1_699_996_400);
        let json = entry(&args("north", Some("alice"), 3600), now).unwrap();
        assert_eq!(
            json,
            "{\"urls\": [\"turn:127.0.0.1:3478?transport=udp\", \
             \"turn:127.0.0.1:3478?transport=tcp\"], \"username\": \"1700000000:alice\", \
             \"credential\": \"Cd/49soE35ICqcJF/bCTn8Z4OyE=\", \"expires\": 1700000000}"
        );
    }

    #[test]
    fn refuses_without_a_secret() {
        let mut a = args("", None, 60);
        assert!(entry(&a, SystemTime::now()).is_err());
        a.secret = None;
        assert!(
            entry(&a, SystemTime::now())
                .unwrap_err()
                .contains("--secret")
        );
    }
}
