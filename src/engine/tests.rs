//! Engine tests: whole engines on real files, sharing one exchange.
//!
//! They are written against the `Exchange` trait only, and [`new_exchange`] gives them the real
//! thing: an embedded store serving on a loopback port in this test's runtime, reached through
//! the store client, as every host in a run reaches it.

use crate::engine::exchange::Exchange;
use crate::engine::graph::{self, Graph};
use crate::engine::resources::{Kind, ResourceId};
use crate::engine::runner::{Engine, EngineConfig, Status};
use crate::engine::store_exchange::StoreExchange;
use crate::store::client::{Endpoints, StoreClient};
use crate::store::{Store, StoreConfig};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A fresh embedded store (in memory, on a free loopback port) for this test; it serves until
/// the test's runtime ends.
async fn new_store() -> StoreClient {
    let config = StoreConfig {
        listen: "127.0.0.1:0".into(),
        data_dir: None,
        allow_non_loopback: false,
    };
    let store = Store::bind(&config).await.expect("embedded store binds");
    let endpoint = store.endpoint().to_string();
    tokio::spawn(store.serve(tokio_util::sync::CancellationToken::new()));
    StoreClient::connect(&Endpoints::parse(&endpoint).expect("endpoint"))
        .await
        .expect("store client connects")
}

/// The exchange the engines share: the embedded store, through the store client.
async fn new_exchange() -> Arc<dyn Exchange> {
    Arc::new(StoreExchange::new(
        new_store().await,
        crate::engine::exchange::Keys::for_run("test"),
    ))
}

const WAIT: Duration = Duration::from_secs(10);

fn config(host: &str) -> EngineConfig {
    let mut c = EngineConfig::new(host);
    c.quiet = Duration::from_millis(100);
    c
}

fn parse(src: &str, host: &str) -> Graph {
    graph::parse(src, Path::new("test.yaml"), host).unwrap_or_else(|e| panic!("{e}"))
}

/// The article's graph for host `a` or `b`, with `/tmp/` moved into `dir`.
fn article_graph(which: char, dir: &Path) -> String {
    let src = match which {
        'a' => include_str!("../../examples/remote2a.yaml"),
        _ => include_str!("../../examples/remote2b.yaml"),
    };
    src.replace("/tmp/", &format!("{}/", dir.display()))
}

async fn start(src: &str, host: &str, exchange: &Arc<dyn Exchange>) -> Engine {
    Engine::start(parse(src, host), config(host), exchange.clone()).expect("engine starts")
}

async fn converged(engine: &Engine) -> Status {
    let (status, held) = engine.wait_for(WAIT, |s| s.converged).await;
    assert!(held, "not converged within {WAIT:?}: {status:?}");
    status
}

