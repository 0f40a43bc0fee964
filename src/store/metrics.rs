//! The store's metrics, served at `/metrics` in Prometheus' text format under the names an etcd
//! dashboard looks for (docs/store.md lists them).
//!
//! Recording is a few relaxed atomic adds, on the request path and in the log thread; nothing
//! allocates or locks. Rendering reads the atomics and, for the gauges of the state (keys,
//! leases, size), takes the state lock once, briefly.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The gRPC type of a method, as go-grpc-prometheus labels it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unary,
    ServerStream,
    BidiStream,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ServerStream => "server_stream",
            Kind::BidiStream => "bidi_stream",
        }
    }
}

/// Every method of etcd's v3 services: `(service, method, type)`. Requests to other paths are
/// not counted by method.
pub const METHODS: &[(&str, &str, Kind)] = &[
    ("etcdserverpb.KV", "Range", Kind::Unary),
    ("etcdserverpb.KV", "Put", Kind::Unary),
    ("etcdserverpb.KV", "DeleteRange", Kind::Unary),
    ("etcdserverpb.KV", "Txn", Kind::Unary),
    ("etcdserverpb.KV", "Compact", Kind::Unary),
    ("etcdserverpb.Watch", "Watch", Kind::BidiStream),
    ("etcdserverpb.Lease", "LeaseGrant", Kind::Unary),
    ("etcdserverpb.Lease", "LeaseRevoke", Kind::Unary),
    ("etcdserverpb.Lease", "LeaseKeepAlive", Kind::BidiStream),
    ("etcdserverpb.Lease", "LeaseTimeToLive", Kind::Unary),
    ("etcdserverpb.Lease", "LeaseLeases", Kind::Unary),
    ("etcdserverpb.Maintenance", "Alarm", Kind::Unary),
    ("etcdserverpb.Maintenance", "Status", Kind::Unary),
    ("etcdserverpb.Maintenance", "Defragment", Kind::Unary),
    ("etcdserverpb.Maintenance", "Hash", Kind::Unary),
    ("etcdserverpb.Maintenance", "HashKV", Kind::Unary),
    ("etcdserverpb.Maintenance", "Snapshot", Kind::ServerStream),
    ("etcdserverpb.Maintenance", "MoveLeader", Kind::Unary),
    ("etcdserverpb.Maintenance", "Downgrade", Kind::Unary),
    ("etcdserverpb.Cluster", "MemberAdd", Kind::Unary),
    ("etcdserverpb.Cluster", "MemberRemove", Kind::Unary),
    ("etcdserverpb.Cluster", "MemberUpdate", Kind::Unary),
    ("etcdserverpb.Cluster", "MemberList", Kind::Unary),
    ("etcdserverpb.Cluster", "MemberPromote", Kind::Unary),
    ("etcdserverpb.Auth", "AuthEnable", Kind::Unary),
    ("etcdserverpb.Auth", "AuthDisable", Kind::Unary),
    ("etcdserverpb.Auth", "AuthStatus", Kind::Unary),
    ("etcdserverpb.Auth", "Authenticate", Kind::Unary),
    ("etcdserverpb.Auth", "UserAdd", Kind::Unary),
    ("etcdserverpb.Auth", "UserGet", Kind::Unary),
    ("etcdserverpb.Auth", "UserList", Kind::Unary),
    ("etcdserverpb.Auth", "UserDelete", Kind::Unary),
    ("etcdserverpb.Auth", "UserChangePassword", Kind::Unary),
    ("etcdserverpb.Auth", "UserGrantRole", Kind::Unary),
    ("etcdserverpb.Auth", "UserRevokeRole", Kind::Unary),
    ("etcdserverpb.Auth", "RoleAdd", Kind::Unary),
    ("etcdserverpb.Auth", "RoleGet", Kind::Unary),
    ("etcdserverpb.Auth", "RoleList", Kind::Unary),
    ("etcdserverpb.Auth", "RoleDelete", Kind::Unary),
    ("etcdserverpb.Auth", "RoleGrantPermission", Kind::Unary),
    ("etcdserverpb.Auth", "RoleRevokePermission", Kind::Unary),
];

/// The index in [`METHODS`] of a gRPC path (`/etcdserverpb.KV/Range`).
pub fn method_index(path: &str) -> Option<usize> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    METHODS
        .iter()
        .position(|(s, m, _)| *s == service && *m == method)
}

/// The index in [`METHODS`] of a method by name (`"Range"`); the names are unique.
pub fn method_named(method: &str) -> Option<usize> {
    METHODS.iter().position(|(_, m, _)| *m == method)
}

