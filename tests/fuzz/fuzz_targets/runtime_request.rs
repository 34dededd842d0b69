#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = edgepack_fuzz::runtime::request(data);
});
