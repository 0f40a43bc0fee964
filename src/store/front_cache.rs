//! The relay front's copy of the shared range, fed by its shared watch, and the KV service
//! that answers serializable reads from it.
//!
//! A leaf starts by reading every export (a Range over the run's exports prefix), then
//! watches from the revision after. Passed through, each of a relay's leaves would pull every
//! export across the relay's uplink: the fleet's exports times its leaves. The front already
//! sees every change in that range on its shared watch, so it keeps the range's keys
//! ([`Cache`]) and answers a serializable Range inside it itself.
//!
//! What makes that safe is one small question asked upstream first, with the child's own
//! token: a Range over the same keys that returns only the count and the key changed last
//! (`keys_only`, `limit: 1`, sorted by mod revision, newest first). The store above answers it
//! only if the child may read the range, so the rights stay the store's. And it tells whether
//! the copy is current: the copy is served when it has seen every revision up to the answer's,
//! or when its count and newest mod revision in the range equal the answer's. The second is
//! enough: a copy that missed a put in the range has an older newest key or fewer keys, and one
//! that missed a delete has more keys (a key both created and deleted since leaves the two
//! equal, and the range then is the same). When the copy is behind, the front waits for its
//! watch to catch up, up to [`CATCH_UP`], and otherwise passes the read through. So a client
//! that wrote and then reads serializably sees its write, as it would from a single etcd
//! member.
//!
//! Reads the copy cannot answer as etcd would pass through: linearizable ones, ones at a past
//! revision, sorted other than by key, or filtered by revisions.

use super::mvcc::KeyRange;
use super::state::{SORT_ASCEND, SORT_DESCEND, SORT_NONE, TARGET_KEY, TARGET_MOD};
use etcd_client::proto::{PbEvent, PbKeyValue, PbRangeRequest, PbRangeResponse};
use std::collections::BTreeMap;
use std::time::Duration;

const EVENT_DELETE: i32 = 1;

/// How long a read waits for the copy to catch up before it is passed through.
pub(crate) const CATCH_UP: Duration = Duration::from_secs(1);

/// The shared range's keys as of revision `rev`: every event after it is applied as it
/// arrives, so the copy is always the range's exact state at some revision.
#[derive(Debug, Default)]
pub(crate) struct Cache {
    kvs: BTreeMap<Vec<u8>, PbKeyValue>,
    rev: i64,
}

impl Cache {
    /// The copy read at revision `rev`.
    pub(crate) fn load(kvs: Vec<PbKeyValue>, rev: i64) -> Cache {
        Cache {
            kvs: kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
            rev,
        }
    }

    pub(crate) fn rev(&self) -> i64 {
        self.rev
    }

    /// Applies a watch response's events (those after the copy's revision: a watch resumed
    /// from before a load repeats some).
    pub(crate) fn apply(&mut self, events: &[PbEvent]) {
        for e in events {
            let Some(kv) = &e.kv else { continue };
            if kv.mod_revision <= self.rev {
                continue;
            }
            if e.r#type == EVENT_DELETE {
                self.kvs.remove(&kv.key);
            } else {
                self.kvs.insert(kv.key.clone(), kv.clone());
            }
            self.rev = kv.mod_revision;
        }
    }

    /// Nothing changed in the range up to `rev` (a progress notification, or a response's
    /// header after its events).
    pub(crate) fn advance(&mut self, rev: i64) {
        self.rev = self.rev.max(rev);
    }

    fn within<'a>(
        &'a self,
        range: &'a KeyRange,
        key: &[u8],
    ) -> impl Iterator<Item = &'a PbKeyValue> {
        self.kvs
            .range(key.to_vec()..)
            .take_while(move |(k, _)| range.contains(k))
            .map(|(_, kv)| kv)
    }

    /// How many keys the range holds, and the newest mod revision among them (0: none).
    pub(crate) fn summary(&self, key: &[u8], range_end: &[u8]) -> (i64, i64) {
        let range = KeyRange::new(key, range_end);
        self.within(&range, key).fold((0, 0), |(n, newest), kv| {
            (n + 1, newest.max(kv.mod_revision))
        })
    }

    /// Whether the copy is the range's state as of `probe`'s revision (see the module's
    /// comment).
    pub(crate) fn current_for(&self, req: &PbRangeRequest, probe: &PbRangeResponse) -> bool {
        let upstream_rev = probe.header.as_ref().map_or(0, |h| h.revision);
        if self.rev >= upstream_rev {
            return true;
        }
        let newest = probe.kvs.first().map_or(0, |kv| kv.mod_revision);
        self.summary(&req.key, &req.range_end) == (probe.count, newest)
    }

    /// The answer to `req` (one [`answerable`]) from the copy, without its header.
    pub(crate) fn answer(&self, req: &PbRangeRequest) -> PbRangeResponse {
        let range = KeyRange::new(&req.key, &req.range_end);
        let limit = usize::try_from(req.limit).unwrap_or(0);
        let mut resp = PbRangeResponse::default();
        for kv in self.within(&range, &req.key) {
            resp.count += 1;
            if req.count_only {
                continue;
            }
            if limit > 0 && resp.kvs.len() == limit {
                resp.more = true;
                continue;
            }
            let mut kv = kv.clone();
            if req.keys_only {
                kv.value.clear();
            }
            resp.kvs.push(kv);
        }
        resp
    }
}