/// Waits for a file to hold `want` (tests may poll; the engine must not).
async fn wait_file(path: &Path, want: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if fs::read_to_string(path).ok().as_deref() == Some(want) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never held {want:?} (has {:?})",
            path.display(),
            fs::read_to_string(path).ok()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn mtime(path: &Path) -> SystemTime {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn lines(path: &Path) -> usize {
    fs::read_to_string(path)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_articles_two_graphs_import_each_others_exports() {
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let ex = new_exchange().await;
    let a = start(&article_graph('a', da.path()), "a", &ex).await;
    let b = start(&article_graph('b', db.path()), "b", &ex).await;
    for dir in [da.path(), db.path()] {
        wait_file(&dir.join("file2a"), "i am file2a, exported from host a\n").await;
        wait_file(&dir.join("file2b"), "i am file2b, exported from host b\n").await;
    }
    assert_eq!(read(&da.path().join("file1a")), "i am file1a\n");
    assert_eq!(read(&db.path().join("file1b")), "i am file1b\n");
    assert!(
        !da.path().join("file1b").exists(),
        "b's local file leaked to a"
    );
    converged(&a).await;
    converged(&b).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_changed_export_updates_the_collected_file() {
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let ex = new_exchange().await;
    let a = start(&article_graph('a', da.path()), "a", &ex).await;
    let b_src = article_graph('b', db.path());
    let b = start(&b_src, "b", &ex).await;
    let collected = da.path().join("file2b");
    wait_file(&collected, "i am file2b, exported from host b\n").await;
    b.load_graph(parse(
        &b_src.replace("exported from host b", "edited on b"),
        "b",
    ));
    wait_file(&collected, "i am file2b, edited on b\n").await;
    wait_file(&db.path().join("file2b"), "i am file2b, edited on b\n").await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_departed_hosts_collected_files_stay_but_are_no_longer_managed() {
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let ex = new_exchange().await;
    let a = start(&article_graph('a', da.path()), "a", &ex).await;
    let b = start(&article_graph('b', db.path()), "b", &ex).await;
    let collected = da.path().join("file2b");
    wait_file(&collected, "i am file2b, exported from host b\n").await;
    b.stop().await;
    let from_b = ResourceId::new(Kind::File, "@@b/file2b");
    let (status, held) = a
        .wait_for(WAIT, |s| {
            !s.managed.contains(&from_b) && !s.managed.is_empty()
        })
        .await;
    assert!(held, "a still manages b's export: {status:?}");
    assert!(collected.exists(), "an unmanaged file must stay on disk");
    fs::remove_file(&collected).expect("rm");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!collected.exists(), "an unmanaged file was restored");
    // a's own export is still collected and still managed.
    fs::remove_file(da.path().join("file2a")).expect("rm");
    wait_file(
        &da.path().join("file2a"),
        "i am file2a, exported from host a\n",
    )
    .await;
    a.stop().await;
}

#[tokio::test]
async fn a_host_that_restarts_exports_again() {
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let ex = new_exchange().await;
    let a = start(&article_graph('a', da.path()), "a", &ex).await;
    let b_src = article_graph('b', db.path());
    let b = start(&b_src, "b", &ex).await;
    let from_b = ResourceId::new(Kind::File, "@@b/file2b");
    let (_, held) = a.wait_for(WAIT, |s| s.managed.contains(&from_b)).await;
    assert!(held);
    b.stop().await;
    let (_, held) = a.wait_for(WAIT, |s| !s.managed.contains(&from_b)).await;
    assert!(held, "b's export outlived b");
    let b = start(
        &b_src.replace("exported from host b", "back again"),
        "b",
        &ex,
    )
    .await;
    wait_file(&da.path().join("file2b"), "i am file2b, back again\n").await;
    let (_, held) = a.wait_for(WAIT, |s| s.managed.contains(&from_b)).await;
    assert!(held);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_shared_graph_names_each_host_with_its_hostname() {
    let dir = tempfile::tempdir().expect("dir");
    let src = format!(
        "graph: rack\nresources:\n  file:\n  - name: \"@@from-{{{{hostname}}}}\"\n    path: \"/x/from-{{{{hostname}}}}\"\n    content: \"hello from {{{{hostname}}}}\\n\"\ncollect:\n- kind: file\n  pattern: \"{}/\"\n",
        dir.path().display()
    );
    let ex = new_exchange().await;
    let h1 = start(&src, "h1", &ex).await;
    let h2 = start(&src, "h2", &ex).await;
    wait_file(&dir.path().join("from-h1"), "hello from h1\n").await;
    wait_file(&dir.path().join("from-h2"), "hello from h2\n").await;
    h1.stop().await;
    h2.stop().await;
}

#[tokio::test]
async fn an_edited_or_deleted_managed_file_is_restored() {
    let dir = tempfile::tempdir().expect("dir");
    let ex = new_exchange().await;
    let a = start(&article_graph('a', dir.path()), "a", &ex).await;
    let path = dir.path().join("file1a");
    wait_file(&path, "i am file1a\n").await;
    converged(&a).await;
    fs::write(&path, "vandalised\n").expect("edit");
    wait_file(&path, "i am file1a\n").await;
    fs::remove_file(&path).expect("rm");
    wait_file(&path, "i am file1a\n").await;
    // The collected copy of a's own export is guarded the same way.
    let own = dir.path().join("file2a");
    fs::write(&own, "x").expect("edit");
    wait_file(&own, "i am file2a, exported from host a\n").await;
    a.stop().await;
}

fn reload_graph(dir: &Path, f2: &str, extra: bool) -> String {
    let d = dir.display();
    let mut src = format!(
        "graph: g\nresources:\n  file:\n  - name: f1\n    path: {d}/f1\n    content: \"one\\n\"\n  - name: f2\n    path: {d}/f2\n    content: \"{f2}\\n\"\n"
    );
    if extra {
        src.push_str(&format!(
            "  - name: f3\n    path: {d}/f3\n    content: \"three\\n\"\n"
        ));
    }
    src.push_str(&format!(
        "  exec:\n  - name: e\n    cmd: \"echo ran >> {d}/exec.log\"\n"
    ));
    src
}

#[tokio::test]
async fn hot_reload_touches_only_what_changed() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    let ex = new_exchange().await;
    let e = start(&reload_graph(d, "two", false), "h", &ex).await;
    converged(&e).await;
    let (f1_before, f2_before) = (mtime(&d.join("f1")), mtime(&d.join("f2")));
    assert_eq!(lines(&d.join("exec.log")), 1);
    tokio::time::sleep(Duration::from_millis(20)).await;

    e.load_graph(parse(&reload_graph(d, "TWO", true), "h"));
    wait_file(&d.join("f2"), "TWO\n").await;
    wait_file(&d.join("f3"), "three\n").await;
    converged(&e).await;
    assert_eq!(
        mtime(&d.join("f1")),
        f1_before,
        "unchanged f1 was rewritten"
    );
    assert_ne!(mtime(&d.join("f2")), f2_before);
    assert_eq!(lines(&d.join("exec.log")), 1, "unchanged exec re-ran");

    // Removed from the graph: stays on disk, no longer guarded.
    e.load_graph(parse(&reload_graph(d, "TWO", false), "h"));
    let f3 = ResourceId::new(Kind::File, "f3");
    let (_, held) = e.wait_for(WAIT, |s| !s.managed.contains(&f3)).await;
    assert!(held);
    assert_eq!(read(&d.join("f3")), "three\n");
    fs::remove_file(d.join("f3")).expect("rm");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!d.join("f3").exists());
    e.stop().await;
}

#[tokio::test]
async fn a_resource_removed_while_its_check_runs_stays_managed_until_the_check_ends() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    let ex = new_exchange().await;
    let slow = format!(
        "graph: g\nresources:\n  file:\n  - name: f1\n    path: {0}/f1\n    content: \"one\\n\"\n  exec:\n  - name: slow\n    cmd: \"touch {0}/started; sleep 1; echo done > {0}/slow\"\n",
        d.display()
    );
    let e = start(&slow, "h", &ex).await;
    wait_file(&d.join("started"), "").await;
    e.load_graph(parse(&reload_graph(d, "two", false), "h"));
    let id = ResourceId::new(Kind::Exec, "slow");
    let (status, _) = e
        .wait_for(WAIT, |s| {
            s.managed.contains(&ResourceId::new(Kind::File, "f2"))
        })
        .await;
    assert!(
        status.managed.contains(&id),
        "a removed exec still running is not shown managed: {:?}",
        status.managed
    );
    let (status, held) = e.wait_for(WAIT, |s| !s.managed.contains(&id)).await;
    assert!(
        held,
        "the removed exec stays managed after its check: {status:?}"
    );
    assert_eq!(
        read(&d.join("slow")),
        "done\n",
        "shown unmanaged before it ended"
    );
    e.stop().await;
}

#[tokio::test]
async fn a_graph_file_edit_is_picked_up_by_the_file_watcher() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    let graph_path = d.join("g.yaml");
    fs::write(&graph_path, reload_graph(d, "two", false)).expect("write graph");
    let ex = new_exchange().await;
    let first = graph::load(&graph_path, "h").expect("valid");
    let e = Engine::start(first.clone(), config("h"), ex).expect("start");
    let cancel = tokio_util::sync::CancellationToken::new();
    let text = fs::read_to_string(&graph_path).expect("read graph");
    let file = crate::engine::reload::GraphFile::follow(&e.fs_events(), &graph_path, text)
        .expect("follow");
    tokio::spawn(crate::engine::reload::follow_graph_file(
        file,
        "h".into(),
        first,
        e.graph_sender(),
        cancel.clone(),
    ));
    wait_file(&d.join("f2"), "two\n").await;
    // A broken edit is reported and ignored; the next good one applies.
    fs::write(&graph_path, "graph: g\nbogus: 1\n").expect("bad edit");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(read(&d.join("f1")), "one\n");
    fs::write(&graph_path, reload_graph(d, "edited", false)).expect("good edit");
    wait_file(&d.join("f2"), "edited\n").await;
    cancel.cancel();
    e.stop().await;
}

fn chain_graph(dir: &Path, content: &str) -> String {
    let d = dir.display();
    format!(
        "graph: chain
resources:
  noop:
  - name: start
  file:
  - name: conf
    path: {d}/conf
    content: \"{content}\\n\"
  exec:
  - name: reload
    cmd: \"cat {d}/conf >> {d}/reload.log\"
edges:
- name: start-conf
  from: {{kind: noop, name: start}}
  to: {{kind: file, name: conf}}
- name: conf-reload
  from: {{kind: file, name: conf}}
  to: {{kind: exec, name: reload}}
  notify: true
"
    )
}

#[tokio::test]
async fn edges_order_application_and_notify_refreshes() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    let ex = new_exchange().await;
    let e = start(&chain_graph(d, "v1"), "h", &ex).await;
    converged(&e).await;
    // The exec ran after the file was written, exactly once.
    assert_eq!(read(&d.join("reload.log")), "v1\n");

    // A change to the file (by reload) refreshes the exec.
    e.load_graph(parse(&chain_graph(d, "v2"), "h"));
    wait_file(&d.join("reload.log"), "v1\nv2\n").await;

    // So does drift repair: the file is restored, and the exec re-runs.
    fs::write(d.join("conf"), "tampered\n").expect("edit");
    wait_file(&d.join("reload.log"), "v1\nv2\nv2\n").await;
    converged(&e).await;
    assert_eq!(lines(&d.join("reload.log")), 3);
    e.stop().await;
}

