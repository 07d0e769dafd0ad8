//! How a shard group reaches the same group on other nodes: over the node's internal
//! Arrow Flight endpoint (the one that serves fragments), multiplexed by group id.
//!
//! Owns: the `RaftNetworkFactory` of the node's groups, the message format, and the
//! connections to peers (one HTTP/2 channel per peer address, shared by every group).
//!
//! A message is one Flight `do_action`: type `raft.append`, `raft.vote` or
//! `raft.snapshot` (a snapshot chunk: openraft cuts snapshots into chunks of
//! `snapshot_max_chunk_size`), body = the group id (u32, little-endian) then the request
//! as CBOR (a snapshot chunk: its header as CBOR, then its bytes raw); the one result message is the CBOR of the receiving group's
//! `Result<response, RaftError>`. Each call is bounded by openraft's `hard_ttl` (plus,
//! for a message with entries or a snapshot chunk, the time its bytes take at 10 MiB/s)
//! and by
//! [`FLIGHT_MESSAGE_BYTES_MAX`] in both directions; how many entries one append carries
//! is bounded by the groups' `max_payload_entries`.
//!
//! Must never: pretend a message was delivered (a transport failure is `Unreachable`,
//! which openraft retries with backoff; a timeout is a network error).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::Action;
use bytes::Bytes;
use futures::StreamExt;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::{AnyError, BasicNode};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::heartbeats::Coalescer;
use super::ShardGroup;
use crate::pipeline::flight::FLIGHT_MESSAGE_BYTES_MAX;

pub const APPEND: &str = "raft.append";
pub const VOTE: &str = "raft.vote";
pub const SNAPSHOT: &str = "raft.snapshot";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A message's time beyond openraft's TTL (the heartbeat interval, 100 ms): its bytes
/// at [`SLOWEST_BYTES_PER_SEC`], for the peer to receive, decode and fsync them. With
/// the TTL alone, an append of many rows (a bulk load across nodes) on a busy machine
/// timed out every time and was sent again and again: a 2-million-row COPY into 3
/// nodes had not finished after 13 minutes.
fn transfer_allowance(bytes: usize) -> Duration {
    Duration::from_millis((bytes as u64).saturating_mul(1000) / SLOWEST_BYTES_PER_SEC)
}

/// The slowest rate at which a peer is expected to take a message in.
const SLOWEST_BYTES_PER_SEC: u64 = 10 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Failed(pub String);

/// CBOR of `v`.
pub fn to_cbor<T: Serialize>(v: &T) -> Result<Vec<u8>, Failed> {
    let mut out = Vec::new();
    ciborium::into_writer(v, &mut out).map_err(|e| Failed(format!("encode: {e}")))?;
    Ok(out)
}

pub fn from_cbor<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Failed> {
    ciborium::from_reader(bytes).map_err(|e| Failed(format!("decode: {e}")))
}

/// A message body: the group id, then the CBOR of `v`.
pub fn envelope<T: Serialize>(group: u32, v: &T) -> Result<Bytes, Failed> {
    let mut out = group.to_le_bytes().to_vec();
    ciborium::into_writer(v, &mut out).map_err(|e| Failed(format!("encode: {e}")))?;
    Ok(Bytes::from(out))
}

/// The group id and the decoded value of a message body.
pub fn open_envelope<T: DeserializeOwned>(body: &[u8]) -> Result<(u32, T), Failed> {
    if body.len() < 4 {
        return Err(Failed("message shorter than its group id".into()));
    }
    let group = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
    Ok((group, from_cbor(&body[4..])?))
}

/// A snapshot chunk's fields but its bytes (which follow the header raw: serde would
/// write a `Vec<u8>` as a CBOR array of integers, about twice its size).
#[derive(Serialize, serde::Deserialize)]
struct ChunkHeader {
    vote: openraft::Vote<u64>,
    meta: openraft::SnapshotMeta<u64, BasicNode>,
    offset: u64,
    done: bool,
}

/// A `raft.snapshot` body: group id, header length (u32, little-endian), the CBOR
/// header, then the chunk's bytes.
pub fn snapshot_chunk(group: u32, req: &InstallSnapshotRequest<ShardGroup>) -> Result<Bytes, Failed> {
    let header = to_cbor(&ChunkHeader { vote: req.vote, meta: req.meta.clone(), offset: req.offset, done: req.done })?;
    let mut out = Vec::with_capacity(8 + header.len() + req.data.len());
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&req.data);
    Ok(Bytes::from(out))
}

