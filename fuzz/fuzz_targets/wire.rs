//! The start-up and message decoder: bytes as a client sends them, through the
//! server's framing (`src/frontend/framing.rs`, built here on its own so this target
//! needs no instrumented build of the engine) and then pgwire's decoder.
#![no_main]

#[path = "../../src/frontend/framing.rs"]
#[allow(dead_code)]
mod framing;

libfuzzer_sys::fuzz_target!(|data: &[u8]| framing::fuzz_one(data));
