#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sarde_fuzz_targets::signature_payload(data));
