//! `turnserver probe`: a TURN client that checks a server from outside, step by step.

use std::process::ExitCode;

/// Arguments of `turnserver probe`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The server, as an ICE URL: `turn:HOST[:PORT][?transport=udp|tcp]`.
    pub url: String,
    /// Username for the long-term credentials.
    #[arg(long)]
    pub user: Option<String>,
    /// Password for the long-term credentials.
    #[arg(long)]
    pub password: Option<String>,
    /// Print the result as one JSON object instead of lines of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs the probe and prints the report; success when every step passed.
pub fn run(_args: &Args) -> ExitCode {
    eprintln!("turnserver probe: not built yet");
    ExitCode::FAILURE
}
