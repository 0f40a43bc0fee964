//! The JSON forms of etcd's messages, as etcd 3.4's gRPC gateway writes and reads them (gogo
//! jsonpb with the proto's own field names): 64-bit integers as strings, bytes in base64, enums
//! by name, and fields at their default value (0, "", false, empty, absent) left out. Output
//! keeps the proto's field order.
//!
//! Reading accepts what jsonpb accepts: a field under its proto name or its lowerCamelCase JSON
//! name, integers as numbers or strings, enums by name or number, `null` as absent; unknown
//! fields are ignored.

use data_encoding::{BASE64, BASE64_NOPAD};
use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbCompactionRequest, PbCompactionResponse, PbCompare,
    PbDefragmentResponse, PbDeleteRequest, PbDeleteResponse, PbEvent, PbKeyValue,
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse,
    PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse, PbLeaseTimeToLiveRequest,
    PbLeaseTimeToLiveResponse, PbMemberListResponse, PbPutRequest, PbPutResponse, PbRangeRequest,
    PbRangeResponse, PbResponseHeader, PbSnapshotResponse, PbStatusResponse, PbTargetUnion,
    PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest, PbTxnRequestOp, PbTxnResponse, PbWatchRequest,
    PbWatchRequestUnion, PbWatchResponse,
};
use serde_json::{Map, Value};

// ---- writing ----

/// A JSON object being written, fields in the order they are added.
struct Obj(String);

impl Obj {
    fn new() -> Self {
        Obj(String::from("{"))
    }

    fn raw(mut self, name: &str, json: &str) -> Self {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push('"');
        self.0.push_str(name);
        self.0.push_str("\":");
        self.0.push_str(json);
        self
    }

    fn int(self, name: &str, v: i64) -> Self {
        if v == 0 {
            return self;
        }
        self.raw(name, &format!("\"{v}\""))
    }

    fn uint(self, name: &str, v: u64) -> Self {
        if v == 0 {
            return self;
        }
        self.raw(name, &format!("\"{v}\""))
    }

    fn boolean(self, name: &str, v: bool) -> Self {
        if !v {
            return self;
        }
        self.raw(name, "true")
    }

    fn bytes(self, name: &str, v: &[u8]) -> Self {
        if v.is_empty() {
            return self;
        }
        let encoded = format!("\"{}\"", BASE64.encode(v));
        self.raw(name, &encoded)
    }

    fn string(self, name: &str, v: &str) -> Self {
        if v.is_empty() {
            return self;
        }
        self.raw(name, &quote(v))
    }

    fn enumeration(self, name: &str, v: i32, names: &[&str]) -> Self {
        if v == 0 {
            return self;
        }
        match usize::try_from(v).ok().and_then(|i| names.get(i)) {
            Some(n) => self.raw(name, &format!("\"{n}\"")),
            None => self.raw(name, &v.to_string()),
        }
    }

    fn message(self, name: &str, json: Option<String>) -> Self {
        match json {
            Some(json) => self.raw(name, &json),
            None => self,
        }
    }

    fn list(self, name: &str, items: impl IntoIterator<Item = String>) -> Self {
        let items: Vec<String> = items.into_iter().collect();
        if items.is_empty() {
            return self;
        }
        let json = format!("[{}]", items.join(","));
        self.raw(name, &json)
    }

    fn done(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_string())
}

const SORT_ORDERS: &[&str] = &["NONE", "ASCEND", "DESCEND"];
const SORT_TARGETS: &[&str] = &["KEY", "VERSION", "CREATE", "MOD", "VALUE"];
const COMPARE_RESULTS: &[&str] = &["EQUAL", "GREATER", "LESS", "NOT_EQUAL"];
const COMPARE_TARGETS: &[&str] = &["VERSION", "CREATE", "MOD", "VALUE", "LEASE"];
const FILTERS: &[&str] = &["NOPUT", "NODELETE"];
const EVENT_TYPES: &[&str] = &["PUT", "DELETE"];
const ALARM_ACTIONS: &[&str] = &["GET", "ACTIVATE", "DEACTIVATE"];
const ALARM_TYPES: &[&str] = &["NONE", "NOSPACE", "CORRUPT"];

