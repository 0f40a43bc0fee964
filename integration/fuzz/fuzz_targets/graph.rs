//! The graph parser (mgmt YAML): any text gives a graph or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = arbor::engine::graph::parse(text, Path::new("fuzz.yaml"), "fuzzhost") {
        let _ = e.to_string();
    }
});