#[tokio::test]
async fn independent_branches_run_concurrently() {
    let ex = new_exchange().await;
    let src = "graph: g\nresources:\n  exec:\n  - name: one\n    cmd: sleep 1\n  - name: two\n    cmd: sleep 1\n  - name: three\n    cmd: sleep 1\n";
    let started = std::time::Instant::now();
    let e = start(src, "h", &ex).await;
    converged(&e).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "took {took:?}: ran in series"
    );
    e.stop().await;
}

#[tokio::test]
async fn a_failure_blocks_only_what_depends_on_it() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let src = format!(
        "graph: g
resources:
  exec:
  - name: broken
    cmd: \"exit 7\"
  file:
  - name: after-broken
    path: {d}/after
  - name: independent
    path: {d}/independent
edges:
- name: e
  from: {{kind: exec, name: broken}}
  to: {{kind: file, name: after-broken}}
"
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    let (status, held) = e
        .wait_for(WAIT, |s| s.settled && !s.failures.is_empty())
        .await;
    assert!(held, "{status:?}");
    assert!(dir.path().join("independent").exists());
    assert!(!dir.path().join("after").exists());
    assert!(!status.converged);
    let broken = &status.failures[&ResourceId::new(Kind::Exec, "broken")];
    assert!(broken.contains("`exit 7` exited with code 7"), "{broken}");
    assert_eq!(
        status.failures[&ResourceId::new(Kind::File, "after-broken")],
        "blocked by exec[broken]"
    );
    e.stop().await;
}