fn header(h: &Option<PbResponseHeader>) -> Option<String> {
    h.as_ref().map(|h| {
        Obj::new()
            .uint("cluster_id", h.cluster_id)
            .uint("member_id", h.member_id)
            .int("revision", h.revision)
            .uint("raft_term", h.raft_term)
            .done()
    })
}

fn key_value(kv: &PbKeyValue) -> String {
    Obj::new()
        .bytes("key", &kv.key)
        .int("create_revision", kv.create_revision)
        .int("mod_revision", kv.mod_revision)
        .int("version", kv.version)
        .bytes("value", &kv.value)
        .int("lease", kv.lease)
        .done()
}

pub fn range_response(r: &PbRangeResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .list("kvs", r.kvs.iter().map(key_value))
        .boolean("more", r.more)
        .int("count", r.count)
        .done()
}

pub fn put_response(r: &PbPutResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .message("prev_kv", r.prev_kv.as_ref().map(key_value))
        .done()
}

pub fn delete_response(r: &PbDeleteResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .int("deleted", r.deleted)
        .list("prev_kvs", r.prev_kvs.iter().map(key_value))
        .done()
}

pub fn txn_response(r: &PbTxnResponse) -> String {
    let op = |op: &etcd_client::proto::PbResponseOp| {
        let o = Obj::new();
        match &op.response {
            Some(PbTxnOpResponse::ResponseRange(r)) => o.raw("response_range", &range_response(r)),
            Some(PbTxnOpResponse::ResponsePut(r)) => o.raw("response_put", &put_response(r)),
            Some(PbTxnOpResponse::ResponseDeleteRange(r)) => {
                o.raw("response_delete_range", &delete_response(r))
            }
            Some(PbTxnOpResponse::ResponseTxn(r)) => o.raw("response_txn", &txn_response(r)),
            None => o,
        }
        .done()
    };
    Obj::new()
        .message("header", header(&r.header))
        .boolean("succeeded", r.succeeded)
        .list("responses", r.responses.iter().map(op))
        .done()
}

pub fn compaction_response(r: &PbCompactionResponse) -> String {
    Obj::new().message("header", header(&r.header)).done()
}

fn event(e: &PbEvent) -> String {
    Obj::new()
        .enumeration("type", e.r#type, EVENT_TYPES)
        .message("kv", e.kv.as_ref().map(key_value))
        .message("prev_kv", e.prev_kv.as_ref().map(key_value))
        .done()
}

pub fn watch_response(r: &PbWatchResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .int("watch_id", r.watch_id)
        .boolean("created", r.created)
        .boolean("canceled", r.canceled)
        .int("compact_revision", r.compact_revision)
        .string("cancel_reason", &r.cancel_reason)
        .boolean("fragment", r.fragment)
        .list("events", r.events.iter().map(event))
        .done()
}

pub fn lease_grant_response(r: &PbLeaseGrantResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .int("ID", r.id)
        .int("TTL", r.ttl)
        .string("error", &r.error)
        .done()
}

pub fn lease_revoke_response(r: &PbLeaseRevokeResponse) -> String {
    Obj::new().message("header", header(&r.header)).done()
}

pub fn lease_keep_alive_response(r: &PbLeaseKeepAliveResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .int("ID", r.id)
        .int("TTL", r.ttl)
        .done()
}

pub fn lease_time_to_live_response(r: &PbLeaseTimeToLiveResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .int("ID", r.id)
        .int("TTL", r.ttl)
        .int("grantedTTL", r.granted_ttl)
        .list(
            "keys",
            r.keys.iter().map(|k| format!("\"{}\"", BASE64.encode(k))),
        )
        .done()
}

pub fn lease_leases_response(r: &PbLeaseLeasesResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .list(
            "leases",
            r.leases.iter().map(|l| Obj::new().int("ID", l.id).done()),
        )
        .done()
}

pub fn status_response(r: &PbStatusResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .string("version", &r.version)
        .int("dbSize", r.db_size)
        .uint("leader", r.leader)
        .uint("raftIndex", r.raft_index)
        .uint("raftTerm", r.raft_term)
        .uint("raftAppliedIndex", r.raft_applied_index)
        .list("errors", r.errors.iter().map(|e| quote(e)))
        .int("dbSizeInUse", r.db_size_in_use)
        .boolean("isLearner", r.is_learner)
        .done()
}

pub fn alarm_response(r: &PbAlarmResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .list(
            "alarms",
            r.alarms.iter().map(|a| {
                Obj::new()
                    .uint("memberID", a.member_id)
                    .enumeration("alarm", a.alarm, ALARM_TYPES)
                    .done()
            }),
        )
        .done()
}

pub fn defragment_response(r: &PbDefragmentResponse) -> String {
    Obj::new().message("header", header(&r.header)).done()
}

pub fn member_list_response(r: &PbMemberListResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .list(
            "members",
            r.members.iter().map(|m| {
                Obj::new()
                    .uint("ID", m.id)
                    .string("name", &m.name)
                    .list("peerURLs", m.peer_ur_ls.iter().map(|u| quote(u)))
                    .list("clientURLs", m.client_ur_ls.iter().map(|u| quote(u)))
                    .boolean("isLearner", m.is_learner)
                    .done()
            }),
        )
        .done()
}

pub fn snapshot_response(r: &PbSnapshotResponse) -> String {
    Obj::new()
        .message("header", header(&r.header))
        .uint("remaining_bytes", r.remaining_bytes)
        .bytes("blob", &r.blob)
        .done()
}

// ---- reading ----

/// A request's JSON object, read field by field.
struct Fields<'a>(&'a Map<String, Value>);

