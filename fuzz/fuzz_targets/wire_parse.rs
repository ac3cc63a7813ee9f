//! The codec on arbitrary bytes: see `turnserver_fuzz::wire_parse`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    turnserver_fuzz::wire_parse(data);
});
