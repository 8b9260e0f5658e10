#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sarde_fuzz_targets::policy_json(data));
