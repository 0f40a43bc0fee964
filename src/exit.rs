//! arbor's exit codes, for scripts: one place, so `--help`, the docs and every job agree.

/// Every host converged (or the job succeeded).
pub const OK: u8 = 0;
/// Some host failed, or the run could not finish.
pub const FAILED: u8 = 1;
/// Bad input (flags, graphs, topology): nothing was contacted.
pub const BAD_INPUT: u8 = 2;
/// Stopped by SIGHUP (128 + 1).
pub const HANGUP: u8 = 129;
/// Stopped by SIGINT, ^C (128 + 2).
pub const INTERRUPTED: u8 = 130;
/// Stopped by SIGTERM (128 + 15).
pub const TERMINATED: u8 = 143;
/// `arbor exec`: a host gave no exit code (unreachable, refused, its connection or staging or
/// relay failed), as ssh exits 255 when it cannot run the command. Otherwise `arbor exec`
/// exits with the largest exit code of the command across hosts, 2 for bad input (nothing
/// contacted), or 128 + N when signal N stopped it.
pub const UNREACHABLE: u8 = 255;

/// The conventional exit code for a run stopped by `signal`: 128 + its number.
pub fn for_signal(signal: i32) -> u8 {
    u8::try_from(128 + signal).unwrap_or(FAILED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_codes_are_128_plus_the_signal() {
        assert_eq!(for_signal(libc::SIGHUP), HANGUP);
        assert_eq!(for_signal(libc::SIGINT), INTERRUPTED);
        assert_eq!(for_signal(libc::SIGTERM), TERMINATED);
    }
}