/// `range_end` → `rangeEnd`, as protoc names JSON fields (the first letter is left alone).
fn camel(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = false;
    for c in name.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

fn bad(name: &str, want: &str) -> String {
    format!("field {name:?}: expected {want}")
}

impl<'a> Fields<'a> {
    fn of(v: &'a Value) -> Result<Self, String> {
        match v {
            Value::Object(m) => Ok(Fields(m)),
            _ => Err("expected a JSON object".to_string()),
        }
    }

    fn get(&self, name: &str) -> Option<&'a Value> {
        self.0
            .get(name)
            .or_else(|| self.0.get(&camel(name)))
            .filter(|v| !v.is_null())
    }

    fn int(&self, name: &str) -> Result<i64, String> {
        match self.get(name) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .ok_or_else(|| bad(name, "a 64-bit integer")),
            Some(Value::String(s)) => s.parse().map_err(|_| bad(name, "a 64-bit integer")),
            Some(_) => Err(bad(name, "a 64-bit integer")),
        }
    }

    fn uint(&self, name: &str) -> Result<u64, String> {
        match self.get(name) {
            None => Ok(0),
            Some(Value::Number(n)) => n
                .as_u64()
                .ok_or_else(|| bad(name, "an unsigned 64-bit integer")),
            Some(Value::String(s)) => s
                .parse()
                .map_err(|_| bad(name, "an unsigned 64-bit integer")),
            Some(_) => Err(bad(name, "an unsigned 64-bit integer")),
        }
    }

    fn boolean(&self, name: &str) -> Result<bool, String> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(name, "true or false")),
        }
    }

    fn bytes(&self, name: &str) -> Result<Vec<u8>, String> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => decode_base64(s).ok_or_else(|| bad(name, "base64")),
            Some(_) => Err(bad(name, "a base64 string")),
        }
    }

    fn enumeration(&self, name: &str, names: &[&str]) -> Result<i32, String> {
        let want = || bad(name, &format!("one of {}", names.join(", ")));
        match self.get(name) {
            None => Ok(0),
            Some(v) => enum_value(v, names).ok_or_else(want),
        }
    }

    fn message(&self, name: &str) -> Result<Option<Fields<'a>>, String> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => Fields::of(v).map(Some).map_err(|_| bad(name, "an object")),
        }
    }

    fn list(&self, name: &str) -> Result<&'a [Value], String> {
        match self.get(name) {
            None => Ok(&[]),
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(bad(name, "a list")),
        }
    }
}

