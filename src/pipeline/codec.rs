//! The codec of fragments sent to other nodes (datafusion-proto's extension codec):
//! a [`ParamUdf`] call travels as the value bound to it for the running execution and
//! arrives as a constant; a replica scan ([`crate::storage::replica_scan`]) as its
//! table, shard and interval, its Parquet scan as its child; plans and other functions
//! as datafusion-proto encodes them by default.

use std::sync::Arc;

use datafusion::logical_expr::{Expr, ScalarUDF};
use datafusion::physical_plan::ExecutionPlan;

use crate::error::Error;
use crate::param_udf::ParamUdf;

const PARAM_TAG: &[u8] = b"TMP1";

/// The codec of fragments sent to other nodes: a [`ParamUdf`] call travels as the value
/// bound to it for the running execution and arrives as a constant; a replica scan
/// ([`crate::storage::replica_scan`]) as its table, shard and interval; plans and other
/// functions as datafusion-proto encodes them by default.
#[derive(Debug, Default)]
pub struct FragmentCodec;

impl datafusion_proto::physical_plan::PhysicalExtensionCodec for FragmentCodec {
    fn try_decode(
        &self,
        buf: &[u8],
        inputs: &[Arc<dyn ExecutionPlan>],
        ctx: &datafusion::execution::TaskContext,
        converter: &dyn datafusion_proto::physical_plan::PhysicalProtoConverterExtension,
    ) -> datafusion::common::Result<Arc<dyn ExecutionPlan>> {
        if let Some(replica) = crate::storage::replica_scan::ReplicaScanExec::decode(buf, inputs) {
            return replica;
        }
        datafusion_proto::physical_plan::DefaultPhysicalExtensionCodec {}.try_decode(buf, inputs, ctx, converter)
    }

    fn try_encode(
        &self,
        node: Arc<dyn ExecutionPlan>,
        buf: &mut Vec<u8>,
        converter: &dyn datafusion_proto::physical_plan::PhysicalProtoConverterExtension,
    ) -> datafusion::common::Result<()> {
        if let Some(replica) = node.downcast_ref::<crate::storage::replica_scan::ReplicaScanExec>() {
            return replica.encode(buf);
        }
        datafusion_proto::physical_plan::DefaultPhysicalExtensionCodec {}.try_encode(node, buf, converter)
    }

    fn try_decode_udf(&self, name: &str, buf: &[u8]) -> datafusion::common::Result<Arc<ScalarUDF>> {
        use datafusion_proto::bytes::Serializeable;
        let Some(value) = buf.strip_prefix(PARAM_TAG) else {
            return Err(Error::InvalidParameter(format!("unknown function {name} in a fragment")).into());
        };
        match Expr::from_bytes(value)? {
            Expr::Literal(v, _) => Ok(Arc::new(ScalarUDF::new_from_impl(ParamUdf::constant(name, v)))),
            other => Err(Error::InvalidParameter(format!("parameter {name} of a fragment is not a value: {other}")).into()),
        }
    }

    fn try_encode_udf(&self, node: &ScalarUDF, buf: &mut Vec<u8>) -> datafusion::common::Result<()> {
        use datafusion_proto::bytes::Serializeable;
        if let Some(p) = node.inner().downcast_ref::<ParamUdf>() {
            buf.extend_from_slice(PARAM_TAG);
            buf.extend_from_slice(&Expr::Literal(p.value()?, None).to_bytes()?);
        }
        Ok(())
    }
}
