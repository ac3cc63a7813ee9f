//! The operator's self-test page (src/daemon/selftest.html), served at `/` of the
//! `prometheus-port` listener:
//!
//! - the file itself is self-contained: it loads nothing, sends nothing but WebRTC, and never
//!   writes markup from data;
//! - the server serves it with this server's URLs filled in, and with its security headers;
//! - Debian's Chromium, headless and driven by `playwright-core` (tests/browser/selftest.mjs),
//!   opens it from the server and uses it as an operator would: the URL field is prefilled with
//!   the server's `turn:` UDP URL; Gather with the right credentials over UDP and TCP gives an
//!   OK verdict and a relay candidate on 127.0.0.1 inside the relay range; the data test
//!   passes through the relay; a wrong password gives a FAIL verdict and a 401 in the error
//!   list; a malformed URL fails at once. The page must request nothing but itself.
//!
//! The browser part needs `node` (20 or newer), `/usr/bin/chromium` (or `TURNSERVER_CHROMIUM`)
//! and `npm ci --prefix tests/browser`. When something is missing it prints "skipping: ..."
//! and passes, unless `TURNSERVER_REQUIRE_BROWSER=1`, in which case it fails and says what to
//! install. The browser contacts nothing but 127.0.0.1.

mod common;

use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use common::browser::{browser_available, chromium, run_node};
use common::{PASSWORD, TestServer, USER, http_get_head};

/// The page as compiled into the server.
const PAGE: &str = include_str!("../src/daemon/selftest.html");
/// The token the server replaces with its URLs.
const TOKEN: &str = "__DEFAULT_URLS__";

/// The longest the runner (node and Chromium) may take before it is killed.
const RUNNER_DEADLINE: Duration = Duration::from_secs(45);
/// The runner's own deadline for all cases (it then reports what it has and exits).
const RUNNER_BUDGET_MS: u64 = 35_000;
/// Round trips of the page's data test.
const ROUND_TRIPS: usize = 5;

// ---------------------------------------------------------------------------------------------
// The server and its HTTP listener
// ---------------------------------------------------------------------------------------------

/// A server with the standard test user, loopback peers allowed, and its HTTP listener on a
/// free port; returns it and that port.
fn start_with_page() -> (TestServer, u16) {
    let http_port = common::free_tcp_port(0);
    let server = common::start(&format!("prometheus-port = {http_port}"));
    assert!(
        server
            .log()
            .contains(&format!("listener=127.0.0.1:{http_port}")),
        "the server did not log its HTTP listener on {http_port}:\n{}",
        server.log()
    );
    (server, http_port)
}

fn server_urls(server: &TestServer) -> [String; 2] {
    let port = server.port;
    [
        format!("turn:127.0.0.1:{port}?transport=udp"),
        format!("turn:127.0.0.1:{port}?transport=tcp"),
    ]
}

// ---------------------------------------------------------------------------------------------
// Tests without a browser
// ---------------------------------------------------------------------------------------------

#[test]
fn page_is_self_contained() {
    assert_eq!(
        PAGE.matches(TOKEN).count(),
        1,
        "the page must hold the token exactly once (the server replaces every occurrence)"
    );
    // Nothing is loaded or sent: no addresses, no resources, no request APIs.
    for bad in [
        "://",
        "src=",
        "@import",
        "url(",
        "fetch(",
        "XMLHttpRequest",
        "WebSocket",
        "EventSource",
        "sendBeacon",
        "navigator.serviceWorker",
        "<iframe",
        "<form action",
    ] {
        assert!(!PAGE.contains(bad), "the page contains {bad:?}");
    }
    for (i, _) in PAGE.match_indices("href=") {
        assert!(
            PAGE[i..].starts_with("href=\"data:,\""),
            "the page links to something: {}",
            &PAGE[i..PAGE.len().min(i + 60)]
        );
    }
    // Data is shown as text, never parsed as markup.
    for bad in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
    ] {
        assert!(!PAGE.contains(bad), "the page contains {bad:?}");
    }
    // The stable ids the operator documentation and the browser test rely on.
    for id in [
        "url",
        "preset",
        "username",
        "password",
        "relay-only",
        "data-test",
        "gather",
        "verdict",
        "errors",
        "candidates",
    ] {
        assert!(PAGE.contains(&format!("id=\"{id}\"")), "no element #{id}");
    }
    assert!(PAGE.contains("id=\"password\" type=\"password\""));
    assert!(PAGE.contains("id=\"relay-only\" type=\"checkbox\" checked"));
}

