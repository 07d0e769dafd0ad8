//! Heartbeats of many groups to one peer, sent as one message.
//!
//! Every shard group's leader sends each follower an empty append every
//! `heartbeat_interval`: with G groups that is G messages per interval and peer, each
//! a gRPC call of its own. Here the empty appends bound for one peer wait at most
//! [`WINDOW`] and go together as one `raft.append_many` action (at most [`BATCH_MAX`]
//! in one), whose answer lists each group's answer in order; the peer runs them
//! concurrently. Appends that carry entries never wait (a write's latency is theirs);
//! a heartbeat is delayed by at most `WINDOW`, far below the election timeout.
//!
//! Owns: the per-peer queues (bounded: a full queue sends the heartbeat on its own)
//! and the batch format (CBOR list of message bodies; answer: CBOR list of
//! `Result<body, error text>`).
//! Must never: answer a heartbeat with another group's answer, or report a batch
//! failure as delivered (every heartbeat of a failed batch fails alike).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::network::{from_cbor, to_cbor, Failed, Peers};

/// Action type of a batch of empty appends.
pub const APPEND_MANY: &str = "raft.append_many";
/// How long a heartbeat waits for others bound to the same peer.
pub const WINDOW: Duration = Duration::from_millis(20);
/// Heartbeats in one batch at most.
pub const BATCH_MAX: usize = 256;
/// Heartbeats waiting per peer at most.
const QUEUE_MAX: usize = 1024;

type Answer = Result<Bytes, (bool, Failed)>;

struct Pending {
    body: Bytes,
    deadline: Instant,
    reply: oneshot::Sender<Answer>,
}

/// The answer to one message of a batch: its group's answer, or why it failed there.
pub type ItemAnswer = Result<ByteBuf, String>;

/// Per peer, the heartbeats waiting to go.
#[derive(Clone, Default)]
pub struct Coalescer {
    peers: Peers,
    queues: Arc<Mutex<HashMap<String, mpsc::Sender<Pending>>>>,
}

impl Coalescer {
    pub fn new(peers: Peers) -> Coalescer {
        Coalescer { peers, queues: Arc::default() }
    }

    /// Sends the message `body` (an empty append) to `addr` in the next batch, within
    /// `timeout`.
    pub async fn send(&self, addr: &str, body: Bytes, timeout: Duration) -> Answer {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { body, deadline: Instant::now() + timeout, reply };
        let queue = self.queue(addr);
        if let Err(e) = queue.try_send(pending) {
            // Full (or its task ended): this one goes alone.
            let p = match e {
                mpsc::error::TrySendError::Full(p) | mpsc::error::TrySendError::Closed(p) => p,
            };
            return self.peers.call(addr, super::network::APPEND, p.body, timeout).await;
        }
        match answer.await {
            Ok(a) => a,
            Err(_) => Err((false, Failed(format!("heartbeat batch to {addr} dropped")))),
        }
    }

    fn queue(&self, addr: &str) -> mpsc::Sender<Pending> {
        let mut queues = self.queues.lock();
        if let Some(q) = queues.get(addr).filter(|q| !q.is_closed()) {
            return q.clone();
        }
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run(self.peers.clone(), addr.to_string(), rx));
        queues.insert(addr.to_string(), tx.clone());
        tx
    }
}

/// One peer's batches, until every sender is gone.
async fn run(peers: Peers, addr: String, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        let until = Instant::now() + WINDOW;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                Ok(None) | Err(_) => break,
            }
        }
        let peers = peers.clone();
        let addr = addr.clone();
        // Sent on its own task: a slow peer does not hold the next window back.
        tokio::spawn(async move { send_batch(&peers, &addr, batch).await });
    }
}

async fn send_batch(peers: &Peers, addr: &str, batch: Vec<Pending>) {
    let deadline = batch.iter().map(|p| p.deadline).min().expect("a batch is never empty");
    let bodies: Vec<ByteBuf> = batch.iter().map(|p| ByteBuf::from(p.body.to_vec())).collect();
    let answer = match to_cbor(&bodies) {
        Ok(body) => {
            let timeout = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
            peers.call(addr, APPEND_MANY, Bytes::from(body), timeout).await
        }
        Err(e) => Err((false, e)),
    };
    match answer.and_then(|b| from_cbor::<Vec<ItemAnswer>>(&b).map_err(|e| (false, e))) {
        Ok(items) if items.len() == batch.len() => {
            for (p, item) in batch.into_iter().zip(items) {
                let _ = p.reply.send(item.map(|b| Bytes::from(b.into_vec())).map_err(|e| (false, Failed(format!("{APPEND_MANY} to {addr}: {e}")))));
            }
        }
        Ok(items) => {
            let why = format!("{APPEND_MANY} to {addr}: {} answers for {} heartbeats", items.len(), batch.len());
            for p in batch {
                let _ = p.reply.send(Err((false, Failed(why.clone()))));
            }
        }
        Err((unavailable, e)) => {
            for p in batch {
                let _ = p.reply.send(Err((unavailable, Failed(e.0.clone()))));
            }
        }
    }
}