fn enum_value(v: &Value, names: &[&str]) -> Option<i32> {
    match v {
        Value::String(s) => names.iter().position(|n| n == s).map(|i| i as i32),
        Value::Number(n) => n.as_i64().and_then(|i| i32::try_from(i).ok()),
        _ => None,
    }
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    BASE64
        .decode(s.as_bytes())
        .or_else(|_| BASE64_NOPAD.decode(s.as_bytes()))
        .ok()
}

/// Parses a request body: empty means an empty message, as the gateway treats it.
pub fn parse(body: &[u8]) -> Result<Value, String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Object(Map::new()));
    }
    serde_json::from_slice(body).map_err(|e| e.to_string())
}

fn range_fields(f: &Fields) -> Result<PbRangeRequest, String> {
    Ok(PbRangeRequest {
        key: f.bytes("key")?,
        range_end: f.bytes("range_end")?,
        limit: f.int("limit")?,
        revision: f.int("revision")?,
        sort_order: f.enumeration("sort_order", SORT_ORDERS)?,
        sort_target: f.enumeration("sort_target", SORT_TARGETS)?,
        serializable: f.boolean("serializable")?,
        keys_only: f.boolean("keys_only")?,
        count_only: f.boolean("count_only")?,
        min_mod_revision: f.int("min_mod_revision")?,
        max_mod_revision: f.int("max_mod_revision")?,
        min_create_revision: f.int("min_create_revision")?,
        max_create_revision: f.int("max_create_revision")?,
    })
}

fn put_fields(f: &Fields) -> Result<PbPutRequest, String> {
    Ok(PbPutRequest {
        key: f.bytes("key")?,
        value: f.bytes("value")?,
        lease: f.int("lease")?,
        prev_kv: f.boolean("prev_kv")?,
        ignore_value: f.boolean("ignore_value")?,
        ignore_lease: f.boolean("ignore_lease")?,
    })
}

fn delete_fields(f: &Fields) -> Result<PbDeleteRequest, String> {
    Ok(PbDeleteRequest {
        key: f.bytes("key")?,
        range_end: f.bytes("range_end")?,
        prev_kv: f.boolean("prev_kv")?,
    })
}

fn compare_fields(f: &Fields) -> Result<PbCompare, String> {
    let union = if f.get("version").is_some() {
        Some(PbTargetUnion::Version(f.int("version")?))
    } else if f.get("create_revision").is_some() {
        Some(PbTargetUnion::CreateRevision(f.int("create_revision")?))
    } else if f.get("mod_revision").is_some() {
        Some(PbTargetUnion::ModRevision(f.int("mod_revision")?))
    } else if f.get("value").is_some() {
        Some(PbTargetUnion::Value(f.bytes("value")?))
    } else if f.get("lease").is_some() {
        Some(PbTargetUnion::Lease(f.int("lease")?))
    } else {
        None
    };
    Ok(PbCompare {
        result: f.enumeration("result", COMPARE_RESULTS)?,
        target: f.enumeration("target", COMPARE_TARGETS)?,
        key: f.bytes("key")?,
        range_end: f.bytes("range_end")?,
        target_union: union,
    })
}

fn op_fields(f: &Fields) -> Result<PbTxnRequestOp, String> {
    let request = if let Some(r) = f.message("request_range")? {
        Some(PbTxnOpRequest::RequestRange(range_fields(&r)?))
    } else if let Some(p) = f.message("request_put")? {
        Some(PbTxnOpRequest::RequestPut(put_fields(&p)?))
    } else if let Some(d) = f.message("request_delete_range")? {
        Some(PbTxnOpRequest::RequestDeleteRange(delete_fields(&d)?))
    } else if let Some(t) = f.message("request_txn")? {
        Some(PbTxnOpRequest::RequestTxn(txn_fields(&t)?))
    } else {
        None
    };
    Ok(PbTxnRequestOp { request })
}

