//! Calls of one client sent together: what arrives within `BATCH_WAIT` (or
//! `BATCH_MAX` of it) goes in one request, sent by a task of its own, and
//! each caller hears its own item's answer, exactly as a call of its own
//! would have answered (docs/sdk.md, 3): an acknowledgement is never the
//! batch's.
//!
//! - `CompleteBatcher`: results in one `POST /v1/tasks/complete` with a
//!   minimal answer. A result already pending or sent under the same fence
//!   is not sent again: a caller asking for it (the outbox retrying after an
//!   earlier attempt timed out on its side) waits for that attempt's answer,
//!   so a report slow to be taken is in flight once, not once per retry.
//! - `SubmitBatcher`: submits in one `POST /v1/tasks/batch`, each caller
//!   answered by its own task's slot or its own refusal; a submit without a
//!   key gets one drawn per call, so a batch sent again creates nothing twice.
//!
//! Bounded: at most `BATCH_CALLS_MAX` calls wait in one batcher; past it a
//! call is refused at once (`overloaded`, nothing sent).

use crate::client::{generated_idempotency_key, Client, CompleteItem, Error, Outcome, SubmitRequest, Submitted};
use futures::FutureExt;
use phalanx_api::ErrorCode;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a batcher collects calls before sending them together.
pub const BATCH_WAIT: Duration = Duration::from_millis(5);
/// Items sent in one request at most.
pub const BATCH_MAX: usize = 64;
/// Calls waiting in one batcher at most, pending or sent.
pub const BATCH_CALLS_MAX: usize = 16_384;

/// What a batcher sends, and how.
pub trait Kind: Send + Sync + 'static {
    type Item: Send + Sync + 'static;
    type Answer: Clone + Send + 'static;
    /// Calls naming the same key share one item and its answer.
    type Key: std::hash::Hash + Eq + Copy + Send + Sync + 'static;
    /// One request for `items`: their answers, one per item, in order.
    fn send(client: &Client, items: &[Self::Item]) -> impl Future<Output = Vec<Result<Self::Answer, Error>>> + Send;
}

type Reply<A> = tokio::sync::oneshot::Sender<Result<A, Error>>;

/// Items not yet taken by a sender, and who waits for each one's answer.
struct Calls<K: Kind> {
    pending: Vec<(K::Key, K::Item)>,
    waiting: HashMap<K::Key, Vec<Reply<K::Answer>>>,
    /// Callers waiting, all keys together (several may wait on one key).
    callers: usize,
}

impl<K: Kind> Calls<K> {
    fn answer(&mut self, key: K::Key, answer: Result<K::Answer, Error>) {
        let replies = self.waiting.remove(&key).unwrap_or_default();
        self.callers -= replies.len();
        for reply in replies {
            let _ = reply.send(answer.clone());
        }
    }
}

pub struct Batcher<K: Kind> {
    calls: Mutex<Calls<K>>,
    full: tokio::sync::Notify,
    /// Keys drawn for calls that are each their own (submits).
    keys: AtomicU64,
    /// Requests sent, for benches and tests.
    pub requests: AtomicU64,
}

impl<K: Kind> Default for Batcher<K> {
    fn default() -> Self {
        Batcher {
            calls: Mutex::new(Calls { pending: Vec::new(), waiting: HashMap::new(), callers: 0 }),
            full: tokio::sync::Notify::new(),
            keys: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        }
    }
}

impl<K: Kind> Batcher<K> {
    /// Sends `item` with whatever else arrives within the wait (or joins
    /// the call already waiting under `key`); resolves with its own answer.
    async fn call(self: &Arc<Self>, client: &Arc<Client>, key: K::Key, item: K::Item) -> Result<K::Answer, Error> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let first = {
            let mut calls = self.calls.lock().expect("batch lock");
            let calls = &mut *calls;
            if calls.callers >= BATCH_CALLS_MAX {
                return Err(Error::Api {
                    status: 429,
                    code: ErrorCode::Overloaded.to_string(),
                    message: format!("{BATCH_CALLS_MAX} calls already wait in this batcher; nothing was sent"),
                    leader_hint: None,
                    retry_after_ms: None,
                    outcome: Outcome::NotDone,
                });
            }
            calls.callers += 1;
            if let Some(waiting) = calls.waiting.get_mut(&key) {
                waiting.push(reply);
                false
            } else {
                calls.waiting.insert(key, vec![reply]);
                calls.pending.push((key, item));
                if calls.pending.len() >= BATCH_MAX {
                    self.full.notify_one();
                }
                calls.pending.len() == 1
            }
        };
        if first {
            // The first call of a batch sends it, on a task of its own, so
            // that a caller giving up (a timeout) does not strand the others.
            let (batcher, client) = (self.clone(), client.clone());
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(BATCH_WAIT) => {}
                    () = batcher.full.notified() => {}
                }
                let batch = std::mem::take(&mut batcher.calls.lock().expect("batch lock").pending);
                let keys: Vec<K::Key> = batch.iter().map(|(key, _)| *key).collect();
                if AssertUnwindSafe(batcher.send(&client, batch)).catch_unwind().await.is_err() {
                    // Nobody may wait for an answer that will not come.
                    let mut calls = batcher.calls.lock().expect("batch lock");
                    for key in keys {
                        calls.answer(key, Err(Error::Transport("the batch sender failed".into())));
                    }
                }
            });
        }
        answer.await.unwrap_or_else(|_| Err(Error::Transport("the batch sender stopped before an answer".into())))
    }

    /// Sends `batch` in requests of at most `BATCH_MAX`, answering each item's callers.
    async fn send(&self, client: &Client, batch: Vec<(K::Key, K::Item)>) {
        let (keys, items): (Vec<K::Key>, Vec<K::Item>) = batch.into_iter().unzip();
        for (keys, items) in keys.chunks(BATCH_MAX).zip(items.chunks(BATCH_MAX)) {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let answers = K::send(client, items).await;
            let mut calls = self.calls.lock().expect("batch lock");
            for (key, answer) in keys.iter().zip(answers) {
                calls.answer(*key, answer);
            }
        }
    }

    /// Calls waiting (pending or sent), for tests.
    pub fn waiting(&self) -> usize {
        self.calls.lock().expect("batch lock").callers
    }
}