/// Whether the copy can answer `req` exactly as the store above would: a serializable read
/// of the current revision, in key order, with no revision filters.
pub(crate) fn answerable(req: &PbRangeRequest) -> bool {
    let key_order = req.sort_target == TARGET_KEY
        && (req.sort_order == SORT_NONE || req.sort_order == SORT_ASCEND);
    req.serializable
        && key_order
        && req.revision <= 0
        && req.limit >= 0
        && req.min_mod_revision == 0
        && req.max_mod_revision == 0
        && req.min_create_revision == 0
        && req.max_create_revision == 0
}

/// The question asked upstream, as the child, before the copy answers `req`: may it read the
/// range, and what are its count and newest key there?
pub(crate) fn probe(req: &PbRangeRequest) -> PbRangeRequest {
    PbRangeRequest {
        key: req.key.clone(),
        range_end: req.range_end.clone(),
        limit: 1,
        keys_only: true,
        sort_order: SORT_DESCEND,
        sort_target: TARGET_MOD,
        serializable: true,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::proto::PbResponseHeader;

    fn kv(key: &str, value: &str, rev: i64) -> PbKeyValue {
        PbKeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
            create_revision: rev,
            version: 1,
            ..Default::default()
        }
    }

    fn put(key: &str, value: &str, rev: i64) -> PbEvent {
        PbEvent {
            r#type: 0,
            kv: Some(kv(key, value, rev)),
            prev_kv: None,
        }
    }

    fn delete(key: &str, rev: i64) -> PbEvent {
        PbEvent {
            r#type: EVENT_DELETE,
            kv: Some(kv(key, "", rev)),
            prev_kv: None,
        }
    }

    fn probe_answer(count: i64, newest: i64, rev: i64) -> PbRangeResponse {
        PbRangeResponse {
            header: Some(PbResponseHeader {
                revision: rev,
                ..Default::default()
            }),
            kvs: (newest > 0)
                .then(|| kv("x", "", newest))
                .into_iter()
                .collect(),
            count,
            more: false,
        }
    }

    fn prefix(p: &str) -> PbRangeRequest {
        let mut end = p.as_bytes().to_vec();
        *end.last_mut().unwrap() += 1;
        PbRangeRequest {
            key: p.as_bytes().to_vec(),
            range_end: end,
            serializable: true,
            ..Default::default()
        }
    }

    #[test]
    fn events_after_the_copys_revision_are_applied_and_repeats_skipped() {
        let mut c = Cache::load(vec![kv("e/a", "1", 5)], 6);
        c.apply(&[put("e/a", "old", 5), put("e/b", "2", 7), delete("e/a", 8)]);
        assert_eq!(c.rev(), 8);
        let resp = c.answer(&prefix("e/"));
        let keys: Vec<_> = resp.kvs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(keys, vec![b"e/b".to_vec()]);
        assert_eq!(resp.count, 1);
    }

    #[test]
    fn the_answer_keeps_range_limit_keys_only_and_count_only() {
        let c = Cache::load(
            vec![
                kv("a", "0", 2),
                kv("e/1", "1", 3),
                kv("e/2", "2", 4),
                kv("e/3", "3", 5),
                kv("f", "9", 6),
            ],
            6,
        );
        let mut req = prefix("e/");
        req.limit = 2;
        req.keys_only = true;
        let resp = c.answer(&req);
        assert_eq!((resp.count, resp.more, resp.kvs.len()), (3, true, 2));
        assert!(resp.kvs.iter().all(|kv| kv.value.is_empty()));
        req.count_only = true;
        let resp = c.answer(&req);
        assert_eq!((resp.count, resp.kvs.len()), (3, 0));
        let single = PbRangeRequest {
            key: b"e/2".to_vec(),
            serializable: true,
            ..Default::default()
        };
        let resp = c.answer(&single);
        assert_eq!(resp.kvs.len(), 1);
        assert_eq!(resp.kvs[0].value, b"2");
        let all = PbRangeRequest {
            key: b"e/".to_vec(),
            range_end: vec![0],
            serializable: true,
            ..Default::default()
        };
        assert_eq!(c.answer(&all).count, 4, "e/1 e/2 e/3 f");
    }

    #[test]
    fn a_copy_that_missed_a_put_or_a_delete_is_not_current() {
        let c = Cache::load(
            vec![kv("e/1", "1", 3), kv("e/2", "2", 4), kv("z", "", 9)],
            4,
        );
        let req = prefix("e/");
        // The store above is at 9 (a write outside the range): same keys, so current.
        assert!(c.current_for(&req, &probe_answer(2, 4, 9)));
        // A put the copy has not seen yet.
        assert!(!c.current_for(&req, &probe_answer(3, 10, 10)));
        assert!(!c.current_for(&req, &probe_answer(2, 10, 10)), "an update");
        // A delete it has not seen.
        assert!(!c.current_for(&req, &probe_answer(1, 3, 10)));
        // A copy that has seen every revision up to the answer's is current.
        let mut c = c;
        c.advance(10);
        assert!(c.current_for(&req, &probe_answer(3, 10, 10)));
    }

    #[test]
    fn only_plain_serializable_reads_are_answered_from_the_copy() {
        let ok = prefix("e/");
        assert!(answerable(&ok));
        let cases: Vec<fn(&mut PbRangeRequest)> = vec![
            |r| r.serializable = false,
            |r| r.revision = 3,
            |r| r.sort_order = SORT_DESCEND,
            |r| r.sort_target = TARGET_MOD,
            |r| r.min_mod_revision = 1,
            |r| r.max_create_revision = 1,
        ];
        for change in cases {
            let mut r = ok.clone();
            change(&mut r);
            assert!(!answerable(&r), "{r:?}");
        }
        let mut ascend = ok.clone();
        ascend.sort_order = SORT_ASCEND;
        assert!(answerable(&ascend));
    }
}