fn txn_fields(f: &Fields) -> Result<PbTxnRequest, String> {
    let each = |name: &str| -> Result<Vec<PbTxnRequestOp>, String> {
        f.list(name)?
            .iter()
            .map(|v| op_fields(&Fields::of(v)?))
            .collect()
    };
    Ok(PbTxnRequest {
        compare: f
            .list("compare")?
            .iter()
            .map(|v| compare_fields(&Fields::of(v)?))
            .collect::<Result<_, _>>()?,
        success: each("success")?,
        failure: each("failure")?,
    })
}

pub fn range_request(v: &Value) -> Result<PbRangeRequest, String> {
    range_fields(&Fields::of(v)?)
}

pub fn put_request(v: &Value) -> Result<PbPutRequest, String> {
    put_fields(&Fields::of(v)?)
}

pub fn delete_request(v: &Value) -> Result<PbDeleteRequest, String> {
    delete_fields(&Fields::of(v)?)
}

pub fn txn_request(v: &Value) -> Result<PbTxnRequest, String> {
    txn_fields(&Fields::of(v)?)
}

pub fn compaction_request(v: &Value) -> Result<PbCompactionRequest, String> {
    let f = Fields::of(v)?;
    Ok(PbCompactionRequest {
        revision: f.int("revision")?,
        physical: f.boolean("physical")?,
    })
}

pub fn watch_request(v: &Value) -> Result<PbWatchRequest, String> {
    let f = Fields::of(v)?;
    let union = if let Some(c) = f.message("create_request")? {
        let mut create = PbWatchRequestUnion::CreateRequest(Default::default());
        if let PbWatchRequestUnion::CreateRequest(r) = &mut create {
            r.key = c.bytes("key")?;
            r.range_end = c.bytes("range_end")?;
            r.start_revision = c.int("start_revision")?;
            r.progress_notify = c.boolean("progress_notify")?;
            r.filters = c
                .list("filters")?
                .iter()
                .map(|v| enum_value(v, FILTERS).ok_or_else(|| bad("filters", "NOPUT or NODELETE")))
                .collect::<Result<_, _>>()?;
            r.prev_kv = c.boolean("prev_kv")?;
            r.watch_id = c.int("watch_id")?;
            r.fragment = c.boolean("fragment")?;
        }
        Some(create)
    } else if let Some(c) = f.message("cancel_request")? {
        let mut cancel = PbWatchRequestUnion::CancelRequest(Default::default());
        if let PbWatchRequestUnion::CancelRequest(r) = &mut cancel {
            r.watch_id = c.int("watch_id")?;
        }
        Some(cancel)
    } else if f.message("progress_request")?.is_some() {
        Some(PbWatchRequestUnion::ProgressRequest(Default::default()))
    } else {
        None
    };
    Ok(PbWatchRequest {
        request_union: union,
    })
}

pub fn lease_grant_request(v: &Value) -> Result<PbLeaseGrantRequest, String> {
    let f = Fields::of(v)?;
    Ok(PbLeaseGrantRequest {
        ttl: f.int("TTL")?,
        id: f.int("ID")?,
    })
}

pub fn lease_revoke_request(v: &Value) -> Result<PbLeaseRevokeRequest, String> {
    Ok(PbLeaseRevokeRequest {
        id: Fields::of(v)?.int("ID")?,
    })
}

pub fn lease_keep_alive_request(v: &Value) -> Result<PbLeaseKeepAliveRequest, String> {
    Ok(PbLeaseKeepAliveRequest {
        id: Fields::of(v)?.int("ID")?,
    })
}

pub fn lease_time_to_live_request(v: &Value) -> Result<PbLeaseTimeToLiveRequest, String> {
    let f = Fields::of(v)?;
    Ok(PbLeaseTimeToLiveRequest {
        id: f.int("ID")?,
        keys: f.boolean("keys")?,
    })
}

pub fn alarm_request(v: &Value) -> Result<PbAlarmRequest, String> {
    let f = Fields::of(v)?;
    Ok(PbAlarmRequest {
        action: f.enumeration("action", ALARM_ACTIONS)?,
        member_id: f.uint("memberID")?,
        alarm: f.enumeration("alarm", ALARM_TYPES)?,
    })
}