#[tokio::test]
async fn a_failed_resource_recovers_on_its_next_event_and_unblocks_its_dependents() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let src = format!(
        "graph: g
resources:
  file:
  - name: in-missing-dir
    path: {d}/later/conf
    content: \"c\\n\"
  exec:
  - name: after
    cmd: \"touch {d}/after\"
edges:
- name: e
  from: {{kind: file, name: in-missing-dir}}
  to: {{kind: exec, name: after}}
"
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    let (status, held) = e
        .wait_for(WAIT, |s| s.settled && s.failures.len() == 2)
        .await;
    assert!(held, "{status:?}");
    assert!(!dir.path().join("after").exists());
    // The directory appears: the file's watch sees it, the file is written, the exec runs.
    fs::create_dir(dir.path().join("later")).expect("mkdir");
    converged(&e).await;
    assert_eq!(read(&dir.path().join("later/conf")), "c\n");
    assert!(dir.path().join("after").exists());
    e.stop().await;
}

#[tokio::test]
async fn noop_changes_nothing_and_reports_what_would_change() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path();
    fs::write(d.join("conf"), "old\n").expect("seed");
    let before = mtime(&d.join("conf"));
    let ex = new_exchange().await;
    let mut cfg = config("h");
    cfg.noop = true;
    let e = Engine::start(parse(&chain_graph(d, "new"), "h"), cfg, ex).expect("start");
    let (status, held) = e.wait_for(WAIT, |s| s.settled).await;
    assert!(held, "{status:?}");
    assert_eq!(
        status.changes, 2,
        "the file and the exec would change: {status:?}"
    );
    assert!(status.failures.is_empty());
    assert_eq!(read(&d.join("conf")), "old\n");
    assert_eq!(mtime(&d.join("conf")), before);
    assert!(!d.join("reload.log").exists(), "noop ran the exec");
    e.stop().await;
}

#[tokio::test]
async fn the_converged_flag_is_published_and_withdrawn() {
    let dir = tempfile::tempdir().expect("dir");
    let client = new_store().await;
    let ex: Arc<dyn Exchange> = Arc::new(StoreExchange::new(
        client.clone(),
        crate::engine::exchange::Keys::for_run("test"),
    ));
    let e = start(&article_graph('a', dir.path()), "a", &ex).await;
    converged(&e).await;
    let flag = client
        .get("/arbor/runs/test/converged/a")
        .await
        .expect("get flag");
    assert_eq!(flag.map(|kv| kv.value().to_vec()), Some(b"true".to_vec()));
    e.stop().await;
    let flag = client
        .get("/arbor/runs/test/converged/a")
        .await
        .expect("get flag");
    assert!(flag.is_none(), "the flag outlived the host");
}

