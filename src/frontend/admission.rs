//! Which connections the front end takes: at most `connections_max` at once, some of
//! them kept for loopback clients (local administration), at most
//! `connections_per_address_max` from one address, and at most `startup_pending_max`
//! still in start-up, where a newcomer closes the oldest one rather than being refused:
//! sockets that connect and send nothing cannot lock real clients out, since a real
//! client finishes its start-up in a round trip or two.
//!
//! Owns: the counts and the eviction order. Must never: lose a count (every admitted
//! connection returns its place when its [`Ticket`] is dropped). No IO.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub connections_max: usize,
    pub reserved_loopback: usize,
    pub per_address_max: usize,
    pub pending_max: usize,
}

/// Why a connection was refused (53300 for the client either way).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    TooManyClients,
    TooManyFromAddress,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::TooManyClients => "sorry, too many clients already",
            Refusal::TooManyFromAddress => "too many connections from this address",
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_address: HashMap<IpAddr, usize>,
    /// Connections in start-up by admission order, with the signal that closes them.
    pending: BTreeMap<u64, oneshot::Sender<()>>,
    next: u64,
}

#[derive(Debug)]
pub struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
}

/// One admitted connection's place. `evicted` fires if a newer connection needed its
/// start-up place; [`Ticket::started`] gives that place up once start-up is done.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    seq: u64,
    pub evicted: oneshot::Receiver<()>,
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Admission> {
        Arc::new(Admission { limits, counts: Mutex::default() })
    }

    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Ticket, Refusal> {
        let mut c = self.counts.lock();
        let cap = if ip.is_loopback() {
            self.limits.connections_max
        } else {
            self.limits.connections_max.saturating_sub(self.limits.reserved_loopback)
        };
        if c.total >= cap {
            return Err(Refusal::TooManyClients);
        }
        let from_here = c.per_address.get(&ip).copied().unwrap_or(0);
        if from_here >= self.limits.per_address_max {
            return Err(Refusal::TooManyFromAddress);
        }
        while c.pending.len() >= self.limits.pending_max {
            // The oldest connection still in start-up makes room (it is closed; its
            // ticket returns its counts when its task ends).
            let Some((_, close)) = c.pending.pop_first() else { break };
            let _ = close.send(());
        }
        c.total += 1;
        *c.per_address.entry(ip).or_default() += 1;
        let seq = c.next;
        c.next += 1;
        let (tx, rx) = oneshot::channel();
        c.pending.insert(seq, tx);
        Ok(Ticket { admission: Arc::clone(self), ip, seq, evicted: rx })
    }

    /// (connections, of which in start-up)
    #[cfg(test)]
    pub fn counts(&self) -> (usize, usize) {
        let c = self.counts.lock();
        (c.total, c.pending.len())
    }
}

impl Ticket {
    /// Start-up is done: the connection can no longer be evicted.
    pub fn started(&self) {
        self.admission.counts.lock().pending.remove(&self.seq);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.admission.counts.lock();
        c.pending.remove(&self.seq);
        c.total -= 1;
        if let Some(n) = c.per_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { connections_max: 6, reserved_loopback: 2, per_address_max: 3, pending_max: 2 }
    }

    #[test]
    fn idle_start_ups_give_way_to_newcomers() {
        let a = Admission::new(limits());
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let mut t1 = a.admit(lo).unwrap();
        let mut t2 = a.admit(lo).unwrap();
        // A third start-up closes the oldest.
        let t3 = a.admit(lo).unwrap();
        assert!(t1.evicted.try_recv().is_ok());
        assert!(t2.evicted.try_recv().is_err());
        assert_eq!(a.counts(), (3, 2));
        drop(t1);
        assert_eq!(a.counts(), (2, 2));
        // Started connections are never evicted.
        t2.started();
        t3.started();
        let _t4 = a.admit(lo).unwrap();
        assert!(t2.evicted.try_recv().is_err());
        // Three from one address at most.
        assert_eq!(a.admit(lo).unwrap_err(), Refusal::TooManyFromAddress);
    }

    #[test]
    fn per_address_cap_and_loopback_reserve() {
        let a = Admission::new(limits());
        let x: IpAddr = "10.0.0.1".parse().unwrap();
        let y: IpAddr = "10.0.0.2".parse().unwrap();
        let held: Vec<Ticket> = (0..3).map(|_| a.admit(x).unwrap()).collect();
        assert_eq!(a.admit(x).unwrap_err(), Refusal::TooManyFromAddress);
        for t in &held {
            t.started();
        }
        let y1 = a.admit(y).unwrap();
        y1.started();
        // 4 of 6 taken: the last 2 are kept for loopback clients.
        assert_eq!(a.admit(y).unwrap_err(), Refusal::TooManyClients);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let l1 = a.admit(lo).unwrap();
        l1.started();
        let l2 = a.admit(lo).unwrap();
        l2.started();
        assert_eq!(a.admit(lo).unwrap_err(), Refusal::TooManyClients);
        drop(held);
        assert!(a.admit(y).is_ok());
    }
}