/// An empty request message: any object will do.
pub fn empty_request(v: &Value) -> Result<(), String> {
    Fields::of(v).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_are_written_as_etcds_gateway_writes_them() {
        let header = Some(PbResponseHeader {
            cluster_id: 15118495548433857066,
            member_id: 13668033151171901709,
            revision: 3,
            raft_term: 2,
        });
        let r = PbRangeResponse {
            header,
            kvs: vec![PbKeyValue {
                key: b"foo".to_vec(),
                create_revision: 2,
                mod_revision: 3,
                version: 2,
                value: b"baz".to_vec(),
                lease: 0,
            }],
            more: false,
            count: 1,
        };
        // Byte for byte what etcd 3.4.23 answered to the same range.
        assert_eq!(
            range_response(&r),
            r#"{"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"3","raft_term":"2"},"kvs":[{"key":"Zm9v","create_revision":"2","mod_revision":"3","version":"2","value":"YmF6"}],"count":"1"}"#
        );
        let w = PbWatchResponse {
            watch_id: -1,
            events: vec![PbEvent {
                r#type: 1,
                kv: Some(PbKeyValue {
                    key: b"w".to_vec(),
                    mod_revision: 10,
                    ..Default::default()
                }),
                prev_kv: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            watch_response(&w),
            r#"{"watch_id":"-1","events":[{"type":"DELETE","kv":{"key":"dw==","mod_revision":"10"}}]}"#
        );
    }

    #[test]
    fn requests_are_read_as_jsonpb_reads_them() {
        let v = parse(br#"{"key":"Zm9v","rangeEnd":"Zm9w","limit":"2","revision":5,"sort_order":"DESCEND","sort_target":3,"countOnly":true,"unknown":1}"#).unwrap();
        let r = range_request(&v).unwrap();
        assert_eq!(r.key, b"foo");
        assert_eq!(r.range_end, b"fop");
        assert_eq!((r.limit, r.revision), (2, 5));
        assert_eq!((r.sort_order, r.sort_target), (2, 3));
        assert!(r.count_only);
        assert_eq!(range_request(&parse(b"").unwrap()).unwrap().key, b"");
        assert!(range_request(&parse(br#"{"key":"not base64!"}"#).unwrap()).is_err());
        assert!(range_request(&parse(br#"{"key":5}"#).unwrap()).is_err());
        assert!(parse(b"{bad").is_err());

        let t = txn_request(&parse(br#"{"compare":[{"result":"EQUAL","target":"VALUE","key":"Zm9v","value":"YmF6"}],"success":[{"request_put":{"key":"Zm9v","value":"cXV4"}},{"request_range":{"key":"Zm9v"}}],"failure":[{"request_delete_range":{"key":"Zm9v"}}]}"#).unwrap()).unwrap();
        assert_eq!(t.compare[0].target, 3);
        assert_eq!(
            t.compare[0].target_union,
            Some(PbTargetUnion::Value(b"baz".to_vec()))
        );
        assert!(matches!(
            t.success[0].request,
            Some(PbTxnOpRequest::RequestPut(_))
        ));
        assert!(matches!(
            t.failure[0].request,
            Some(PbTxnOpRequest::RequestDeleteRange(_))
        ));

        let w = watch_request(&parse(br#"{"create_request":{"key":"dw==","filters":["NOPUT"],"watch_id":7,"start_revision":"3"}}"#).unwrap()).unwrap();
        match w.request_union {
            Some(PbWatchRequestUnion::CreateRequest(c)) => {
                assert_eq!((c.watch_id, c.start_revision), (7, 3));
                assert_eq!(c.filters, [0]);
            }
            other => panic!("{other:?}"),
        }
        let g = lease_grant_request(&parse(br#"{"TTL":30,"ID":"1234"}"#).unwrap()).unwrap();
        assert_eq!((g.ttl, g.id), (30, 1234));
    }
}
