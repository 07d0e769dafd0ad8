//! The node's internal Arrow Flight service: other nodes send it fragments to run on
//! its pipelines.
//!
//! Owns: the fragment ticket format, the Flight server, and the mapping of errors to
//! and from gRPC statuses (a SQLSTATE survives the trip). Must never: run a fragment
//! outside a pipeline (slots and queue limits apply to remote work too), or accept a
//! ticket it cannot fully decode.
//!
//! Ticket: `TMF1`, a little-endian u32 header length, a JSON [`TicketHeader`], then the
//! fragment's physical plan encoded with datafusion-proto.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse,
    PollInfo, PutResult, SchemaResult, Ticket,
};
use bytes::Bytes;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use super::codec::FragmentCodec;
use futures::{Stream, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{Cluster, Fragment};
use crate::error::{Error, Result};
use crate::shard_map::{PipelineId, ShardId};

const MAGIC: &[u8; 4] = b"TMF1";
/// Largest Flight message either side accepts (a fragment plan or a batch).
pub const FLIGHT_MESSAGE_BYTES_MAX: usize = 256 << 20;

/// What a ticket says besides the plan.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TicketHeader {
    /// Index of the pipeline on the receiving node.
    pub pipeline: u32,
    pub query_id: u64,
    pub shard: Option<ShardId>,
    /// A replicated cluster's fragment: the log index of `shard` that the session's
    /// writes reached, which this node's replica applies before it reads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_after: Option<u64>,
}