/// gRPC status code names, by code, as go-grpc-prometheus labels them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Request latencies: prometheus' default buckets, with finer ones below 5 ms where the
/// store's requests land.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// etcd's buckets for disk durations (1 ms doubling to 8 s), finer below 1 ms for fast disks.
const DISK_BUCKETS: &[f64] = &[
    0.000125, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
    0.512, 1.024, 2.048, 4.096, 8.192,
];
/// etcd's buckets for snapshot and defragmentation durations (10 ms doubling to 163 s).
const SLOW_BUCKETS: &[f64] = &[
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92, 163.84,
];

/// A histogram of durations with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    /// Upper bounds in nanoseconds, for a cheap comparison on the hot path.
    bounds_ns: Vec<u64>,
    /// Per bucket (not cumulative), and one more for +Inf.
    counts: Vec<AtomicU64>,
    sum_ns: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            bounds_ns: bounds.iter().map(|b| (b * 1e9) as u64).collect(),
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_ns: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = self.bounds_ns.partition_point(|b| *b < ns);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Relaxed);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {cumulative}"
            );
        }
        cumulative += self.counts[self.bounds.len()].load(Relaxed);
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}"
        );
        let sum = self.sum_ns.load(Relaxed) as f64 / 1e9;
        let braces = |s: &str| {
            if s.is_empty() {
                String::new()
            } else {
                format!("{{{s}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

struct MethodStats {
    started: AtomicU64,
    handled: [AtomicU64; CODES.len()],
    latency: Histogram,
}

/// Everything the store counts. One per store, shared by the services, the log thread and the
/// HTTP front.
pub struct Metrics {
    methods: Vec<MethodStats>,
    pub wal_fsync: Histogram,
    pub wal_write_bytes: AtomicU64,
    /// Writing a snapshot of the state into the data dir (when the log is restarted).
    pub snapshot_write: Histogram,
    /// Streaming a snapshot to a client (`etcdctl snapshot save`).
    pub snapshot_send: Histogram,
    pub defrag: Histogram,
    pub watch_streams: AtomicI64,
    pub watchers: AtomicI64,
    pub leases_granted: AtomicU64,
    pub leases_revoked: AtomicU64,
    pub leases_renewed: AtomicU64,
    pub leases_expired: AtomicU64,
    pub health_failures: AtomicU64,
    pub health_successes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            methods: METHODS
                .iter()
                .map(|_| MethodStats {
                    started: AtomicU64::new(0),
                    handled: std::array::from_fn(|_| AtomicU64::new(0)),
                    latency: Histogram::new(LATENCY_BUCKETS),
                })
                .collect(),
            wal_fsync: Histogram::new(DISK_BUCKETS),
            wal_write_bytes: AtomicU64::new(0),
            snapshot_write: Histogram::new(SLOW_BUCKETS),
            snapshot_send: Histogram::new(SLOW_BUCKETS),
            defrag: Histogram::new(SLOW_BUCKETS),
            watch_streams: AtomicI64::new(0),
            watchers: AtomicI64::new(0),
            leases_granted: AtomicU64::new(0),
            leases_revoked: AtomicU64::new(0),
            leases_renewed: AtomicU64::new(0),
            leases_expired: AtomicU64::new(0),
            health_failures: AtomicU64::new(0),
            health_successes: AtomicU64::new(0),
        }
    }
}

/// The state's figures at the time of a scrape.
pub struct Gauges {
    pub member_id: u64,
    pub version: &'static str,
    pub quota_bytes: i64,
    pub db_size: i64,
    pub db_size_in_use: i64,
    pub keys: usize,
    pub leases: usize,
    pub revision: i64,
    pub compacted: i64,
    pub index: u64,
    pub durable_index: u64,
    pub nospace: bool,
}

impl Metrics {
    pub fn started(&self, method: usize) {
        if let Some(m) = self.methods.get(method) {
            m.started.fetch_add(1, Relaxed);
        }
    }

    /// A call ended with gRPC `code` after `elapsed` (for a stream: its lifetime).
    pub fn handled(&self, method: usize, code: i32, elapsed: Duration) {
        if let Some(m) = self.methods.get(method) {
            let code = usize::try_from(code)
                .ok()
                .filter(|c| *c < CODES.len())
                .unwrap_or(2);
            m.handled[code].fetch_add(1, Relaxed);
            m.latency.observe(elapsed);
        }
    }

    /// The whole exposition, Prometheus text format 0.0.4.
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(16 << 10);
        let family = |out: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        };

        // Requests, by method, as go-grpc-prometheus names them (etcd registers the same).
        family(
            &mut out,
            "grpc_server_started_total",
            "counter",
            "Total number of RPCs started on the server.",
        );
        for (i, (service, method, kind)) in METHODS.iter().enumerate() {
            let n = self.methods[i].started.load(Relaxed);
            if n > 0 {
                let _ = writeln!(
                    out,
                    "grpc_server_started_total{{grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{}\"}} {n}",
                    kind.label()
                );
            }
        }
        family(
            &mut out,
            "grpc_server_handled_total",
            "counter",
            "Total number of RPCs completed on the server, regardless of success or failure.",
        );
        for (i, (service, method, kind)) in METHODS.iter().enumerate() {
            for (code, name) in CODES.iter().enumerate() {
                let n = self.methods[i].handled[code].load(Relaxed);
                if n > 0 {
                    let _ = writeln!(
                        out,
                        "grpc_server_handled_total{{grpc_code=\"{name}\",grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{}\"}} {n}",
                        kind.label()
                    );
                }
            }
        }
        family(
            &mut out,
            "grpc_server_handling_seconds",
            "histogram",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
        );
        for (i, (service, method, kind)) in METHODS.iter().enumerate() {
            let h = &self.methods[i].latency;
            if h.count() > 0 {
                let labels = format!(
                    "grpc_method=\"{method}\",grpc_service=\"{service}\",grpc_type=\"{}\"",
                    kind.label()
                );
                h.render(&mut out, "grpc_server_handling_seconds", &labels);
            }
        }

        // The server: one member, always the leader.
        gauge(
            &mut out,
            "etcd_server_has_leader",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            1.0,
        );
        gauge(
            &mut out,
            "etcd_server_is_leader",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            1.0,
        );
        counter(
            &mut out,
            "etcd_server_leader_changes_seen_total",
            "The number of leader changes seen.",
            0,
        );
        family(
            &mut out,
            "etcd_server_id",
            "gauge",
            "Server or member ID in hexadecimal format. 1 for 'server_id' label with current ID.",
        );
        let _ = writeln!(out, "etcd_server_id{{server_id=\"{:x}\"}} 1", g.member_id);
        family(
            &mut out,
            "etcd_server_version",
            "gauge",
            "Which version is running. 1 for 'server_version' label with current version.",
        );
        let _ = writeln!(
            out,
            "etcd_server_version{{server_version=\"{}\"}} 1",
            g.version
        );
        gauge(
            &mut out,
            "etcd_server_proposals_committed_total",
            "The total number of consensus proposals committed.",
            g.durable_index as f64,
        );
        gauge(
            &mut out,
            "etcd_server_proposals_applied_total",
            "The total number of consensus proposals applied.",
            g.index as f64,
        );
        gauge(
            &mut out,
            "etcd_server_proposals_pending",
            "The current number of pending proposals to commit.",
            g.index.saturating_sub(g.durable_index) as f64,
        );
        counter(
            &mut out,
            "etcd_server_health_success",
            "The total number of successful health checks",
            self.health_successes.load(Relaxed),
        );
        counter(
            &mut out,
            "etcd_server_health_failures",
            "The total number of failed health checks",
            self.health_failures.load(Relaxed),
        );
        gauge(
            &mut out,
            "etcd_server_quota_backend_bytes",
            "Current backend storage quota size in bytes.",
            g.quota_bytes as f64,
        );
        family(
            &mut out,
            "arbor_store_alarm",
            "gauge",
            "Whether an alarm is raised (1) or not (0), by alarm type.",
        );
        let _ = writeln!(
            out,
            "arbor_store_alarm{{alarm=\"NOSPACE\"}} {}",
            u8::from(g.nospace)
        );

        // The key space.
        gauge(
            &mut out,
            "etcd_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            g.db_size as f64,
        );
        gauge(
            &mut out,
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "Total size of the underlying database logically in use in bytes.",
            g.db_size_in_use as f64,
        );
        gauge(
            &mut out,
            "etcd_debugging_mvcc_db_total_size_in_bytes",
            "Total size of the underlying database physically allocated in bytes.",
            g.db_size as f64,
        );
        gauge(
            &mut out,
            "etcd_debugging_mvcc_keys_total",
            "Total number of keys.",
            g.keys as f64,
        );
        gauge(
            &mut out,
            "etcd_debugging_mvcc_current_revision",
            "The current revision of store.",
            g.revision as f64,
        );
        gauge(
            &mut out,
            "etcd_debugging_mvcc_compact_revision",
            "The revision of the last compaction in store.",
            g.compacted as f64,
        );

        // Watches and leases.
        gauge(
            &mut out,
            "etcd_debugging_mvcc_watch_stream_total",
            "Total number of watch streams.",
            self.watch_streams.load(Relaxed) as f64,
        );
        gauge(
            &mut out,
            "etcd_debugging_mvcc_watcher_total",
            "Total number of watchers.",
            self.watchers.load(Relaxed) as f64,
        );
        gauge(
            &mut out,
            "arbor_store_leases",
            "The number of leases that exist.",
            g.leases as f64,
        );
        counter(
            &mut out,
            "etcd_debugging_lease_granted_total",
            "The total number of granted leases.",
            self.leases_granted.load(Relaxed),
        );
        counter(
            &mut out,
            "etcd_debugging_lease_revoked_total",
            "The total number of revoked leases.",
            self.leases_revoked.load(Relaxed),
        );
        counter(
            &mut out,
            "etcd_debugging_lease_renewed_total",
            "The number of renewed leases seen by the leader.",
            self.leases_renewed.load(Relaxed),
        );
        counter(
            &mut out,
            "etcd_debugging_server_lease_expired_total",
            "The total number of expired leases.",
            self.leases_expired.load(Relaxed),
        );

        // The disk.
        family(
            &mut out,
            "etcd_disk_wal_fsync_duration_seconds",
            "histogram",
            "The latency distributions of fsync called by WAL.",
        );
        self.wal_fsync
            .render(&mut out, "etcd_disk_wal_fsync_duration_seconds", "");
        counter(
            &mut out,
            "etcd_disk_wal_write_bytes_total",
            "Total number of bytes written in WAL.",
            self.wal_write_bytes.load(Relaxed),
        );
        family(
            &mut out,
            "etcd_disk_backend_defrag_duration_seconds",
            "histogram",
            "The latency distribution of backend defragmentation.",
        );
        self.defrag
            .render(&mut out, "etcd_disk_backend_defrag_duration_seconds", "");
        family(
            &mut out,
            "etcd_disk_backend_snapshot_duration_seconds",
            "histogram",
            "The latency distribution of backend snapshots.",
        );
        self.snapshot_send
            .render(&mut out, "etcd_disk_backend_snapshot_duration_seconds", "");
        family(
            &mut out,
            "arbor_store_snapshot_write_duration_seconds",
            "histogram",
            "The time to write a snapshot of the state into the data dir and restart the log.",
        );
        self.snapshot_write
            .render(&mut out, "arbor_store_snapshot_write_duration_seconds", "");

        process_metrics(&mut out);
        out
    }
}

