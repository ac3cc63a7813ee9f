//! The probe's report: one line per step as it completes (or one JSON object at the end).

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Passed with a problem that does not fail the probe (a Refresh that was not answered).
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }
}

/// Round-trip times of the relayed data, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rtt {
    pub min: f64,
    pub avg: f64,
    pub max: f64,
}

/// One step of the probe.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: &'static str,
    pub status: Status,
    pub elapsed: Duration,
    pub detail: String,
    pub rtt: Option<Rtt>,
}

/// Collects steps; in text mode prints each as it is added.
pub struct Report {
    json: bool,
    server: String,
    transport: &'static str,
    steps: Vec<Step>,
}

/// Width of the step-name column: the longest name, `create_permission`.
const NAME_WIDTH: usize = 17;

impl Report {
    pub fn new(json: bool, server: String, transport: &'static str, url: &str) -> Report {
        if !json {
            out(&format!("probing {server} over {transport} ({url})"));
        }
        Report {
            json,
            server,
            transport,
            steps: Vec::new(),
        }
    }

    pub fn add(&mut self, step: Step) {
        if !self.json {
            out(&text_line(&step));
        }
        self.steps.push(step);
    }

    /// Prints the end of the report: `OK` or `FAIL: reason` (or the JSON object).
    pub fn finish(&self, error: Option<&str>) {
        if self.json {
            out(&self.to_json(error));
        } else {
            match error {
                None => out("OK"),
                Some(e) => out(&format!("FAIL: {e}")),
            }
        }
    }

    /// The whole report as one JSON object.
    pub fn to_json(&self, error: Option<&str>) -> String {
        let mut s = String::with_capacity(256 + 128 * self.steps.len());
        s.push_str("{\"ok\":");
        s.push_str(if error.is_none() { "true" } else { "false" });
        s.push_str(",\"server\":");
        push_json_str(&mut s, &self.server);
        s.push_str(",\"transport\":");
        push_json_str(&mut s, self.transport);
        s.push_str(",\"steps\":[");
        for (i, step) in self.steps.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str("{\"step\":");
            push_json_str(&mut s, step.name);
            let _ = write!(
                s,
                ",\"ok\":{},\"ms\":{}",
                step.status != Status::Fail,
                ms(step.elapsed)
            );
            if step.status == Status::Warn {
                s.push_str(",\"warning\":true");
            }
            s.push_str(",\"detail\":");
            push_json_str(&mut s, &step.detail);
            if let Some(r) = step.rtt {
                let _ = write!(
                    s,
                    ",\"rtt_ms\":{{\"min\":{},\"avg\":{},\"max\":{}}}",
                    num(r.min),
                    num(r.avg),
                    num(r.max)
                );
            }
            s.push('}');
        }
        s.push_str("],\"error\":");
        match error {
            None => s.push_str("null"),
            Some(e) => push_json_str(&mut s, e),
        }
        s.push('}');
        s
    }
}

/// Prints one line on stdout; a closed stdout is ignored (the exit code still tells).
fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

fn text_line(step: &Step) -> String {
    format!(
        "{:<NAME_WIDTH$}  {:<4}  {:>9} ms  {}",
        step.name,
        step.status.label(),
        ms(step.elapsed),
        step.detail
    )
}

/// Milliseconds with three decimals: a JSON number and a readable column.
pub fn ms(d: Duration) -> String {
    num(d.as_secs_f64() * 1000.0)
}

fn num(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "0".into()
    }
}

/// Appends `v` as a JSON string (RFC 8259 7): quotes, backslashes and control characters
/// escaped; everything else, non-ASCII included, as is (the output is UTF-8).
pub fn push_json_str(s: &mut String, v: &str) {
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(s, "\\u{:04x}", c as u32);
            }
            // Line and paragraph separators are valid JSON but break JavaScript parsers.
            '\u{2028}' => s.push_str("\\u2028"),
            '\u{2029}' => s.push_str("\\u2029"),
            c => s.push(c),
        }
    }
    s.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        push_json_str(&mut s, "a\"b\\c\nd\u{1}e\u{7f}é\u{2028}");
        assert_eq!(s, r#""a\"b\\c\nd\u0001e\u007fé\u2028""#);
    }

    #[test]
    fn report_is_one_json_object() {
        let mut r = Report {
            json: true,
            server: "127.0.0.1:3478".into(),
            transport: "udp",
            steps: Vec::new(),
        };
        r.steps.push(Step {
            name: "binding",
            status: Status::Ok,
            elapsed: Duration::from_micros(1250),
            detail: "mapped \"x\"".into(),
            rtt: None,
        });
        r.steps.push(Step {
            name: "refresh",
            status: Status::Warn,
            elapsed: Duration::ZERO,
            detail: String::new(),
            rtt: Some(Rtt {
                min: 1.0,
                avg: 2.0,
                max: f64::NAN,
            }),
        });
        assert_eq!(
            r.to_json(None),
            "{\"ok\":true,\"server\":\"127.0.0.1:3478\",\"transport\":\"udp\",\"steps\":[\
             {\"step\":\"binding\",\"ok\":true,\"ms\":1.250,\"detail\":\"mapped \\\"x\\\"\"},\
             {\"step\":\"refresh\",\"ok\":true,\"ms\":0.000,\"warning\":true,\"detail\":\"\",\
             \"rtt_ms\":{\"min\":1.000,\"avg\":2.000,\"max\":0}}],\"error\":null}"
        );
        assert!(r.to_json(Some("x\ty")).ends_with(",\"error\":\"x\\ty\"}"));
    }
}
