//! Network namespaces for deployment tests (tests/netns.rs): a [`Lab`] of namespaces joined by
//! veth pairs, with routes, forwarding and nftables rulesets, all removed when it is dropped;
//! sockets opened inside a namespace from this process ([`in_netns`]); and the server started
//! inside a namespace ([`NsServer`]).
//!
//! Nothing is connected to the namespace the test runs in: the namespaces of a lab reach each
//! other through their veth pairs only, so no packet of theirs can leave the machine.
//!
//! Names carry the process id and a counter, so that labs of tests running in parallel (and of
//! other test processes) never collide.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::TempDir;

/// Set to 1 to make a machine that cannot run these tests a failure instead of a skip.
pub const REQUIRE_ENV: &str = "TURNSERVER_REQUIRE_NETNS";

static NEXT: AtomicU32 = AtomicU32::new(0);

fn next_id() -> u32 {
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Runs `program args`; the output, or a line saying why it could not run or failed.
fn run(program: &str, args: &[&str]) -> Result<Output, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// What the machine lacks: for namespaces with veth pairs, and for nftables in them.
struct Probe {
    netns: Option<String>,
    nft: Option<String>,
}

/// Finds out once per process, with a throw-away namespace, a veth pair and an nftables table
/// (the first `ip netns add` may set up the mount under /run/netns, so that is not done by
/// several threads at once).
fn probe() -> &'static Probe {
    static PROBE: OnceLock<Probe> = OnceLock::new();
    PROBE.get_or_init(|| {
        if let Err(e) = run("ip", &["-V"]) {
            let why = format!("{e} (apt-get install iproute2)");
            return Probe {
                netns: Some(why.clone()),
                nft: Some(why),
            };
        }
        let id = next_id();
        let ns = format!("tsn{}-{id}probe", std::process::id());
        if let Err(e) = run("ip", &["netns", "add", &ns]) {
            let why = format!("cannot create a network namespace: {e}");
            return Probe {
                netns: Some(why.clone()),
                nft: Some(why),
            };
        }
        let veth = format!("p{:x}x{id}", std::process::id());
        let peer = format!("{veth}b");
        let netns = (|| {
            in_netns_result(&ns, || ())
                .map_err(|e| format!("cannot enter a network namespace: {e}"))?;
            let add = [
                "-n", &ns, "link", "add", &veth, "type", "veth", "peer", "name", &peer,
            ];
            run("ip", &add).map_err(|e| format!("cannot create a veth pair: {e}"))?;
            Ok::<(), String>(())
        })()
        .err();
        let nft = match (&netns, run("nft", &["--version"])) {
            (Some(why), _) => Some(why.clone()),
            (None, Err(e)) => Some(format!("{e} (apt-get install nftables)")),
            (None, Ok(_)) => {
                let table = format!("add table ip tsnprobe{id}");
                run("ip", &["netns", "exec", &ns, "nft", &table])
                    .map_err(|e| format!("nftables does not work in a namespace: {e}"))
                    .err()
            }
        };
        let _ = run("ip", &["-n", &ns, "link", "del", &veth]);
        let _ = run("ip", &["netns", "del", &ns]);
        Probe { netns, nft }
    })
}

/// True when the lab test `test` can run here (network namespaces, veth pairs, and nftables
/// when `nft`). Otherwise fails when `TURNSERVER_REQUIRE_NETNS=1`, and returns false after
/// printing `netns: SKIPPED: <reason>` when not.
pub fn netns_available(test: &str, nft: bool) -> bool {
    let p = probe();
    let Some(why) = p.netns.as_ref().or(p.nft.as_ref().filter(|_| nft)) else {
        return true;
    };
    if std::env::var(REQUIRE_ENV).as_deref() == Ok("1") {
        panic!("{REQUIRE_ENV}=1 but {test} cannot run: {why}");
    }
    eprintln!("netns: SKIPPED: {test}: {why}");
    false
}

/// Runs `f` on a thread that has entered the network namespace `ns` and returns its result.
/// Sockets `f` opens belong to `ns` for good, whichever thread uses them afterwards.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    in_netns_result(ns, f).unwrap_or_else(|e| panic!("cannot enter network namespace {ns}: {e}"))
}

