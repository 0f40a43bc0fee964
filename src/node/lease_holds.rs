//! Leases held while a link is down: a host whose link is reconnecting cannot keep its
//! subtree's leases alive, so whoever holds those leases (the initiator's embedded store, for
//! its subtrees; a relay's store front, for its children's) renews them instead of expiring
//! them until the link is back, or the host fails, at most for the grace period and 10 s more.

use crate::wire::HostState;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Where leases can be held, by user name.
pub trait LeaseHolds {
    fn hold(&self, names: &[String], until: Instant);
    fn release(&self, names: &[String]);
}

impl LeaseHolds for crate::store::auth::Users {
    fn hold(&self, names: &[String], until: Instant) {
        crate::store::auth::Users::hold(self, names, until);
    }

    fn release(&self, names: &[String]) {
        crate::store::auth::Users::release(self, names);
    }
}

impl LeaseHolds for crate::store::relay_front::Holds {
    fn hold(&self, names: &[String], until: Instant) {
        crate::store::relay_front::Holds::hold(self, names, until);
    }

    fn release(&self, names: &[String]) {
        crate::store::relay_front::Holds::release(self, names);
    }
}

/// The hosts whose subtrees' leases are held now.
#[derive(Default)]
pub struct Holding(HashSet<String>);

impl Holding {
    /// Follows host `host`'s new state: `subtree` is the user names of the host and every
    /// host below it, `what` names whose leases they are (for the log).
    pub fn state(
        &mut self,
        host: &str,
        state: &HostState,
        subtree: &[String],
        holds: &dyn LeaseHolds,
        what: &str,
    ) {
        match state {
            HostState::Reconnecting { grace } => {
                let until = Instant::now() + Duration::from_secs(grace.saturating_add(10));
                tracing::info!(
                    "{host}: holding the {what} leases of {} while its link is down",
                    subtree.join(", ")
                );
                holds.hold(subtree, until);
                self.0.insert(host.to_string());
            }
            HostState::Failed { .. } => {
                if self.0.remove(host) {
                    holds.release(subtree);
                }
            }
            _ => {
                // Back: what the host sends up arrives, but what goes down to it may wait on
                // TCP's retransmission backoff for a while (seconds after a long outage), and
                // the subtree's keepalives wait for answers: hold for two lease TTLs more.
                if self.0.remove(host) {
                    tracing::info!(
                        "{host}: its link is back; its subtree's {what} leases run again shortly"
                    );
                    let ttl = Duration::from_secs(
                        crate::engine::store_exchange::LEASE_TTL.unsigned_abs(),
                    );
                    holds.hold(subtree, Instant::now() + 2 * ttl);
                }
            }
        }
    }
}
