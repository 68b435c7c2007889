#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| dps_fuzz::sas_token(data));
