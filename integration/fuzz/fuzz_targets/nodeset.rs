//! Nodeset expansion: any string gives at most MAX_NAMES names or an error pointing inside it,
//! never a panic.
#![no_main]

use arbor::topology::nodeset::{MAX_NAMES, expand};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match expand(text) {
        Ok(names) => assert!(names.len() <= MAX_NAMES),
        Err(e) => assert!(
            e.at <= text.chars().count(),
            "error at {} past the end",
            e.at
        ),
    }
});
