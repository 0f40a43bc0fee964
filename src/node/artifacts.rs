//! Artifacts through the tree: files a graph names with `source:`, sent down as
//! content-addressed blobs, each byte across each link once.
//!
//! - The initiator reads every source before any host is contacted (a missing, unreadable or
//!   directory source is bad input, exit 2, named by graph file:line:col), hashes each file
//!   once, and gives each host's `ChildSpec` the map of its own graph's sources (as written)
//!   to `{sha256, size}` ([`Sources::resolve_sources`]). A live edit may not add a source
//!   ([`new_source`]): that needs a restart.
//! - A parent puts into a child's cache (`~/.cache/arbor/artifacts/<sha256>`, XDG_CACHE_HOME
//!   respected; the working dir's `artifacts/` with --no-caching) every artifact the child's
//!   subtree needs, and only those ([`subtree_artifacts`]), before starting it: one exec that
//!   checks the entries already there (size and sha256; a corrupt one is removed and reported),
//!   then one sftp session for what is missing, with the binary's upload (atomic, size
//!   checked). So a relay receives each artifact once, however many of its children need it.
//! - A node serves its children from where it holds the blobs ([`Served`]): the initiator from
//!   the source files it hashed, a relay from its cache, after checking each entry's sha256
//!   once; a corrupt entry there is reported and fetched again from the parent (`Up::Fetch`).
//!   Every copy is also hashed as it is sent (`stage::upload_blob`), and kept on the child
//!   only if it is the artifact.
//! - The host's file resources read the blob through `engine::artifacts`, which checks the
//!   sha256 again before writing a byte.
//! - Children marked `seed_siblings` fetch what a sibling already holds from that sibling
//!   instead, under a capability this node brokers ([`super::sibling`]); any failure there
//!   falls back to the copy above.

use super::builds::FetchFromParent;
use super::sibling::{Claim, Publish, SeedError, Seeding};
use super::stage::{self, Blob, Staged, UploadError};
use super::transfer;
use crate::engine::artifacts::{
    ArtifactFile, ArtifactIndex, Manifest, TreeIndex, build_manifest, sha256_file, short,
    tree_items,
};
use crate::engine::graph::{Graph, GraphError};
use crate::ssh::{Session, shell_quote};
use crate::wire::{ArtifactRef, ChildSpec};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Mode of blobs in a cache: private; a file resource sets its own file's mode.
const BLOB_MODE: u32 = 0o600;

/// What the sources of one graph's exported files may come to as the exports' content, JSON
/// escaped: a host's exports are written in one store transaction, which etcd (and arbor's
/// store) caps at 1.5 MiB; the rest is left to the specs themselves.
pub const EXPORTED_SOURCES_MAX: usize = 1 << 20;

/// The initiator's sources, hashed once each, by the file they were read from.
#[derive(Default)]
pub struct Sources {
    by_path: HashMap<PathBuf, ArtifactRef>,
    /// An exported source's size as the export's content, or why it cannot be one: read once
    /// per file, however many hosts' graphs export it.
    exported: HashMap<PathBuf, Result<usize, String>>,
    /// What the initiator serves: each sha256's file here.
    files: BTreeMap<String, PathBuf>,
}

impl Sources {
    /// Turns `graph`'s sources (as parsed for one host from the file at `graph_path`) into
    /// that host's artifacts: each read relative to the graph file's directory (absolute
    /// paths as they are), hashed the first time it is met. A source that is missing,
    /// unreadable or not a regular file is an error at its `file:line:col`.
    pub fn resolve_sources(
        &mut self,
        graph: &Graph,
        graph_path: &Path,
    ) -> Result<Resolved, GraphError> {
        let mut out = BTreeMap::new();
        let mut trees = BTreeMap::new();
        let mut exported: usize = 0;
        for at in &graph.sources {
            let error = |message: String| GraphError::Invalid {
                path: graph_path.to_path_buf(),
                line: at.line,
                column: at.column,
                message,
            };
            let file = source_path(graph_path, &at.source);
            let shown = file.display();
            let meta = std::fs::metadata(&file)
                .map_err(|e| error(format!("source `{}`: {shown}: {e}", at.source)))?;
            if at.source.ends_with('/') {
                if !meta.is_dir() {
                    return Err(error(format!(
                        "source `{}`: {shown} is not a directory",
                        at.source
                    )));
                }
                let manifest = build_manifest(&file, &mut |p| self.hash(p))
                    .map_err(|e| error(format!("source `{}`: {e}", at.source)))?;
                trees.insert(
                    at.source.clone(),
                    manifest.into_iter().map(|(e, _)| e).collect(),
                );
                continue;
            }
            if meta.is_dir() {
                return Err(error(format!(
                    "source `{}`: {shown} is a directory: a directory source ends in `/` (and \
                     so does its path, with `recurse: true`)",
                    at.source
                )));
            }
            if !meta.is_file() {
                return Err(error(format!(
                    "source `{}`: {shown} is not a regular file",
                    at.source
                )));
            }
            let artifact = self
                .hash(&file)
                .map_err(|e| error(format!("source `{}`: {shown}: {e}", at.source)))?;
            if at.exported {
                // As JSON text it is at least as long as its bytes: one over the cap is not read.
                let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
                exported = exported.saturating_add(if len > EXPORTED_SOURCES_MAX {
                    len
                } else {
                    self.exported
                        .entry(file.clone())
                        .or_insert_with(|| exported_size(&file))
                        .clone()
                        .map_err(|e| error(format!("source `{}`: {shown}{e}", at.source)))?
                });
                if exported > EXPORTED_SOURCES_MAX {
                    return Err(error(format!(
                        "source `{}`: the graph's exported files' sources come to {exported} \
                         bytes as content, over the {EXPORTED_SOURCES_MAX} a host's exports may \
                         carry in the store",
                        at.source
                    )));
                }
            }
            out.insert(at.source.clone(), artifact);
        }
        Ok(Resolved {
            artifacts: out,
            trees,
        })
    }

    /// A source file's artifact, hashed the first time it is met.
    fn hash(&mut self, file: &Path) -> std::io::Result<ArtifactRef> {
        if let Some(a) = self.by_path.get(file) {
            return Ok(a.clone());
        }
        let (sha256, size) = sha256_file(file)?;
        let a = ArtifactRef { sha256, size };
        self.by_path.insert(file.to_path_buf(), a.clone());
        self.files.insert(a.sha256.clone(), file.to_path_buf());
        Ok(a)
    }

    /// The initiator's own graph's source directories, their files read where they are.
    pub fn local_trees(&self, trees: &BTreeMap<String, Manifest>) -> TreeIndex {
        Arc::new(
            trees
                .iter()
                .map(|(source, m)| {
                    (
                        source.clone(),
                        tree_items(m, |sha| self.files.get(sha).cloned()),
                    )
                })
                .collect(),
        )
    }