/// The group id and the chunk of a `raft.snapshot` body.
pub fn open_snapshot_chunk(body: &[u8]) -> Result<(u32, InstallSnapshotRequest<ShardGroup>), Failed> {
    if body.len() < 8 {
        return Err(Failed("snapshot chunk shorter than its header".into()));
    }
    let group = u32::from_le_bytes(body[..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(body[4..8].try_into().expect("4 bytes")) as usize;
    let header = body.get(8..8 + len).ok_or_else(|| Failed("snapshot chunk header longer than the message".into()))?;
    let h: ChunkHeader = from_cbor(header)?;
    Ok((group, InstallSnapshotRequest { vote: h.vote, meta: h.meta, offset: h.offset, data: body[8 + len..].to_vec(), done: h.done }))
}

/// Another way to carry the groups' calls than Flight: the seeded simulation of the
/// groups (`tests/raft_sim.rs`) delivers them in process, and loses, delays or cuts
/// them off as its seed says. Same contract as [`Peers::call`].
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    async fn call(&self, addr: &str, kind: &str, body: Bytes, timeout: Duration) -> Result<Bytes, (bool, Failed)>;
}

/// Connections to peers, by internal address, shared by every group of the node.
#[derive(Clone, Default)]
pub struct Peers {
    clients: Arc<Mutex<HashMap<String, FlightServiceClient<Channel>>>>,
    /// When each address last answered a call.
    answered: Arc<Mutex<HashMap<String, std::time::Instant>>>,
    /// Carries the calls instead of Flight (the simulation).
    transport: Option<Arc<dyn Transport>>,
}

impl Peers {
    /// Peers reached through `transport` instead of Flight.
    pub fn through(transport: Arc<dyn Transport>) -> Peers {
        Peers { transport: Some(transport), ..Peers::default() }
    }

    /// The client of the node at `addr` (connected on first use, reconnected after a
    /// failure by tonic).
    pub fn client(&self, addr: &str) -> Result<FlightServiceClient<Channel>, Failed> {
        if addr.is_empty() {
            return Err(Failed("the node has no internal address".into()));
        }
        let mut clients = self.clients.lock();
        if let Some(c) = clients.get(addr) {
            return Ok(c.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Failed(format!("peer address {addr}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy();
        let c = FlightServiceClient::new(channel)
            .max_decoding_message_size(FLIGHT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(FLIGHT_MESSAGE_BYTES_MAX);
        clients.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    /// How long ago the node at `addr` last answered a call (None: never).
    pub fn last_answer(&self, addr: &str) -> Option<Duration> {
        self.answered.lock().get(addr).map(|t| t.elapsed())
    }

    /// Sends one action to the node at `addr` and returns its one result, within
    /// `timeout`. `Err(true, ..)`: the peer is unavailable (no connection, or not
    /// serving); `Err(false, ..)`: a timeout or another failure.
    pub async fn call(&self, addr: &str, kind: &str, body: Bytes, timeout: Duration) -> Result<Bytes, (bool, Failed)> {
        if let Some(t) = &self.transport {
            let r = t.call(addr, kind, body, timeout).await;
            if r.is_ok() {
                self.answered.lock().insert(addr.to_string(), std::time::Instant::now());
            }
            return r;
        }
        let mut client = self.client(addr).map_err(|e| (true, e))?;
        let action = Action { r#type: kind.to_string(), body };
        let call = async move {
            let mut stream = client.do_action(action).await?.into_inner();
            match stream.next().await {
                Some(r) => Ok(r?.body),
                None => Err(tonic::Status::internal("empty answer")),
            }
        };
        match tokio::time::timeout(timeout, call).await {
            Err(_) => Err((false, Failed(format!("{kind} to {addr}: no answer within {} ms", timeout.as_millis())))),
            Ok(Ok(b)) => {
                self.answered.lock().insert(addr.to_string(), std::time::Instant::now());
                Ok(b)
            }
            Ok(Err(s)) => {
                // Unavailable: no connection, or the peer's groups are not running; it
                // may also be a connection lost mid-call, so a caller that must know
                // whether a write happened treats it as unknown (see groups).
                let unavailable = s.code() == tonic::Code::Unavailable;
                Err((unavailable, Failed(format!("{kind} to {addr}: {:?}: {}", s.code(), s.message()))))
            }
        }
    }
}

/// The network of one group.
#[derive(Clone)]
pub struct Network {
    pub group: u32,
    pub peers: Peers,
    /// The node's heartbeat batches (shared by its groups).
    pub heartbeats: Coalescer,
}

/// A group's connection to one peer.
pub struct Peer {
    group: u32,
    target: u64,
    addr: String,
    peers: Peers,
    heartbeats: Coalescer,
}

impl RaftNetworkFactory<ShardGroup> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> Peer {
        Peer { group: self.group, target, addr: node.addr.clone(), peers: self.peers.clone(), heartbeats: self.heartbeats.clone() }
    }
}

impl Peer {
    /// Sends `req` as a `kind` message; `batched`: in the peer's next heartbeat batch.
    async fn send<Req: Serialize, Resp: DeserializeOwned, E>(
        &self,
        kind: &str,
        req: &Req,
        option: &RPCOption,
        batched: bool,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let body = envelope(self.group, req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send_body(kind, body, option, batched).await
    }

    async fn send_body<Resp: DeserializeOwned, E>(
        &self,
        kind: &str,
        body: Bytes,
        option: &RPCOption,
        batched: bool,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        E: std::error::Error + DeserializeOwned,
    {
        let answer = if batched {
            self.heartbeats.send(&self.addr, body, option.hard_ttl()).await
        } else {
            let ttl = option.hard_ttl() + transfer_allowance(body.len());
            self.peers.call(&self.addr, kind, body, ttl).await
        };
        match answer {
            Ok(bytes) => {
                let r: Result<Resp, RaftError<u64, E>> = from_cbor(&bytes).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            Err((true, e)) => Err(RPCError::Unreachable(Unreachable::new(&AnyError::new(&e)))),
            Err((false, e)) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<ShardGroup> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<ShardGroup>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        // An empty append (a heartbeat, or news of the commit index) waits for the
        // other groups' heartbeats to the same peer; one with entries goes now.
        let batched = rpc.entries.is_empty();
        self.send(APPEND, &rpc, &option, batched).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ShardGroup>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        let body = snapshot_chunk(self.group, &rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.send_body(SNAPSHOT, body, &option, false).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.send(VOTE, &rpc, &option, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_larger_message_may_take_longer() {
        assert_eq!(transfer_allowance(0), Duration::ZERO);
        assert_eq!(transfer_allowance(10 * 1024 * 1024), Duration::from_secs(1));
        assert_eq!(transfer_allowance(40 * 1024 * 1024), Duration::from_secs(4));
        assert!(transfer_allowance(usize::MAX) > Duration::from_secs(3600), "no overflow to a short time");
    }

    #[test]
    fn envelopes_carry_the_group_and_refuse_garbage() {
        let b = envelope(7, &("x", 3u64)).unwrap();
        let (g, v): (u32, (String, u64)) = open_envelope(&b).unwrap();
        assert_eq!((g, v), (7, ("x".to_string(), 3)));
        assert!(open_envelope::<u64>(b"\x01\x00").is_err());
        assert!(open_envelope::<(String, u64)>(b"\x01\x00\x00\x00\xff\xff").is_err());
    }

    #[test]
    fn snapshot_chunks_carry_their_bytes_raw() {
        let data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let req = InstallSnapshotRequest::<ShardGroup> {
            vote: openraft::Vote::new_committed(3, 2),
            meta: openraft::SnapshotMeta { last_log_id: None, last_membership: Default::default(), snapshot_id: "s-1".into() },
            offset: 4096,
            data: data.clone(),
            done: true,
        };
        let body = snapshot_chunk(9, &req).unwrap();
        assert!(body.len() < data.len() + 200, "{} bytes for {} of data", body.len(), data.len());
        let (g, back) = open_snapshot_chunk(&body).unwrap();
        assert_eq!((g, back.offset, back.done, back.meta.snapshot_id.as_str(), back.vote), (9, 4096, true, "s-1", req.vote));
        assert_eq!(back.data, data);
        assert!(open_snapshot_chunk(&body[..6]).is_err());
        let mut lying = body.to_vec();
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(open_snapshot_chunk(&lying).is_err());
    }

    #[tokio::test]
    async fn a_peer_that_is_not_there_is_unreachable_not_delivered() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let peers = Peers::default();
        let r = peers.call(&format!("127.0.0.1:{port}"), VOTE, Bytes::from_static(b"\x00\x00\x00\x00"), Duration::from_secs(2)).await;
        let (surely_not, _) = r.unwrap_err();
        assert!(surely_not);
        let r = peers.call("", VOTE, Bytes::new(), Duration::from_secs(2)).await;
        assert!(r.unwrap_err().0);
    }
}