/// Only for the examples' own smoke test below.
fn example(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

#[test]
fn every_example_graph_is_valid() {
    for name in [
        "examples/remote2a.yaml",
        "examples/remote2b.yaml",
        "examples/local.yaml",
        "examples/meta.yaml",
    ] {
        graph::load(&example(name), "h").unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test]
async fn a_thousand_files_converge_in_seconds() {
    let dir = tempfile::tempdir().expect("dir");
    let mut src = String::from("graph: big\nresources:\n  file:\n");
    for i in 0..1000 {
        src.push_str(&format!(
            "  - name: f{i}\n    path: {}/f{i}\n    content: \"{i}\\n\"\n",
            dir.path().display()
        ));
    }
    let started = std::time::Instant::now();
    let e = start(&src, "h", &new_exchange().await).await;
    let status = converged(&e).await;
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(status.changes, 1000);
    assert_eq!(read(&dir.path().join("f999")), "999\n");
    e.stop().await;
}

#[tokio::test]
async fn a_long_chain_is_applied_in_order() {
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("order.log");
    let mut src = String::from("graph: chain\nresources:\n  exec:\n");
    let n = 30;
    for i in 0..n {
        src.push_str(&format!(
            "  - name: s{i}\n    cmd: \"echo {i} >> {}\"\n",
            log.display()
        ));
    }
    src.push_str("edges:\n");
    // Declared in reverse, so file order cannot be what orders them.
    for i in (1..n).rev() {
        src.push_str(&format!(
            "- name: e{i}\n  from: {{kind: exec, name: s{}}}\n  to: {{kind: exec, name: s{i}}}\n",
            i - 1
        ));
    }
    let e = start(&src, "h", &new_exchange().await).await;
    converged(&e).await;
    let want: String = (0..n).map(|i| format!("{i}\n")).collect();
    assert_eq!(read(&log), want);
    e.stop().await;
}

// Metaparams (`meta:`), as the scheduler applies them.

#[tokio::test]
async fn meta_retry_tries_a_failed_apply_again_delay_apart() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    // Fails twice, then succeeds.
    let src = format!(
        "graph: g
resources:
  exec:
  - name: flaky
    cmd: \"echo x >> {d}/tries; test $(wc -l < {d}/tries) -ge 3\"
    meta:
      retry: 3
      delay: 150
  - name: hopeless
    cmd: \"echo x >> {d}/hopeless; exit 1\"
    meta:
      retry: 1
"
    );
    let start_at = std::time::Instant::now();
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    let (status, held) = e
        .wait_for(WAIT, |s| s.settled && s.failures.len() == 1)
        .await;
    assert!(held, "{status:?}");
    assert_eq!(lines(&dir.path().join("tries")), 3);
    assert!(start_at.elapsed() >= Duration::from_millis(300));
    // One try and one retry, then it counts as failed.
    assert_eq!(lines(&dir.path().join("hopeless")), 2);
    assert!(
        status
            .failures
            .contains_key(&ResourceId::new(Kind::Exec, "hopeless"))
    );
    e.stop().await;
}

#[tokio::test]
async fn meta_retryreset_gives_the_retries_back_after_a_success() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    // Each run appends a line; only the second run succeeds. Polled, so it runs again on
    // the next tick after succeeding. With one retry: `kept` spent it on run 1, so run 3
    // fails for good; `reset` got it back with its success, so it retries run 3 as run 4.
    let exec = |name: &str, reset: bool| {
        format!(
            "  - name: {name}\n    cmd: \"echo x >> {d}/{name}; test $(wc -l < {d}/{name}) -eq 2\"\n    \
             meta: {{poll: 2, retry: 1, retryreset: {reset}}}\n"
        )
    };
    let src = format!(
        "graph: g\nresources:\n  exec:\n{}{}",
        exec("kept", false),
        exec("reset", true)
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    for (name, runs) in [("kept", 3), ("reset", 4)] {
        let id = ResourceId::new(Kind::Exec, name);
        let (status, held) = e.wait_for(WAIT, |s| s.failures.contains_key(&id)).await;
        assert!(held, "{name} never failed for good: {status:?}");
        assert_eq!(
            lines(&dir.path().join(name)),
            runs,
            "{name}: runs before it failed"
        );
    }
    e.stop().await;
}

#[tokio::test]
async fn meta_noop_leaves_one_resource_alone() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let src = format!(
        "graph: g
resources:
  file:
  - name: kept
    path: {d}/kept
    content: \"k\\n\"
    meta:
      noop: true
  - name: written
    path: {d}/written
    content: \"w\\n\"
    meta: {{noop: false, autoedge: true, autogroup: true}}
"
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    converged(&e).await;
    assert_eq!(read(&dir.path().join("written")), "w\n");
    assert!(
        !dir.path().join("kept").exists(),
        "a noop resource was applied"
    );
    e.stop().await;
}

#[tokio::test]
async fn meta_poll_checks_on_a_timer_instead_of_watching() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let src = format!(
        "graph: g
resources:
  file:
  - name: polled
    path: {d}/polled
    content: \"p\\n\"
    meta: {{poll: 1}}
  - name: rarely
    path: {d}/rarely
    content: \"r\\n\"
    meta: {{poll: 3600}}
"
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    converged(&e).await;
    fs::remove_file(dir.path().join("polled")).expect("rm");
    fs::remove_file(dir.path().join("rarely")).expect("rm");
    wait_file(&dir.path().join("polled"), "p\n").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !dir.path().join("rarely").exists(),
        "a polled resource reacted to inotify"
    );
    e.stop().await;
}