#[test]
fn page_is_served_with_this_servers_urls() {
    let (server, http_port) = start_with_page();
    let (head, body) = http_get_head(http_port, "/");
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200 ok"), "{head}");
    for header in [
        "content-type: text/html; charset=utf-8",
        "x-frame-options: deny",
        "cache-control: no-store",
        "x-content-type-options: nosniff",
    ] {
        assert!(head.contains(header), "no {header:?} in:\n{head}");
    }
    assert!(!head.contains("content-security-policy"), "{head}");
    let [udp, tcp] = server_urls(&server);
    let urls = format!("[\"{udp}\",\"{tcp}\"]");
    assert!(
        body.contains(&format!("DEFAULT_URLS = {urls};")),
        "the page does not carry {urls}"
    );
    assert!(!body.contains(TOKEN));
    assert_eq!(body.len(), PAGE.len() - TOKEN.len() + urls.len());
    // Served at /index.html too, whatever the query.
    assert_eq!(http_get_head(http_port, "/index.html?x=1").1, body);
}

// ---------------------------------------------------------------------------------------------
// What the runner reports
// ---------------------------------------------------------------------------------------------

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct RunnerOutput {
    ok: bool,
    error: Option<String>,
    browser_version: Option<String>,
    initial: Option<Initial>,
    #[serde(default)]
    cases: Vec<CaseResult>,
    #[serde(default)]
    requests: Vec<String>,
    #[serde(default)]
    page_errors: Vec<String>,
    #[serde(default)]
    console_errors: Vec<String>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Initial {
    http_status: Option<u16>,
    #[serde(default)]
    headers: Value,
    #[serde(flatten)]
    dom: Dom,
}

/// The page as the DOM shows it (selftest.mjs's `readPage`).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Dom {
    url: String,
    presets: Vec<String>,
    status: String,
    verdict: String,
    error_box_visible: bool,
    rows: Vec<Row>,
    errors: Vec<ErrorItem>,
    first_relay_ms: String,
    gather_disabled: bool,
}

#[derive(Deserialize, Debug)]
struct Row {
    #[serde(rename = "type")]
    kind: String,
    cells: Vec<String>,
}

#[derive(Deserialize, Debug)]
struct ErrorItem {
    code: String,
    text: String,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct CaseResult {
    name: String,
    /// Set when the case did not run to its end.
    error: Option<String>,
    status_while_running: Option<String>,
    ms: Option<u64>,
    result: Option<PageResult>,
    dom: Option<Dom>,
}

/// `window.selfTestResult`.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct PageResult {
    status: String,
    verdict: String,
    url: String,
    relay_only: bool,
    candidates: Vec<Candidate>,
    errors: Vec<IceError>,
    timings: Timings,
    data_rtt: Option<DataRtt>,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(rename = "type")]
    kind: Option<String>,
    protocol: Option<String>,
    address: Option<String>,
    port: Option<u16>,
    relay_protocol: Option<String>,
    url: Option<String>,
    ms: Option<f64>,
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
struct Timings {
    first_candidate_ms: Option<f64>,
    first_relay_ms: Option<f64>,
    complete_ms: Option<f64>,
    timed_out: bool,
}

#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct DataRtt {
    ok: bool,
    connect_ms: Option<f64>,
    round_trips_ms: Vec<f64>,
    median_ms: Option<f64>,
    error: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// The cases and their checks; each check pushes what is wrong, so that one run reports all
// ---------------------------------------------------------------------------------------------

