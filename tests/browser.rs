//! Browser end-to-end test: Debian's Chromium, headless and driven by `playwright-core`
//! (tests/browser/run.mjs and page.html), uses our server as its only ICE server with
//! `iceTransportPolicy: 'relay'`, over `turn:` UDP, `turn:` TCP and `turns:` (TLS):
//!
//! - it gathers candidates as the Trickle ICE sample does and must get a relay candidate of the
//!   right relay protocol (udp, tcp, tls), on 127.0.0.1 and inside the server's relay range;
//! - two relay-only peer connections in the page open a data channel through the server and
//!   send 20 messages each way (strings and ArrayBuffers, 1 byte to 128 KiB, all byte values),
//!   compared byte for byte in the page; getStats must show a relay/relay selected pair;
//! - a wrong password must surface as the browser's `icecandidateerror` 401, with no relay
//!   candidate.
//!
//! For `turns:` a throw-away CA (tests/common's `TestCerts`) is trusted by Chromium through an
//! NSS database in a throw-away HOME, made with `certutil` (package libnss3-tools).
//!
//! Needs `node` (20 or newer), `/usr/bin/chromium` (or `TURNSERVER_CHROMIUM`), `certutil` and
//! `npm ci --prefix tests/browser`. When something is missing the test prints "skipping: ..."
//! and passes, unless `TURNSERVER_REQUIRE_BROWSER=1`, in which case it fails and says what to
//! install. No browser is ever downloaded, and the browser contacts nothing but 127.0.0.1.

mod common;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use common::browser::{browser_available, chromium, run_node};
use common::{PASSWORD, TempDir, TestCerts, TestServer, USER};

/// The longest the runner (node and Chromium) may take before it is killed.
const RUNNER_DEADLINE: Duration = Duration::from_secs(90);
/// The runner's own deadline for all cases (it then reports what it has and exits).
const RUNNER_BUDGET_MS: u64 = 75_000;
/// Messages each side of the data channel sends (page.html's `messages()`).
const MESSAGES_EACH_WAY: u32 = 20;

// ---------------------------------------------------------------------------------------------
// The cases (run.mjs's input) and the results (its output)
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct Case {
    name: String,
    urls: String,
    username: String,
    credential: String,
    #[serde(flatten)]
    expect: Expect,
    /// How the browser reaches the server: "udp", "tcp" or "tls" (as the server logs it).
    #[serde(skip)]
    transport: &'static str,
}