    /// The initiator's own graph reads its sources where they are (checked by sha256 like
    /// any cache entry).
    pub fn local_index(&self, artifacts: &BTreeMap<String, ArtifactRef>) -> ArtifactIndex {
        Arc::new(
            artifacts
                .iter()
                .filter_map(|(source, a)| {
                    let path = self.files.get(&a.sha256)?.clone();
                    Some((
                        source.clone(),
                        ArtifactFile {
                            path,
                            sha256: a.sha256.clone(),
                            size: a.size,
                            arrival: None,
                        },
                    ))
                })
                .collect(),
        )
    }

    /// What the initiator copies to its children from.
    pub fn served(&self) -> Served {
        Served {
            entries: self
                .by_path
                .iter()
                .map(|(path, a)| {
                    (
                        a.sha256.clone(),
                        Arc::new(Entry {
                            path: path.clone(),
                            size: a.size,
                            checked: None,
                            compresses: Default::default(),
                            arrival: None,
                        }),
                    )
                })
                .collect(),
            fetch: None,
            node: String::new(),
            bases: None,
            keep: false,
            kept: Default::default(),
        }
    }
}

/// One host's sources: its files' artifacts and its directories' manifests.
#[derive(Debug, Default)]
pub struct Resolved {
    pub artifacts: BTreeMap<String, ArtifactRef>,
    pub trees: BTreeMap<String, Manifest>,
}

/// A live edit may use only the sources each host was given artifacts for when the run
/// started: the first source of `graph` (parsed for `host`) that is new, as an error at its
/// place saying a restart is needed.
pub fn new_source(
    graph: &Graph,
    path: &Path,
    host: &str,
    known: Option<&BTreeSet<String>>,
) -> Option<String> {
    let at = graph
        .sources
        .iter()
        .find(|s| !known.is_some_and(|k| k.contains(&s.source)))?;
    Some(format!(
        "{}:{}:{}: source `{}` is new to {host}: artifacts are copied when the run starts, \
         so adding a source needs a restart of the run",
        path.display(),
        at.line,
        at.column,
        at.source
    ))
}

/// An exported file's source, as the export's content will be in the store: its size, JSON
/// escaped; an error (to follow the path) when it is not UTF-8 text, since an export carries
/// its content as text.
fn exported_size(file: &Path) -> Result<usize, String> {
    let bytes = std::fs::read(file).map_err(|e| format!(": {e}"))?;
    let text = String::from_utf8(bytes).map_err(|_| {
        " is not UTF-8 text: an exported file's source is published with the export, as its \
         content, which is text"
            .to_string()
    })?;
    serde_json::to_string(&text)
        .map(|json| json.len())
        .map_err(|e| format!(": {e}"))
}

/// The shell that checks a host's artifacts dir `dir` against the list on its stdin, a line
/// per artifact: `sha256:size:key,key…` (keys: the index entries of its source names). It
/// prints `cached`, `corrupt` (removed) or `missing` for each, and `base <sha256> <older>`
/// where the index names an older version still there. Nothing forks for a missing entry (a
/// fork costs milliseconds on a busy host, and a tree brings thousands of entries); an
/// entry that is there is read whole by sha256sum.
fn check_command(dir: &str) -> String {
    format!(
        "set -e; umask 077; mkdir -p -m 700 {dir}; cd {dir}; mkdir -p .src; oi=$IFS; \
         while IFS= read -r e; do h=${{e%%:*}}; r=${{e#*:}}; n=${{r%%:*}}; ks=${{r#*:}}; m=; \
         if [ -f \"$h\" ] && [ \"$(wc -c < \"$h\")\" -eq \"$n\" ] && \
            sha256sum \"$h\" | grep -q \"^$h \"; then touch -c -- \"$h\" || true; \
           echo \"cached $h\"; \
         elif [ -e \"$h\" ]; then rm -f -- \"$h\"; m=1; \
           if command -v sha256sum >/dev/null 2>&1; then echo \"corrupt $h\"; \
           else echo \"missing $h\"; fi; \
         else m=1; echo \"missing $h\"; fi; \
         b=; IFS=,; set -- $ks; IFS=$oi; for k in \"$@\"; do o=; \
           if [ -f .src/\"$k\" ]; then read -r o < .src/\"$k\" || true; fi; \
           case \"$o\" in *[!0-9a-f]*|'') ;; *) \
             if [ -n \"$m\" ] && [ -z \"$b\" ] && [ \"$o\" != \"$h\" ] && [ -f \"$o\" ]; \
             then b=$o; fi;; esac; \
           echo \"$h\" > .src/\"$k\"; done; \
         if [ -n \"$b\" ]; then echo \"base $h $b\"; fi; done",
        dir = shell_quote(dir),
    )
}

/// A source as written, relative to the graph file's directory unless absolute.
fn source_path(graph_path: &Path, source: &str) -> PathBuf {
    let source = Path::new(source);
    if source.is_absolute() {
        return source.to_path_buf();
    }
    match graph_path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(source),
        _ => source.to_path_buf(),
    }
}

/// The artifacts a child's own graph needs (its sources and its source directories' files).
pub fn own_artifacts(spec: &ChildSpec) -> BTreeSet<ArtifactRef> {
    let mut out: BTreeSet<ArtifactRef> = spec.artifacts.values().cloned().collect();
    out.extend(spec.trees.values().flatten().filter_map(|e| e.file.clone()));
    out
}

/// Every artifact a child's subtree needs (its own graph's and its descendants').
pub fn subtree_artifacts(spec: &ChildSpec) -> BTreeSet<ArtifactRef> {
    let mut out = own_artifacts(spec);
    for c in &spec.children {
        out.extend(subtree_artifacts(c));
    }
    out
}

/// The source names each artifact of a child's subtree has there (a directory source's files
/// as `source` + path): what a host's cache index records, to find an older version of the
/// same source next time.
pub fn subtree_sources(spec: &ChildSpec) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut add = |sha: &str, name: String| {
        out.entry(sha.to_string()).or_default().insert(name);
    };
    for (source, a) in &spec.artifacts {
        add(&a.sha256, source.clone());
    }
    for (source, entries) in &spec.trees {
        for e in entries {
            if let Some(f) = &e.file {
                add(&f.sha256, format!("{source}{}", e.path));
            }
        }
    }
    for c in &spec.children {
        for (sha, names) in subtree_sources(c) {
            out.entry(sha).or_default().extend(names);
        }
    }
    out
}

/// The name of a source's entry in a cache's index (`.src/<this>`: the sha256 it had last).
fn index_key(source: &str) -> String {
    crate::engine::artifacts::sha256_hex(source.as_bytes())
}

