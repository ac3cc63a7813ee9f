//! The fuzz targets' bodies on stable Rust, in the normal test run.
//!
//! `fuzz/src/lib.rs` holds the bodies of the cargo-fuzz targets `wire_parse` and
//! `core_sequence`; this test compiles that same file and runs it over the committed seed corpus
//! (`fuzz/corpus/<target>/`), every saved crash (`fuzz/regressions/<target>/`), and a bounded
//! number of pseudo-random inputs from a fixed seed: mutated seeds and generated programs. So
//! the targets keep compiling and their invariants keep holding without nightly or cargo-fuzz;
//! `scripts/fuzz.sh` runs the real fuzzer.
//!
//! `cargo test --release --test fuzz_smoke -- --ignored write_seed_corpus` rewrites the seed
//! files from `wire_seeds()` / `core_seeds()`.

#[path = "../fuzz/src/lib.rs"]
mod targets;

use std::path::{Path, PathBuf};

use targets::{Op, Request, Setup, Summary};

/// Pseudo-random inputs per target: a second or so each in release (`cargo test --release`, as
/// CI runs it); a fifth as many in an unoptimised build, which is about fifteen times slower.
const RANDOM_WIRE: usize = if cfg!(debug_assertions) {
    10_000
} else {
    50_000
};
const RANDOM_CORE: usize = if cfg!(debug_assertions) {
    10_000
} else {
    50_000
};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `fuzz/<kind>/<target>/`, sorted; none if the folder does not exist.
fn files(kind: &str, target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            let data = std::fs::read(&p).expect("readable corpus file");
            (name, data)
        })
        .collect();
    out.sort();
    out
}

/// Runs `f` on `data`; on a panic, names the input and shows it in hex before failing.
fn run_named<T>(what: &str, data: &[u8], f: impl FnOnce(&[u8]) -> T) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(data))) {
        Ok(v) => v,
        Err(e) => {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            eprintln!("failing input {what} ({} bytes): {hex}", data.len());
            std::panic::resume_unwind(e)
        }
    }
}

/// SplitMix64: a fixed-seed source of test inputs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn u8(&mut self) -> u8 {
        self.next() as u8
    }

    fn u16(&mut self) -> u16 {
        self.next() as u16
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.u8()).collect()
    }

    /// A value that is often at an edge: 0, 1, all ones, or random.
    fn edgy_u16(&mut self) -> u16 {
        match self.below(6) {
            0 => 0,
            1 => 1,
            2 => u16::MAX,
            3 => self.u16() % 64,
            _ => self.u16(),
        }
    }
}

/// Byte-level mutations, as a fuzzer would make them (bounded: at most 8 per input).
fn mutate(rng: &mut Rng, data: &mut Vec<u8>, pool: &[Vec<u8>]) {
    for _ in 0..1 + rng.below(8) {
        let len = data.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = rng.u8();
            }
            2 if len > 1 => {
                // Overwrite a big-endian u16 (length fields, types, ports).
                let i = rng.below(len - 1);
                let v = rng.edgy_u16().to_be_bytes();
                data[i..i + 2].copy_from_slice(&v);
            }
            3 if len > 0 => {
                let start = rng.below(len);
                let end = (start + 1 + rng.below(16)).min(len);
                data.drain(start..end);
            }
            4 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let ins = rng.bytes(n);
                data.splice(at..at, ins);
            }
            5 if len > 0 => data.truncate(rng.below(len)),
            6 if !pool.is_empty() => {
                // Splice in part of another input.
                let other = &pool[rng.below(pool.len())];
                if !other.is_empty() {
                    let s = rng.below(other.len());
                    let e = (s + 1 + rng.below(64)).min(other.len());
                    let at = rng.below(len + 1);
                    data.splice(at..at, other[s..e].iter().copied());
                }
            }
            _ if len > 3 => {
                // Duplicate a chunk in place.
                let s = rng.below(len);
                let e = (s + 1 + rng.below(32)).min(len);
                let chunk = data[s..e].to_vec();
                data.splice(e..e, chunk);
            }
            _ => data.push(rng.u8()),
        }
    }
}