pub fn encode_ticket(header: &TicketHeader, plan: &Arc<dyn ExecutionPlan>) -> Result<Bytes> {
    let plan = datafusion_proto::bytes::physical_plan_to_bytes_with_extension_codec(Arc::clone(plan), &FragmentCodec)?;
    let head = serde_json::to_vec(header).map_err(|e| Error::Internal(format!("ticket header: {e}")))?;
    let mut out = Vec::with_capacity(8 + head.len() + plan.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(&plan);
    Ok(Bytes::from(out))
}

/// Splits a ticket into its header and plan bytes.
pub fn decode_ticket(ticket: &[u8]) -> Result<(TicketHeader, &[u8])> {
    let bad = |why: &str| Error::InvalidParameter(format!("malformed fragment ticket: {why}"));
    if ticket.len() < 8 || &ticket[..4] != MAGIC {
        return Err(bad("no TMF1 header"));
    }
    let n = u32::from_le_bytes(ticket[4..8].try_into().expect("4 bytes")) as usize;
    let head = ticket.get(8..8 + n).ok_or_else(|| bad("header longer than the ticket"))?;
    let header: TicketHeader = serde_json::from_slice(head).map_err(|e| bad(&e.to_string()))?;
    Ok((header, &ticket[8 + n..]))
}

/// A gRPC status that carries our SQLSTATE in its message.
pub fn to_status(e: &Error) -> Status {
    let code = match e {
        Error::QueueFull { .. } | Error::ResourcesExhausted(_) => tonic::Code::ResourceExhausted,
        Error::InvalidParameter(_) => tonic::Code::InvalidArgument,
        Error::PipelineUnavailable { .. } => tonic::Code::Unavailable,
        _ => tonic::Code::Internal,
    };
    Status::new(code, format!("SQLSTATE {}: {}", e.sqlstate(), e.message()))
}

/// Our error for a status from a remote node: its own SQLSTATE when it sent one; a
/// transport failure (refused, reset, timed out) means the pipeline is unavailable.
pub fn from_status(pipeline: PipelineId, s: &Status) -> Error {
    if let Some(rest) = s.message().strip_prefix("SQLSTATE ") {
        if let Some((code, msg)) = rest.split_once(": ") {
            if code.len() == 5 && s.code() != tonic::Code::Unavailable {
                return Error::Relayed { sqlstate: crate::error::intern_sqlstate(code), message: msg.to_string() };
            }
        }
    }
    Error::PipelineUnavailable { pipeline: pipeline.to_string(), reason: format!("{:?}: {}", s.code(), s.message()) }
}

/// Answers the internal service's actions that are not about fragments (the shard
/// groups' Raft messages and forwarded writes): set once the groups have started, so
/// that the service can run before them (a group elects its leader over it).
#[async_trait::async_trait]
pub trait ActionHandler: Send + Sync {
    /// Whether this handler answers actions of type `kind`.
    fn handles(&self, kind: &str) -> bool;
    /// The one result message of an action.
    async fn handle(&self, kind: &str, body: Bytes) -> std::result::Result<Bytes, Status>;
}

/// Reads a replicated cluster's fragment from this node's replica: waits until the
/// replica of `shard` has applied `read_after` (bounded; a replica that stays behind
/// answers unavailable, so the gateway tries another), then replaces the plan's replica
/// scans by this node's rows ([`crate::storage::replica_scan`]). Set by the node once
/// its shard groups exist.
#[async_trait::async_trait]
pub trait ReplicaReader: Send + Sync {
    async fn read(&self, shard: ShardId, read_after: Option<u64>, plan: Arc<dyn ExecutionPlan>) -> Result<Arc<dyn ExecutionPlan>>;
}

/// Where the service finds its [`ActionHandler`] (weakly held: the handler's owner
/// stops it).
pub type ActionSlot = Arc<std::sync::OnceLock<std::sync::Weak<dyn ActionHandler>>>;

/// Runs fragments sent by other nodes on this node's pipelines.
#[derive(Clone)]
pub struct FragmentService {
    actions: ActionSlot,
    replicas: Arc<std::sync::OnceLock<Arc<dyn ReplicaReader>>>,
    ctx: SessionContext,
    /// Fragments run on the node's execution runtime, apart from its connections.
    exec: tokio::runtime::Handle,
    cluster: Arc<Cluster>,
    /// Each fragment's memory budget (`query_memory_bytes_max`; 0 = the node's only).
    memory_bytes_max: u64,
}

impl FragmentService {
    pub fn new(ctx: SessionContext, cluster: Arc<Cluster>, memory_bytes_max: u64, exec: tokio::runtime::Handle) -> FragmentService {
        FragmentService { actions: ActionSlot::default(), replicas: Arc::default(), ctx, exec, cluster, memory_bytes_max }
    }

    /// Sets how this node reads replica scans (once).
    pub fn set_replica_reader(&self, reader: Arc<dyn ReplicaReader>) {
        let _ = self.replicas.set(reader);
    }

    /// The slot where the node puts the handler of its other actions.
    pub fn action_slot(&self) -> ActionSlot {
        Arc::clone(&self.actions)
    }

    async fn start(&self, ticket: &[u8]) -> Result<datafusion::execution::SendableRecordBatchStream> {
        let (header, plan_bytes) = decode_ticket(ticket)?;
        let runtime = crate::memory::query_runtime(&self.ctx.runtime_env(), self.memory_bytes_max);
        let task_ctx = crate::memory::task_context_with(&self.ctx.task_ctx(), runtime);
        let plan = datafusion_proto::bytes::physical_plan_from_bytes_with_extension_codec(
            plan_bytes,
            &task_ctx,
            &FragmentCodec,
        )
        .map_err(|e| Error::InvalidParameter(format!("malformed fragment plan: {e}")))?;
        let shards = crate::storage::replica_scan::shards(&plan);
        let plan = if !shards.is_empty() {
            let (Some(shard), true) = (header.shard, shards.iter().all(|s| Some(*s) == header.shard)) else {
                return Err(Error::InvalidParameter(format!("a fragment of shard {:?} reads replicas of shards {shards:?}", header.shard)));
            };
            let reader = self
                .replicas
                .get()
                .ok_or_else(|| Error::InvalidParameter("this node holds no replicas: it cannot run a replicated cluster's fragment".into()))?;
            reader.read(shard, header.read_after, plan).await?
        } else {
            plan
        };
        let id = PipelineId::new(self.cluster.node_id(), header.pipeline);
        let pipeline = self
            .cluster
            .pipeline(id)
            .filter(|p| p.is_local())
            // The sender's view of this node's pipelines is wrong (`peer_pipelines`, or a
            // pipeline the autoscaler stopped): for it, that pipeline is unavailable, so
            // it avoids it and reruns the fragment elsewhere.
            .ok_or_else(|| Error::PipelineUnavailable { pipeline: id.to_string(), reason: format!("node {} has no pipeline {id}", self.cluster.node_id()) })?;
        pipeline.run(Fragment { query_id: header.query_id, shard: header.shard, plan, alone: false, read_after: None }, task_ctx).await
    }
}

type BoxedStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

fn unimplemented<T>(what: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!("{what} is not part of Tidemark's internal service")))
}

#[tonic::async_trait]
impl FlightService for FragmentService {
    type HandshakeStream = BoxedStream<HandshakeResponse>;
    type ListFlightsStream = BoxedStream<FlightInfo>;
    type DoGetStream = BoxedStream<FlightData>;
    type DoPutStream = BoxedStream<PutResult>;
    type DoActionStream = BoxedStream<arrow_flight::Result>;
    type ListActionsStream = BoxedStream<ActionType>;
    type DoExchangeStream = BoxedStream<FlightData>;