#[tokio::test]
async fn meta_sema_keeps_holders_of_one_semaphore_apart() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    // Each holds a lock directory for a while: two at once would fail the second mkdir.
    let exec = |name: &str| {
        format!(
            "  - name: {name}
    cmd: \"mkdir {d}/lock && sleep 0.3 && rmdir {d}/lock && touch {d}/{name}\"
    meta:
      sema: [\"lock\"]
"
        )
    };
    let src = format!(
        "graph: g\nresources:\n  exec:\n{}{}{}",
        exec("one"),
        exec("two"),
        exec("three")
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    let status = converged(&e).await;
    assert!(status.failures.is_empty(), "{status:?}");
    for name in ["one", "two", "three"] {
        assert!(dir.path().join(name).exists(), "{name}");
    }
    e.stop().await;
}

#[tokio::test]
async fn meta_timeout_fails_an_apply_that_takes_too_long() {
    let src = "graph: g
resources:
  exec:
  - name: slow
    cmd: \"sleep 10\"
    meta: {timeout: 200}
";
    let ex = new_exchange().await;
    let e = start(src, "h", &ex).await;
    let (status, held) = e
        .wait_for(WAIT, |s| s.settled && !s.failures.is_empty())
        .await;
    assert!(held, "{status:?}");
    let why = &status.failures[&ResourceId::new(Kind::Exec, "slow")];
    assert!(why.contains("meta.timeout"), "{why}");
    e.stop().await;
}

#[tokio::test]
async fn meta_rewatch_restarts_a_broken_watch_on_reload() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let src = format!(
        "graph: g
resources:
  exec:
  - name: watched
    cmd: \"true\"
    watchcmd: \"test -e {d}/ok && sleep 30\"
    meta: {{rewatch: true}}
"
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    let (status, held) = e
        .wait_for(WAIT, |s| s.settled && !s.failures.is_empty())
        .await;
    assert!(held, "{status:?}");
    fs::write(dir.path().join("ok"), "").expect("ok");
    // A new graph where this resource is unchanged: only its watch starts over.
    e.load_graph(parse(&format!("{src}  noop:\n  - name: n\n"), "h"));
    let status = converged(&e).await;
    assert!(status.failures.is_empty(), "{status:?}");
    e.stop().await;
}

#[tokio::test]
async fn meta_retry_starts_a_failed_watch_again() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let src = format!(
        "graph: g
resources:
  exec:
  - name: watched
    cmd: \"true\"
    watchcmd: \"echo x >> {d}/starts; exit 1\"
    meta: {{retry: 2, delay: 50}}
"
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    let (status, held) = e
        .wait_for(WAIT, |s| s.settled && !s.failures.is_empty())
        .await;
    assert!(held, "{status:?}");
    // The first start and two more, then the watch counts as broken.
    assert_eq!(lines(&dir.path().join("starts")), 3);
    e.stop().await;
}

#[tokio::test]
async fn a_polled_exec_runs_on_every_tick() {
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let src = format!(
        "graph: g
resources:
  exec:
  - name: ticking
    cmd: \"echo x >> {d}/runs\"
    meta: {{poll: 1}}
"
    );
    let ex = new_exchange().await;
    let e = start(&src, "h", &ex).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while lines(&dir.path().join("runs")) < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not run on each tick"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    e.stop().await;
}

#[tokio::test]
async fn a_lease_that_expired_under_a_living_host_is_replaced_and_its_keys_written_again() {
    use crate::engine::resources::{FileSpec, FileState, ResourceSpec};
    let client = new_store().await;
    let ex = StoreExchange::new(
        client.clone(),
        crate::engine::exchange::Keys::for_run("test"),
    );
    let spec = ResourceSpec::File(FileSpec {
        name: "from-a".into(),
        path: "/tmp/from-a".into(),
        content: Some("hello from a\n".into()),
        state: FileState::Exists,
        ..FileSpec::default()
    });
    ex.publish("a", vec![spec]).await.expect("publish");
    ex.set_converged("a", true).await.expect("flag");
    let export = "/arbor/runs/test/exports/a/file/from-a";
    let flag = "/arbor/runs/test/converged/a";
    let lease = client
        .get(export)
        .await
        .expect("get export")
        .map(|kv| kv.lease())
        .expect("the export is there");
    // As the store does when a lease runs out while the host cannot reach it.
    client.lease_revoke(lease).await.expect("revoke");
    assert!(client.get(export).await.expect("get").is_none());
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (e, f) = (
            client.get(export).await.expect("get export"),
            client.get(flag).await.expect("get flag"),
        );
        if let (Some(e), Some(f)) = (&e, &f) {
            assert_ne!(e.lease(), lease, "written on the old lease");
            assert_eq!(e.lease(), f.lease());
            assert_eq!(f.value(), b"true");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the exports and flag were not written again within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ex.withdraw("a").await.expect("withdraw");
    assert!(client.get(export).await.expect("get").is_none());
}

#[tokio::test]
async fn exports_published_while_the_store_is_out_of_reach_land_once_it_answers() {
    use crate::engine::resources::{FileSpec, FileState, ResourceSpec};
    // A port where no store listens yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let client = StoreClient::connect(&Endpoints::parse(&endpoint).expect("endpoint"))
        .await
        .expect("a client connects lazily");
    let ex = StoreExchange::new(client, crate::engine::exchange::Keys::for_run("test"));
    let spec = ResourceSpec::File(FileSpec {
        name: "from-a".into(),
        path: "/tmp/from-a".into(),
        content: Some("hello from a\n".into()),
        state: FileState::Exists,
        ..FileSpec::default()
    });
    assert!(ex.publish("a", vec![spec]).await.is_err());
    assert!(ex.set_converged("a", true).await.is_err());
    let config = StoreConfig {
        listen: format!("127.0.0.1:{port}"),
        data_dir: None,
        allow_non_loopback: false,
    };
    let store = Store::bind(&config).await.expect("embedded store binds");
    tokio::spawn(store.serve(tokio_util::sync::CancellationToken::new()));
    let reader = StoreClient::connect(&Endpoints::parse(&endpoint).expect("endpoint"))
        .await
        .expect("connect");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let export = reader
            .get("/arbor/runs/test/exports/a/file/from-a")
            .await
            .expect("get export");
        let flag = reader
            .get("/arbor/runs/test/converged/a")
            .await
            .expect("get flag");
        if let (Some(_), Some(flag)) = (export, flag) {
            assert_eq!(flag.value(), b"true");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the failed writes were not made again within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ex.withdraw("a").await.expect("withdraw");
}

#[tokio::test]
async fn a_timer_refreshes_an_exec_along_a_notify_edge_on_every_tick() {
    let dir = tempfile::tempdir().expect("dir");
    let (notified, plain) = (dir.path().join("notified"), dir.path().join("plain"));
    let src = format!(
        "graph: ticks\nresources:\n  timer:\n  - name: t\n    interval: 1\n  exec:\n  \
         - name: notified\n    cmd: echo run >> {}\n  - name: plain\n    cmd: echo run >> {}\n\
         edges:\n- name: e1\n  from: {{kind: timer, name: t}}\n  to: {{kind: exec, name: notified}}\n  notify: true\n\
         - name: e2\n  from: {{kind: timer, name: t}}\n  to: {{kind: exec, name: plain}}\n",
        notified.display(),
        plain.display()
    );
    let e = start(&src, "h", &new_exchange().await).await;
    // The first run, then one a second.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let runs = lines(&notified);
    assert!(
        (3..=5).contains(&runs),
        "the notified exec ran {runs} times in 3.5 s of a 1 s timer"
    );
    // Without notify a tick only orders: the exec, already run, stays as it is (as in mgmt).
    assert_eq!(lines(&plain), 1, "a plain edge re-ran the exec");
    let status = e.status().borrow().clone();
    assert!(status.failures.is_empty(), "{status:?}");
    e.stop().await;
}

/// An embedded store that checks credentials, with a user per host in `hosts` allowed what
/// a run's host is (`initiator::host_access`); returns its endpoint.
async fn store_with_hosts(hosts: &[&str]) -> Endpoints {
    let mut users = crate::store::auth::Users::new();
    let keys = crate::engine::exchange::Keys::for_run("test");
    for h in hosts {
        users.add(
            h,
            &format!("pw-{h}"),
            crate::node::initiator::host_access(&keys, h, &[]),
        );
    }
    let store = Store::bind_with(
        &StoreConfig {
            listen: "127.0.0.1:0".into(),
            data_dir: None,
            allow_non_loopback: false,
        },
        crate::store::Options {
            users: Some(Arc::new(users)),
            ..crate::store::Options::default()
        },
    )
    .await
    .expect("embedded store binds");
    let endpoint = store.endpoint().to_string();
    tokio::spawn(store.serve(tokio_util::sync::CancellationToken::new()));
    Endpoints::parse(&endpoint).expect("endpoint")
}

async fn exchange_as(endpoints: &Endpoints, host: &str) -> Arc<dyn Exchange> {
    let client = StoreClient::connect_as(endpoints, Some((host, &format!("pw-{host}"))))
        .await
        .expect("connects");
    Arc::new(StoreExchange::new(
        client,
        crate::engine::exchange::Keys::for_run("test"),
    ))
}

#[tokio::test]
async fn a_kv_sets_its_hosts_own_key_in_the_store_and_its_watch_repairs_drift() {
    let client = new_store().await;
    let ex: Arc<dyn Exchange> = Arc::new(StoreExchange::new(
        client.clone(),
        crate::engine::exchange::Keys::for_run("test"),
    ));
    let src = "graph: kv\nresources:\n  kv:\n  - name: color\n    value: blue\n  \
               - name: gone\n    key: stale\n";
    client.put("/arbor/kv/a/stale", "old").await.expect("put");
    let e = start(src, "a", &ex).await;
    converged(&e).await;
    let get = |key: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(key)
                .await
                .expect("get")
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        }
    };
    assert_eq!(get("/arbor/kv/a/color").await.as_deref(), Some("blue"));
    assert_eq!(get("/arbor/kv/a/stale").await, None, "no value deletes");
    // Drift is seen by the store watch: the engine does not poll.
    client.put("/arbor/kv/a/color", "red").await.expect("drift");
    let deadline = tokio::time::Instant::now() + WAIT;
    while get("/arbor/kv/a/color").await.as_deref() != Some("blue") {
        assert!(tokio::time::Instant::now() < deadline, "drift not repaired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Not leased: the key outlives the host.
    e.stop().await;
    assert_eq!(get("/arbor/kv/a/color").await.as_deref(), Some("blue"));
}

#[tokio::test]
async fn a_host_reads_another_hosts_kv_key_but_cannot_write_it() {
    let endpoints = store_with_hosts(&["a", "b"]).await;
    let (ex_a, ex_b) = (
        exchange_as(&endpoints, "a").await,
        exchange_as(&endpoints, "b").await,
    );
    let src = "graph: kv\nresources:\n  kv:\n  - name: color\n    value: blue\n";
    let a = start(src, "a", &ex_a).await;
    converged(&a).await;
    // b, with its own credential, reads a's key: hosts may read every kv key.
    assert_eq!(
        ex_b.kv_get("a", "color").await.expect("b reads a's key"),
        Some("blue".into())
    );
    // A kv resource on b that targets a's key (what a compromised b would try) is refused
    // by the store, and the failure says so.
    let attack = crate::engine::resources::kv::KvResource::new(
        crate::engine::resources::KvSpec {
            name: "color".into(),
            key: "color".into(),
            value: Some("red".into()),
            ..Default::default()
        },
        crate::engine::resources::KvStore::new(ex_b.clone(), "a"),
    );
    use crate::engine::resources::Resource;
    let err = attack
        .check_apply(Default::default())
        .await
        .expect_err("b may not write a's key");
    let err = format!("{err:#}");
    assert!(
        err.contains("set /arbor/kv/a/color to `red` (it is `blue`)")
            && err.contains("permission denied"),
        "{err}"
    );
    // b's own key is b's to write; a's stays as a set it.
    let b = start(src, "b", &ex_b).await;
    converged(&b).await;
    assert_eq!(
        ex_a.kv_get("b", "color").await.expect("a reads"),
        Some("blue".into())
    );
    assert_eq!(
        ex_b.kv_get("a", "color").await.expect("b reads"),
        Some("blue".into())
    );
    a.stop().await;
    b.stop().await;
}

/// An exported file's `source` is published as its content, the bytes of the exporter's
/// artifact: a collector, which holds no artifact, writes them. An exporter without the
/// artifact publishes nothing and settles unhealthy, saying why.
#[tokio::test]
async fn an_exported_files_source_reaches_a_collector_as_its_content() {
    use crate::engine::artifacts::{ArtifactFile, sha256_hex};
    let (da, db) = (
        tempfile::tempdir().expect("a"),
        tempfile::tempdir().expect("b"),
    );
    let text = "published by a\nsecond line: ünïcödé\n";
    let blob = da.path().join("blob");
    fs::write(&blob, text).expect("blob");
    let ex = new_exchange().await;
    let a_src = format!(
        "graph: a\nresources:\n  file:\n  - name: \"@@motd\"\n    path: {}/motd\n    \
         source: motd.txt\n",
        db.path().display()
    );
    let mut a_config = config("a");
    a_config.artifacts = Arc::new(
        [(
            "motd.txt".to_string(),
            ArtifactFile {
                path: blob,
                sha256: sha256_hex(text.as_bytes()),
                size: text.len() as u64,
                arrival: None,
            },
        )]
        .into(),
    );
    let a = Engine::start(parse(&a_src, "a"), a_config, ex.clone()).expect("a starts");
    let b_src = format!(
        "graph: b\ncollect:\n- kind: file\n  pattern: {}/\n",
        db.path().display()
    );
    let b = start(&b_src, "b", &ex).await;
    wait_file(&db.path().join("motd"), text).await;
    converged(&a).await;
    converged(&b).await;
    a.stop().await;

    // The same graph on a host given no artifact for the source.
    let c = start(&a_src.replace("motd", "motd-c"), "c", &ex).await;
    let (status, held) = c.wait_for(WAIT, |s| s.settled && !s.healthy()).await;
    assert!(held, "c did not settle unhealthy: {status:?}");
    let why = status.export_error.unwrap_or_default();
    assert!(
        why.contains("source `motd-c.txt`: this host was given no artifact for it"),
        "{why}"
    );
    assert!(!db.path().join("motd-c").exists(), "c published its export");
    c.stop().await;
    b.stop().await;
}