/// A STUN message with random attributes, framed right so that it gets past the parser.
fn random_stun(rng: &mut Rng) -> Vec<u8> {
    const TYPES: [u16; 16] = [
        0x0001, 0x0006, 0x0008, 0x0009, 0x000C, 0x000D, 0x0012, 0x0013, 0x0014, 0x0015, 0x0018,
        0x001C, 0x0022, 0x8022, 0x8028, 0x0030,
    ];
    let mut m = vec![0u8; 20];
    m[..2].copy_from_slice(&(rng.u16() & 0x3FFF).to_be_bytes());
    m[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes());
    let txid = rng.bytes(12);
    m[8..20].copy_from_slice(&txid);
    for _ in 0..rng.below(40) {
        let t = if rng.chance(80) {
            TYPES[rng.below(TYPES.len())]
        } else {
            rng.u16()
        };
        let vlen = match t {
            0x0008 => 20,
            0x001C => 16 + 4 * rng.below(5),
            0x8028 => 4,
            _ => rng.below(40),
        };
        m.extend(t.to_be_bytes());
        m.extend((vlen as u16).to_be_bytes());
        let value = rng.bytes(vlen);
        m.extend(value);
        m.resize(targets_pad4(m.len()), 0);
    }
    let body = (m.len() - 20) as u16;
    m[2..4].copy_from_slice(&body.to_be_bytes());
    m
}

fn targets_pad4(n: usize) -> usize {
    (n + 3) & !3
}

#[test]
fn wire_parse_runs_the_corpus_and_regressions() {
    let corpus = files("corpus", "wire_parse");
    assert!(
        corpus.len() >= targets::wire_seeds().len(),
        "fuzz/corpus/wire_parse is missing seeds: run write_seed_corpus"
    );
    for (name, data) in corpus.iter().chain(&files("regressions", "wire_parse")) {
        run_named(name, data, targets::wire_parse);
    }
    for (name, data) in targets::wire_seeds() {
        run_named(name, &data, targets::wire_parse);
    }
}

#[test]
fn wire_parse_pseudo_random() {
    let mut rng = Rng(0x5755_5245);
    let pool: Vec<Vec<u8>> = targets::wire_seeds().into_iter().map(|(_, d)| d).collect();
    for i in 0..RANDOM_WIRE {
        let mut data = match i % 4 {
            0 => random_stun(&mut rng),
            1 => {
                let n = rng.below(64);
                rng.bytes(n)
            }
            _ => pool[rng.below(pool.len())].clone(),
        };
        if i % 4 != 0 || rng.chance(30) {
            mutate(&mut rng, &mut data, &pool);
        }
        run_named(&format!("random #{i}"), &data, targets::wire_parse);
    }
}

#[test]
fn core_program_encoding_round_trips() {
    for (name, data) in targets::core_seeds() {
        let (setup, ops) = targets::decode_program(&data);
        assert_eq!(targets::encode_program(setup, &ops), data, "{name}");
    }
}

#[test]
fn core_sequence_runs_the_corpus_and_regressions() {
    let corpus = files("corpus", "core_sequence");
    assert!(
        corpus.len() >= targets::core_seeds().len(),
        "fuzz/corpus/core_sequence is missing seeds: run write_seed_corpus"
    );
    for (name, data) in corpus.iter().chain(&files("regressions", "core_sequence")) {
        run_named(name, data, targets::core_sequence);
    }
    // The built-in seeds go deep: allocations, successful requests, and relayed data both ways
    // in both framings. If a change to the server or the harness stops that, the fuzzer would
    // be back to knocking on the door.
    let mut total = Summary::default();
    for (name, data) in targets::core_seeds() {
        let s = run_named(name, &data, targets::core_sequence);
        assert!(
            s.allocations > 0 && s.success_responses > 0,
            "{name}: {s:?}"
        );
        add(&mut total, &s);
    }
    assert!(total.channel_to_peer > 0, "{total:?}");
    assert!(total.channel_to_client > 0, "{total:?}");
    assert!(total.data_to_client > 0, "{total:?}");
    assert!(total.send_to_peer > 0, "{total:?}");
    println!("seeds: {total:?}, error codes {:?}", codes(&total));
}

fn add(total: &mut Summary, s: &Summary) {
    total.ops += s.ops;
    total.allocations += s.allocations;
    total.success_responses += s.success_responses;
    total.channel_to_peer += s.channel_to_peer;
    total.send_to_peer += s.send_to_peer;
    total.channel_to_client += s.channel_to_client;
    total.data_to_client += s.data_to_client;
    total.error_codes |= s.error_codes;
}

/// The error codes a summary saw, for messages.
fn codes(s: &Summary) -> Vec<u16> {
    (0..targets::ERROR_CODES.len())
        .filter(|i| s.error_codes & 1 << i != 0)
        .map(|i| targets::ERROR_CODES[i])
        .collect()
}

