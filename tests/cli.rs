//! The command line: `--check-config`, `--version`, `hash-password`, and refusal of bad
//! configurations at start.

mod common;

use std::process::Command;

fn turnserver() -> Command {
    Command::new(env!("CARGO_BIN_EXE_turnserver"))
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("turnserver-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn check_config_accepts_the_example_and_describes_it() {
    let out = turnserver()
        .args(["--check-config", "--config"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/turnserver.toml.example"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("127.0.0.1:3478"), "{text}");
    assert!(text.contains("49152-65535"), "{text}");
    assert!(text.contains("turnserver.local"), "{text}");
    assert!(text.contains("1 user"), "{text}");
}

#[test]
fn bad_configurations_are_refused_naming_key_and_line() {
    let cases = [
        (
            "ports.toml",
            "listening-ips = [\"127.0.0.1\"]\nmin-port = 60000\nmax-port = 50000\n[users]\na = \"b\"\n",
            &["min-port", "line 2"][..],
        ),
        (
            "unknown.toml",
            "listening-ips = [\"127.0.0.1\"]\nlistening-prot = 1\n[users]\na = \"b\"\n",
            &["listening-prot"][..],
        ),
        (
            "nousers.toml",
            "listening-ips = [\"127.0.0.1\"]\n",
            &["users"][..],
        ),
        (
            "badip.toml",
            "listening-ips = [\"127.0.0.300\"]\n[users]\na = \"b\"\n",
            &["listening-ips", "127.0.0.300"][..],
        ),
    ];
    for (name, text, needles) in cases {
        let path = write(name, text);
        for check in [true, false] {
            let mut cmd = turnserver();
            if check {
                cmd.arg("--check-config");
            }
            let out = cmd.arg("--config").arg(&path).output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{name}: {out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            for n in needles {
                assert!(err.contains(n), "{name}: {n:?} not in {err}");
            }
        }
    }
    let out = turnserver()
        .args(["--config", "/nonexistent/turnserver.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/turnserver.toml"));
}

#[test]
fn version_is_printed() {
    let out = turnserver().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// `hash-password` reads the password from standard input and prints a `[users]` line; a
/// server configured with that line (no plain password in the file) accepts the password.
#[test]
fn hash_password_line_configures_a_user_without_the_password() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnserver"))
        .args(["hash-password", "--user", "dora", "--realm", common::REALM])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"explorer\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(line.starts_with("dora = \"0x"), "{line}");
    assert!(!line.contains("explorer"));
    let server = common::start_with(&format!("allow-loopback-peers = true\n[users]\n{line}"));
    let mut c = common::Client::udp(server.addr());
    c.user = "dora".into();
    c.password = "explorer".into();
    assert_eq!(c.allocate(None), None);
    c = common::Client::udp(server.addr());
    c.user = "dora".into();
    c.password = "wrong".into();
    assert_eq!(c.allocate(None), Some(401));
}

/// A private relay address without an external-ip mapping is named in `--check-config` (the
/// usual cause of relay candidates browsers cannot reach behind 1:1 NAT); a running server logs
/// each relay address with the address it advertises.
#[test]
fn private_relay_without_external_ip_is_warned_about() {
    let cfg = write(
        "private.toml",
        "listening-ips = [\"10.0.0.5\"]\n[users]\na = \"b\"\n",
    );
    let out = turnserver()
        .args(["--check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning: relay ip 10.0.0.5 is private and no external-ip maps it"),
        "{text}"
    );
    let mapped = write(
        "mapped.toml",
        "listening-ips = [\"10.0.0.5\"]\nexternal-ip = \"203.0.113.5/10.0.0.5\"\n[users]\na = \"b\"\n",
    );
    let out = turnserver()
        .args(["--check-config", "--config"])
        .arg(&mapped)
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&out.stdout).contains("warning: relay ip"));

    let server = common::start("");
    assert!(
        server.wait_log(
            "relay address relay=127.0.0.1 advertised=127.0.0.1",
            std::time::Duration::from_secs(2)
        ),
        "{}",
        server.log()
    );
    assert!(!server.log().contains("is private"));
}
