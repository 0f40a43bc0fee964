//! The store's request handling for a host's credential (not admin): each input is a sequence
//! of requests, each either an etcd protobuf message (Range, Put, DeleteRange, Txn, Compaction,
//! LeaseGrant, LeaseRevoke, LeaseTimeToLive) handed to the gRPC service as the front does, or a
//! JSON body POSTed to the gateway with the host's token. A fresh in-memory store per input
//! holds keys the host may write, keys it may only read, keys it may not see, and a lease
//! granted by root.
//!
//! Checks, after every request:
//! - no panic;
//! - a refused request (an error, a denial among them) left the store exactly as it was;
//! - every key the request added, changed or deleted is one the host may write (its own
//!   export prefix or its converged key), checked against the key list as root sees it;
//! - root's lease still exists, and the store was not compacted;
//! - every key an answer shows (kvs, prev_kv, prev_kvs, lease keys; in JSON the `key` fields)
//!   is one the host may read.
//!
//! Input: records of `kind: u8 | len: u16 LE | body`; `kind % 18` picks the request (0-7 the
//! protobuf messages above, 8-17 a gateway path).
//!
//! `ARBOR_FUZZ_WRITE_SEEDS=DIR` writes the seeds instead (see README.md);
//! `ARBOR_FUZZ_VERBOSE=1` tells what each request did.
#![no_main]

use arbor::store::auth::Access;
use arbor::store::fuzzing::{GrpcRequest, GrpcResponse, Harness};
use data_encoding::BASE64;
use etcd_client::proto::{
    PbCompactionRequest, PbCompare, PbDeleteRequest, PbKeyValue, PbLeaseGrantRequest,
    PbLeaseRevokeRequest, PbLeaseTimeToLiveRequest, PbPutRequest, PbRangeRequest, PbTargetUnion,
    PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp, PbTxnResponse,
};
use libfuzzer_sys::fuzz_target;
use prost::Message;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

const EXPORTS: &[u8] = b"/run/exports/";
const MINE: &[u8] = b"/run/exports/h1/";
const CONVERGED: &[u8] = b"/run/converged/h1";
const ROOT_LEASE: i64 = 0x1234;

/// What root writes before the host's requests: keys of every kind of access.
const KEYS: &[(&str, &str)] = &[
    ("/run/exports/h1/file/a", "mine"),
    ("/run/exports/h2/file/b", "theirs"),
    ("/run/exports/h10/file/c", "a prefix of h1 is not h1"),
    ("/run/converged/h1", "1"),
    ("/run/converged/h2", "1"),
    ("/run/exports", "not under the prefix"),
    ("/run/secret", "root only"),
];

const PATHS: &[&str] = &[
    "/v3/kv/range",
    "/v3/kv/put",
    "/v3/kv/deleterange",
    "/v3/kv/txn",
    "/v3/kv/compaction",
    "/v3/lease/grant",
    "/v3/lease/revoke",
    "/v3/lease/timetolive",
    "/v3/kv/lease/revoke",
    "/v3/lease/leases",
];

fn readable(key: &[u8]) -> bool {
    key.starts_with(EXPORTS) || key == CONVERGED
}

fn writable(key: &[u8]) -> bool {
    key.starts_with(MINE) || key == CONVERGED
}

fn access() -> Access {
    Access::Keys {
        read: vec![EXPORTS.to_vec()],
        write: vec![MINE.to_vec()],
        own: vec![CONVERGED.to_vec()],
    }
}

/// A runtime per input: dropping it drops the store's lease clock task with it, so an input
/// leaves nothing allocated behind (else libFuzzer runs a leak check after every input).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime")
}

