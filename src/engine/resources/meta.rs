//! Metaparams: what a graph's `meta:` says about how the engine treats one resource, whatever
//! its kind (after mgmt's metaparams). The scheduler applies them: see `scheduler.rs`.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A resource's metaparams. The default is what a resource without `meta:` gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Meta {
    /// Report what would change and change nothing, for this resource alone.
    #[serde(skip_serializing_if = "is_false")]
    pub noop: bool,
    /// How many times a failed apply is tried again (`delay` apart) before the resource counts
    /// as failed; `-1`: forever. Retries spent are remembered between checks.
    #[serde(skip_serializing_if = "is_zero_i16")]
    pub retry: i16,
    /// A successful apply gives back every retry spent.
    #[serde(skip_serializing_if = "is_false")]
    pub retry_reset: bool,
    /// Milliseconds between retries.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub delay: u64,
    /// Milliseconds an apply may take; 0: no limit.
    #[serde(skip_serializing_if = "is_zero_u64")]
    pub timeout: u64,
    /// Seconds between checks instead of watching; 0: watch; -1: neither (checked when the
    /// graph loads and when a dependency changes).
    #[serde(skip_serializing_if = "is_zero_i32")]
    pub poll: i32,
    /// At most this many events a second reach the resource (`None`: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<Rate>,
    /// How many events may pass at once before `limit` applies.
    #[serde(skip_serializing_if = "is_zero_u32")]
    pub burst: u32,
    /// Semaphores held while applying: `id` (one holder) or `id:count`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sema: Vec<String>,
    /// On a graph reload, restart this resource's watch if it had ended with an error.
    #[serde(skip_serializing_if = "is_false")]
    pub rewatch: bool,
    /// A changed resource starts with a fresh retry count (else retries spent carry over).
    #[serde(skip_serializing_if = "is_false")]
    pub reset: bool,
}

impl Meta {
    pub fn is_default(&self) -> bool {
        *self == Meta::default()
    }

    pub fn delay(&self) -> Duration {
        Duration::from_millis(self.delay)
    }

    pub fn timeout(&self) -> Option<Duration> {
        (self.timeout > 0).then(|| Duration::from_millis(self.timeout))
    }

    /// Retries left after `used`: `None` means without end.
    pub fn retries_left(&self, used: u32) -> Option<u32> {
        if self.retry < 0 {
            None
        } else {
            Some(u32::try_from(self.retry).unwrap_or(0).saturating_sub(used))
        }
    }
}

/// Events per second, a positive finite number (compared by its bits so specs stay `Eq`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Rate(pub f64);

impl PartialEq for Rate {
    fn eq(&self, other: &Self) -> bool {
        self.0.to_bits() == other.0.to_bits()
    }
}

impl Eq for Rate {}

/// The number of holders a semaphore id allows, as mgmt counts them: `name:3` and `:3` → 3;
/// anything else (`name`, `name:x`, `name:0`) → 1. Ids are distinct by their full text.
pub fn sema_count(id: &str) -> u32 {
    id.rsplit_once(':')
        .and_then(|(_, count)| count.parse::<u32>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero_i16(n: &i16) -> bool {
    *n == 0
}

fn is_zero_i32(n: &i32) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sema_counts() {
        assert_eq!(sema_count("db"), 1);
        assert_eq!(sema_count("db:3"), 3);
        assert_eq!(sema_count(":2"), 2);
        assert_eq!(sema_count("db:0"), 1);
        assert_eq!(sema_count("db:x"), 1);
    }

    #[test]
    fn retries_left() {
        let mut m = Meta {
            retry: 2,
            ..Meta::default()
        };
        assert_eq!(m.retries_left(0), Some(2));
        assert_eq!(m.retries_left(5), Some(0));
        m.retry = -1;
        assert_eq!(m.retries_left(100), None);
    }

    #[test]
    fn the_default_is_not_serialized() {
        assert_eq!(serde_json::to_string(&Meta::default()).unwrap(), "{}");
    }
}
