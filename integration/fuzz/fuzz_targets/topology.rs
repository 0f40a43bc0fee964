//! The topology parser: any text gives a topology (which `topology check` can render) or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.yaml");
    match arbor::topology::parse(text, path) {
        Ok(t) => {
            let _ = arbor::topology::check::render(&t, path);
            let _ = (t.host_count(), t.max_depth());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