enum Call {
    Grpc(GrpcRequest),
    Gateway(&'static str, Vec<u8>),
}

fn decode(kind: u8, body: &[u8]) -> Option<Call> {
    let kind = usize::from(kind) % (8 + PATHS.len());
    if kind >= 8 {
        return Some(Call::Gateway(PATHS[kind - 8], body.to_vec()));
    }
    let request = match kind {
        0 => GrpcRequest::Range(Message::decode(body).ok()?),
        1 => GrpcRequest::Put(Message::decode(body).ok()?),
        2 => GrpcRequest::DeleteRange(Message::decode(body).ok()?),
        3 => GrpcRequest::Txn(Message::decode(body).ok()?),
        4 => GrpcRequest::Compaction(Message::decode(body).ok()?),
        5 => GrpcRequest::LeaseGrant(Message::decode(body).ok()?),
        6 => GrpcRequest::LeaseRevoke(Message::decode(body).ok()?),
        _ => GrpcRequest::LeaseTimeToLive(Message::decode(body).ok()?),
    };
    Some(Call::Grpc(request))
}

/// Splits an input into its records (a short last record is dropped).
fn records(mut data: &[u8]) -> Vec<(u8, &[u8])> {
    let mut out = Vec::new();
    while data.len() >= 3 && out.len() < 32 {
        let kind = data[0];
        let len = usize::from(u16::from_le_bytes([data[1], data[2]]));
        let rest = &data[3..];
        let body = &rest[..len.min(rest.len())];
        out.push((kind, body));
        data = &rest[body.len()..];
    }
    out
}

async fn setup() -> Harness {
    let store = Harness::new(access()).expect("store");
    store
        .grpc_as_root(GrpcRequest::LeaseGrant(PbLeaseGrantRequest {
            ttl: 3600,
            id: ROOT_LEASE,
        }))
        .await
        .expect("root's lease");
    for (key, value) in KEYS {
        store
            .grpc_as_root(GrpcRequest::Put(PbPutRequest {
                key: key.as_bytes().to_vec(),
                value: value.as_bytes().to_vec(),
                ..Default::default()
            }))
            .await
            .expect("root's put");
    }
    store
        .grpc_as_root(GrpcRequest::Put(PbPutRequest {
            key: b"/run/leased".to_vec(),
            value: b"root's lease holds it".to_vec(),
            lease: ROOT_LEASE,
            ..Default::default()
        }))
        .await
        .expect("root's leased put");
    store
}

/// Every key as root sees it.
async fn keys(store: &Harness) -> BTreeMap<Vec<u8>, PbKeyValue> {
    let all = store
        .grpc_as_root(GrpcRequest::Range(PbRangeRequest {
            key: vec![0],
            range_end: vec![0],
            ..Default::default()
        }))
        .await;
    match all {
        Ok(GrpcResponse::Range(r)) => r.kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect(),
        other => panic!("root's range: {other:?}"),
    }
}

async fn check_root_lease_and_history(store: &Harness) {
    match store
        .grpc_as_root(GrpcRequest::LeaseTimeToLive(PbLeaseTimeToLiveRequest {
            id: ROOT_LEASE,
            keys: false,
        }))
        .await
    {
        Ok(GrpcResponse::LeaseTimeToLive(t)) => {
            assert!(t.ttl > 0, "root's lease is gone: {t:?}")
        }
        other => panic!("root's lease: {other:?}"),
    }
    let first = store
        .grpc_as_root(GrpcRequest::Range(PbRangeRequest {
            key: b"/".to_vec(),
            revision: 1,
            ..Default::default()
        }))
        .await;
    assert!(first.is_ok(), "the store was compacted: {first:?}");
}

fn shown_kvs<'a>(response: &'a GrpcResponse, out: &mut Vec<&'a [u8]>) {
    fn txn<'a>(t: &'a PbTxnResponse, out: &mut Vec<&'a [u8]>) {
        for op in &t.responses {
            match &op.response {
                Some(PbTxnOpResponse::ResponseRange(r)) => {
                    out.extend(r.kvs.iter().map(|kv| kv.key.as_slice()))
                }
                Some(PbTxnOpResponse::ResponsePut(p)) => {
                    out.extend(p.prev_kv.iter().map(|kv| kv.key.as_slice()))
                }
                Some(PbTxnOpResponse::ResponseDeleteRange(d)) => {
                    out.extend(d.prev_kvs.iter().map(|kv| kv.key.as_slice()))
                }
                Some(PbTxnOpResponse::ResponseTxn(t)) => txn(t, out),
                None => {}
            }
        }
    }
    match response {
        GrpcResponse::Range(r) => out.extend(r.kvs.iter().map(|kv| kv.key.as_slice())),
        GrpcResponse::Put(p) => out.extend(p.prev_kv.iter().map(|kv| kv.key.as_slice())),
        GrpcResponse::DeleteRange(d) => out.extend(d.prev_kvs.iter().map(|kv| kv.key.as_slice())),
        GrpcResponse::Txn(t) => txn(t, out),
        GrpcResponse::LeaseTimeToLive(t) => out.extend(t.keys.iter().map(|k| k.as_slice())),
        GrpcResponse::Compaction(_)
        | GrpcResponse::LeaseGrant(_)
        | GrpcResponse::LeaseRevoke(_) => {}
    }
}

