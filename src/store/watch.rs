//! The Watch service: one bidirectional stream carries many watches.
//!
//! Each stream is one task. A watcher is only a key range and the next revision it has to
//! see; whenever the durable revision moves, the task reads the changes from the store's
//! revision log and sends them. A slow client therefore costs no memory here: it just falls
//! behind in the log, and if compaction overtakes it, it gets the compaction error (as etcd
//! cancels a watcher whose history is gone).
//!
//! Order on the stream, which clients rely on: a watch's `created` reply comes before its
//! events; events come in revision order; a progress reply (to a request, or `progress_notify`)
//! comes only after every event up to its header revision has been sent.

use super::backend::Backend;
use super::kv::{GRPC_OVERHEAD_BYTES, MAX_REQUEST_BYTES};
use super::mvcc::{Change, KeyRange, RevisionError, is_tombstone};
use etcd_client::proto::{
    PbEvent, PbKeyValue as KeyValue, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse,
    PbWatchService,
};
use prost::Message;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Roughly how many bytes of events go in one response. A single revision is never split, so
/// a response can be larger when one revision is.
const RESPONSE_BUDGET: usize = 1 << 20;

// WatchCreateRequest.FilterType values.
const FILTER_NOPUT: i32 = 0;
const FILTER_NODELETE: i32 = 1;

pub struct WatchService {
    pub backend: Arc<Backend>,
}

#[tonic::async_trait]
impl PbWatchService for WatchService {
    type WatchStream = Pin<Box<dyn Stream<Item = Result<PbWatchResponse, Status>> + Send>>;