enum Expect {
    /// OK with a relay candidate over this relay protocol (and, with the data test, data
    /// through it).
    Relay { proto: &'static str, data: bool },
    /// FAIL with this `icecandidateerror` code in the list.
    Error(u16),
    /// FAIL before anything is sent: the browser refuses the URL.
    Refused,
}

struct Case {
    name: &'static str,
    /// None: keep what the URL field holds (the prefilled value, for the first case).
    url: Option<String>,
    /// The URL the page runs with.
    expect_url: String,
    password: String,
    expect: Expect,
}

impl Case {
    fn config(&self) -> Value {
        json!({
            "name": self.name,
            "url": self.url,
            "username": USER,
            "password": self.password,
            "relayOnly": true,
            "dataTest": matches!(self.expect, Expect::Relay { data: true, .. }),
        })
    }
}

fn cases(server: &TestServer) -> Vec<Case> {
    let [udp, tcp] = server_urls(server);
    let case = |name, url: Option<&String>, expect_url: &String, password: &str, expect| Case {
        name,
        url: url.cloned(),
        expect_url: expect_url.clone(),
        password: password.into(),
        expect,
    };
    let wrong = format!("{PASSWORD}-not");
    let relay = |proto, data| Expect::Relay { proto, data };
    let bad = "turn:<img src=x onerror=window.pwned=1>:3478".to_string();
    vec![
        case("udp", None, &udp, PASSWORD, relay("udp", false)),
        case("tcp", Some(&tcp), &tcp, PASSWORD, relay("tcp", false)),
        case(
            "udp-wrong-password",
            Some(&udp),
            &udp,
            &wrong,
            Expect::Error(401),
        ),
        case(
            "tcp-wrong-password",
            Some(&tcp),
            &tcp,
            &wrong,
            Expect::Error(401),
        ),
        // After failures the page starts afresh: no stale errors.
        case("udp-data", Some(&udp), &udp, PASSWORD, relay("udp", true)),
        case("tcp-data", Some(&tcp), &tcp, PASSWORD, relay("tcp", true)),
        case("markup-url", Some(&bad), &bad, PASSWORD, Expect::Refused),
    ]
}

fn check(failures: &mut Vec<String>, ok: bool, what: impl FnOnce() -> String) {
    if !ok {
        failures.push(what());
    }
}

fn on_relay_port(server: &TestServer, c: &Candidate) -> bool {
    c.address.as_deref() == Some("127.0.0.1")
        && c.port
            .is_some_and(|p| (server.min_port..=server.max_port).contains(&p))
}

/// Checks common to every case: it ran to its end and the page shows what it reports.
fn check_ran<'a>(
    f: &mut Vec<String>,
    case: &Case,
    r: &'a CaseResult,
) -> Option<(&'a PageResult, &'a Dom)> {
    let name = case.name;
    if let Some(e) = &r.error {
        f.push(format!("{name}: did not finish: {e}; page: {:?}", r.dom));
        return None;
    }
    let (Some(res), Some(dom)) = (&r.result, &r.dom) else {
        f.push(format!("{name}: no result"));
        return None;
    };
    // A URL the browser refuses fails within the click already.
    let refused = matches!(case.expect, Expect::Refused);
    check(
        f,
        refused || r.status_while_running.as_deref() == Some("running"),
        || {
            format!(
                "{name}: the verdict was {:?} right after the click, not running",
                r.status_while_running
            )
        },
    );
    check(
        f,
        res.url == case.expect_url && dom.url == case.expect_url,
        || {
            format!(
                "{name}: ran with {:?} (field {:?}), expected {:?}",
                res.url, dom.url, case.expect_url
            )
        },
    );
    check(f, res.relay_only, || format!("{name}: relay only was off"));
    check(f, dom.status == res.status, || {
        format!(
            "{name}: #verdict says {:?}, the result {:?}",
            dom.status, res.status
        )
    });
    check(f, dom.verdict == res.verdict, || {
        format!(
            "{name}: #verdict shows {:?}, the result {:?}",
            dom.verdict, res.verdict
        )
    });
    check(f, !dom.gather_disabled, || {
        format!("{name}: Gather stayed disabled")
    });
    check(f, dom.rows.len() == res.candidates.len(), || {
        format!(
            "{name}: {} rows for {} candidates",
            dom.rows.len(),
            res.candidates.len()
        )
    });
    check(
        f,
        dom.errors.len() == res.errors.len() && dom.error_box_visible != res.errors.is_empty(),
        || {
            format!(
                "{name}: the error list {:?} (shown: {}) does not match {:?}",
                dom.errors, dom.error_box_visible, res.errors
            )
        },
    );
    Some((res, dom))
}

