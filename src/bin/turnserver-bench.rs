//! `turnserver-bench`: load generator for TURN servers on loopback. See [`turnserver::bench`].

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = turnserver::bench::Args::parse();
    turnserver::bench::run(&args)
}
