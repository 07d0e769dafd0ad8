//! Stopping a running statement: a CancelRequest from the client, its statement
//! timeout, or the client going away; and running statements apart from the
//! connections, on the node's execution runtime.
//!
//! Owns: the per-connection cancel slots (keyed by the process id and secret key the
//! client got at start-up), the [`Stop`] conditions of one statement, and the
//! [`pump`] that drives a statement's result stream on the execution runtime while the
//! connection's task only forwards what it produces.
//! Must never: let a stopped statement go on holding pipeline slots: stopping aborts
//! the task that drives it, which drops its plan and streams (slots are released on
//! drop), at the latest at the operator's next cooperative yield.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use crate::error::{Error, Result};

/// How often a running statement checks that its client is still connected.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);

/// Items a statement's driver may produce ahead of the connection that sends them.
const PUMP_CHANNEL_ITEMS: usize = 2;

/// The cancel slot of one connection: armed while a statement runs.
#[derive(Debug, Default)]
pub struct CancelSlot {
    current: Mutex<Option<oneshot::Sender<()>>>,
}

impl CancelSlot {
    /// A receiver that fires if a cancel request arrives before the next `arm`.
    pub fn arm(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        *self.current.lock() = Some(tx);
        rx
    }

    fn fire(&self) -> bool {
        match self.current.lock().take() {
            Some(tx) => tx.send(()).is_ok(),
            None => false,
        }
    }
}

/// Connections by (process id, secret key), for CancelRequests.
#[derive(Debug, Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, Vec<u8>), Arc<CancelSlot>>>,
}

impl CancelRegistry {
    /// Registers a connection; it is forgotten when the registration is dropped.
    pub fn register(self: &Arc<Self>, pid: i32, secret: Vec<u8>) -> (Arc<CancelSlot>, Registration) {
        let slot = Arc::new(CancelSlot::default());
        self.slots.lock().insert((pid, secret.clone()), Arc::clone(&slot));
        (slot, Registration { registry: Arc::clone(self), key: (pid, secret) })
    }

    /// Cancels the statement running on the connection, if the key matches one.
    pub fn cancel(&self, pid: i32, secret: &[u8]) -> bool {
        let slot = self.slots.lock().get(&(pid, secret.to_vec())).cloned();
        slot.is_some_and(|s| s.fire())
    }
}

/// Removes a connection from its registry when the connection ends.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<CancelRegistry>,
    key: (i32, Vec<u8>),
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.slots.lock().remove(&self.key);
    }
}

/// Whether a connection's client is still there, by peeking at a duplicate of its
/// socket (never reading from it): end of stream or a reset means it is gone. Data
/// waiting to be read (a pipelined next message) means it is there.
#[derive(Debug, Clone)]
pub struct Probe(Arc<std::net::TcpStream>);

impl Probe {
    /// A probe on a duplicate of `socket`'s descriptor.
    pub fn of(socket: &tokio::net::TcpStream) -> Option<Probe> {
        use std::os::fd::AsFd;
        let fd = socket.as_fd().try_clone_to_owned().ok()?;
        Some(Probe(Arc::new(std::net::TcpStream::from(fd))))
    }

    pub fn gone(&self) -> bool {
        let mut b = [0u8; 1];
        // The descriptor shares the connection's non-blocking mode.
        match self.0.peek(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted),
        }
    }
}

/// What stops one statement: a cancel request, its deadline, its client leaving.
pub struct Stop {
    cancel: Option<oneshot::Receiver<()>>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    probe: Option<(Probe, tokio::time::Interval)>,
}

impl Stop {
    pub fn new(cancel: Option<oneshot::Receiver<()>>, timeout: Option<Duration>, probe: Option<Probe>) -> Stop {
        Stop {
            cancel,
            deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
            probe: probe.map(|p| {
                let mut tick = tokio::time::interval(PROBE_INTERVAL);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                (p, tick)
            }),
        }
    }

    /// Nothing stops it (in-process callers, tests).
    pub fn never() -> Stop {
        Stop { cancel: None, deadline: None, probe: None }
    }