    async fn do_get(&self, request: Request<Ticket>) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let ticket = request.into_inner().ticket;
        // Decoded, planned and driven on the execution runtime; the gRPC task only
        // forwards batches, and a cancelled call drops (aborts) the fragment.
        let svc = self.clone();
        let started = self.exec.spawn(async move { svc.start(&ticket).await }).await;
        let stream = started
            .map_err(|e| Status::internal(format!("fragment start failed: {e}")))?
            .map_err(|e| to_status(&e))?;
        let stream = crate::interrupt::pump_batches(&self.exec, stream, crate::interrupt::Stop::never());
        let schema = stream.schema();
        let batches = stream.map_err(|e| FlightError::ExternalError(Box::new(Error::from(e))));
        let flight = FlightDataEncoderBuilder::new().with_schema(schema).build(batches).map_err(|e| match e {
            FlightError::ExternalError(inner) => match inner.downcast::<Error>() {
                Ok(ours) => to_status(&ours),
                Err(other) => Status::internal(other.to_string()),
            },
            other => Status::internal(other.to_string()),
        });
        Ok(Response::new(Box::pin(flight)))
    }

    async fn do_action(&self, request: Request<Action>) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        let action = request.into_inner();
        match action.r#type.as_str() {
            // Liveness and identity: the node id and its pipelines.
            "describe" => {
                let ids: Vec<String> = self.cluster.local_pipelines().iter().map(|p| p.id().to_string()).collect();
                let body = serde_json::json!({ "node_id": self.cluster.node_id(), "pipelines": ids });
                let r = arrow_flight::Result { body: Bytes::from(body.to_string()) };
                Ok(Response::new(Box::pin(futures::stream::iter([Ok(r)]))))
            }
            other => {
                let handler = self.actions.get().and_then(|w| w.upgrade()).filter(|h| h.handles(other));
                match handler {
                    Some(h) => {
                        let body = h.handle(other, action.body).await?;
                        let r = arrow_flight::Result { body };
                        Ok(Response::new(Box::pin(futures::stream::iter([Ok(r)]))))
                    }
                    None if other.starts_with("raft.") => {
                        Err(Status::unavailable(format!("this node's shard groups are not running (action {other:?})")))
                    }
                    None => Err(Status::invalid_argument(format!("unknown action {other:?}"))),
                }
            }
        }
    }

    async fn handshake(
        &self,
        _r: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        unimplemented("handshake")
    }
    async fn list_flights(&self, _r: Request<Criteria>) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        unimplemented("list_flights")
    }
    async fn get_flight_info(&self, _r: Request<FlightDescriptor>) -> std::result::Result<Response<FlightInfo>, Status> {
        unimplemented("get_flight_info")
    }
    async fn poll_flight_info(&self, _r: Request<FlightDescriptor>) -> std::result::Result<Response<PollInfo>, Status> {
        unimplemented("poll_flight_info")
    }
    async fn get_schema(&self, _r: Request<FlightDescriptor>) -> std::result::Result<Response<SchemaResult>, Status> {
        unimplemented("get_schema")
    }
    async fn do_put(&self, _r: Request<Streaming<FlightData>>) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        unimplemented("do_put")
    }
    async fn do_exchange(
        &self,
        _r: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        unimplemented("do_exchange")
    }
    async fn list_actions(&self, _r: Request<Empty>) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        let t = ActionType { r#type: "describe".into(), description: "node id and pipelines".into() };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(t)]))))
    }
}

/// The running internal service.
pub struct FlightServer {
    pub local_addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl FlightServer {
    /// Binds `addr` (port 0 picks one) and serves fragments until dropped.
    pub async fn start(addr: SocketAddr, service: FragmentService) -> Result<FlightServer> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::Config(format!("cannot listen on internal address {addr}: {e}")))?;
        let local_addr = listener.local_addr()?;
        let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let svc = FlightServiceServer::new(service)
            .max_decoding_message_size(FLIGHT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(FLIGHT_MESSAGE_BYTES_MAX);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let r = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "internal Flight service stopped");
            }
        });
        tracing::info!(%local_addr, "internal Flight service listening");
        Ok(FlightServer { local_addr, shutdown: Some(tx), task })
    }
}

impl Drop for FlightServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_garbage_is_refused() {
        let plan: Arc<dyn ExecutionPlan> = Arc::new(datafusion::physical_plan::empty::EmptyExec::new(Arc::new(
            datafusion::arrow::datatypes::Schema::new(vec![datafusion::arrow::datatypes::Field::new(
                "a",
                datafusion::arrow::datatypes::DataType::Int64,
                true,
            )]),
        )));
        let h = TicketHeader { pipeline: 3, query_id: 77, shard: Some(5), read_after: Some(9) };
        let t = encode_ticket(&h, &plan).unwrap();
        let (back, rest) = decode_ticket(&t).unwrap();
        assert_eq!(back, h);
        assert!(!rest.is_empty());
        for bad in [&b""[..], b"TMF1", b"XXXX\x01\x00\x00\x00{", b"TMF1\xff\xff\xff\xff{}", b"TMF1\x02\x00\x00\x00{x"] {
            let e = decode_ticket(bad).unwrap_err();
            assert_eq!(e.sqlstate(), "22023", "{bad:?}");
        }
    }

    #[test]
    fn statuses_keep_sqlstate_and_transport_failures_are_unavailable() {
        let p = PipelineId::new(2, 0);
        let e = from_status(p, &to_status(&Error::QueueFull { what: "pipeline queue", limit: 4, unit: "fragments" }));
        assert_eq!(e.sqlstate(), "53000");
        let e = from_status(p, &Status::unavailable("tcp connect error: Connection refused"));
        assert!(matches!(e, Error::PipelineUnavailable { .. }), "{e:?}");
        let e = from_status(p, &Status::internal("h2 protocol error"));
        assert!(matches!(e, Error::PipelineUnavailable { .. }), "{e:?}");
    }
}
