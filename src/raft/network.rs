//! How a shard group reaches the same group on other nodes.
//!
//! Owns: the `RaftNetworkFactory` of the node's groups. Today every group has one voter
//! (this node), so openraft never sends a message; a message to another node is
//! answered `Unreachable`, which openraft treats as a peer that is down (it retries
//! with backoff). Next (issue 12, step 3): the messages travel over the internal Flight
//! endpoint, multiplexed by group id, with timeouts and bounded sizes.
//!
//! Must never: pretend a message was delivered.

use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse};
use openraft::{AnyError, BasicNode};

use super::ShardGroup;

/// The network of one-node groups.
#[derive(Clone, Default)]
pub struct LocalOnly;

/// A connection to another node's group, which cannot be made yet.
pub struct NoPeer {
    target: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("node {0} is not reachable: shard groups do not span nodes yet")]
struct NotYet(u64);

fn unreachable<E: std::error::Error>(target: u64) -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&AnyError::new(&NotYet(target))))
}

impl RaftNetworkFactory<ShardGroup> for LocalOnly {
    type Network = NoPeer;

    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> NoPeer {
        NoPeer { target }
    }
}

impl RaftNetwork<ShardGroup> for NoPeer {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<ShardGroup>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable(self.target))
    }

    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<ShardGroup>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        Err(unreachable(self.target))
    }

    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(unreachable(self.target))
    }
}