/// Where this node keeps the artifacts its parent put there: its cache
/// (`$XDG_CACHE_HOME/arbor/artifacts`, else `~/.cache/arbor/artifacts`, as the parent's shell
/// computed it), or `artifacts/` in its working dir with --no-caching.
pub fn node_dir(no_caching: bool, workdir: Option<&Path>) -> PathBuf {
    match (no_caching, workdir) {
        (true, Some(w)) => w.join("artifacts"),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| super::home_dir().join(".cache"))
            .join("arbor/artifacts"),
    }
}

/// This node's own graph's artifacts, in `dir`.
pub fn node_index(
    dir: &Path,
    artifacts: &BTreeMap<String, ArtifactRef>,
    arrivals: &Arrivals,
) -> ArtifactIndex {
    Arc::new(
        artifacts
            .iter()
            .map(|(source, a)| {
                (
                    source.clone(),
                    ArtifactFile {
                        path: dir.join(&a.sha256),
                        sha256: a.sha256.clone(),
                        size: a.size,
                        arrival: arrivals.0.get(&a.sha256).cloned(),
                    },
                )
            })
            .collect(),
    )
}

/// This node's own graph's source directories, their files in `dir`.
pub fn node_trees(
    dir: &Path,
    trees: &BTreeMap<String, Manifest>,
    arrivals: &Arrivals,
) -> TreeIndex {
    Arc::new(
        trees
            .iter()
            .map(|(source, m)| {
                let mut items = tree_items(m, |sha| Some(dir.join(sha)));
                for file in items.iter_mut().filter_map(|i| i.file.as_mut()) {
                    file.arrival = arrivals.0.get(&file.sha256).cloned();
                }
                (source.clone(), items)
            })
            .collect(),
    )
}

/// The artifacts this node's parent copies here while it runs (`Start::arriving`), each
/// waited for by the engine until the parent's `Down::Arrived`. Dropped (the node ends),
/// it ends every wait still going on, so that no check blocks the node's exit.
#[derive(Default)]
pub struct Arrivals(BTreeMap<String, crate::engine::artifacts::Arrival>);

impl Arrivals {
    /// Those of `start.arriving` that this node's own graph uses (the rest are its
    /// children's, see [`Served`]).
    pub fn new(start: &crate::wire::Start) -> Arrivals {
        let own: BTreeSet<&str> = start
            .artifacts
            .values()
            .map(|a| a.sha256.as_str())
            .chain(
                start
                    .trees
                    .values()
                    .flatten()
                    .filter_map(|e| e.file.as_ref().map(|f| f.sha256.as_str())),
            )
            .collect();
        Arrivals(
            start
                .arriving
                .iter()
                .filter(|sha| own.contains(sha.as_str()))
                .map(|sha| (sha.clone(), Default::default()))
                .collect(),
        )
    }

    /// The parent's word on `sha256`; whether this node's own graph waited for it.
    pub fn arrived(&self, sha256: &str, error: Option<String>) -> bool {
        let Some(arrival) = self.0.get(sha256) else {
            return false;
        };
        arrival.done(error.map_or(Ok(()), Err));
        true
    }
}

impl Drop for Arrivals {
    fn drop(&mut self) {
        for arrival in self.0.values() {
            arrival.done(Err("this node is stopping".into()));
        }
    }
}

/// One blob a node can copy to its children.
struct Entry {
    path: PathBuf,
    size: u64,
    /// A cache entry is checked (sha256) before it is first served, and again if a copy of
    /// it turns out not to be the artifact; `None`: the initiator's source files, hashed when
    /// the run started (every copy is hashed as it is sent, so a change is caught there).
    checked: Option<tokio::sync::Mutex<Option<Result<PathBuf, String>>>>,
    /// Whether it compresses ([`Served::compresses`]), found out once.
    compresses: tokio::sync::OnceCell<bool>,
    /// Still being copied here by the parent (`Start::arriving`): `None` until it says the
    /// copy is done (`Some(Ok)`) or failed.
    arrival: Option<tokio::sync::watch::Sender<Option<Result<(), String>>>>,
}

/// Bytes of each of the three samples [`Served::compresses`] compresses.
const SAMPLE: u64 = 256 << 10;

/// See [`Served::compresses`]; true when the file cannot be read (the copy then reports it).
fn sample_compresses(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let sample = || -> std::io::Result<Vec<u8>> {
        let mut file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let mut bytes = Vec::new();
        for at in [
            0,
            size.saturating_sub(SAMPLE) / 2,
            size.saturating_sub(SAMPLE),
        ] {
            file.seek(SeekFrom::Start(at))?;
            (&mut file).take(SAMPLE).read_to_end(&mut bytes)?;
        }
        Ok(bytes)
    };
    match sample() {
        Ok(bytes) if !bytes.is_empty() => zstd::bulk::compress(&bytes, 1)
            .map_or(true, |packed| packed.len() * 100 <= bytes.len() * 97),
        _ => true,
    }
}

/// The blobs a node copies to its children, by sha256.
#[derive(Default)]
pub struct Served {
    entries: HashMap<String, Arc<Entry>>,
    /// Asks the parent for a blob again (a relay whose cache entry turned out corrupt).
    fetch: Option<FetchFromParent>,
    /// This node's name, for messages about its cache.
    node: String,
    /// Where older versions of artifacts are, by sha256, to send patches against: a relay's
    /// cache, or the initiator's own cache (see `keep`).
    bases: Option<PathBuf>,
    /// Keep a copy of each artifact sent in `bases` (the initiator: its sources change in
    /// place, and the next run patches against the copy).
    keep: bool,
    /// The artifacts already kept, this run.
    kept: tokio::sync::Mutex<BTreeSet<String>>,
}

impl Served {
    /// The relay `node`'s: the artifacts of its subtree (`children`), in its cache `dir`.
    /// Those in `arriving` are still being copied by the parent: serving one waits for
    /// [`Served::arrived`].
    pub fn from_cache(
        node: &str,
        dir: &Path,
        children: &[ChildSpec],
        arriving: &[String],
        fetch: FetchFromParent,
    ) -> Served {
        let mut entries = HashMap::new();
        for c in children {
            for a in subtree_artifacts(c) {
                entries.entry(a.sha256.clone()).or_insert_with(|| {
                    Arc::new(Entry {
                        path: dir.join(&a.sha256),
                        size: a.size,
                        checked: Some(tokio::sync::Mutex::new(None)),
                        compresses: Default::default(),
                        arrival: arriving
                            .contains(&a.sha256)
                            .then(|| tokio::sync::watch::channel(None).0),
                    })
                });
            }
        }
        Served {
            entries,
            fetch: Some(fetch),
            node: node.to_string(),
            bases: Some(dir.to_path_buf()),
            keep: false,
            kept: Default::default(),
        }
    }