fn in_netns_result<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    use std::os::fd::AsRawFd;
    let path = Path::new("/var/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            let file =
                std::fs::File::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
            // SAFETY: setns on a valid descriptor; it changes only this thread's network
            // namespace, and the thread ends when `f` returns.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(format!("setns: {}", std::io::Error::last_os_error()));
            }
            Ok(f())
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A set of network namespaces and the veth pairs between them, removed when dropped (also
/// when the test panics): first every process still running in them is killed, then the veth
/// pairs and the namespaces are deleted.
pub struct Lab {
    id: u32,
    namespaces: Vec<String>,
    /// (namespace, interface): one end of each veth pair.
    links: Vec<(String, String)>,
    dir: TempDir,
}

impl Lab {
    pub fn new() -> Lab {
        let id = next_id();
        Lab {
            id,
            namespaces: Vec::new(),
            links: Vec::new(),
            dir: TempDir::new(&format!("netns-{id}")),
        }
    }

    /// A directory for the lab's files (configurations, rulesets), removed with it.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Creates a namespace for `role` (a short word) with `lo` up; returns its name.
    pub fn netns(&mut self, role: &str) -> String {
        let name = format!("tsn{}-{}-{role}", std::process::id(), self.id);
        // A namespace of this name can only be left over from a killed process that had the
        // same process id.
        let _ = run("ip", &["netns", "del", &name]);
        check(run("ip", &["netns", "add", &name]));
        self.namespaces.push(name.clone());
        self.ip(&name, &["link", "set", "lo", "up"]);
        name
    }

    /// Joins namespaces `a` and `b` with a veth pair, up, with the addresses (with prefix
    /// length, e.g. "10.0.0.1/24"; IPv6 without duplicate address detection) given; returns the
    /// interface names in `a` and in `b`.
    pub fn veth(
        &mut self,
        a: &str,
        a_addrs: &[&str],
        b: &str,
        b_addrs: &[&str],
    ) -> (String, String) {
        let k = self.links.len();
        let name_a = format!("v{:x}x{}x{k}a", std::process::id(), self.id);
        let name_b = format!("v{:x}x{}x{k}b", std::process::id(), self.id);
        assert!(name_a.len() <= 15, "interface name {name_a} too long");
        check(run(
            "ip",
            &[
                "link", "add", &name_a, "netns", a, "type", "veth", "peer", "name", &name_b,
                "netns", b,
            ],
        ));
        self.links.push((a.to_owned(), name_a.clone()));
        for (ns, dev, addrs) in [(a, &name_a, a_addrs), (b, &name_b, b_addrs)] {
            for addr in addrs {
                let mut args = vec!["addr", "add", addr, "dev", dev.as_str()];
                if addr.contains(':') {
                    args.push("nodad");
                }
                self.ip(ns, &args);
            }
            self.ip(ns, &["link", "set", dev, "up"]);
        }
        // A device sends nothing until the kernel has seen its carrier come up (it then
        // reports the operational state UP).
        for (ns, dev) in [(a, &name_a), (b, &name_b)] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out = self.ip(ns, &["-o", "link", "show", "dev", dev]);
                if String::from_utf8_lossy(&out.stdout).contains("state UP") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{dev} in {ns} is not up after 10 s"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        (name_a, name_b)
    }

    /// `ip -n NS args`, which must succeed.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Output {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        check(run("ip", &all))
    }

    /// `ip netns exec NS program args`, which must succeed.
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> Output {
        let mut all = vec!["netns", "exec", ns, program];
        all.extend_from_slice(args);
        check(run("ip", &all))
    }

    /// Makes `ns` a router: IPv4 and IPv6 forwarding on, in that namespace only.
    pub fn router(&self, ns: &str) {
        self.exec(ns, "sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        self.exec(
            ns,
            "sysctl",
            &["-q", "-w", "net.ipv6.conf.all.forwarding=1"],
        );
    }

    /// Loads `ruleset` (nft syntax) into `ns` from a file of its own.
    pub fn nft(&self, ns: &str, ruleset: &str) {
        let path = self.dir().join(format!("{ns}.nft"));
        std::fs::write(&path, ruleset).unwrap();
        self.exec(ns, "nft", &["-f", path.to_str().unwrap()]);
    }

    /// What the lab looks like, for failure messages: addresses, routes and rulesets.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for ns in &self.namespaces {
            out.push_str(&format!("--- {ns}\n"));
            for args in [&["-br", "addr"][..], &["route"], &["-6", "route"]] {
                if let Ok(o) = run("ip", &[&["-n", ns.as_str()][..], args].concat()) {
                    out.push_str(&String::from_utf8_lossy(&o.stdout));
                }
            }
            if let Ok(o) = run("ip", &["netns", "exec", ns, "nft", "list", "ruleset"]) {
                out.push_str(&String::from_utf8_lossy(&o.stdout));
            }
        }
        out
    }

    /// The processes running in `ns`.
    fn pids(ns: &str) -> Vec<String> {
        run("ip", &["netns", "pids", ns])
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Whatever the test started in its namespaces and is still running (a browser the
        // runner left behind, say) would keep them alive.
        for ns in &self.namespaces {
            for pid in Lab::pids(ns) {
                let _ = run("kill", &["-KILL", &pid]);
            }
        }
        for (ns, dev) in &self.links {
            let _ = run("ip", &["-n", ns, "link", "del", dev]);
        }
        for ns in &self.namespaces {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

fn check(r: Result<Output, String>) -> Output {
    r.unwrap_or_else(|e| panic!("{e}"))
}

/// The server binary (ours: coturn's is also called turnserver) running in a namespace of a
/// lab, with its log collected. Killed when dropped; if the test is panicking, its log is
/// printed then.
pub struct NsServer {
    child: Child,
    log: Arc<Mutex<String>>,
    pub config: PathBuf,
}

impl NsServer {
    /// Starts the server in `ns` with `config` and waits until it says it is ready (every
    /// listener bound). Panics with the log when it does not start.
    pub fn start(lab: &Lab, ns: &str, config: &str) -> NsServer {
        let path = lab.dir().join(format!("{ns}.toml"));
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_turnserver")])
            .arg("--config")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start turnserver");
        let log = super::capture_stderr(&mut child);
        let mut server = NsServer {
            child,
            log,
            config: path,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if server
                .log()
                .lines()
                .any(|l| l.contains(" ready") && l.contains("workers="))
            {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("turnserver exited with {status} in {ns}:\n{}", server.log());
            }
            if Instant::now() >= deadline {
                panic!(
                    "turnserver not ready within 20 s in {ns}:\n{}",
                    server.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The log lines that contain every one of `needles`.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_owned)
            .collect()
    }

    /// Waits up to `timeout` for a log line that contains every one of `needles`.
    pub fn wait_log(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log_lines(needles).into_iter().next() {
                return Some(l);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- server log ---\n{}--- end of server log ---",
                self.log()
            );
        }
    }
}