fn check_relay(
    f: &mut Vec<String>,
    server: &TestServer,
    case: &Case,
    proto: &str,
    data: bool,
    res: &PageResult,
    dom: &Dom,
) {
    let name = case.name;
    check(f, res.status == "ok", || {
        format!("{name}: verdict {:?}", res.verdict)
    });
    check(
        f,
        res.candidates
            .iter()
            .all(|c| c.kind.as_deref() == Some("relay")),
        || {
            format!(
                "{name}: a non-relay candidate with relay only on: {:?}",
                res.candidates
            )
        },
    );
    let relay = res.candidates.iter().find(|c| {
        c.protocol.as_deref() == Some("udp")
            && c.relay_protocol.as_deref() == Some(proto)
            && on_relay_port(server, c)
            && c.url.as_deref() == Some(case.expect_url.as_str())
    });
    let Some(relay) = relay else {
        let (min, max) = (server.min_port, server.max_port);
        return f.push(format!(
            "{name}: no relay candidate over {proto} on 127.0.0.1:[{min}..={max}]: {:?}",
            res.candidates
        ));
    };
    let port = relay.port.unwrap_or_default();
    let expected = format!("OK: relay candidate 127.0.0.1:{port} ({proto}) in ");
    check(f, res.verdict.starts_with(&expected), || {
        format!(
            "{name}: verdict {:?}, expected {expected:?}...",
            res.verdict
        )
    });
    let row = dom.rows.iter().any(|r| {
        r.kind == "relay"
            && r.cells.contains(&port.to_string())
            && r.cells.contains(&proto.to_string())
    });
    check(f, row, || {
        format!(
            "{name}: no relay row for port {port} over {proto}: {:?}",
            dom.rows
        )
    });
    check(f, res.errors.is_empty(), || {
        format!("{name}: errors: {:?}", res.errors)
    });
    let t = &res.timings;
    check(
        f,
        !t.timed_out
            && t.first_candidate_ms.is_some()
            && t.first_relay_ms == relay.ms
            && t.complete_ms >= t.first_relay_ms
            && dom.first_relay_ms == show(relay.ms),
        || format!("{name}: timings {t:?}, #t-relay {:?}", dom.first_relay_ms),
    );
    match (&res.data_rtt, data) {
        (None, false) => {}
        (Some(d), true) => {
            check(
                f,
                d.ok && d.error.is_none()
                    && d.round_trips_ms.len() == ROUND_TRIPS
                    && d.median_ms.is_some()
                    && d.connect_ms.is_some(),
                || format!("{name}: data test {d:?}"),
            );
            check(
                f,
                res.verdict.contains(&format!(
                    "; data through the relay: {ROUND_TRIPS} round trips, median "
                )),
                || {
                    format!(
                        "{name}: verdict {:?} does not tell the data test",
                        res.verdict
                    )
                },
            );
        }
        (d, _) => f.push(format!("{name}: data test {d:?}, expected to run: {data}")),
    }
}

fn check_error(f: &mut Vec<String>, case: &Case, code: u16, res: &PageResult, dom: &Dom) {
    let name = case.name;
    check(f, res.status == "fail", || {
        format!("{name}: verdict {:?}", res.verdict)
    });
    let expected = format!("FAIL: {code} ");
    check(
        f,
        res.verdict.starts_with(&expected) && res.verdict.contains("wrong username or password"),
        || {
            format!(
                "{name}: verdict {:?}, expected {expected:?}... wrong username or password",
                res.verdict
            )
        },
    );
    let reported = res
        .errors
        .iter()
        .any(|e| e.error_code == Some(code) && e.url.as_deref() == Some(case.expect_url.as_str()));
    check(f, reported, || {
        format!(
            "{name}: no {code} for {} in {:?}",
            case.expect_url, res.errors
        )
    });
    let shown = dom
        .errors
        .iter()
        .any(|e| e.code == code.to_string() && e.text.contains(&case.expect_url));
    check(f, shown && dom.error_box_visible, || {
        format!("{name}: #errors does not show the {code}: {:?}", dom.errors)
    });
    check(f, res.candidates.is_empty(), || {
        format!(
            "{name}: candidates despite the wrong password: {:?}",
            res.candidates
        )
    });
    check(f, res.data_rtt.is_none(), || {
        format!("{name}: a data test ran")
    });
}

fn check_refused(f: &mut Vec<String>, case: &Case, res: &PageResult, dom: &Dom) {
    let name = case.name;
    check(
        f,
        res.status == "fail" && res.verdict.starts_with("FAIL: "),
        || format!("{name}: verdict {:?}", res.verdict),
    );
    check(
        f,
        res.candidates.is_empty() && res.errors.is_empty() && dom.rows.is_empty(),
        || format!("{name}: candidates or errors for a URL the browser refuses: {res:?}"),
    );
}

