//! The receiving side of the groups' messages: the internal Flight service hands
//! actions `raft.append`, `raft.vote`, `raft.snapshot`, `raft.write` (a forwarded
//! write) and `raft.state` (whether this node holds a group) to [`Groups`], which answers them with the addressed group.
//!
//! Owns: decoding a message (a malformed one is refused with InvalidArgument, and a
//! message for a group this node does not have with NotFound) and encoding the answer
//! (the CBOR of the group's result, errors included, so the sender sees openraft's own
//! error).

use bytes::Bytes;
use openraft::raft::{AppendEntriesRequest, VoteRequest};
use serde::de::DeserializeOwned;
use tonic::Status;

use super::groups::{ForwardedWrite, Groups, FORWARD, STATE};
use super::heartbeats::{ItemAnswer, APPEND_MANY, BATCH_MAX};
use super::network::{from_cbor, open_envelope, open_snapshot_chunk, to_cbor, APPEND, SNAPSHOT, VOTE};
use serde_bytes::ByteBuf;
use super::ShardGroup;
use crate::pipeline::flight::ActionHandler;

fn decode<T: DeserializeOwned>(kind: &str, body: &[u8]) -> Result<(u32, T), Status> {
    open_envelope(body).map_err(|e| Status::invalid_argument(format!("malformed {kind} message: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Bytes, Status> {
    to_cbor(v).map(Bytes::from).map_err(|e| Status::internal(e.to_string()))
}

impl Groups {
    /// One group's append (`body`: group id + CBOR request).
    async fn append(&self, body: &[u8]) -> Result<Bytes, Status> {
        let (g, req): (u32, AppendEntriesRequest<ShardGroup>) = decode(APPEND, body)?;
        let raft = self.raft(g).ok_or_else(|| Status::not_found(format!("this node has no group for shard {g}")))?;
        self.note_append(g, req.leader_commit.map(|l| l.index));
        encode(&raft.append_entries(req).await)
    }
}

#[async_trait::async_trait]
impl ActionHandler for Groups {
    fn handles(&self, kind: &str) -> bool {
        matches!(kind, APPEND | APPEND_MANY | VOTE | SNAPSHOT | FORWARD | STATE)
    }

    async fn handle(&self, kind: &str, body: Bytes) -> Result<Bytes, Status> {
        let raft = |g: u32| self.raft(g).ok_or_else(|| Status::not_found(format!("this node has no group for shard {g}")));
        match kind {
            APPEND => self.append(&body).await,
            APPEND_MANY => {
                let bodies: Vec<ByteBuf> = from_cbor(&body).map_err(|e| Status::invalid_argument(format!("malformed {kind} message: {e}")))?;
                if bodies.len() > BATCH_MAX {
                    return Err(Status::invalid_argument(format!("{kind} of {} messages (at most {BATCH_MAX})", bodies.len())));
                }
                let answers = futures::future::join_all(bodies.iter().map(|b| self.append(b))).await;
                let items: Vec<ItemAnswer> =
                    answers.into_iter().map(|a| a.map(|b| ByteBuf::from(b.to_vec())).map_err(|s| s.message().to_string())).collect();
                encode(&items)
            }
            VOTE => {
                let (g, req): (u32, VoteRequest<u64>) = decode(kind, &body)?;
                let raft = raft(g)?;
                if !self.may_vote(g) {
                    // Seen by the candidate as a peer that did not answer.
                    return Err(Status::unavailable(format!("shard {g}: this replica has not caught up with its peers and does not vote yet")));
                }
                encode(&raft.vote(req).await)
            }
            SNAPSHOT => {
                let (g, req) = open_snapshot_chunk(&body).map_err(|e| Status::invalid_argument(format!("malformed {kind} message: {e}")))?;
                encode(&raft(g)?.install_snapshot(req).await)
            }
            FORWARD => {
                let (g, w): (u32, ForwardedWrite) = decode(kind, &body)?;
                raft(g)?;
                encode(&self.forwarded(g, w).await)
            }
            STATE => {
                let (g, ()): (u32, ()) = decode(kind, &body)?;
                encode(&self.group_state(g).await)
            }
            other => Err(Status::invalid_argument(format!("unknown action {other:?}"))),
        }
    }
}
