//! `turnserver probe` against our server (started by the harness on 127.0.0.1) and against
//! small fake servers that misbehave on purpose: every step, both transports, the JSON report,
//! and the failures an operator must be able to tell apart.
//!
//! The probe runs as the real binary, by its cargo path; every run is killed if it outlives
//! [`RUN_DEADLINE`], and fake servers stop on their own.

mod common;

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use turnserver::wire::{AttrType, Class, MessageRef, MessageWriter, Method};

/// The longest one probe run may take before the test kills it and fails.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// Every step of a full run over UDP, in order.
const STEPS: [&str; 7] = [
    "binding",
    "allocate",
    "peer",
    "create_permission",
    "channel_bind",
    "round_trip",
    "refresh",
];

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.elapsed, self.stdout, self.stderr
        )
    }
}

/// Runs `turnserver probe ARGS` under [`RUN_DEADLINE`].
fn probe(args: &[&str]) -> Run {
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_turnserver"))
        .arg("probe")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start turnserver probe");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > RUN_DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("turnserver probe {args:?} still running after {RUN_DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Run {
        code: status.code().unwrap_or(-1),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

fn udp_url(port: u16) -> String {
    format!("turn:127.0.0.1:{port}")
}

fn tcp_url(port: u16) -> String {
    format!("turn:127.0.0.1:{port}?transport=tcp")
}

/// Asserts a text report of a full, passing run: every step on its own line marked ok, in
/// order, and `OK` last.
fn assert_passed(run: &Run, first: &[&str]) {
    assert_eq!(run.code, 0, "{run:?}");
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.last(), Some(&"OK"), "{run:?}");
    let steps: Vec<&str> = lines
        .iter()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            (words.next() == Some("ok")).then_some(name)
        })
        .collect();
    let want: Vec<&str> = first.iter().chain(STEPS.iter()).copied().collect();
    assert_eq!(steps, want, "{run:?}");
}