/// A random operation, biased towards the ones that make progress (signed requests with the
/// usual attributes, ChannelData on the first channels, peers with permissions).
fn random_op(rng: &mut Rng, wire_pool: &[Vec<u8>]) -> Op {
    let client = if rng.chance(60) { 0 } else { rng.u8() };
    match rng.below(100) {
        0..=44 => {
            let mut r = Request {
                client,
                method: if rng.chance(85) {
                    rng.below(4) as u8
                } else {
                    rng.u8()
                },
                auth: if rng.chance(70) { 1 } else { rng.u8() },
                peer: if rng.chance(60) { 0 } else { rng.u8() },
                channel: if rng.chance(70) { 0 } else { rng.u8() },
                ..Request::default()
            };
            if rng.chance(35) {
                r.flags = if rng.chance(70) {
                    1 << rng.below(15)
                } else {
                    rng.u16()
                };
                r.transport = if rng.chance(50) { 17 } else { rng.u8() };
                r.lifetime = rng.edgy_u16();
                r.even = rng.u8();
                r.token = rng.next().to_be_bytes();
                r.family = 1 + rng.below(3) as u8;
                r.additional = 1 + rng.below(3) as u8;
                r.peer2 = rng.u8();
                r.corrupt = (rng.u16(), rng.u8());
            }
            if r.method % 8 == 5 {
                let n = rng.below(40);
                r.data = rng.bytes(n);
            }
            Op::Request(r)
        }
        45..=56 => {
            let n = rng.below(48);
            Op::ChannelData {
                client,
                channel: if rng.chance(70) { 0 } else { rng.u8() },
                shape: if rng.chance(70) { 0 } else { rng.u8() },
                payload: rng.bytes(n),
            }
        }
        57..=72 => {
            let size = if rng.chance(95) {
                rng.below(64) as u8
            } else {
                0xF0 + rng.below(16) as u8
            };
            Op::Peer {
                relay: if rng.chance(70) { 0 } else { rng.u8() },
                peer: if rng.chance(60) { 0 } else { rng.u8() },
                size,
                payload: if size < 0xF0 {
                    rng.bytes(size as usize)
                } else {
                    Vec::new()
                },
            }
        }
        73..=84 => Op::Advance {
            mode: rng.u8(),
            amount: rng.edgy_u16(),
        },
        85..=89 => {
            let mut bytes = wire_pool[rng.below(wire_pool.len())].clone();
            mutate(rng, &mut bytes, wire_pool);
            Op::Raw { client, bytes }
        }
        90..=93 => Op::Close { client },
        94..=96 => Op::TogglePort { port: rng.u8() },
        _ => Op::Timeout,
    }
}

#[test]
fn core_sequence_pseudo_random() {
    let mut rng = Rng(0x434f_5245);
    let wire_pool: Vec<Vec<u8>> = targets::wire_seeds().into_iter().map(|(_, d)| d).collect();
    let seeds: Vec<Vec<u8>> = targets::core_seeds().into_iter().map(|(_, d)| d).collect();
    let mut total = Summary::default();
    for i in 0..RANDOM_CORE {
        let data = if i % 3 == 0 {
            let mut d = seeds[rng.below(seeds.len())].clone();
            mutate(&mut rng, &mut d, &seeds);
            d
        } else {
            let setup = Setup {
                flags: rng.u8(),
                flags2: rng.u8(),
            };
            let ops: Vec<Op> = (0..1 + rng.below(40))
                .map(|_| random_op(&mut rng, &wire_pool))
                .collect();
            targets::encode_program(setup, &ops)
        };
        let s = run_named(&format!("random #{i}"), &data, targets::core_sequence);
        add(&mut total, &s);
    }
    println!(
        "{RANDOM_CORE} programs: {total:?}, error codes {:?}",
        codes(&total)
    );
    assert!(
        total.channel_to_peer > 0 && total.channel_to_client > 0,
        "{total:?}"
    );
}

/// Rewrites `fuzz/corpus/<target>/` seed files from the built-in seeds (run by hand).
#[test]
#[ignore = "writes files; run by hand after changing the seeds"]
fn write_seed_corpus() {
    for (target, seeds) in [
        ("wire_parse", targets::wire_seeds()),
        ("core_sequence", targets::core_seeds()),
    ] {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus folder");
        for (name, data) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), data).expect("seed written");
        }
    }
}
