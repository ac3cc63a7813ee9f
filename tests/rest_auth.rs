//! Shared-secret (TURN REST API) credentials: minted by `turnserver credentials`, accepted for
//! Allocate over UDP and TCP, from either of two configured secrets (rotation), next to the
//! static `[users]`; expired usernames and wrong secrets get 401 with the reason logged.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Client, TestServer};

const SECRETS: &str = "static-auth-secret = [\"old-secret\", \"north\"]";

/// Runs `turnserver credentials ARGS` and returns the parsed JSON entry.
fn credentials(args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_turnserver"))
        .arg("credentials")
        .args(args)
        .output()
        .expect("run turnserver credentials");
    assert!(
        out.status.success(),
        "credentials failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object")
}

fn client(server: &TestServer, tcp: bool, user: &str, password: &str) -> Client {
    let mut c = if tcp {
        Client::tcp(server.addr())
    } else {
        Client::udp(server.addr())
    };
    c.user = user.into();
    c.password = password.into();
    c
}

fn allocate_with(server: &TestServer, tcp: bool, entry: &serde_json::Value) -> Option<u16> {
    let user = entry["username"].as_str().expect("username");
    let password = entry["credential"].as_str().expect("credential");
    client(server, tcp, user, password).allocate(None)
}

#[test]
fn minted_credentials_allocate_over_udp_and_tcp_with_either_secret() {
    let server = common::start(SECRETS);
    for secret in ["north", "old-secret"] {
        let entry = credentials(&["--secret", secret, "--user", "bob", "--ttl", "600"]);
        let username = entry["username"].as_str().unwrap();
        let (expiry, user) = username.split_once(':').expect("EXPIRY:USER");
        assert_eq!(user, "bob");
        let expiry: u64 = expiry.parse().unwrap();
        assert_eq!(entry["expires"].as_u64(), Some(expiry));
        for tcp in [false, true] {
            assert_eq!(
                allocate_with(&server, tcp, &entry),
                None,
                "{secret}, tcp {tcp}"
            );
        }
    }
    // Without a user part too.
    let entry = credentials(&["--secret", "north", "--ttl", "60"]);
    assert!(!entry["username"].as_str().unwrap().contains(':'));
    assert_eq!(allocate_with(&server, false, &entry), None);
    // The static user still works beside them.
    assert_eq!(Client::udp(server.addr()).allocate(None), None);
}

#[test]
fn expired_and_foreign_credentials_are_refused_with_the_reason_logged() {
    let server = common::start(SECRETS);
    let expired = "1000000000:bob";
    let password = turnserver::auth::rest_password(b"north", expired);
    assert_eq!(
        client(&server, false, expired, &password).allocate(None),
        Some(401)
    );
    assert!(
        server.wait_log("expired credentials", Duration::from_secs(2)),
        "{}",
        server.log()
    );
    let entry = credentials(&["--secret", "some-other-secret", "--user", "eve"]);
    assert_eq!(allocate_with(&server, false, &entry), Some(401));
    assert_eq!(allocate_with(&server, true, &entry), Some(401));
    // A REST-shaped name is not a credential on a server without secrets.
    let plain = common::start("");
    let entry = credentials(&["--secret", "north", "--user", "bob"]);
    assert_eq!(allocate_with(&plain, false, &entry), Some(401));
}

#[test]
fn credentials_take_the_secret_and_urls_from_a_config() {
    let server = common::start(&format!("{SECRETS}\nexternal-ip = \"203.0.113.7\""));
    let path = server.config_path();
    let entry = credentials(&["--config", path.to_str().unwrap(), "--user", "carol"]);
    let urls: Vec<&str> = entry["urls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    let port = server.addr().port();
    assert_eq!(
        urls,
        vec![
            format!("turn:203.0.113.7:{port}?transport=udp"),
            format!("turn:203.0.113.7:{port}?transport=tcp"),
        ]
    );
    // Minted from the first secret of the file: good on the server.
    assert_eq!(allocate_with(&server, false, &entry), None);
}

#[test]
fn credentials_refuse_without_a_secret() {
    let out = Command::new(env!("CARGO_BIN_EXE_turnserver"))
        .args(["credentials", "--user", "bob"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--secret"));
}