    /// Ready with the reason once the statement must stop.
    pub fn poll_stop(&mut self, cx: &mut Context<'_>) -> Poll<Error> {
        if let Some(rx) = self.cancel.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(())) => return Poll::Ready(Error::Cancelled),
                // The slot was re-armed or the connection ended: nothing to wait for.
                Poll::Ready(Err(_)) => self.cancel = None,
                Poll::Pending => {}
            }
        }
        if let Some(d) = self.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Error::StatementTimeout);
            }
        }
        if let Some((probe, tick)) = self.probe.as_mut() {
            while tick.poll_tick(cx).is_ready() {
                if probe.gone() {
                    return Poll::Ready(Error::Cancelled);
                }
            }
        }
        Poll::Pending
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `work` on `exec` and waits for it unless `stop` fires first (then the task is
/// aborted, which drops whatever it holds).
pub async fn run<T: Send + 'static>(
    exec: &tokio::runtime::Handle,
    stop: &mut Stop,
    work: impl Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    let mut task = AbortOnDrop(exec.spawn(work));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(e) = stop.poll_stop(cx) {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut task.0).poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(join)) if join.is_panic() => {
                Poll::Ready(Err(Error::Internal(format!("statement failed: {}", panic_text(join.into_panic())))))
            }
            Poll::Ready(Err(_)) => Poll::Ready(Err(Error::Cancelled)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

/// A stream driven on the execution runtime, read here; ends with the stop's error
/// (made an item by `stopped`) if the stop fires first.
pub struct Pumped<T> {
    rx: mpsc::Receiver<T>,
    task: Option<AbortOnDrop<()>>,
    stop: Stop,
    stopped: fn(Error) -> T,
    done: bool,
}

/// Forwards `inner`'s items into `tx` until it ends or the reader goes away.
async fn drive<T>(mut inner: Pin<Box<dyn Stream<Item = T> + Send>>, tx: mpsc::Sender<T>) {
    while let Some(item) = inner.next().await {
        if tx.send(item).await.is_err() {
            break; // the reader went away or stopped
        }
    }
}

/// Drives `inner` on `exec`; the returned stream forwards its items until `stop` fires.
pub fn pump<T: Send + 'static>(
    exec: &tokio::runtime::Handle,
    inner: Pin<Box<dyn Stream<Item = T> + Send>>,
    stop: Stop,
    stopped: fn(Error) -> T,
) -> Pumped<T> {
    let (tx, rx) = mpsc::channel(PUMP_CHANNEL_ITEMS);
    let task = exec.spawn(drive(inner, tx));
    Pumped { rx, task: Some(AbortOnDrop(task)), stop, stopped, done: false }
}

/// A stream's driver started from a task of the runtime it runs on ([`start`]): the
/// task that produced the stream starts its driver where it is, so the first rows need
/// no wake-up of another runtime's thread (a point query's whole answer is then one
/// hop from the execution runtime to the connection's). [`Started::with_stop`] reads it.
pub struct Started<T> {
    rx: mpsc::Receiver<T>,
    task: AbortOnDrop<()>,
}

/// Starts driving `inner` on the current runtime (to be called from one of its tasks).
pub fn start<T: Send + 'static>(inner: Pin<Box<dyn Stream<Item = T> + Send>>) -> Started<T> {
    let (tx, rx) = mpsc::channel(PUMP_CHANNEL_ITEMS);
    Started { rx, task: AbortOnDrop(tokio::spawn(drive(inner, tx))) }
}

impl<T> Started<T> {
    /// The stream of its items, which ends with the stop's error if `stop` fires first.
    pub fn with_stop(self, stop: Stop, stopped: fn(Error) -> T) -> Pumped<T> {
        Pumped { rx: self.rx, task: Some(self.task), stop, stopped, done: false }
    }
}

impl<T> Stream for Pumped<T> {
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(e) = self.stop.poll_stop(cx) {
            self.done = true;
            self.task = None; // aborts the driver: the plan and its slots are dropped
            self.rx.close();
            return Poll::Ready(Some((self.stopped)(e)));
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(None) => {
                self.done = true;
                self.task = None;
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

/// A record-batch stream pumped on `exec` (see [`pump`]).
pub fn pump_batches(
    exec: &tokio::runtime::Handle,
    inner: datafusion::execution::SendableRecordBatchStream,
    stop: Stop,
) -> datafusion::execution::SendableRecordBatchStream {
    let schema = inner.schema();
    let pumped = pump(exec, inner, stop, |e| Err(e.into()));
    Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(schema, pumped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_cancel_ends_the_stream_and_its_driver() {
        let exec = tokio::runtime::Handle::current();
        let registry = Arc::new(CancelRegistry::default());
        let (slot, reg) = registry.register(7, vec![1, 2]);
        // An endless source: only stopping ends it.
        let endless: Pin<Box<dyn Stream<Item = Result<u64>> + Send>> = Box::pin(futures::stream::iter(0u64..).map(Ok));
        let mut s = pump(&exec, endless, Stop::new(Some(slot.arm()), None, None), Err);
        assert_eq!(s.next().await.unwrap().unwrap(), 0);
        assert!(!registry.cancel(7, &[9]), "a wrong secret cancels nothing");
        assert!(registry.cancel(7, &[1, 2]));
        let mut last = None;
        for _ in 0..10 {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => {
                    last = Some(e);
                    break;
                }
                None => break,
            }
        }
        assert_eq!(last.expect("stopped").sqlstate(), "57014");
        assert!(s.next().await.is_none());
        drop(reg);
        assert!(!registry.cancel(7, &[1, 2]), "forgotten with its connection");
    }

    #[tokio::test]
    async fn a_deadline_stops_waiting_work() {
        let exec = tokio::runtime::Handle::current();
        let mut stop = Stop::new(None, Some(Duration::from_millis(20)), None);
        let e = run(&exec, &mut stop, async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok(())
        })
        .await
        .unwrap_err();
        assert!(matches!(e, Error::StatementTimeout), "{e}");
    }
}