#[derive(Serialize, Clone, Copy)]
enum Expect {
    /// A relay candidate over this relay protocol and a working data channel through it.
    #[serde(rename = "expectRelayProtocol")]
    Relay(&'static str),
    /// This `icecandidateerror` code, and no relay candidate.
    #[serde(rename = "expectError")]
    Error(u16),
}

/// A right-password and a wrong-password case for each of UDP, TCP and TLS, and over UDP a
/// TURN REST credential minted from `secret` (the server's `static-auth-secret`) and an expired
/// one.
fn cases(server: &TestServer, tls_port: u16, secret: &str) -> Vec<Case> {
    let port = server.port;
    let targets = [
        ("udp", format!("turn:127.0.0.1:{port}?transport=udp")),
        ("tcp", format!("turn:127.0.0.1:{port}?transport=tcp")),
        ("tls", format!("turns:127.0.0.1:{tls_port}?transport=tcp")),
    ];
    targets
        .into_iter()
        .flat_map(|(transport, urls)| {
            let case = |name, credential, expect| Case {
                name,
                urls: urls.clone(),
                username: USER.into(),
                credential,
                expect,
                transport,
            };
            [
                case(transport.into(), PASSWORD.into(), Expect::Relay(transport)),
                case(
                    format!("{transport}-wrong-password"),
                    format!("{PASSWORD}-not"),
                    Expect::Error(401),
                ),
            ]
        })
        .chain(rest_cases(port, secret))
        .collect()
}

/// REST credentials over UDP: one valid for an hour, one expired a minute ago.
fn rest_cases(port: u16, secret: &str) -> Vec<Case> {
    use turnserver::auth::{rest_password, rest_username};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    [
        ("udp-rest", now + 3600, Expect::Relay("udp")),
        ("udp-rest-expired", now - 60, Expect::Error(401)),
    ]
    .into_iter()
    .map(|(name, expiry, expect)| {
        let username = rest_username(expiry, Some(USER));
        Case {
            name: name.into(),
            urls: format!("turn:127.0.0.1:{port}?transport=udp"),
            credential: rest_password(secret.as_bytes(), &username),
            username,
            expect,
            transport: "udp",
        }
    })
    .collect()
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct RunnerOutput {
    ok: bool,
    error: Option<String>,
    browser_version: Option<String>,
    #[serde(default)]
    cases: Vec<CaseResult>,
    /// `{"ok": ..., "url": ..., "error": ...}`: whether Chromium trusted the https page.
    #[serde(default)]
    tls_probe: Value,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct CaseResult {
    name: String,
    /// Set when the case did not run to its end.
    error: Option<String>,
    gather: Option<Gather>,
    data_channel: Option<DataChannel>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Gather {
    candidates: Vec<Candidate>,
    errors: Vec<IceError>,
    first_relay_ms: Option<f64>,
    complete_ms: Option<f64>,
    timed_out: bool,
}

/// A gathered candidate, or a candidate in getStats.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(rename = "type", alias = "candidateType")]
    kind: Option<String>,
    protocol: Option<String>,
    relay_protocol: Option<String>,
    relay_protocol_from_stats: Option<String>,
    address: Option<String>,
    port: Option<u16>,
    url: Option<String>,
}

impl Candidate {
    fn is_relay(&self) -> bool {
        self.kind.as_deref() == Some("relay")
    }

    /// Chromium leaves `RTCIceCandidate.relayProtocol` null for UDP, so the page also reads
    /// it from getStats.
    fn relay_protocol(&self) -> Option<&str> {
        (self.relay_protocol.as_ref())
            .or(self.relay_protocol_from_stats.as_ref())
            .map(String::as_str)
    }

    fn on_relay_port(&self, server: &TestServer) -> bool {
        self.address.as_deref() == Some("127.0.0.1")
            && self
                .port
                .is_some_and(|p| (server.min_port..=server.max_port).contains(&p))
    }
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct IceError {
    error_code: Option<u16>,
    error_text: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct DataChannel {
    connect_ms: Option<f64>,
    connected: bool,
    transfer_timed_out: bool,
    errors: Vec<Value>,
    a_to_b: Option<Transfer>,
    b_to_a: Option<Transfer>,
    selected_pair: SelectedPairs,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Transfer {
    sent: u32,
    received: u32,
    matched: u32,
    bytes_sent: u64,
    bytes_received: u64,
    mismatches: Vec<Value>,
    ms: Option<f64>,
}

#[derive(Deserialize, Debug)]
struct SelectedPairs {
    a: Option<Pair>,
    b: Option<Pair>,
}

#[derive(Deserialize, Debug)]
struct Pair {
    local: Option<Candidate>,
    remote: Option<Candidate>,
}

impl Pair {
    fn ends(&self) -> Option<(&Candidate, &Candidate)> {
        Some((self.local.as_ref()?, self.remote.as_ref()?))
    }
}

// ---------------------------------------------------------------------------------------------
// Checks: each pushes what is wrong, so that one run reports everything at once
// ---------------------------------------------------------------------------------------------

fn check(failures: &mut Vec<String>, ok: bool, what: impl FnOnce() -> String) {
    if !ok {
        failures.push(what());
    }
}

fn check_relay_case(
    f: &mut Vec<String>,
    server: &TestServer,
    case: &Case,
    proto: &str,
    r: &CaseResult,
) {
    let name = &case.name;
    let Some(g) = &r.gather else {
        return f.push(format!("{name}: no gathering result"));
    };
    check(f, !g.timed_out, || {
        format!("{name}: gathering did not complete in time")
    });
    check(f, g.candidates.iter().all(Candidate::is_relay), || {
        format!("{name}: a non-relay candidate under iceTransportPolicy 'relay'")
    });
    let good = g.candidates.iter().any(|c| {
        c.is_relay()
            && c.protocol.as_deref() == Some("udp")
            && c.relay_protocol() == Some(proto)
            && c.on_relay_port(server)
            && c.url.as_deref() == Some(case.urls.as_str())
    });
    check(f, good, || {
        let (min, max, url) = (server.min_port, server.max_port, &case.urls);
        format!(
            "{name}: no relay candidate with relayProtocol {proto} on 127.0.0.1:[{min}..={max}] from {url}"
        )
    });
    check(f, g.errors.is_empty(), || {
        format!("{name}: icecandidateerror while gathering: {:?}", g.errors)
    });
    check(f, g.first_relay_ms.is_some(), || {
        format!("{name}: no time to the first relay candidate")
    });

    let Some(d) = &r.data_channel else {
        return f.push(format!("{name}: no data channel result"));
    };
    check(f, d.connected, || {
        format!("{name}: the relay-only data channel did not open")
    });
    check(f, !d.transfer_timed_out, || {
        format!("{name}: the messages did not all arrive in time")
    });
    check(f, d.errors.is_empty(), || {
        format!(
            "{name}: errors during the data channel test: {:?}",
            d.errors
        )
    });
    for (dir, x) in [("aToB", &d.a_to_b), ("bToA", &d.b_to_a)] {
        let all = x.as_ref().is_some_and(|x| {
            [x.sent, x.received, x.matched] == [MESSAGES_EACH_WAY; 3]
                && x.mismatches.is_empty()
                && x.bytes_received == x.bytes_sent
        });
        check(f, all, || format!("{name}: {dir} messages differ: {x:?}"));
    }
    let pairs = &d.selected_pair;
    let (a, b) = (
        pairs.a.as_ref().and_then(Pair::ends),
        pairs.b.as_ref().and_then(Pair::ends),
    );
    for (side, pair, this, other) in [("a", &pairs.a, a, b), ("b", &pairs.b, b, a)] {
        let ok = this.is_some_and(|(local, remote)| {
            local.is_relay()
                && remote.is_relay()
                && local.relay_protocol() == Some(proto)
                && local.on_relay_port(server)
                && remote.on_relay_port(server)
                // Each side's remote candidate is the other side's relay address.
                && other.is_some_and(|(other_local, _)| other_local.port == remote.port)
        });
        check(f, ok, || {
            format!(
                "{name}: side {side}'s selected pair is not relay/relay over {proto} on our relay ports: {pair:?}"
            )
        });
    }
}

fn check_error_case(f: &mut Vec<String>, case: &Case, code: u16, r: &CaseResult) {
    let name = &case.name;
    let Some(g) = &r.gather else {
        return f.push(format!("{name}: no gathering result"));
    };
    check(f, !g.timed_out, || {
        format!("{name}: gathering did not complete in time")
    });
    let seen = g
        .errors
        .iter()
        .any(|e| e.error_code == Some(code) && e.url.as_deref() == Some(case.urls.as_str()));
    check(f, seen, || {
        format!(
            "{name}: no icecandidateerror {code} for {}; errors: {:?}",
            case.urls, g.errors
        )
    });
    check(f, g.candidates.is_empty(), || {
        format!(
            "{name}: candidates despite the wrong password: {:?}",
            g.candidates
        )
    });
}

/// Checks the server's log: allocations for alice over every transport that worked, a refused
/// Allocate (401, bad credentials) for every wrong-password case, and nothing else refused.
fn check_log(f: &mut Vec<String>, log: &str, cases: &[Case]) {
    for c in cases {
        let client = format!("client={}:127.0.0.1:", c.transport);
        let user = format!("user=\"{}\"", c.username);
        let for_alice = |l: &&str| l.contains(&client) && l.contains(&user);
        match c.expect {
            Expect::Relay(_) => {
                // One allocation for the gathering, one for each of the two connections.
                let n = log
                    .lines()
                    .filter(|l| l.contains("allocation created"))
                    .filter(for_alice)
                    .count();
                check(f, n >= 3, || {
                    let t = c.transport;
                    format!(
                        "{}: {n} allocations created for alice over {t}, expected at least 3",
                        c.name
                    )
                });
            }
            Expect::Error(code) => {
                let refused = log.lines().filter(for_alice).any(|l| {
                    l.contains("request refused")
                        && l.contains(&format!("code={code}"))
                        && (l.contains("bad credentials") || l.contains("expired credentials"))
                });
                check(f, refused, || {
                    format!(
                        "{}: the server did not log a {code} for alice over {}",
                        c.name, c.transport
                    )
                });
            }
        }
    }
    let odd: Vec<&str> = log
        .lines()
        .filter(|l| {
            (l.contains("request refused") && !l.contains("code=401"))
                || l.contains(" WARN ")
                || l.contains(" ERROR ")
        })
        .collect();
    check(f, odd.is_empty(), || {
        format!(
            "the server refused or complained about something else:\n{}",
            odd.join("\n")
        )
    });
}

/// A figure for the report: "-" when there is none.
fn show(v: Option<impl ToString>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

// ---------------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------------

#[test]
fn chromium_relays_through_the_server() {
    if !browser_available("the browser test", true) {
        return;
    }
    let dir = TempDir::new("browser");
    let certs = TestCerts::generate(&dir.0, "browser");
    let secret = "browser-rest-secret";
    let (server, tls_port) =
        common::start_tls(&certs, &format!("static-auth-secret = \"{secret}\""));
    assert!(
        server
            .log()
            .contains(&format!("listener=127.0.0.1:{tls_port} transport=\"tls\"")),
        "the server did not open its TLS listener on {tls_port}:\n{}",
        server.log()
    );

    let cases = cases(&server, tls_port, secret);
    let config = json!({
        "chromium": chromium(),
        "deadlineMs": RUNNER_BUDGET_MS,
        "cases": cases,
        "caCert": certs.ca,
        "tlsProbe": { "cert": certs.cert, "key": certs.key },
    })
    .to_string();
    let out = run_node(
        "run.mjs",
        "TURNSERVER_BROWSER_CONFIG",
        &config,
        RUNNER_DEADLINE,
    );
    let context = |why: &str| {
        format!(
            "{why}\nrunner status {:?} after {:?}\nconfig: {config}\nstdout:\n{}\nstderr:\n{}\nserver log:\n{}",
            out.status,
            out.elapsed,
            out.stdout,
            out.stderr,
            server.log()
        )
    };
    let Some(line) = out.stdout.lines().rev().find(|l| l.starts_with('{')) else {
        panic!("{}", context("the runner printed no JSON line"));
    };
    let result: RunnerOutput = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{}", context(&format!("unexpected runner output: {e}"))));
    if !result.ok {
        let why = match out.status {
            None => format!("the runner did not finish within {RUNNER_DEADLINE:?} and was killed"),
            Some(_) => format!(
                "the runner failed: {}",
                result.error.as_deref().unwrap_or("-")
            ),
        };
        panic!("{}", context(&why));
    }

    let mut f = Vec::new();
    check(&mut f, out.status.is_some_and(|s| s.success()), || {
        format!("the runner exited with {:?}", out.status)
    });
    check(&mut f, result.tls_probe["ok"] == true, || {
        format!(
            "Chromium does not trust the test CA through its NSS db (an https page with the \
             server's certificate failed): {}",
            result.tls_probe
        )
    });
    for case in &cases {
        let Some(r) = result.cases.iter().find(|r| r.name == case.name) else {
            f.push(format!("{}: no result", case.name));
            continue;
        };
        if let Some(e) = &r.error {
            f.push(format!("{}: {e}", case.name));
            continue;
        }
        match case.expect {
            Expect::Relay(proto) => check_relay_case(&mut f, &server, case, proto, r),
            Expect::Error(code) => check_error_case(&mut f, case, code, r),
        }
        let g = r.gather.as_ref();
        let d = r.data_channel.as_ref();
        let errors: Vec<String> = g
            .map(|g| &g.errors[..])
            .unwrap_or_default()
            .iter()
            .map(|e| format!("{} {}", show(e.error_code), show(e.error_text.as_ref())))
            .collect();
        eprintln!(
            "{:<20} first relay {:>7} ms, gathering complete {:>7} ms, channel open {:>7} ms, \
             a->b {:>6} ms, b->a {:>6} ms, errors {}",
            case.name,
            show(g.and_then(|g| g.first_relay_ms)),
            show(g.and_then(|g| g.complete_ms)),
            show(d.and_then(|d| d.connect_ms)),
            show(d.and_then(|d| d.a_to_b.as_ref()?.ms)),
            show(d.and_then(|d| d.b_to_a.as_ref()?.ms)),
            errors.join(", "),
        );
    }
    // The browser has closed its connections (and so sent its Refresh with lifetime 0) by the
    // time the runner exits.
    check_log(&mut f, &server.log(), &cases);
    eprintln!(
        "chromium {} ran {} cases in {:?}",
        show(result.browser_version.as_ref()),
        cases.len(),
        out.elapsed
    );
    if !f.is_empty() {
        panic!("{}", context(&format!("FAILED:\n- {}", f.join("\n- "))));
    }
}
