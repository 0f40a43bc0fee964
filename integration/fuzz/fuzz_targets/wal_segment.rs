//! WAL recovery's decoding of a log segment: any bytes give records, a torn tail to drop, or an
//! error, never a panic; and what recovery keeps decodes again to the same records, intact.
#![no_main]

use arbor::store::decode_segment;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("wal-fuzz.log");
    for last in [true, false] {
        match decode_segment(path, data, last) {
            Ok((records, keep)) => {
                assert!(keep <= data.len());
                if !last {
                    assert_eq!(keep, data.len(), "a segment before the last lost a tail");
                }
                let (again, kept) =
                    decode_segment(path, &data[..keep], last).expect("the kept prefix decodes");
                assert_eq!(kept, keep, "the kept prefix is not intact");
                assert_eq!(again, records);
            }
            Err(e) => {
                let _ = format!("{e:#}");
            }
        }
    }
});
