//! `turnserver hash-password`: prints the `[users]` line that stores a user's long-term key
//! (HA1, MD5(user:realm:password)) instead of the password, so plain passwords need not sit in
//! the configuration file.

use std::io::{BufRead, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;

use crate::auth::long_term_key;
use crate::config;

/// Arguments of `turnserver hash-password`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The user name.
    #[arg(long, value_name = "USER")]
    pub user: String,
    /// The realm the key is for (the key changes with it). Without it, the `realm` of
    /// `--config`, else the default realm.
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,
    /// A server configuration to take the realm from.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The password. Without it, the first line of standard input is read (so that the
    /// password stays out of the shell history and the process list).
    #[arg(long, value_name = "PASSWORD")]
    pub password: Option<String>,
}

/// Runs the command: prints `USER = "0x..."`, or why it cannot.
pub fn run(args: &Args) -> ExitCode {
    match line(args) {
        Ok(l) => {
            println!("{l}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("turnserver hash-password: {e}");
            ExitCode::FAILURE
        }
    }
}

fn line(args: &Args) -> Result<String, String> {
    let realm = match (&args.realm, &args.config) {
        (Some(r), _) => r.clone(),
        (None, Some(path)) => config::load(path).map_err(|e| e.to_string())?.realm,
        (None, None) => config::DEFAULT_REALM.to_owned(),
    };
    let password = match &args.password {
        Some(p) => p.clone(),
        None => {
            let stdin = std::io::stdin();
            if stdin.is_terminal() {
                eprint!("password for {}: ", args.user);
            }
            let mut l = String::new();
            stdin
                .lock()
                .read_line(&mut l)
                .map_err(|e| format!("reading the password: {e}"))?;
            l.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    hashed_line(&args.user, &realm, &password)
}

/// The `[users]` line for `user` with the key for `realm` and `password`.
pub fn hashed_line(user: &str, realm: &str, password: &str) -> Result<String, String> {
    if user.is_empty() || user.contains(':') || user.chars().any(char::is_control) {
        return Err(format!(
            "user name {user:?} is empty or holds ':' or a control character"
        ));
    }
    if password.is_empty() {
        return Err("the password is empty".into());
    }
    let key = long_term_key(user, realm, password);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let name = if user
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        user.to_owned()
    } else {
        format!("{user:?}")
    };
    Ok(format!("{name} = \"0x{hex}\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_holds_the_rfc_key() {
        // Checked against `printf '%s' 'alice:example.org:secret' | md5sum`.
        assert_eq!(
            hashed_line("alice", "example.org", "secret").unwrap(),
            "alice = \"0x543e1aec5d3614f03141652d6ada51b2\""
        );
        assert!(
            hashed_line("a b", "r", "p")
                .unwrap()
                .starts_with("\"a b\" = ")
        );
        assert!(hashed_line("a:b", "r", "p").is_err());
        assert!(hashed_line("alice", "r", "").is_err());
    }
}