/// The keys a JSON answer shows: every `key` field, and `keys` lists.
fn shown_json_keys(v: &Value, out: &mut Vec<Vec<u8>>) {
    match v {
        Value::Object(m) => {
            for (name, field) in m {
                match (name.as_str(), field) {
                    ("key", Value::String(s)) => {
                        out.push(BASE64.decode(s.as_bytes()).expect("a key in base64"))
                    }
                    ("keys", Value::Array(items)) => {
                        for item in items {
                            if let Value::String(s) = item {
                                out.push(BASE64.decode(s.as_bytes()).expect("a key in base64"));
                            }
                        }
                    }
                    _ => shown_json_keys(field, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| shown_json_keys(i, out)),
        _ => {}
    }
}

fuzz_target!(
    init: {
        if let Ok(dir) = std::env::var("ARBOR_FUZZ_WRITE_SEEDS") {
            write_seeds(Path::new(&dir));
            std::process::exit(0);
        }
    },
    |data: &[u8]| {
        let started = Instant::now();
        runtime().block_on(async {
            let store = setup().await;
            for (kind, body) in records(data) {
                let Some(call) = decode(kind, body) else {
                    continue;
                };
                let state = store.state().await.expect("state");
                let before = keys(&store).await;
                let (refused, shown, what) = match call {
                    Call::Grpc(request) => {
                        let what = format!("{request:?}");
                        match store.grpc(request).await {
                            Ok(response) => {
                                let mut shown = Vec::new();
                                shown_kvs(&response, &mut shown);
                                let shown = shown.into_iter().map(<[u8]>::to_vec).collect();
                                (None, shown, what)
                            }
                            Err(status) => (Some(format!("{status:?}")), Vec::new(), what),
                        }
                    }
                    Call::Gateway(path, body) => {
                        let what = format!("POST {path} {:?}", String::from_utf8_lossy(&body));
                        let (code, answer) = store.gateway(path, body).await.expect("gateway");
                        if code == 200 {
                            let v: Value =
                                serde_json::from_slice(&answer).expect("the gateway answers JSON");
                            let mut shown = Vec::new();
                            shown_json_keys(&v, &mut shown);
                            (None, shown, what)
                        } else {
                            let why = format!("{code} {}", String::from_utf8_lossy(&answer));
                            (Some(why), Vec::new(), what)
                        }
                    }
                };
                if std::env::var_os("ARBOR_FUZZ_VERBOSE").is_some() {
                    eprintln!("{what}: {}", refused.as_deref().unwrap_or("ok"));
                }
                // A lease the host granted in this input expires after 2 s at the earliest:
                // past that, a change may be the lease clock's, not the request's.
                if started.elapsed() > Duration::from_millis(1500) {
                    break;
                }
                if let Some(why) = &refused {
                    let after = store.state().await.expect("state");
                    assert!(after == state, "{what}: refused ({why}) but the store changed");
                }
                let after = keys(&store).await;
                for key in before.keys().chain(after.keys()) {
                    if before.get(key) != after.get(key) {
                        assert!(
                            writable(key),
                            "{what}: changed {:?}, which the host may not write ({:?} -> {:?})",
                            String::from_utf8_lossy(key),
                            before.get(key),
                            after.get(key)
                        );
                    }
                }
                for key in &shown {
                    assert!(
                        readable(key),
                        "{what}: the answer shows {:?}, which the host may not read",
                        String::from_utf8_lossy(key)
                    );
                }
                check_root_lease_and_history(&store).await;
            }
            store.close().await;
        });
    }
);

// ---- seeds ----

fn record(out: &mut Vec<u8>, kind: u8, body: &[u8]) {
    out.push(kind);
    out.extend_from_slice(
        &u16::try_from(body.len())
            .expect("a short body")
            .to_le_bytes(),
    );
    out.extend_from_slice(body);
}

fn put(key: &[u8], value: &[u8], lease: i64) -> PbPutRequest {
    PbPutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        lease,
        prev_kv: true,
        ..Default::default()
    }
}

fn range(key: &[u8], range_end: &[u8]) -> PbRangeRequest {
    PbRangeRequest {
        key: key.to_vec(),
        range_end: range_end.to_vec(),
        ..Default::default()
    }
}

fn delete(key: &[u8], range_end: &[u8]) -> PbDeleteRequest {
    PbDeleteRequest {
        key: key.to_vec(),
        range_end: range_end.to_vec(),
        prev_kv: true,
    }
}

fn txn(key: &[u8], then: PbTxnOpRequest, otherwise: PbTxnOpRequest) -> PbTxnRequest {
    PbTxnRequest {
        compare: vec![PbCompare {
            result: 0,
            target: 0,
            key: key.to_vec(),
            range_end: vec![],
            target_union: Some(PbTargetUnion::Version(0)),
        }],
        success: vec![PbTxnRequestOp {
            request: Some(then),
        }],
        failure: vec![PbTxnRequestOp {
            request: Some(otherwise),
        }],
    }
}

/// The requests of a host at work (`allowed`) or of one trying beyond its keys.
fn requests(allowed: bool) -> Vec<GrpcRequest> {
    if allowed {
        vec![
            GrpcRequest::Put(put(b"/run/exports/h1/file/new", b"v", 0)),
            GrpcRequest::Range(range(EXPORTS, b"/run/exports0")),
            GrpcRequest::Txn(txn(
                b"/run/exports/h1/file/a",
                PbTxnOpRequest::RequestPut(put(b"/run/exports/h1/file/a", b"w", 0)),
                PbTxnOpRequest::RequestRange(range(b"/run/exports/h2/", b"/run/exports/h20")),
            )),
            GrpcRequest::LeaseGrant(PbLeaseGrantRequest { ttl: 60, id: 99 }),
            GrpcRequest::Put(put(CONVERGED, b"1", 99)),
            GrpcRequest::LeaseTimeToLive(PbLeaseTimeToLiveRequest { id: 99, keys: true }),
            GrpcRequest::LeaseRevoke(PbLeaseRevokeRequest { id: 99 }),
            GrpcRequest::DeleteRange(delete(MINE, b"/run/exports/h10")),
        ]
    } else {
        vec![
            GrpcRequest::Put(put(b"/run/exports/h2/file/b", b"forged", 0)),
            GrpcRequest::Put(put(b"/run/exports/h10/file/c", b"forged", 0)),
            GrpcRequest::Range(range(b"/", &[0])),
            GrpcRequest::Range(range(b"/run/secret", b"")),
            GrpcRequest::DeleteRange(delete(b"/run/", b"/run0")),
            GrpcRequest::Put(put(CONVERGED, b"1", ROOT_LEASE)),
            GrpcRequest::LeaseRevoke(PbLeaseRevokeRequest { id: ROOT_LEASE }),
            GrpcRequest::Compaction(PbCompactionRequest {
                revision: 3,
                physical: false,
            }),
            GrpcRequest::Txn(txn(
                b"/run/secret",
                PbTxnOpRequest::RequestPut(put(b"/run/exports/h1/file/a", b"w", 0)),
                PbTxnOpRequest::RequestTxn(txn(
                    MINE,
                    PbTxnOpRequest::RequestDeleteRange(delete(b"/run/converged/h2", b"")),
                    PbTxnOpRequest::RequestRange(range(b"/run/secret", b"")),
                )),
            )),
        ]
    }
}

fn protobuf(request: &GrpcRequest) -> (u8, Vec<u8>) {
    match request {
        GrpcRequest::Range(m) => (0, m.encode_to_vec()),
        GrpcRequest::Put(m) => (1, m.encode_to_vec()),
        GrpcRequest::DeleteRange(m) => (2, m.encode_to_vec()),
        GrpcRequest::Txn(m) => (3, m.encode_to_vec()),
        GrpcRequest::Compaction(m) => (4, m.encode_to_vec()),
        GrpcRequest::LeaseGrant(m) => (5, m.encode_to_vec()),
        GrpcRequest::LeaseRevoke(m) => (6, m.encode_to_vec()),
        GrpcRequest::LeaseTimeToLive(m) => (7, m.encode_to_vec()),
    }
}

fn b64(bytes: &[u8]) -> Value {
    Value::String(BASE64.encode(bytes))
}

fn op_json(op: &PbTxnOpRequest) -> Value {
    match op {
        PbTxnOpRequest::RequestRange(r) => json!({"request_range": range_json(r)}),
        PbTxnOpRequest::RequestPut(p) => json!({"request_put": put_json(p)}),
        PbTxnOpRequest::RequestDeleteRange(d) => json!({"request_delete_range": delete_json(d)}),
        PbTxnOpRequest::RequestTxn(t) => json!({"request_txn": txn_json(t)}),
    }
}

fn range_json(r: &PbRangeRequest) -> Value {
    json!({"key": b64(&r.key), "range_end": b64(&r.range_end)})
}

fn put_json(p: &PbPutRequest) -> Value {
    json!({"key": b64(&p.key), "value": b64(&p.value), "lease": p.lease.to_string(), "prev_kv": p.prev_kv})
}

fn delete_json(d: &PbDeleteRequest) -> Value {
    json!({"key": b64(&d.key), "range_end": b64(&d.range_end), "prev_kv": d.prev_kv})
}

fn txn_json(t: &PbTxnRequest) -> Value {
    let compare: Vec<Value> = t
        .compare
        .iter()
        .map(
            |c| json!({"key": b64(&c.key), "target": "VERSION", "result": "EQUAL", "version": "0"}),
        )
        .collect();
    let ops = |ops: &[PbTxnRequestOp]| -> Vec<Value> {
        ops.iter()
            .filter_map(|o| o.request.as_ref())
            .map(op_json)
            .collect()
    };
    json!({"compare": compare, "success": ops(&t.success), "failure": ops(&t.failure)})
}

/// The same request as a JSON body (as curl sends it to the gateway), and its path's index.
fn gateway(request: &GrpcRequest) -> (u8, Vec<u8>) {
    let (path, v) = match request {
        GrpcRequest::Range(r) => (0, range_json(r)),
        GrpcRequest::Put(p) => (1, put_json(p)),
        GrpcRequest::DeleteRange(d) => (2, delete_json(d)),
        GrpcRequest::Txn(t) => (3, txn_json(t)),
        GrpcRequest::Compaction(c) => (4, json!({"revision": c.revision.to_string()})),
        GrpcRequest::LeaseGrant(g) => {
            (5, json!({"TTL": g.ttl.to_string(), "ID": g.id.to_string()}))
        }
        GrpcRequest::LeaseRevoke(r) => (6, json!({"ID": r.id.to_string()})),
        GrpcRequest::LeaseTimeToLive(t) => (7, json!({"ID": t.id.to_string(), "keys": t.keys})),
    };
    (8 + path, serde_json::to_vec(&v).expect("json"))
}

fn write_seeds(dir: &Path) {
    std::fs::create_dir_all(dir).expect("seed dir");
    for (name, allowed) in [("host", true), ("denied", false)] {
        let mut grpc = Vec::new();
        let mut json = Vec::new();
        for request in requests(allowed) {
            let (kind, body) = protobuf(&request);
            record(&mut grpc, kind, &body);
            let (kind, body) = gateway(&request);
            record(&mut json, kind, &body);
        }
        std::fs::write(dir.join(format!("{name}-grpc")), grpc).expect("write seed");
        std::fs::write(dir.join(format!("{name}-gateway")), json).expect("write seed");
    }
}