    /// Keeps a copy of every artifact sent in `dir`, and sends patches against the copies
    /// found there (the initiator's own cache).
    pub fn keep_in(&mut self, dir: PathBuf) {
        self.bases = Some(dir);
        self.keep = true;
    }

    /// The older version `sha256` of an artifact, if this node holds it.
    fn base(&self, sha256: &str) -> Option<PathBuf> {
        let path = self.bases.as_ref()?.join(sha256);
        path.is_file().then_some(path)
    }

    /// Keeps a copy of the artifact `sha256` (at `local`) in `bases`, once; best effort.
    async fn keep_copy(&self, sha256: &str, local: &Path) {
        let Some(dir) = self.bases.clone().filter(|_| self.keep) else {
            return;
        };
        let mut kept = self.kept.lock().await;
        if !kept.insert(sha256.to_string()) {
            return;
        }
        let (sha, local) = (sha256.to_string(), local.to_path_buf());
        let copied = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let target = dir.join(&sha);
            if target.is_file() {
                return Ok(());
            }
            std::fs::create_dir_all(&dir)?;
            let temp = dir.join(format!(".keep.{sha}.{}", std::process::id()));
            std::fs::copy(&local, &temp)?;
            // Kept only if it is the artifact (the source may change at any time).
            match sha256_file(&temp) {
                Ok((got, _)) if got == sha => std::fs::rename(&temp, &target),
                _ => std::fs::remove_file(&temp),
            }
        })
        .await;
        if let Ok(Err(e)) = copied {
            tracing::debug!("keeping a copy of artifact {sha256}: {e}");
        }
    }

    /// Whether the blob `sha256` (at `local`) compresses: zstd level 1 on three samples of it
    /// (its start, middle and end, [`SAMPLE`] bytes each) saves at least 3%. Found out once per
    /// blob. Random data (packages, images, encrypted files) does not: zstd at the link's
    /// level would then spend CPU on both ends for nothing (at level 6, 26 MB/s here; for a
    /// relay copying to 12 leaves at once, whose links read as thin while its CPU is the
    /// bottleneck, seconds), so it is sent at level 1, which passes such data through.
    async fn compresses(&self, sha256: &str, local: &Path) -> bool {
        let Some(entry) = self.entries.get(sha256) else {
            return true;
        };
        let local = local.to_path_buf();
        if crate::node::arriving::is_arriving(&local) && entry.compresses.get().is_none() {
            // Still arriving: sampled as far as it is here, and not kept.
            return tokio::task::spawn_blocking(move || sample_compresses(&local))
                .await
                .unwrap_or(true);
        }
        *entry
            .compresses
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || sample_compresses(&local))
                    .await
                    .unwrap_or(true)
            })
            .await
    }

    /// The parent's copy of an arriving artifact is done (`error`: it failed). Returns
    /// whether it was one this node waited for.
    pub fn arrived(&self, sha256: &str, error: Option<String>) -> bool {
        let Some(arrival) = self.entries.get(sha256).and_then(|e| e.arrival.as_ref()) else {
            return false;
        };
        arrival.send_replace(Some(match error {
            None => Ok(()),
            Some(e) => Err(e),
        }));
        true
    }

    pub fn holds(&self, sha256: &str) -> bool {
        self.entries.contains_key(sha256)
    }

    /// Where to read the blob `sha256` from to pass it on: while the parent's copy of it is
    /// still arriving here, the arriving copy, read as it arrives (crate::node::arriving; a
    /// path [`arriving::is_arriving`] knows) once it has begun; otherwise as [`Served::path`].
    pub async fn source(&self, sha256: &str) -> Result<PathBuf, String> {
        if let Some(entry) = self.entries.get(sha256)
            && let Some(arrival) = &entry.arrival
        {
            let mut arrived = arrival.subscribe();
            while arrived.borrow_and_update().is_none() {
                if crate::node::arriving::open_growing(&entry.path).is_some() {
                    return Ok(crate::node::arriving::arriving_path(&entry.path));
                }
                tokio::select! {
                    _ = arrived.changed() => {}
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                }
            }
        }
        self.path(sha256).await
    }

    /// The blob with `sha256` here, intact: a relay's cache entry is checked the first time;
    /// a corrupt one is reported and fetched again from the parent.
    pub async fn path(&self, sha256: &str) -> Result<PathBuf, String> {
        let host = &self.node;
        let entry = self
            .entries
            .get(sha256)
            .ok_or_else(|| format!("{host}: artifact {sha256} is not one of this subtree's"))?;
        let Some(checked) = &entry.checked else {
            return Ok(entry.path.clone());
        };
        // Held while checking and fetching: every child that needs it waits for one answer.
        let mut state = checked.lock().await;
        if let Some(done) = &*state {
            return done.clone();
        }
        let result = async {
            if let Some(arrival) = &entry.arrival {
                let mut arrived = arrival.subscribe();
                let done = arrived
                    .wait_for(Option::is_some)
                    .await
                    .map(|done| done.clone().unwrap_or(Ok(())));
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => {
                        return Err(format!(
                            "{host}: artifact {sha256} did not reach this node: {why}"
                        ));
                    }
                    Err(_) => return Err(format!("{host}: stopped")),
                }
            }
            let found = check_blob(&entry.path, sha256, entry.size).await;
            if found.is_ok() {
                return Ok(entry.path.clone());
            }
            let why = found.err().unwrap_or_default();
            tracing::warn!(
                "{host}: artifact {sha256} in this node's cache is corrupt ({why}); \
                 not used: fetching it again from the parent"
            );
            let fetch = self.fetch.as_ref().ok_or("no parent to fetch it from")?;
            let path = fetch(sha256.to_string()).await?;
            check_blob(&path, sha256, entry.size)
                .await
                .map_err(|why| format!("{host}: artifact {sha256} fetched again: {why}"))?;
            Ok(path)
        }
        .await;
        *state = Some(result.clone());
        result
    }

    /// Forgets that the entry was checked: a copy of it was not the artifact. Returns whether
    /// it can be checked again (a cache entry; the initiator's sources cannot).
    async fn recheck(&self, sha256: &str) -> bool {
        match self.entries.get(sha256).and_then(|e| e.checked.as_ref()) {
            Some(checked) => {
                *checked.lock().await = None;
                true
            }
            None => false,
        }
    }

    fn size(&self, sha256: &str) -> Option<u64> {
        self.entries.get(sha256).map(|e| e.size)
    }
}

