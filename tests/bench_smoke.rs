//! The load generator against the real server: it sets up allocations with long-term
//! credentials, relays for about a second with no loss, and prints one valid JSON object.
//! A behaviour test: no figure is asserted beyond "it relayed".

mod common;

use std::process::Command;

use serde_json::Value;

fn bench(server: &common::TestServer, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_turnserver-bench"))
        .args(["--server", &server.addr().to_string()])
        .args(["--user", common::USER, "--password", common::PASSWORD])
        .args(["--server-pid", &server.pid().to_string()])
        .args(["--threads", "2", "--json"])
        .args(extra)
        .output()
        .expect("run turnserver-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "turnserver-bench {extra:?} failed: {}\nstdout: {stdout}\nstderr: {}\nserver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one JSON line expected, got: {stdout}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn assert_relayed_without_loss(v: &Value, clients: u64) {
    assert_eq!(u(v, "clients"), clients, "{v}");
    assert_eq!(u(v, "setup_failed"), 0, "{v}");
    let sent = u(v, "sent");
    assert!(sent > 0, "{v}");
    assert_eq!(u(v, "received"), sent, "every packet echoed: {v}");
    assert_eq!(u(v, "lost"), 0, "{v}");
    assert_eq!(u(v, "corrupt") + u(v, "unexpected"), 0, "{v}");
    assert!(v["relayed_pps"].as_f64().unwrap() > 0.0, "{v}");
    for q in ["p50", "p99", "p999"] {
        assert!(v["latency_us"][q].as_f64().unwrap() > 0.0, "{v}");
    }
    let s = &v["server_process"];
    assert_eq!(u(s, "relayed_packets"), 2 * sent, "{v}");
    assert!(u(s, "rss_kb_after") > 0, "{v}");
    assert_eq!(u(v, "release_failures"), 0, "{v}");
}

#[test]
fn relays_paced_channel_data_over_udp() {
    let server = common::start("");
    let v = bench(
        &server,
        &["--clients", "8", "--rate", "100", "--duration", "1"],
    );
    assert_eq!(v["mode"], "relay");
    assert_eq!(v["transport"], "udp");
    assert_eq!(v["framing"], "channel");
    assert_eq!(v["load"], "paced");
    assert_relayed_without_loss(&v, 8);
    // 8 clients at 100 packets/s for a second.
    let sent = u(&v, "sent");
    assert!((600..=900).contains(&sent), "{v}");
}

#[test]
fn relays_bursts_of_indications_over_tcp() {
    let server = common::start("");
    let v = bench(
        &server,
        &[
            "--clients",
            "4",
            "--transport",
            "tcp",
            "--indications",
            "--window",
            "4",
            "--size",
            "1200",
            "--duration",
            "1",
        ],
    );
    assert_eq!(v["transport"], "tcp");
    assert_eq!(v["framing"], "indication");
    assert_eq!(v["load"], "burst");
    assert_relayed_without_loss(&v, 4);
}

#[test]
fn measures_allocation_setups() {
    let server = common::start("");
    let v = bench(&server, &["--mode", "alloc", "--allocations", "40"]);
    assert_eq!(v["mode"], "alloc");
    assert_eq!(u(&v, "allocations"), 40, "{v}");
    assert_eq!(u(&v, "failed"), 0, "{v}");
    assert!(v["allocations_per_s"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["server_process"]["rss_bytes_per_allocation"].is_number(),
        "{v}"
    );
    assert_eq!(u(&v, "release_failures"), 0, "{v}");
}

#[test]
fn refuses_addresses_off_loopback() {
    let out = Command::new(env!("CARGO_BIN_EXE_turnserver-bench"))
        .args([
            "--server",
            "192.0.2.1:3478",
            "--user",
            "a",
            "--password",
            "b",
        ])
        .output()
        .expect("run turnserver-bench");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("loopback"));
}
