//! `arbor store restore`'s reading of a snapshot file (a backup `etcdctl snapshot save` wrote,
//! or a data dir's `snapshot.pb`): any bytes give an error or a state, never a panic or an
//! allocation out of proportion to the file; and the snapshot a restored store writes of
//! itself restores again, to the same state.
//!
//! Input: a whole file, tried as it is; and tried again as the state inside a data dir's
//! `snapshot.pb` with a header and checksum that match (else nearly every mutation would stop
//! at the checksum).
//!
//! `ARBOR_FUZZ_WRITE_SEEDS=DIR` writes the seeds instead (see README.md).
#![no_main]

use arbor::store::auth::Access;
use arbor::store::fuzzing::{GrpcRequest, Harness, restore_bytes, snapshot_with_payload};
use etcd_client::proto::{PbCompactionRequest, PbDeleteRequest, PbLeaseGrantRequest, PbPutRequest};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(
    init: {
        if let Ok(dir) = std::env::var("ARBOR_FUZZ_WRITE_SEEDS") {
            write_seeds(Path::new(&dir));
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        check(data);
        check(&snapshot_with_payload(data).expect("a small payload"));
    }
);

fn check(file: &[u8]) {
    let Ok(own) = restore_bytes(file) else {
        return;
    };
    let again = restore_bytes(&own)
        .unwrap_or_else(|e| panic!("a restored store's own snapshot does not restore: {e:#}"));
    assert!(
        again == own,
        "a restored store's own snapshot restores to another state ({} bytes, then {})",
        own.len(),
        again.len()
    );
}

/// A store with keys, history, a deletion, a lease holding a key and a compaction, saved as a
/// backup and as a data dir snapshot, before and after the compaction.
fn write_seeds(dir: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = Harness::new(Access::Admin).expect("store");
        let put = |key: &str, value: &str, lease| {
            GrpcRequest::Put(PbPutRequest {
                key: key.into(),
                value: value.into(),
                lease,
                ..Default::default()
            })
        };
        for (key, value) in [("/a", "1"), ("/b", "2"), ("/a", "3"), ("/c/d", "4")] {
            store.grpc_as_root(put(key, value, 0)).await.expect("put");
        }
        let lease = match store
            .grpc_as_root(GrpcRequest::LeaseGrant(PbLeaseGrantRequest {
                ttl: 60,
                id: 7,
            }))
            .await
            .expect("grant")
        {
            arbor::store::fuzzing::GrpcResponse::LeaseGrant(g) => g.id,
            other => panic!("{other:?}"),
        };
        store
            .grpc_as_root(put("/leased", "x", lease))
            .await
            .expect("put");
        store
            .grpc_as_root(GrpcRequest::DeleteRange(PbDeleteRequest {
                key: "/b".into(),
                ..Default::default()
            }))
            .await
            .expect("delete");
        std::fs::create_dir_all(dir).expect("seed dir");
        let write = |name: &str, bytes: Vec<u8>| {
            std::fs::write(dir.join(name), bytes).expect("write seed");
        };
        write("backup", store.backup().await.expect("backup"));
        write("data-dir", store.snapshot_file().await.expect("snapshot"));
        write("state", store.state().await.expect("state"));
        store
            .grpc_as_root(GrpcRequest::Compaction(PbCompactionRequest {
                revision: 4,
                physical: false,
            }))
            .await
            .expect("compact");
        write("backup-compacted", store.backup().await.expect("backup"));
        write(
            "data-dir-compacted",
            store.snapshot_file().await.expect("snapshot"),
        );
        write("state-compacted", store.state().await.expect("state"));
        store.close().await;
    });
}
