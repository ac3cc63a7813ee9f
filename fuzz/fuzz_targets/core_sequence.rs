//! The sans-IO server driven by an operation sequence: see `turnserver_fuzz::core_sequence`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    turnserver_fuzz::core_sequence(data);
});