/// Checks the server's log: allocations for alice over UDP and TCP, and a refused Allocate
/// (401, bad credentials) for each wrong-password case.
fn check_log(f: &mut Vec<String>, log: &str) {
    for transport in ["udp", "tcp"] {
        let client = format!("client={transport}:127.0.0.1:");
        let for_alice = |l: &&str| l.contains(&client) && l.contains("user=\"alice\"");
        // The gathering, and the two connections of the data test.
        let created = log
            .lines()
            .filter(|l| l.contains("allocation created"))
            .filter(for_alice)
            .count();
        check(f, created >= 4, || {
            format!("{created} allocations for alice over {transport}, expected at least 4")
        });
        let refused = log.lines().filter(for_alice).any(|l| {
            l.contains("request refused") && l.contains("code=401") && l.contains("bad credentials")
        });
        check(f, refused, || {
            format!("the server did not log a 401 for alice over {transport}")
        });
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

/// A figure as the page shows it: "-" when there is none.
fn show(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

// ---------------------------------------------------------------------------------------------
// The browser test
// ---------------------------------------------------------------------------------------------

#[test]
fn chromium_runs_the_self_test_page() {
    if !browser_available("the self-test page test", false) {
        return;
    }
    let (server, http_port) = start_with_page();
    let page_url = format!("http://127.0.0.1:{http_port}/");
    let cases = cases(&server);
    let config = json!({
        "pageUrl": page_url,
        "chromium": chromium(),
        "deadlineMs": RUNNER_BUDGET_MS,
        "cases": cases.iter().map(Case::config).collect::<Vec<_>>(),
    })
    .to_string();
    let out = run_node(
        "selftest.mjs",
        "TURNSERVER_SELFTEST_CONFIG",
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
    // As loaded: this server's URLs offered, the UDP one in the field, nothing run yet.
    let [udp, tcp] = server_urls(&server);
    match &result.initial {
        None => f.push("no initial page state".into()),
        Some(i) => {
            check(&mut f, i.http_status == Some(200), || {
                format!("GET / answered {:?}", i.http_status)
            });
            check(&mut f, i.headers["x-frame-options"] == "DENY", || {
                format!("headers {}", i.headers)
            });
            check(&mut f, i.dom.url == udp, || {
                format!("the URL field holds {:?}, expected {udp:?}", i.dom.url)
            });
            check(&mut f, i.dom.presets == [udp.clone(), tcp.clone()], || {
                format!("the page offers {:?}", i.dom.presets)
            });
            check(
                &mut f,
                i.dom.status == "idle" && i.dom.rows.is_empty(),
                || format!("before any run: {:?}", i.dom),
            );
        }
    }
    for case in &cases {
        let Some(r) = result.cases.iter().find(|r| r.name == case.name) else {
            f.push(format!("{}: no result", case.name));
            continue;
        };
        let Some((res, dom)) = check_ran(&mut f, case, r) else {
            continue;
        };
        match case.expect {
            Expect::Relay { proto, data } => {
                check_relay(&mut f, &server, case, proto, data, res, dom)
            }
            Expect::Error(code) => check_error(&mut f, case, code, res, dom),
            Expect::Refused => check_refused(&mut f, case, res, dom),
        }
        let errors: Vec<String> = res
            .errors
            .iter()
            .map(|e| format!("{:?} {:?}", e.error_code, e.error_text))
            .collect();
        eprintln!(
            "{:<19} {:>5} ms to verdict; first relay {:>4} ms, gathering complete {:>4} ms, \
             data round trips {:?}, errors [{}]: {}",
            case.name,
            r.ms.unwrap_or_default(),
            show(res.timings.first_relay_ms),
            show(res.timings.complete_ms),
            res.data_rtt.as_ref().map(|d| &d.round_trips_ms),
            errors.join(", "),
            res.verdict,
        );
    }
    // Self-contained: the page itself is the only request, and it ran without errors.
    check(&mut f, result.requests == [page_url.clone()], || {
        format!(
            "the browser requested {:?}, expected only {page_url}",
            result.requests
        )
    });
    check(
        &mut f,
        result.page_errors.is_empty() && result.console_errors.is_empty(),
        || {
            format!(
                "page errors {:?}, console errors {:?}",
                result.page_errors, result.console_errors
            )
        },
    );
    check_log(&mut f, &server.log());
    eprintln!(
        "chromium {} ran {} cases on the self-test page in {:?}",
        result.browser_version.as_deref().unwrap_or("-"),
        cases.len(),
        out.elapsed
    );
    if !f.is_empty() {
        panic!("{}", context(&format!("FAILED:\n- {}", f.join("\n- "))));
    }
}
