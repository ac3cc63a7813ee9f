//! Running Debian's Chromium through playwright-core (tests/browser/*.mjs): the prerequisites,
//! and a runner process bounded in time. Shared by tests/browser.rs and tests/selftest_page.rs.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Where the node runners and their `node_modules` are.
pub fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// The browser: Debian's Chromium, or `TURNSERVER_CHROMIUM`.
pub fn chromium() -> PathBuf {
    std::env::var_os("TURNSERVER_CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), Into::into)
}

/// The major version of `node`, if it runs.
fn node_major() -> Option<u32> {
    let out = Command::new("node").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim()
        .strip_prefix('v')?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// True when `test` (named in messages) can run: node 20+, Chromium, playwright-core, and
/// `certutil` when `needs_certutil`. Otherwise fails when `TURNSERVER_REQUIRE_BROWSER=1`, and
/// returns false (after saying so) when not.
pub fn browser_available(test: &str, needs_certutil: bool) -> bool {
    let mut missing = Vec::new();
    match node_major() {
        None => missing.push("node (apt-get install nodejs npm; Node 20 or newer)".to_string()),
        Some(v) if v < 20 => missing.push(format!("node 20 or newer (found {v})")),
        Some(_) => {}
    }
    if !chromium().is_file() {
        let path = chromium().display().to_string();
        missing.push(format!(
            "{path} (apt-get install chromium; never a downloaded browser)"
        ));
    }
    if !browser_dir()
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push(
            "tests/browser/node_modules/playwright-core (npm ci --prefix tests/browser)".into(),
        );
    }
    if needs_certutil && Command::new("certutil").output().is_err() {
        missing.push(
            "certutil, to trust the test CA for turns: (apt-get install libnss3-tools)".into(),
        );
    }
    if missing.is_empty() {
        return true;
    }
    let what = missing.join("; ");
    if std::env::var("TURNSERVER_REQUIRE_BROWSER").as_deref() == Ok("1") {
        panic!("TURNSERVER_REQUIRE_BROWSER=1 but {test} cannot run, missing: {what}");
    }
    eprintln!("skipping: {test} needs {what}");
    false
}

pub struct RunOutput {
    /// None when the runner was killed at the deadline.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `node SCRIPT` in tests/browser with the environment variable `env` = `config` until
/// it exits or `deadline` passes; then it gets SIGTERM (playwright closes Chromium on it) and,
/// 5 s later, SIGKILL.
pub fn run_node(script: &str, env: &str, config: &str, deadline: Duration) -> RunOutput {
    run_node_in(&[], script, env, config, deadline)
}

/// Like [`run_node`], with `node` run through the command `prefix` (e.g. `ip netns exec NS`);
/// an empty prefix runs `node` itself.
pub fn run_node_in(
    prefix: &[&str],
    script: &str,
    env: &str,
    config: &str,
    deadline: Duration,
) -> RunOutput {
    let (program, args) = match prefix {
        [] => ("node", &[][..]),
        [program, args @ ..] => (*program, args),
    };
    let mut child = Command::new(program)
        .args(args)
        .args((!prefix.is_empty()).then_some("node"))
        .arg(script)
        .env(env, config)
        .current_dir(browser_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start node: {e}"));
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = collect(Box::new(child.stdout.take().unwrap()));
    let stderr = collect(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let mut termed = None;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break termed.is_none().then_some(status);
        }
        match termed {
            None if start.elapsed() >= deadline => {
                let pid = child.id().to_string();
                let _ = Command::new("kill").args(["-TERM", &pid]).status();
                termed = Some(Instant::now());
            }
            Some(t) if t.elapsed() >= Duration::from_secs(5) => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    RunOutput {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}
