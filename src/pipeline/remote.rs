//! A pipeline on another node, reached over its internal Arrow Flight service.
//!
//! Owns: sending a fragment (datafusion-proto in a Flight ticket), turning the
//! answer back into a record batch stream, timeouts, and the "down" mark that keeps
//! the router away from a node that just failed. Must never: report a transport
//! failure as anything but [`Error::PipelineUnavailable`] (the caller decides whether
//! a retry is safe), or wait for a silent node longer than the fragment timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::Ticket;
use async_trait::async_trait;
use datafusion::error::DataFusionError;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::StreamExt;
use parking_lot::Mutex;
use tonic::transport::Channel;

use super::flight::{encode_ticket, from_status, TicketHeader, FLIGHT_MESSAGE_BYTES_MAX};
use super::{Fragment, InFlight, Pipeline, PipelineStats, TrackedStream};
use crate::error::{Error, Result};
use crate::shard_map::PipelineId;
use crate::storage::cache::CacheStats;

/// After a transport failure the router avoids the pipeline for this long.
const DOWN_BACKOFF: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct RemotePipeline {
    id: PipelineId,
    slots: u32,
    client: FlightServiceClient<Channel>,
    stats: Arc<PipelineStats>,
    timeout: Duration,
    down_until: Arc<Mutex<Option<Instant>>>,
}

impl RemotePipeline {
    /// Pipeline `id` served at `addr`; the connection is made on first use (and
    /// re-made after a failure).
    pub fn new(id: PipelineId, addr: SocketAddr, slots: u32, timeout: Duration) -> Result<RemotePipeline> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Error::Config(format!("peer address {addr}: {e}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        let client = FlightServiceClient::new(channel)
            .max_decoding_message_size(FLIGHT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(FLIGHT_MESSAGE_BYTES_MAX);
        Ok(RemotePipeline {
            id,
            slots,
            client,
            stats: Arc::default(),
            timeout,
            down_until: Arc::default(),
        })
    }
}

fn mark_down(down: &Mutex<Option<Instant>>) {
    *down.lock() = Some(Instant::now() + DOWN_BACKOFF);
}

fn flight_error(id: PipelineId, e: FlightError, down: &Mutex<Option<Instant>>) -> Error {
    let err = match e {
        FlightError::Tonic(status) => from_status(id, &status),
        other => Error::PipelineUnavailable { pipeline: id.to_string(), reason: other.to_string() },
    };
    if matches!(err, Error::PipelineUnavailable { .. }) {
        mark_down(down);
    }
    err
}

#[async_trait]
impl Pipeline for RemotePipeline {
    fn id(&self) -> PipelineId {
        self.id
    }

    fn slots(&self) -> u32 {
        self.slots
    }

    fn stats(&self) -> &Arc<PipelineStats> {
        &self.stats
    }

    fn cache(&self) -> Option<CacheStats> {
        None
    }

    fn is_local(&self) -> bool {
        false
    }

    fn available(&self) -> bool {
        self.down_until.lock().is_none_or(|t| Instant::now() >= t)
    }

    async fn run(&self, fragment: Fragment, _ctx: Arc<TaskContext>) -> Result<SendableRecordBatchStream> {
        let mut flight = InFlight::start(&self.stats);
        let header = TicketHeader { pipeline: self.id.index, query_id: fragment.query_id, shard: fragment.shard, read_after: fragment.read_after };
        let plan = crate::storage::provider::materialize_segment_files(Arc::clone(&fragment.plan))?;
        let ticket = encode_ticket(&header, &plan)?;
        let schema = fragment.plan.schema();
        let mut client = self.client.clone();
        let id = self.id;
        let response = match tokio::time::timeout(self.timeout, client.do_get(Ticket { ticket })).await {
            Err(_) => {
                flight.fail();
                mark_down(&self.down_until);
                return Err(Error::PipelineUnavailable {
                    pipeline: id.to_string(),
                    reason: format!("no answer within {} ms", self.timeout.as_millis()),
                });
            }
            Ok(Err(status)) => {
                flight.fail();
                let e = from_status(id, &status);
                if matches!(e, Error::PipelineUnavailable { .. }) {
                    mark_down(&self.down_until);
                }
                return Err(e);
            }
            Ok(Ok(r)) => r.into_inner(),
        };
        let data = response.map(|r| r.map_err(FlightError::from));
        let batches = FlightRecordBatchStream::new_from_flight_data(data);
        let (timeout, down) = (self.timeout, Arc::clone(&self.down_until));
        // Each batch must arrive within the fragment timeout; the first error ends the stream.
        let stream = futures::stream::unfold(Some(batches), move |state| {
            let down = Arc::clone(&down);
            async move {
                let mut s = state?;
                match tokio::time::timeout(timeout, s.next()).await {
                    Err(_) => {
                        mark_down(&down);
                        let e = Error::PipelineUnavailable {
                            pipeline: id.to_string(),
                            reason: format!("sent nothing for {} ms", timeout.as_millis()),
                        };
                        Some((Err(DataFusionError::External(Box::new(e))), None))
                    }
                    Ok(None) => None,
                    Ok(Some(Ok(b))) => Some((Ok(b), Some(s))),
                    Ok(Some(Err(e))) => {
                        Some((Err(DataFusionError::External(Box::new(flight_error(id, e, &down)))), None))
                    }
                }
            }
        });
        let adapter: SendableRecordBatchStream = Box::pin(RecordBatchStreamAdapter::new(schema, stream));
        Ok(Box::pin(TrackedStream::new(adapter, flight, ())))
    }
}
