//! The command line: `--check-config`, `--version`, and refusal of bad configurations at start.

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