fn last_line(run: &Run) -> &str {
    run.stdout.lines().last().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Against our server
// ---------------------------------------------------------------------------------------------

#[test]
fn passes_over_udp() {
    let server = common::start("");
    let run = probe_alice(&udp_url(server.port), &["--realm", common::REALM]);
    assert_passed(&run, &[]);
    assert!(run.stdout.contains("5/5 round trips"), "{run:?}");
    assert!(run.stdout.contains("realm test.local"), "{run:?}");
    assert!(run.stdout.contains("allocation released"), "{run:?}");
}

#[test]
fn passes_over_tcp() {
    let server = common::start("");
    let run = probe_alice(&tcp_url(server.port), &["--count", "3"]);
    assert_passed(&run, &["connect"]);
    assert!(run.stdout.contains("over tcp"), "{run:?}");
    assert!(run.stdout.contains("3/3 round trips"), "{run:?}");
}

#[test]
fn passes_with_a_host_name() {
    let server = common::start("");
    let run = probe_alice(&format!("turn:localhost:{}", server.port), &[]);
    // localhost may resolve to ::1 first, where the server does not listen: only a run that
    // resolved to 127.0.0.1 must pass.
    if run.stdout.contains("localhost is 127.0.0.1") {
        assert_passed(&run, &["resolve"]);
    } else {
        assert!(run.stdout.contains("resolve"), "{run:?}");
    }
}

#[test]
fn json_report_parses_and_names_every_step() {
    let server = common::start("");
    let run = probe_alice(&udp_url(server.port), &["--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON object");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["server"], format!("127.0.0.1:{}", server.port));
    assert_eq!(v["transport"], "udp");
    assert!(v["error"].is_null(), "{v}");
    let steps = v["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, STEPS, "{v}");
    for s in steps {
        assert_eq!(s["ok"], true, "{s}");
        assert!(s["ms"].as_f64().unwrap() >= 0.0, "{s}");
        assert!(!s["detail"].as_str().unwrap().is_empty(), "{s}");
    }
    let rtt = &steps[5]["rtt_ms"];
    let (min, avg, max) = (
        rtt["min"].as_f64().unwrap(),
        rtt["avg"].as_f64().unwrap(),
        rtt["max"].as_f64().unwrap(),
    );
    assert!(min <= avg && avg <= max, "{rtt}");
}

#[test]
fn json_report_of_a_failure_carries_the_error() {
    let server = common::start("");
    let run = probe(&[
        &tcp_url(server.port),
        "--user",
        common::USER,
        "--password",
        "not the password",
        "--json",
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON object");
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["transport"], "tcp");
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("wrong username or password"), "{v}");
    let last = v["steps"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["step"], "allocate", "{v}");
    assert_eq!(last["ok"], false, "{v}");
}

#[test]
fn external_echo_peer() {
    let server = common::start("");
    let peer = common::udp_echo_peer(10, Duration::from_secs(20));
    let run = probe_alice(&udp_url(server.port), &["--peer", &peer.to_string()]);
    assert_passed(&run, &[]);
    assert!(run.stdout.contains("external echo peer"), "{run:?}");
}

#[test]
fn wrong_password_is_reported_as_refused_credentials() {
    let server = common::start("");
    for url in [udp_url(server.port), tcp_url(server.port)] {
        let run = probe(&[
            &url,
            "--user",
            common::USER,
            "--password",
            "queen of hearts",
        ]);
        assert_eq!(run.code, 1, "{run:?}");
        let last = last_line(&run);
        assert!(last.starts_with("FAIL: "), "{run:?}");
        assert!(
            last.contains("wrong username or password for realm test.local"),
            "{run:?}"
        );
        assert!(last.contains("401"), "{run:?}");
    }
}

#[test]
fn missing_credentials_are_asked_for() {
    let server = common::start("");
    let run = probe(&[&udp_url(server.port)]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(last_line(&run).contains("requires credentials"), "{run:?}");
    assert!(last_line(&run).contains("--user"), "{run:?}");
}

#[test]
fn wrong_realm_is_reported() {
    let server = common::start("");
    let run = probe_alice(&udp_url(server.port), &["--realm", "wrong"]);
    assert_eq!(run.code, 1, "{run:?}");
    let last = last_line(&run);
    assert!(last.contains("wrong realm"), "{run:?}");
    assert!(last.contains("test.local"), "{run:?}");
}

#[test]
fn peers_refused_by_policy_get_the_403_explanation() {
    let server = common::start_with(&format!(
        "[users]\n{} = \"{}\"\n",
        common::USER,
        common::PASSWORD
    ));
    for url in [udp_url(server.port), tcp_url(server.port)] {
        let run = probe(&[&url, "--user", common::USER, "--password", common::PASSWORD]);
        assert_eq!(run.code, 1, "{run:?}");
        let last = last_line(&run);
        assert!(last.contains("peer policy refuses"), "{run:?}");
        assert!(last.contains("403"), "{run:?}");
        assert!(last.contains("allow-loopback-peers"), "{run:?}");
        // The allocation is released even so.
        assert!(run.stdout.contains("allocation released"), "{run:?}");
    }
}

#[test]
fn closed_udp_port_is_no_answer_within_the_timeout() {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let run = probe(&[&udp_url(port), "--timeout", "1"]);
    assert_eq!(run.code, 1, "{run:?}");
    let last = last_line(&run);
    assert!(
        last.contains(&format!(
            "no answer from 127.0.0.1:{port} over udp within 1 s"
        )),
        "{run:?}"
    );
    assert!(run.elapsed < Duration::from_secs(10), "{run:?}");
}

#[test]
fn silent_udp_server_is_no_answer_within_the_timeout() {
    // Bound but never read: no ICMP comes back, the probe retransmits until its timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let run = probe(&[&udp_url(port), "--timeout", "1.5"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        last_line(&run).contains("no answer from") && last_line(&run).contains("within 1.5 s"),
        "{run:?}"
    );
    assert!(run.elapsed >= Duration::from_millis(1400), "{run:?}");
    assert!(run.elapsed < Duration::from_secs(10), "{run:?}");
    // RTO 500 ms, doubling: sends at 0, 0.5 and 1.5 s at most.
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1500];
    let mut sent = 0;
    while silent.recv(&mut buf).is_ok() {
        sent += 1;
    }
    assert!((2..=3).contains(&sent), "{sent} Binding requests");
}

#[test]
fn closed_tcp_port_is_refused() {
    let port = common::free_tcp_port(0);
    let run = probe(&[&tcp_url(port), "--timeout", "1"]);
    assert_eq!(run.code, 1, "{run:?}");
    let last = last_line(&run);
    assert!(last.contains("refused"), "{run:?}");
    assert!(
        last.contains(&format!("127.0.0.1:{port} over tcp")),
        "{run:?}"
    );
    assert!(run.elapsed < Duration::from_secs(10), "{run:?}");
}

#[test]
fn usage_errors_exit_2() {
    for url in [
        "http://127.0.0.1:3478",
        "127.0.0.1",
        "turn:",
        "turn:127.0.0.1:0",
        "turn:127.0.0.1?transport=sctp",
        "turn:::1",
    ] {
        let run = probe(&[url]);
        assert_eq!(run.code, 2, "{url}: {run:?}");
        assert!(run.stderr.contains("turnserver probe:"), "{url}: {run:?}");
        assert!(run.stdout.is_empty(), "{url}: {run:?}");
    }
    let run = probe(&["turns:127.0.0.1:5349"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains("not supported by probe yet (TLS)"),
        "{run:?}"
    );

    let run = probe(&["turn:example.invalid", "--json", "--peer", "nowhere"]);
    assert_eq!(run.code, 2, "{run:?}");
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("--peer"), "{v}");

    for args in [
        &["turn:127.0.0.1", "--user", "alice"][..],
        &["turn:127.0.0.1", "--timeout", "0"][..],
        &["turn:127.0.0.1", "--count", "0"][..],
    ] {
        let run = probe(args);
        assert_eq!(run.code, 2, "{args:?}: {run:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Against fake servers
// ---------------------------------------------------------------------------------------------

const FAKE_REALM: &str = "fake.realm";

/// A UDP server on 127.0.0.1 that answers each request with what `respond` writes (or not at
/// all when it returns `None`), for at most a minute or until dropped.
struct FakeServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

type Respond = dyn Fn(&MessageRef, SocketAddr, &mut [u8]) -> Option<usize> + Send;

fn fake_server(respond: Box<Respond>) -> FakeServer {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let addr = sock.local_addr().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let until = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 1500];
        let mut out = [0u8; 1500];
        while !flag.load(Ordering::Relaxed) && Instant::now() < until {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(m) = MessageRef::parse(&buf[..n]) else {
                continue;
            };
            if let Some(len) = respond(&m, from, &mut out) {
                let _ = sock.send_to(&out[..len], from);
            }
        }
    });
    FakeServer { addr, stop }
}

fn key() -> [u8; 16] {
    turnserver::auth::long_term_key(common::USER, FAKE_REALM, common::PASSWORD)
}

/// Writes a response to `req`: `class`, the attributes `add` appends, then
/// MESSAGE-INTEGRITY with `sign` if given.
fn answer(
    req: &MessageRef,
    class: Class,
    out: &mut [u8],
    sign: Option<&[u8]>,
    add: impl FnOnce(&mut MessageWriter),
) -> Option<usize> {
    let mut w = MessageWriter::new(out, req.method(), class, req.transaction_id());
    add(&mut w);
    if let Some(k) = sign {
        w.add_integrity(k);
    }
    w.finish()
}

fn binding(req: &MessageRef, from: SocketAddr, out: &mut [u8]) -> Option<usize> {
    answer(req, Class::Success, out, None, |w| {
        w.add_xor_address(AttrType::XOR_MAPPED_ADDRESS, from);
    })
}

fn challenge(req: &MessageRef, out: &mut [u8], code: u16, nonce: &str) -> Option<usize> {
    answer(req, Class::Error, out, None, |w| {
        w.add_error_reason(
            code,
            if code == 401 {
                "Unauthorized"
            } else {
                "Stale Nonce"
            },
        )
        .add(AttrType::REALM, FAKE_REALM.as_bytes())
        .add(AttrType::NONCE, nonce.as_bytes());
    })
}

fn fake_args(server: &FakeServer) -> Vec<String> {
    vec![
        udp_url(server.addr.port()),
        "--user".into(),
        common::USER.into(),
        "--password".into(),
        common::PASSWORD.into(),
        "--timeout".into(),
        "1".into(),
    ]
}

/// Runs the probe on `url` with the harness's user and password, then `extra`.
fn probe_alice(url: &str, extra: &[&str]) -> Run {
    let mut args = vec![url, "--user", common::USER, "--password", common::PASSWORD];
    args.extend_from_slice(extra);
    probe(&args)
}

fn probe_fake(server: &FakeServer, extra: &[&str]) -> Run {
    let mut args = fake_args(server);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    probe(&args)
}

#[test]
fn a_401_for_every_nonce_is_a_401_loop() {
    let n = Arc::new(AtomicU32::new(0));
    let server = fake_server(Box::new(move |req, from, out| match req.method() {
        Method::BINDING => binding(req, from, out),
        _ => {
            let i = n.fetch_add(1, Ordering::Relaxed);
            challenge(req, out, 401, &format!("nonce-{i}"))
        }
    }));
    let run = probe_fake(&server, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let last = last_line(&run);
    assert!(last.contains("401 loop"), "{run:?}");
    assert!(last.contains(FAKE_REALM), "{run:?}");
}

#[test]
fn a_stale_nonce_is_retried_once_and_responses_are_verified() {
    // Allocate: 401, then 438 with a new nonce, then success only for the new nonce, signed
    // with the user's key; the relayed address is a socket that never answers.
    let relay = UdpSocket::bind("127.0.0.1:0").unwrap();
    let relayed = relay.local_addr().unwrap();
    let server = fake_server(Box::new(move |req, from, out| {
        let nonce = req.nonce().ok().flatten().unwrap_or_default().to_vec();
        if req.method() == Method::BINDING {
            return binding(req, from, out);
        }
        if req.integrity().is_none() {
            return challenge(req, out, 401, "first");
        }
        if !req.verify_integrity(&key()) {
            return challenge(req, out, 401, "first");
        }
        if nonce == b"first" {
            return challenge(req, out, 438, "second");
        }
        answer(req, Class::Success, out, Some(&key()), |w| {
            if req.method() == Method::ALLOCATE {
                w.add_xor_address(AttrType::XOR_RELAYED_ADDRESS, relayed)
                    .add_u32(AttrType::LIFETIME, 600);
            }
        })
    }));
    let run = probe_fake(&server, &["--json"]);
    assert_eq!(run.code, 1, "{run:?}");
    let v: serde_json::Value = serde_json::from_str(run.stdout.trim()).unwrap();
    let steps = v["steps"].as_array().unwrap();
    let ok = |name: &str| {
        steps
            .iter()
            .find(|s| s["step"] == name)
            .map(|s| s["ok"] == true)
    };
    assert_eq!(ok("allocate"), Some(true), "{v}");
    assert_eq!(ok("create_permission"), Some(true), "{v}");
    assert_eq!(ok("channel_bind"), Some(true), "{v}");
    // Nothing comes through a relay that does not relay.
    assert_eq!(ok("round_trip"), Some(false), "{v}");
    let error = v["error"].as_str().unwrap();
    assert!(error.starts_with("relay unreachable"), "{v}");
    assert!(error.contains(&relayed.to_string()), "{v}");
    assert!(error.contains("external-ip"), "{v}");
    // The allocation is released after the failure.
    assert_eq!(ok("refresh"), Some(true), "{v}");
}

#[test]
fn a_response_signed_with_another_key_fails_the_integrity_check() {
    let server = fake_server(Box::new(move |req, from, out| {
        if req.method() == Method::BINDING {
            return binding(req, from, out);
        }
        if req.integrity().is_none() {
            return challenge(req, out, 401, "n");
        }
        answer(req, Class::Success, out, Some(b"not the key"), |w| {
            w.add_xor_address(
                AttrType::XOR_RELAYED_ADDRESS,
                "127.0.0.1:9".parse().unwrap(),
            );
        })
    }));
    let run = probe_fake(&server, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(last_line(&run).contains("MESSAGE-INTEGRITY"), "{run:?}");
}

#[test]
fn unexpected_error_codes_are_shown_with_their_reason() {
    let server = fake_server(Box::new(move |req, from, out| {
        if req.method() == Method::BINDING {
            return binding(req, from, out);
        }
        if req.integrity().is_none() {
            return challenge(req, out, 401, "n");
        }
        // A reason phrase with a line break must not forge a line of the report.
        answer(req, Class::Error, out, Some(&key()), |w| {
            w.add_error_reason(486, "Quota\nOK");
        })
    }));
    let run = probe_fake(&server, &[]);
    assert_eq!(run.code, 1, "{run:?}");
    let last = last_line(&run);
    assert!(last.contains("Allocate refused: 486 Quota"), "{run:?}");
    assert!(!run.stdout.lines().any(|l| l == "OK"), "{run:?}");
}