    async fn watch(
        &self,
        request: Request<Streaming<PbWatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = super::auth::caller_of(&request);
        let rx = open(self.backend.clone(), request.into_inner(), caller);
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Starts one watch stream: `inbound` carries its requests (from gRPC, or from the JSON
/// gateway), the receiver its responses. The stream lives until the receiver is dropped or the
/// store closes; the end of `inbound` only means no more requests, as in etcd.
/// With a `caller` (the store checks credentials), a watch outside what it may read is
/// created and at once canceled with etcd's "permission denied".
pub fn open<S>(
    backend: Arc<Backend>,
    inbound: S,
    caller: Option<Arc<super::auth::Caller>>,
) -> mpsc::Receiver<Result<PbWatchResponse, Status>>
where
    S: Stream<Item = Result<PbWatchRequest, Status>> + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(16);
    backend.metrics().watch_streams.fetch_add(1, Relaxed);
    let session = Session {
        backend,
        tx,
        watchers: BTreeMap::new(),
        next_id: 0,
        caller,
    };
    tokio::spawn(session.run(inbound));
    rx
}

struct Watcher {
    range: KeyRange,
    /// The first revision this watcher has not been sent yet.
    next: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// Split a revision too large for one message into several (`fragment` set on all but the
    /// last), as etcd does when asked.
    fragment: bool,
    /// Nothing sent since the last progress tick.
    quiet: bool,
}

/// The client went away; the stream's task ends.
struct Gone;

struct Session {
    backend: Arc<Backend>,
    tx: mpsc::Sender<Result<PbWatchResponse, Status>>,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    caller: Option<Arc<super::auth::Caller>>,
}

impl Drop for Session {
    fn drop(&mut self) {
        let metrics = self.backend.metrics();
        metrics.watch_streams.fetch_sub(1, Relaxed);
        metrics
            .watchers
            .fetch_sub(self.watchers.len() as i64, Relaxed);
    }
}

/// The next request, or never once the requests have ended.
async fn next_request<S>(inbound: &mut Option<S>) -> Option<Result<PbWatchRequest, Status>>
where
    S: Stream<Item = Result<PbWatchRequest, Status>> + Unpin,
{
    match inbound {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

impl Session {
    async fn run<S>(mut self, inbound: S)
    where
        S: Stream<Item = Result<PbWatchRequest, Status>> + Unpin,
    {
        let mut inbound = Some(inbound);
        let mut durable = self.backend.subscribe();
        let mut tick = tokio::time::interval(self.backend.options().progress_notify_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let closing = self.backend.closing();
        loop {
            let step = tokio::select! {
                msg = next_request(&mut inbound) => match msg {
                    Some(Ok(req)) => self.handle(req).await,
                    Some(Err(_)) => Err(Gone),
                    None => {
                        inbound = None;
                        Ok(())
                    }
                },
                changed = durable.changed() => match changed {
                    Ok(()) => self.sync_all().await,
                    Err(_) => Err(Gone),
                },
                _ = tick.tick() => self.progress_tick().await,
                _ = self.tx.closed() => Err(Gone),
                _ = closing.cancelled() => Err(Gone),
            };
            if step.is_err() {
                return;
            }
        }
    }

    async fn send(&self, resp: PbWatchResponse) -> Result<(), Gone> {
        self.tx.send(Ok(resp)).await.map_err(|_| Gone)
    }

    fn response(&self, watch_id: i64, revision: i64) -> PbWatchResponse {
        PbWatchResponse {
            header: Some(self.backend.header(revision)),
            watch_id,
            ..Default::default()
        }
    }

    async fn handle(&mut self, req: PbWatchRequest) -> Result<(), Gone> {
        match req.request_union {
            Some(PbWatchRequestUnion::CreateRequest(create)) => {
                let visible = self.backend.visible();
                let id = if create.watch_id != 0 {
                    create.watch_id
                } else {
                    while self.watchers.contains_key(&self.next_id) {
                        self.next_id += 1;
                    }
                    self.next_id
                };
                if let Some(caller) = &self.caller
                    && !caller.may_read(&create.key, &create.range_end)
                {
                    let mut resp = self.response(-1, visible);
                    resp.created = true;
                    resp.canceled = true;
                    resp.cancel_reason = "etcdserver: permission denied".into();
                    return self.send(resp).await;
                }
                if self.watchers.contains_key(&id) || id < 0 {
                    let mut resp = self.response(-1, visible);
                    resp.created = true;
                    resp.canceled = true;
                    resp.cancel_reason =
                        "etcdserver: mvcc: watcher id already in use or invalid".into();
                    return self.send(resp).await;
                }
                let watcher = Watcher {
                    range: KeyRange::new(&create.key, &create.range_end),
                    next: if create.start_revision > 0 {
                        create.start_revision
                    } else {
                        visible + 1
                    },
                    prev_kv: create.prev_kv,
                    no_put: create.filters.contains(&FILTER_NOPUT),
                    no_delete: create.filters.contains(&FILTER_NODELETE),
                    progress_notify: create.progress_notify,
                    fragment: create.fragment,
                    quiet: true,
                };
                self.watchers.insert(id, watcher);
                self.backend.metrics().watchers.fetch_add(1, Relaxed);
                let mut resp = self.response(id, visible);
                resp.created = true;
                self.send(resp).await?;
                self.sync(id, visible).await
            }
            Some(PbWatchRequestUnion::CancelRequest(cancel)) => {
                if self.watchers.remove(&cancel.watch_id).is_some() {
                    self.backend.metrics().watchers.fetch_sub(1, Relaxed);
                    let mut resp = self.response(cancel.watch_id, self.backend.visible());
                    resp.canceled = true;
                    return self.send(resp).await;
                }
                Ok(())
            }
            Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                let visible = self.backend.visible();
                self.sync_all_to(visible).await?;
                // etcd's id for "not about any one watch".
                self.send(self.response(-1, visible)).await
            }
            None => Ok(()),
        }
    }

    async fn sync_all(&mut self) -> Result<(), Gone> {
        let visible = self.backend.visible();
        self.sync_all_to(visible).await
    }

    async fn sync_all_to(&mut self, visible: i64) -> Result<(), Gone> {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            self.sync(id, visible).await?;
        }
        Ok(())
    }

    /// Sends watcher `id` everything up to at least revision `upto`.
    async fn sync(&mut self, id: i64, upto: i64) -> Result<(), Gone> {
        loop {
            let Some(w) = self.watchers.get(&id) else {
                return Ok(());
            };
            if w.next > upto {
                return Ok(());
            }
            match self
                .backend
                .changes_since(&w.range, w.next, RESPONSE_BUDGET)
            {
                Err(RevisionError::Compacted(rev)) => {
                    self.watchers.remove(&id);
                    self.backend.metrics().watchers.fetch_sub(1, Relaxed);
                    // etcd leaves the header's revision at 0 here.
                    let mut resp = self.response(id, 0);
                    resp.canceled = true;
                    resp.compact_revision = rev;
                    return self.send(resp).await;
                }
                Err(RevisionError::Future) => return Ok(()),
                Ok((changes, next, visible)) => {
                    let fragment = w.fragment;
                    let events: Vec<PbEvent> = changes.iter().filter_map(|c| event(w, c)).collect();
                    if let Some(w) = self.watchers.get_mut(&id) {
                        w.next = next;
                        if !events.is_empty() {
                            w.quiet = false;
                        }
                    }
                    if !events.is_empty() {
                        let mut resp = self.response(id, visible);
                        resp.events = events;
                        if fragment && resp.encoded_len() > FRAGMENT_BYTES {
                            for part in fragments(resp) {
                                self.send(part).await?;
                            }
                        } else {
                            self.send(resp).await?;
                        }
                    }
                    if next > visible {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// `progress_notify`: every interval, each such watcher that heard nothing since the last
    /// tick is told the current revision.
    async fn progress_tick(&mut self) -> Result<(), Gone> {
        let visible = self.backend.visible();
        self.sync_all_to(visible).await?;
        let due: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| w.progress_notify && w.quiet)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            self.send(self.response(id, visible)).await?;
        }
        for w in self.watchers.values_mut() {
            w.quiet = true;
        }
        Ok(())
    }
}

/// etcd splits a response for a watch that asked for `fragment` past this size.
const FRAGMENT_BYTES: usize = MAX_REQUEST_BYTES + GRPC_OVERHEAD_BYTES;

/// Splits a response into parts of at most [`FRAGMENT_BYTES`] (a single event larger than that
/// goes alone), all but the last marked `fragment`, as etcd's FragmentWatchResponse.
fn fragments(whole: PbWatchResponse) -> Vec<PbWatchResponse> {
    let mut parts = Vec::new();
    let mut events = whole.events.iter().cloned().peekable();
    let empty = PbWatchResponse {
        events: Vec::new(),
        ..whole.clone()
    };
    while events.peek().is_some() {
        let mut part = empty.clone();
        let mut size = part.encoded_len();
        while let Some(ev) = events.peek() {
            let add = ev.encoded_len() + 8;
            if !part.events.is_empty() && size + add > FRAGMENT_BYTES {
                break;
            }
            size += add;
            part.events.extend(events.next());
        }
        part.fragment = true;
        parts.push(part);
    }
    if let Some(last) = parts.last_mut() {
        last.fragment = false;
    }
    parts
}

fn event(w: &Watcher, change: &Change) -> Option<PbEvent> {
    let delete = is_tombstone(&change.kv);
    if (delete && w.no_delete) || (!delete && w.no_put) {
        return None;
    }
    Some(PbEvent {
        r#type: i32::from(delete),
        kv: Some(KeyValue::clone(&change.kv)),
        prev_kv: if w.prev_kv {
            change.prev.as_deref().cloned()
        } else {
            None
        },
    })
}