/// Whether the file at `path` has `size` bytes and the sha256 `sha256`; why not, if not.
async fn check_blob(path: &Path, sha256: &str, size: u64) -> Result<(), String> {
    let p = path.to_path_buf();
    let hashed = tokio::task::spawn_blocking(move || sha256_file(&p))
        .await
        .map_err(|e| e.to_string())?;
    match hashed {
        Ok((sha, n)) if sha == sha256 && n == size => Ok(()),
        Ok((sha, n)) => Err(format!("{n} bytes with sha256 {sha}")),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// What copying a child's artifacts did.
#[derive(Debug, Default)]
pub struct Copied {
    pub bytes: u64,
    /// Entries that were in the child's cache but corrupt: removed, and copied again.
    pub replaced: Vec<String>,
    /// How many were there already, intact.
    pub cached: usize,
    /// How many went as a patch against an older version the host held.
    pub patched: usize,
    /// How many the host fetched from a sibling (none of their bytes on this node's link).
    pub seeded: usize,
    /// Seedings that failed (the artifact was copied from this node instead), and why.
    pub seed_failed: Vec<(String, String)>,
}

/// The child's artifacts dir: beside its binary cache (`…/arbor/bin` → `…/arbor/artifacts`),
/// or in its working dir with --no-caching.
pub fn child_dir(staged: &Staged, no_caching: bool) -> Result<String, String> {
    if no_caching {
        return Ok(format!("{}/artifacts", staged.workdir));
    }
    staged
        .cache
        .strip_suffix("/bin")
        .map(|arbor| format!("{arbor}/artifacts"))
        .ok_or_else(|| format!("unexpected cache dir {}", staged.cache))
}

/// How `copy_to_child` copies.
#[derive(Debug, Clone, Copy)]
pub struct CopyOptions {
    pub no_caching: bool,
    pub compress: crate::wire::Compress,
}

/// Serves a running child's `Fetch` of `artifact` over the QUIC link its control stream runs
/// on (the SSH connection may be gone: this node's address changed): the whole file into its
/// artifacts dir, at the link's level (level 1 for what does not compress; as it is with
/// `--compress never`). Returns its path on the child and the bytes sent.
pub async fn send_over_quic(
    connection: &quinn::Connection,
    label: &str,
    staged: &Staged,
    artifact: &ArtifactRef,
    served: &Served,
    options: CopyOptions,
) -> Result<(String, u64), String> {
    let sha = &artifact.sha256;
    let remote = format!("{}/{sha}", child_dir(staged, options.no_caching)?);
    let local = served.path(sha).await?;
    let level = match transfer::level_for(options.compress, staged.rate) {
        Some(l) if l > 1 && !served.compresses(sha, &local).await => Some(1),
        l => l,
    };
    let what = format!("artifact {}", short(sha));
    let send = transfer::Send {
        what: &what,
        local: &local,
        size: artifact.size,
        sha256: sha,
        mode: BLOB_MODE,
        level: level.unwrap_or(1),
        base: None,
        receiver: &staged.binary,
        remote: &remote,
    };
    let never = CancellationToken::new();
    let bytes = transfer::send_quic(
        connection,
        label,
        &send,
        level.is_none(),
        &never,
        &mut |_, _| {},
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((remote, bytes))
}

/// Puts `wanted` into the child's artifacts dir unless intact copies are there (see the
/// module docs); `names`: the source names of each (by sha256), for the host's index of
/// older versions. Stops early, removing a partial upload, when `cancel` fires.
#[allow(clippy::too_many_arguments)]
pub async fn copy_to_child(
    session: &Session,
    staged: &Staged,
    wanted: &BTreeSet<ArtifactRef>,
    names: &BTreeMap<String, BTreeSet<String>>,
    served: &Served,
    options: CopyOptions,
    seeding: Option<&Seeding>,
    quic: Option<&quinn::Connection>,
    cancel: &CancellationToken,
    progress: &mut (dyn FnMut(&str, u64, u64) + Send),
) -> Result<Copied, String> {
    let host = session.label().to_string();
    let dir =
        child_dir(staged, options.no_caching).map_err(|e| format!("{host}: artifacts: {e}"))?;
    let mut copied = Copied::default();
    if wanted.is_empty() {
        return Ok(copied);
    }
    // One exec: which entries are there, intact (size and sha256); corrupt ones are removed.
    // The index (`.src/<sha256 of the source name>`: the sha256 it had) is read for an older
    // version of each missing one that is still there (`base`), and updated. The list goes on
    // stdin, a line each: a tree of many files would not fit a command line.
    let list: Vec<String> = wanted
        .iter()
        .map(|a| {
            let keys: Vec<String> = names
                .get(&a.sha256)
                .into_iter()
                .flatten()
                .map(|n| index_key(n))
                .collect();
            format!("{}:{}:{}", a.sha256, a.size, keys.join(","))
        })
        .collect();
    let check = check_command(&dir);
    let out = session
        .run_checked_with_input(&check, format!("{}\n", list.join("\n")).as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut to_copy = Vec::new();
    let mut bases: HashMap<String, String> = HashMap::new();
    for line in String::from_utf8_lossy(&out).lines() {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next()) {
            (Some("cached"), Some(sha), None) => {
                copied.cached += 1;
                if let Some(seed) = seeding {
                    seed.board.offer(sha, &seed.me);
                }
            }
            (Some("corrupt"), Some(sha), None) => {
                copied.replaced.push(sha.to_string());
                to_copy.push(sha.to_string());
            }
            (Some("missing"), Some(sha), None) => to_copy.push(sha.to_string()),
            (Some("base"), Some(sha), Some(old)) => {
                bases.insert(sha.to_string(), old.to_string());
            }
            _ => {
                return Err(format!(
                    "{host}: artifacts: unexpected check output {line:?}"
                ));
            }
        }
    }
    if to_copy.is_empty() {
        return Ok(copied);
    }
    let level = transfer::level_for(options.compress, staged.rate);
    let mut sftp: Option<crate::ssh::Sftp> = None;
    // Seeding: what this child is the first to need goes first (its siblings wait for it);
    // then what a sibling holds or is receiving, fetched from it once it has it.
    // A host that holds an older version gets its own patch, which is smaller than any whole
    // copy a sibling could give it: seeding skips those artifacts.
    let patch_base = |sha: &str| {
        (options.compress != crate::wire::Compress::Never)
            .then(|| bases.get(sha))
            .flatten()
            .and_then(|old| Some((served.base(old)?, format!("{dir}/{old}"))))
    };
    let mut claimed: HashMap<String, Publish> = HashMap::new();
    let mut order = to_copy.clone();
    if let Some(seed) = seeding {
        for sha in to_copy.iter().filter(|s| patch_base(s).is_none()) {
            if let Some(Claim::Mine(p)) = seed.board.claim(sha, &seed.me.name, false, cancel).await
            {
                claimed.insert(sha.clone(), p);
            }
        }
        order.sort_by_key(|s| !claimed.contains_key(s));
    }
    let uploads = async {
        for sha in &order {
            let size = served
                .size(sha)
                .ok_or_else(|| format!("{host}: artifact {sha} is not one this node serves"))?;
            let what = format!("artifact {}", short(sha));
            let remote = format!("{dir}/{sha}");
            let mut publish = claimed.remove(sha);
            let seeding = seeding.filter(|_| patch_base(sha).is_none());
            if let (Some(seed), None) = (seeding, &publish) {
                let claim = seed
                    .board
                    .claim(sha, &seed.me.name, true, cancel)
                    .await
                    .ok_or_else(|| format!("{host}: stopped"))?;
                match claim {
                    Claim::Mine(p) => publish = Some(p),
                    Claim::From(peer) => match seed.fetch(&peer, sha, size, cancel).await {
                        Ok(()) => {
                            tracing::debug!(
                                "{host}: {what} fetched from its sibling {}",
                                peer.name
                            );
                            copied.seeded += 1;
                            continue;
                        }
                        Err(SeedError::Stopped) => return Err(format!("{host}: stopped")),
                        Err(e) => copied
                            .seed_failed
                            .push((sha.clone(), format!("from {}: {e}", peer.name))),
                    },
                    Claim::Alone | Claim::Later => {}
                }
            }
            // A patch against the older version both ends hold, else the whole file
            // compressed at the link's level; a failure of either falls back to a plain copy.
            let base = patch_base(sha);
            let mut again = false;
            let mut zstd = level.is_some() || base.is_some();
            // The child runs and its link is on QUIC (a relay taking its children's
            // artifacts): a stream there, plain or zstd, whose congestion control keeps the
            // link's queue short for everything else on it (the agent's requests the relay
            // makes meanwhile, its control frames).
            let mut on_quic = quic;
            // An artifact still arriving here is passed on as it arrives (cut-through); if
            // that fails, it is sent again once it is here whole and checked.
            let mut follow = true;
            // Why the first way tried failed: said with the last failure (a full disk fails
            // every way, and SFTP's own word for it is only "Failure").
            let mut first_failure: Option<String> = None;
            let failed = |why: String, first: &Option<String>| match first {
                Some(f) if !why.contains(f.as_str()) => format!("{why} (first tried: {f})"),
                _ => why,
            };
            loop {
                let local = tokio::select! {
                    local = served.source(sha), if follow => local?,
                    local = served.path(sha), if !follow => local?,
                    _ = cancel.cancelled() => return Err(format!("{host}: stopped")),
                };
                let growing = crate::node::arriving::is_arriving(&local);
                let mut whole = |why: &dyn std::fmt::Display| {
                    tracing::warn!(
                        "{host}: passing {what} on as it arrived here failed ({why}); \
                         sending it once it is here whole"
                    );
                    follow = false;
                };
                // What does not compress goes at level 1, which passes it through.
                let level = match level {
                    Some(l) if l > 1 && !served.compresses(sha, &local).await => Some(1),
                    l => l,
                };
                if zstd || on_quic.is_some() {
                    let send = transfer::Send {
                        what: &what,
                        local: &local,
                        size,
                        sha256: sha,
                        mode: BLOB_MODE,
                        level: level.unwrap_or(1),
                        base: base.clone(),
                        receiver: &staged.binary,
                        remote: &remote,
                    };
                    // The child's arbor receives it where its own seed-serve can follow it
                    // (crate::node::arriving): siblings waiting for it start fetching it from
                    // this child now, while it still arrives (cut-through). Should this copy
                    // fail, their fetch fails and they get it from this node instead.
                    if let (Some(seed), Some(p)) = (seeding, publish.take()) {
                        p.held(seed.me.clone());
                    }
                    let mut shown = |sent, total| progress(&what, sent, total);
                    let sent = match on_quic {
                        Some(connection) => {
                            let plain = !zstd;
                            transfer::send_quic(connection, &host, &send, plain, cancel, &mut shown)
                                .await
                        }
                        None => transfer::send(session, &send, cancel, &mut shown).await,
                    };
                    match sent {
                        Ok(bytes) => {
                            copied.bytes += bytes;
                            if base.is_some() {
                                copied.patched += 1;
                            }
                            tracing::debug!(
                                "{host}: {what}: {bytes} bytes sent for {size}{}",
                                if base.is_some() { " (a patch)" } else { "" }
                            );
                            served.keep_copy(sha, &local).await;
                            break;
                        }
                        Err(transfer::SendError::Stopped) => {
                            return Err(format!("{host}: stopped"));
                        }
                        Err(e) if growing => {
                            whole(&e);
                            continue;
                        }
                        Err(transfer::SendError::Changed(why))
                            if !again && served.recheck(sha).await =>
                        {
                            tracing::warn!("{host}: {why}; checking this node's copy again");
                            again = true;
                            continue;
                        }
                        Err(transfer::SendError::Changed(why)) => {
                            return Err(format!("{host}: {why}"));
                        }
                        Err(transfer::SendError::Failed(why)) if on_quic.is_some() => {
                            tracing::warn!("{why}; copying {what} to {host} over SSH instead");
                            first_failure.get_or_insert(why);
                            on_quic = None;
                            continue;
                        }
                        Err(transfer::SendError::Failed(why)) => {
                            tracing::warn!(
                                "{why}; copying {what} to {host} whole and uncompressed instead"
                            );
                            first_failure.get_or_insert(why);
                            zstd = false;
                            continue;
                        }
                    }
                }
                if sftp.is_none() {
                    sftp = Some(session.sftp().await.map_err(|e| e.to_string())?);
                }
                let Some(channel) = &sftp else { continue };
                let blob = Blob {
                    what: &what,
                    local: &local,
                    size,
                    mode: BLOB_MODE,
                    sha256: Some(sha),
                };
                let uploaded =
                    stage::upload_blob(channel, &blob, &remote, cancel, &mut |sent, total| {
                        progress(&what, sent, total)
                    })
                    .await;
                match uploaded {
                    Ok(bytes) => {
                        copied.bytes += bytes;
                        if let (Some(seed), Some(p)) = (seeding, publish.take()) {
                            p.held(seed.me.clone());
                        }
                        served.keep_copy(sha, &local).await;
                        break;
                    }
                    Err(e) if growing && !cancel.is_cancelled() => whole(&e),
                    Err(UploadError::Ssh(e)) => return Err(failed(e.to_string(), &first_failure)),
                    // The entry here changed since it was checked: check it again (and fetch
                    // it again from the parent if it is corrupt), once.
                    Err(UploadError::Other(why)) if !again && served.recheck(sha).await => {
                        tracing::warn!("{host}: {why}; checking this node's copy again");
                        again = true;
                    }
                    Err(UploadError::Other(why)) => {
                        return Err(failed(format!("{host}: {why}"), &first_failure));
                    }
                }
            }
            if let (Some(seed), Some(p)) = (seeding, publish) {
                p.held(seed.me.clone());
            }
        }
        Ok::<_, String>(())
    }
    .await;
    // As after staging: the sftp channel is gone before anything else starts here.
    if let Some(sftp) = sftp
        && let Err(e) = sftp.close().await
    {
        tracing::warn!("{e}");
    }
    uploads.map(|()| copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::graph;

    /// The cache check, run with `sh` on a dir holding an intact entry, a corrupt one and an
    /// older version named by the index: each entry's word, the corrupt one removed, the
    /// index pointing at the new versions.
    #[test]
    fn the_cache_check_names_each_entry_and_an_older_version_to_patch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = |text: &str| {
            (
                crate::engine::artifacts::sha256_hex(text.as_bytes()),
                text.len(),
            )
        };
        let (intact, corrupt, new, old, fresh) = (
            blob("intact"),
            blob("corrupt"),
            blob("new"),
            blob("old"),
            blob("fresh"),
        );
        std::fs::write(dir.path().join(&intact.0), "intact").expect("write");
        std::fs::write(dir.path().join(&corrupt.0), "not what it says").expect("write");
        std::fs::write(dir.path().join(&old.0), "old").expect("write");
        std::fs::create_dir(dir.path().join(".src")).expect("mkdir");
        std::fs::write(dir.path().join(".src/k1"), format!("{}\n", old.0)).expect("write");
        let input = format!(
            "{}:{}:\n{}:{}:k0\n{}:{}:k0,k1\n{}:{}:\n",
            intact.0, intact.1, corrupt.0, corrupt.1, new.0, new.1, fresh.0, fresh.1
        );
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(check_command(&dir.path().to_string_lossy()))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), input.as_bytes())
            .expect("stdin");
        let out = child.wait_with_output().expect("sh");
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!(
                "cached {}\ncorrupt {}\nmissing {}\nbase {} {}\nmissing {}\n",
                intact.0, corrupt.0, new.0, new.0, old.0, fresh.0
            )
        );
        assert!(!dir.path().join(&corrupt.0).exists());
        for k in ["k0", "k1"] {
            let index = std::fs::read_to_string(dir.path().join(".src").join(k)).expect("index");
            assert_eq!(index, format!("{}\n", new.0), "{k}");
        }
    }

    #[test]
    fn random_bytes_do_not_compress_and_text_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let random: Vec<u8> = (0..(3 * SAMPLE + 12_345))
            .map(|_| rand::random::<u8>())
            .collect();
        let text: Vec<u8> = (0..(3 * SAMPLE))
            .flat_map(|i| format!("line {i} of a log\n").into_bytes())
            .collect();
        std::fs::write(dir.path().join("random"), &random).expect("write");
        std::fs::write(dir.path().join("text"), &text).expect("write");
        std::fs::write(dir.path().join("small"), b"abcabcabcabcabcabcabcabc").expect("write");
        assert!(!sample_compresses(&dir.path().join("random")));
        assert!(sample_compresses(&dir.path().join("text")));
        assert!(sample_compresses(&dir.path().join("small")));
        assert!(sample_compresses(&dir.path().join("missing")));
    }

    #[test]
    fn sources_are_read_relative_to_the_graph_and_hashed_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a.bin"), b"abc").expect("write");
        let graph_path = dir.path().join("g.yaml");
        let text = format!(
            "graph: g\nresources:\n  file:\n  - name: /x\n    source: a.bin\n  \
             - name: /y\n    source: {}\n",
            dir.path().join("a.bin").display()
        );
        let g = graph::parse(&text, &graph_path, "h").expect("parse");
        let mut sources = Sources::default();
        let got = sources.resolve_sources(&g, &graph_path).expect("resolve");
        assert_eq!(got.artifacts.len(), 2);
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert!(
            got.artifacts
                .values()
                .all(|a| a.sha256 == abc && a.size == 3)
        );
        assert_eq!(sources.files.len(), 1);
    }

    #[test]
    fn a_source_directory_becomes_a_manifest_whose_files_are_artifacts_once_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("conf");
        std::fs::create_dir_all(tree.join("sub")).expect("mkdir");
        for i in 0..5 {
            std::fs::write(tree.join(format!("sub/same{i}")), b"abc").expect("write");
        }
        std::fs::write(tree.join("other"), b"other").expect("write");
        // A file the graph also names on its own: hashed once for both.
        let text = "graph: g\nresources:\n  file:\n  - name: /x/\n    source: conf/\n    \
                    recurse: true\n  - name: /y\n    source: conf/other\n";
        let graph_path = dir.path().join("g.yaml");
        let g = graph::parse(text, &graph_path, "h").expect("parse");
        let mut sources = Sources::default();
        let got = sources.resolve_sources(&g, &graph_path).expect("resolve");
        let m = &got.trees["conf/"];
        let paths: Vec<_> = m.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "other",
                "sub",
                "sub/same0",
                "sub/same1",
                "sub/same2",
                "sub/same3",
                "sub/same4"
            ]
        );
        assert_eq!(sources.files.len(), 2, "two distinct contents");
        let spec = ChildSpec {
            trees: got.trees.clone(),
            artifacts: got.artifacts.clone(),
            ..ChildSpec::default()
        };
        assert_eq!(subtree_artifacts(&spec).len(), 2);
        let local = sources.local_trees(&got.trees);
        assert!(
            local["conf/"]
                .iter()
                .filter_map(|i| i.file.as_ref())
                .all(|f| f.read_verified().is_ok())
        );
        // A symlink in the tree: refused at the graph's place, naming it.
        std::os::unix::fs::symlink("/etc/passwd", tree.join("sub/link")).expect("symlink");
        let err = Sources::default()
            .resolve_sources(&g, &graph_path)
            .expect_err("a symlink")
            .to_string();
        assert!(
            err.starts_with(&format!("{}:5:13: source `conf/`", graph_path.display())),
            "{err}"
        );
        assert!(err.contains("sub/link is a symlink"), "{err}");
    }

    #[test]
    fn a_missing_or_directory_source_is_an_error_at_its_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("d")).expect("mkdir");
        let graph_path = dir.path().join("g.yaml");
        for (source, needle) in [
            ("nope.bin", "No such file"),
            ("d", "a directory source ends in `/`"),
        ] {
            let text =
                format!("graph: g\nresources:\n  file:\n  - name: /x\n    source: {source}\n");
            let g = graph::parse(&text, &graph_path, "h").expect("parse");
            let err = Sources::default()
                .resolve_sources(&g, &graph_path)
                .expect_err("bad source")
                .to_string();
            let want = format!("{}:5:13: source `{source}`: ", graph_path.display());
            assert!(err.starts_with(&want), "{err}");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn a_live_edit_adding_a_source_is_refused_asking_for_a_restart() {
        let path = Path::new("/g/leaf.yaml");
        let text = |sources: &[&str]| {
            let mut t = "graph: g\nresources:\n  file:\n".to_string();
            for (i, s) in sources.iter().enumerate() {
                t.push_str(&format!("  - name: /f{i}\n    source: {s}\n"));
            }
            t
        };
        let given: BTreeSet<String> = ["a.bin".to_string()].into();
        let parse = |t: &str| graph::parse(t, path, "l1").expect("parse");
        assert_eq!(
            new_source(&parse(&text(&["a.bin"])), path, "l1", Some(&given)),
            None
        );
        assert_eq!(new_source(&parse(&text(&[])), path, "l1", None), None);
        let err = new_source(&parse(&text(&["a.bin", "b.bin"])), path, "l1", Some(&given))
            .expect("b.bin is new");
        assert!(
            err.starts_with("/g/leaf.yaml:7:13: source `b.bin` is new to l1"),
            "{err}"
        );
        assert!(err.contains("needs a restart"), "{err}");
        assert!(new_source(&parse(&text(&["a.bin"])), path, "l1", None).is_some());
    }

    #[test]
    fn a_subtree_needs_its_hosts_artifacts_once_each() {
        let a = |s: &str| ArtifactRef {
            sha256: s.into(),
            size: 1,
        };
        let leaf = |name: &str, arts: &[&str]| ChildSpec {
            name: name.into(),
            artifacts: arts.iter().map(|s| (format!("src-{s}"), a(s))).collect(),
            ..Default::default()
        };
        let relay = ChildSpec {
            name: "r".into(),
            children: vec![leaf("l1", &["x", "y"]), leaf("l2", &["x"]), leaf("l3", &[])],
            ..Default::default()
        };
        let got: Vec<String> = subtree_artifacts(&relay)
            .into_iter()
            .map(|a| a.sha256)
            .collect();
        assert_eq!(got, vec!["x", "y"]);
        assert!(subtree_artifacts(&leaf("l3", &[])).is_empty());
    }

    /// A leaf whose graph names one source, the artifact `sha` of `size` bytes.
    fn leaf_needing(sha: &str, size: usize) -> ChildSpec {
        ChildSpec {
            name: "l".into(),
            artifacts: [(
                "s".to_string(),
                ArtifactRef {
                    sha256: sha.to_string(),
                    size: size as u64,
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_corrupt_cache_entry_is_fetched_again_from_the_parent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let right = b"right bytes";
        let sha = crate::engine::artifacts::sha256_hex(right);
        std::fs::write(dir.path().join(&sha), b"wrong bytes").expect("write");
        let good = dir.path().join("fetched");
        std::fs::write(&good, right).expect("write");
        let child = leaf_needing(&sha, right.len());
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = calls.clone();
        let fetch: FetchFromParent = Arc::new(move |_| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let good = good.clone();
            Box::pin(async move { Ok(good) })
        });
        let served = Served::from_cache("r", dir.path(), &[child], &[], fetch);
        let (a, b) = tokio::join!(served.path(&sha), served.path(&sha));
        assert_eq!(a.expect("fetched"), dir.path().join("fetched"));
        assert!(b.is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Checked once: later children do not cost a hash or a fetch.
        assert!(served.path(&sha).await.is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // A copy that was not the artifact: checked again, and (still corrupt) fetched again.
        assert!(served.recheck(&sha).await);
        assert!(served.path(&sha).await.is_ok());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(served.path("0000").await.is_err());
        // The initiator's sources are never checked again: they are hashed as they are sent.
        assert!(!Sources::default().served().recheck(&sha).await);
    }

    #[tokio::test]
    async fn an_arriving_artifact_is_served_once_the_parent_says_it_is_there_and_never_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes = b"the artifact's bytes";
        let sha = crate::engine::artifacts::sha256_hex(bytes);
        let child = leaf_needing(&sha, bytes.len());
        let fetch: FetchFromParent =
            Arc::new(|_| Box::pin(async { Err("not asked in this test".to_string()) }));
        let served = Served::from_cache(
            "r",
            dir.path(),
            std::slice::from_ref(&child),
            std::slice::from_ref(&sha),
            fetch.clone(),
        );
        // Not there yet: serving it waits, and does not take it for corrupt.
        let waiting = served.path(&sha);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), &mut waiting).await;
        assert!(early.is_err(), "served before it arrived: {early:?}");
        std::fs::write(dir.path().join(&sha), bytes).expect("write");
        assert!(served.arrived(&sha, None));
        assert_eq!(waiting.await.expect("served"), dir.path().join(&sha));
        assert!(!served.arrived("0000", None), "not one it waits for");
        // A copy that failed: the children that need it fail with the reason.
        let failed = tempfile::tempdir().expect("tempdir");
        let served = Served::from_cache(
            "r",
            failed.path(),
            &[child],
            std::slice::from_ref(&sha),
            fetch,
        );
        served.arrived(&sha, Some("link cut".into()));
        let err = served.path(&sha).await.expect_err("not there");
        assert_eq!(
            err,
            format!("r: artifact {sha} did not reach this node: link cut")
        );
    }

    #[tokio::test]
    async fn an_arriving_artifact_is_passed_on_as_it_arrives_once_its_copy_has_begun() {
        use crate::node::arriving;
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 97) as u8).collect();
        let sha = crate::engine::artifacts::sha256_hex(&bytes);
        let fetch: FetchFromParent =
            Arc::new(|_| Box::pin(async { Err("not asked in this test".to_string()) }));
        let served = Served::from_cache(
            "r",
            dir.path(),
            &[leaf_needing(&sha, bytes.len())],
            std::slice::from_ref(&sha),
            fetch,
        );
        // Its copy has not begun: nothing to pass on yet.
        let waiting = served.source(&sha);
        tokio::pin!(waiting);
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), &mut waiting).await;
        assert!(early.is_err(), "a source before the copy began: {early:?}");
        // It has begun: the arriving copy, read as it arrives, before the parent says it is
        // there.
        let dest = dir.path().join(&sha);
        let mut incoming =
            arriving::Incoming::create(&dest, &dir.path().join(".t")).expect("create");
        let source = waiting.await.expect("source");
        assert!(arriving::is_arriving(&source), "{}", source.display());
        let (file, follow) = arriving::open(&source).expect("open");
        assert!(follow, "the arriving copy is followed");
        let size = bytes.len() as u64;
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            std::io::Read::read_to_end(&mut arriving::Tail::new(file, size, follow), &mut got)
                .map(|_| got)
        });
        std::io::Write::write_all(&mut incoming.file, &bytes).expect("write");
        incoming.finish(0o600, &dest).expect("finish");
        assert_eq!(reader.join().expect("thread").expect("read"), bytes);
        // Arrived: the whole, checked copy.
        served.arrived(&sha, None);
        assert_eq!(served.source(&sha).await.expect("source"), dest);
    }
}