/// Results, keyed by (task, fence).
pub struct Completes;

impl Kind for Completes {
    type Item = CompleteItem;
    type Answer = ();
    type Key = (u64, u64);

    async fn send(client: &Client, items: &[CompleteItem]) -> Vec<Result<(), Error>> {
        match client.complete_many(items).await {
            // A node older than the batch route: one complete each.
            Err(error) if matches!(error.status(), Some(404 | 405)) => {
                let mut answers = Vec::with_capacity(items.len());
                for item in items {
                    answers.push(client.complete(item.task_id, item.fence, &item.result).await.map(|_| ()));
                }
                answers
            }
            Ok(answers) => answers.into_iter().map(|answer| answer.map(|_| ())).collect(),
            Err(error) => items.iter().map(|_| Err(error.clone())).collect(),
        }
    }
}

pub type CompleteBatcher = Batcher<Completes>;

impl Batcher<Completes> {
    /// Sends `item` with whatever else arrives within the wait; resolves with its own answer.
    pub async fn complete(self: &Arc<Self>, client: &Arc<Client>, item: CompleteItem) -> Result<(), Error> {
        self.call(client, (item.task_id, item.fence), item).await
    }
}

/// Submits; each call is its own (keyed by a count).
pub struct Submits;

impl Kind for Submits {
    type Item = SubmitRequest;
    type Answer = Submitted;
    type Key = u64;

    async fn send(client: &Client, items: &[SubmitRequest]) -> Vec<Result<Submitted, Error>> {
        match client.submit_batch(items).await {
            Ok(answers) if answers.len() == items.len() => answers
                .into_iter()
                .map(|answer| answer.map_err(|refusal| Error::refused(refusal.code, refusal.message)))
                .collect(),
            Ok(answers) => {
                let error = Error::Decode(format!("{} answers for {} submits", answers.len(), items.len()));
                items.iter().map(|_| Err(error.clone())).collect()
            }
            Err(error) => items.iter().map(|_| Err(error.clone())).collect(),
        }
    }
}

/// `submit` calls of one client sent together in `POST /v1/tasks/batch`.
pub type SubmitBatcher = Batcher<Submits>;

impl Batcher<Submits> {
    /// As `Client::submit`: its own task, or its own refusal.
    pub async fn submit(self: &Arc<Self>, client: &Arc<Client>, request: SubmitRequest) -> Result<Submitted, Error> {
        let mut request = request;
        request.idempotency_key.get_or_insert_with(generated_idempotency_key);
        let key = self.keys.fetch_add(1, Ordering::Relaxed);
        self.call(client, key, request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past `BATCH_CALLS_MAX` calls waiting, a call is refused at once and
    /// nothing of it is sent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_past_the_bound_are_refused_at_once() {
        // A node that takes connections and never answers.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let client = Arc::new(Client::new(vec![addr], None).unwrap());
        let batcher = Arc::new(SubmitBatcher::default());
        let mut calls = Vec::new();
        for i in 0..BATCH_CALLS_MAX {
            let (batcher, client) = (batcher.clone(), client.clone());
            calls.push(tokio::spawn(async move {
                let _ = batcher.submit(&client, SubmitRequest::new("q", serde_json::json!(i))).await;
            }));
        }
        let start = std::time::Instant::now();
        while batcher.waiting() < BATCH_CALLS_MAX {
            assert!(start.elapsed() < Duration::from_secs(10), "{} calls waiting", batcher.waiting());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let error = batcher.submit(&client, SubmitRequest::new("q", serde_json::json!("one more"))).await.unwrap_err();
        assert_eq!(error.status(), Some(429), "{error}");
        assert_eq!(error.outcome(), Outcome::NotDone);
        assert!(error.to_string().contains("wait in this batcher"), "{error}");
        for call in calls {
            call.abort();
        }
        silent.abort();
    }
}
