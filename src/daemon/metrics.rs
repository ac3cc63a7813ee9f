//! Prometheus exposition of a [`Snapshot`]: built per scrape from the plain counters the drivers
//! keep, so the relay path never touches a metric object, a lock or a label map.
//!
//! Names follow the Prometheus conventions: a `turnserver_` prefix, `_total` on counters, base
//! units (`_bytes`, `_seconds`), labels for the dimensions (`direction`, `transport`, `method`,
//! `code`, `reason`, `listener`).

use std::sync::atomic::Ordering;

use prometheus::Encoder as _;
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

use super::Status;
use crate::core::{COUNTED_ERRORS, COUNTED_METHODS, Drop, EndReason, OUTCOMES, TRANSPORTS};
use crate::net::Snapshot;

/// One sample: label pairs and a value.
type Sample = (Vec<(&'static str, String)>, f64);

#[derive(Default)]
struct Families(Vec<MetricFamily>);

impl Families {
    fn add(&mut self, kind: MetricType, name: &str, help: &str, samples: Vec<Sample>) {
        if samples.is_empty() {
            return;
        }
        let mut family = MetricFamily::default();
        family.set_name(name.to_owned());
        family.set_help(help.to_owned());
        family.set_field_type(kind);
        let metrics = samples
            .into_iter()
            .map(|(labels, value)| {
                let mut m = Metric::default();
                m.set_label(
                    labels
                        .into_iter()
                        .map(|(k, v)| {
                            let mut l = LabelPair::default();
                            l.set_name(k.to_owned());
                            l.set_value(v);
                            l
                        })
                        .collect(),
                );
                if kind == MetricType::COUNTER {
                    let mut c = Counter::default();
                    c.set_value(value);
                    m.set_counter(c);
                } else {
                    let mut g = Gauge::default();
                    g.set_value(value);
                    m.set_gauge(g);
                }
                m
            })
            .collect();
        family.set_metric(metrics);
        self.0.push(family);
    }

    fn counter(&mut self, name: &str, help: &str, samples: Vec<Sample>) {
        self.add(MetricType::COUNTER, name, help, samples);
    }

    fn gauge(&mut self, name: &str, help: &str, samples: Vec<Sample>) {
        self.add(MetricType::GAUGE, name, help, samples);
    }
}

fn one(v: u64) -> Vec<Sample> {
    vec![(Vec::new(), v as f64)]
}

fn code_label(outcome: usize) -> String {
    match outcome {
        0 => "success".to_owned(),
        i if COUNTED_ERRORS[i - 1] == 0 => "other".to_owned(),
        i => COUNTED_ERRORS[i - 1].to_string(),
    }
}

/// The exposition text (format 0.0.4) for a snapshot summed over every driver, the process's
/// own status, and the standard `process_*` metrics.
pub fn render(s: &Snapshot, status: &Status) -> String {
    let c = &s.core;
    let mut f = Families::default();
    f.gauge(
        "turnserver_build_info",
        "Always 1; the labels say which build runs.",
        vec![(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1.0)],
    );
    f.gauge(
        "turnserver_allocations",
        "Allocations alive.",
        one(s.allocations),
    );
    f.counter(
        "turnserver_allocations_created_total",
        "Allocations created.",
        one(c.allocations_created),
    );
    f.counter(
        "turnserver_allocations_ended_total",
        "Allocations ended, by reason.",
        EndReason::ALL
            .iter()
            .map(|r| {
                (
                    vec![("reason", r.name().to_owned())],
                    c.allocations_ended[*r as usize] as f64,
                )
            })
            .collect(),
    );
    f.gauge(
        "turnserver_permissions",
        "Permissions installed in allocations alive.",
        one(s.permissions),
    );
    f.counter(
        "turnserver_permissions_created_total",
        "Permissions created (refreshes of a live permission not counted).",
        one(c.permissions_created),
    );
    f.gauge(
        "turnserver_channels",
        "Channel bindings in allocations alive (including those cooling down after expiry).",
        one(s.channels),
    );
    f.counter(
        "turnserver_channels_bound_total",
        "Channels bound (refreshes of a live binding not counted).",
        one(c.channels_bound),
    );
    let flows = |bytes: bool| -> Vec<Sample> {
        let mut v = Vec::new();
        for (direction, flows) in [("to_peer", &c.to_peer), ("to_client", &c.to_client)] {
            for (t, flow) in TRANSPORTS.iter().zip(flows) {
                let value = if bytes { flow.bytes } else { flow.packets };
                v.push((
                    vec![
                        ("direction", direction.to_owned()),
                        ("transport", t.name().to_owned()),
                    ],
                    value as f64,
                ));
            }
        }
        v
    };
    f.counter(
        "turnserver_relayed_packets_total",
        "Datagrams relayed, by direction and by the client's transport.",
        flows(false),
    );
    f.counter(
        "turnserver_relayed_bytes_total",
        "Payload bytes relayed (without TURN headers), by direction and client transport.",
        flows(true),
    );
    f.counter(
        "turnserver_requests_total",
        "STUN requests and Send indications received, by method.",
        COUNTED_METHODS
            .iter()
            .zip(&c.requests)
            .map(|(m, n)| (vec![("method", m.name().to_owned())], *n as f64))
            .collect(),
    );
    let mut responses = Vec::new();
    for (m, row) in COUNTED_METHODS.iter().zip(&c.responses) {
        for (outcome, n) in row.iter().enumerate().take(OUTCOMES) {
            if *n > 0 || outcome == 0 {
                responses.push((
                    vec![
                        ("method", m.name().to_owned()),
                        ("code", code_label(outcome)),
                    ],
                    *n as f64,
                ));
            }
        }
    }
    f.counter(
        "turnserver_responses_total",
        "Responses sent, by method and error code (\"success\" for success responses).",
        responses,
    );
    f.counter(
        "turnserver_auth_failures_total",
        "Requests refused for bad credentials (wrong password or unknown user).",
        one(c.auth_failures),
    );
    f.counter(
        "turnserver_nat_discovery_responses_total",
        "RFC 5780 Binding requests: answered from the other address or port (other_source), \
         sent to RESPONSE-PORT (response_port), refused with 400 or 420 (refused).",
        [
            ("other_source", c.nat_discovery_other_source),
            ("response_port", c.nat_discovery_response_port),
            ("refused", c.nat_discovery_refused),
        ]
        .iter()
        .map(|(outcome, n)| (vec![("outcome", (*outcome).to_owned())], *n as f64))
        .collect(),
    );
    f.counter(
        "turnserver_dropped_packets_total",
        "Datagrams and frames dropped without an answer, by reason.",
        Drop::ALL
            .iter()
            .map(|d| (vec![("reason", d.name().to_owned())], c.dropped(*d) as f64))
            .collect(),
    );
    f.counter(
        "turnserver_send_dropped_packets_total",
        "Datagrams to clients dropped on a full socket buffer or send queue, by transport.",
        TRANSPORTS
            .iter()
            .map(|t| {
                (
                    vec![("transport", t.name().to_owned())],
                    s.send_dropped[*t as usize] as f64,
                )
            })
            .collect(),
    );
    f.counter(
        "turnserver_udp_gso_sends_total",
        "Runs of same-size datagrams to one destination sent as one UDP GSO send.",
        one(s.gso_sends),
    );
    f.counter(
        "turnserver_udp_gso_datagrams_total",
        "Datagrams sent within UDP GSO sends.",
        one(s.gso_datagrams),
    );
    f.gauge(
        "turnserver_relay_ports_used",
        "Relay ports taken by allocations and reservations.",
        one(s.relay_ports_used),
    );
    f.gauge(
        "turnserver_relay_ports",
        "Relay ports in the configured range (min-port to max-port).",
        one(s.relay_ports),
    );
    f.gauge(
        "turnserver_connections",
        "Open TCP and TLS connections and DTLS associations, by transport.",
        TRANSPORTS[1..]
            .iter()
            .map(|t| {
                (
                    vec![("transport", t.name().to_owned())],
                    s.open_connections[*t as usize] as f64,
                )
            })
            .collect(),
    );
    let per_listener = |value: &dyn Fn(&crate::net::ListenerStats) -> Option<u64>| {
        s.listeners
            .iter()
            .filter_map(|l| {
                value(l).map(|v| {
                    (
                        vec![
                            ("transport", l.transport.name().to_owned()),
                            ("listener", l.addr.to_string()),
                        ],
                        v as f64,
                    )
                })
            })
            .collect::<Vec<_>>()
    };
    f.counter(
        "turnserver_listener_received_packets_total",
        "Datagrams (UDP) or frames (TCP, TLS, DTLS) received from clients, by listener.",
        per_listener(&|l| Some(l.received)),
    );
    f.counter(
        "turnserver_listener_received_bytes_total",
        "Bytes of those datagrams and frames, by listener.",
        per_listener(&|l| Some(l.received_bytes)),
    );
    f.counter(
        "turnserver_listener_connections_accepted_total",
        "Connections (TCP, TLS) and associations (DTLS) accepted, by listener.",
        per_listener(&|l| l.transport.is_connection().then_some(l.accepted)),
    );
    f.counter(
        "turnserver_listener_connections_refused_total",
        "Connections closed at accept because max-connections was reached, by listener.",
        per_listener(&|l| l.transport.is_stream().then_some(l.refused)),
    );
    f.counter(
        "turnserver_config_reloads_total",
        "Configuration reloads (SIGHUP), by result.",
        vec![
            (
                vec![("result", "success".to_owned())],
                status.reloads_ok.load(Ordering::Relaxed) as f64,
            ),
            (
                vec![("result", "failure".to_owned())],
                status.reloads_failed.load(Ordering::Relaxed) as f64,
            ),
        ],
    );
    f.gauge(
        "turnserver_config_last_reload_successful",
        "1 if the last reload applied (or none was asked for), 0 if it was refused.",
        one(u64::from(status.last_reload_ok.load(Ordering::Relaxed))),
    );
    let process = prometheus::process_collector::ProcessCollector::for_self();
    f.0.extend(prometheus::core::Collector::collect(&process));
    f.0.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    match prometheus::TextEncoder::new().encode(&f.0, &mut out) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(e) => format!("# encoding failed: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_named_by_the_conventions_and_typed() {
        let mut s = Snapshot::default();
        s.core.allocations_created = 3;
        s.core.to_peer[0].packets = 7;
        s.core.responses[1][0] = 2;
        s.listeners.push(crate::net::ListenerStats {
            transport: crate::core::Transport::Tcp,
            addr: "127.0.0.1:3478".parse().unwrap(),
            received: 5,
            received_bytes: 100,
            accepted: 1,
            refused: 0,
        });
        let text = render(&s, &Status::default());
        let mut names = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    name.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                    "{name}"
                );
                assert_eq!(
                    kind == "counter",
                    name.ends_with("_total"),
                    "{name} is a {kind}"
                );
                names.push(name.to_owned());
            }
        }
        for expected in [
            "turnserver_allocations",
            "turnserver_allocations_created_total",
            "turnserver_relayed_packets_total",
            "turnserver_responses_total",
            "turnserver_listener_connections_accepted_total",
            "turnserver_build_info",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing:\n{text}"
            );
        }
        assert!(
            text.contains("turnserver_allocations_created_total 3\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "turnserver_relayed_packets_total{direction=\"to_peer\",transport=\"udp\"} 7\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("turnserver_responses_total{method=\"allocate\",code=\"success\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "turnserver_listener_received_packets_total{transport=\"tcp\",listener=\"127.0.0.1:3478\"} 5\n"
            ),
            "{text}"
        );
    }
}