/// The standard process_* metrics, from /proc/self.
fn process_metrics(out: &mut String) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return;
    };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15, starttime 22, vsize 23, rss 24.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
    // SAFETY: sysconf only reads configuration values.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    if let (Some(u), Some(s)) = (field(14), field(15)) {
        metric(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (u + s) as f64 / ticks,
        );
    }
    if let Some(rss) = field(24) {
        metric(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            rss as f64 * page,
        );
    }
    if let Some(vsize) = field(23) {
        metric(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            vsize as f64,
        );
    }
    let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<u64>().ok())
    });
    if let (Some(boot), Some(start)) = (boot, field(22)) {
        metric(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            boot as f64 + start as f64 / ticks,
        );
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metric(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            fds.count() as f64,
        );
    }
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        metric(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            limit.rlim_cur as f64,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_are_found_by_path_and_histograms_are_cumulative() {
        assert_eq!(method_index("/etcdserverpb.KV/Range"), Some(0));
        assert_eq!(
            method_index("/etcdserverpb.Watch/Watch").map(|i| METHODS[i].1),
            Some("Watch")
        );
        assert_eq!(method_index("/etcdserverpb.KV/Nope"), None);
        assert_eq!(method_index("nonsense"), None);
        let m = Metrics::default();
        m.started(0);
        m.handled(0, 0, Duration::from_micros(300));
        m.handled(0, 3, Duration::from_secs(20));
        let text = m.render(&Gauges {
            member_id: 0xabc,
            version: "3.4.0",
            quota_bytes: 1,
            db_size: 2,
            db_size_in_use: 3,
            keys: 4,
            leases: 5,
            revision: 6,
            compacted: 7,
            index: 8,
            durable_index: 8,
            nospace: false,
        });
        let has = |line: &str| text.lines().any(|l| l == line);
        assert!(has(
            "grpc_server_started_total{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1"
        ));
        assert!(has(
            "grpc_server_handled_total{grpc_code=\"InvalidArgument\",grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"} 1"
        ));
        assert!(has(
            "grpc_server_handling_seconds_bucket{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\",le=\"0.00025\"} 0"
        ));
        assert!(has(
            "grpc_server_handling_seconds_bucket{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\",le=\"0.0005\"} 1"
        ));
        assert!(has(
            "grpc_server_handling_seconds_bucket{grpc_method=\"Range\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\",le=\"+Inf\"} 2"
        ));
        assert!(has("etcd_server_id{server_id=\"abc\"} 1"));
        assert!(has("etcd_debugging_mvcc_keys_total 4"));
        assert!(has("etcd_disk_wal_fsync_duration_seconds_count 0"));
        assert!(
            text.lines()
                .any(|l| l.starts_with("process_resident_memory_bytes "))
        );
    }
}
