//! `$n` of a reused physical plan: a function whose value is the one bound to the
//! running execution (set per Execute in its plan's [`ParamSlot`]).
//!
//! Owns: the parameter function and its value slot. Below storage (whose deferred
//! scans fold parameters into literals per execution), the pipeline's fragment codec
//! (which sends a parameter as its value) and the planner (which puts them in plans).

use std::sync::Arc;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility};

use crate::error::Error;

/// The values bound to the execution of a reused plan that is running now.
#[derive(Debug, Default)]
pub struct ParamSlot(parking_lot::RwLock<Vec<ScalarValue>>);

impl ParamSlot {
    pub(crate) fn set(&self, values: Vec<ScalarValue>) {
        *self.0.write() = values;
    }

    fn get(&self, index: usize) -> datafusion::common::Result<ScalarValue> {
        self.0.read().get(index).cloned().ok_or_else(|| {
            datafusion::error::DataFusionError::from(Error::Internal(format!("no value bound for ${}", index + 1)))
        })
    }
}

/// `$n` in a reused physical plan: a constant for one execution, read from the plan's
/// [`ParamSlot`]. Stable, not volatile: it may be pushed into scans like a literal.
#[derive(Debug)]
pub struct ParamUdf {
    index: usize,
    name: String,
    data_type: DataType,
    values: Arc<ParamSlot>,
    signature: Signature,
}

impl ParamUdf {
    pub(crate) fn new(index: usize, data_type: DataType, values: Arc<ParamSlot>) -> ParamUdf {
        ParamUdf { index, name: format!("${}", index + 1), data_type, values, signature: Signature::nullary(Volatility::Stable) }
    }

    /// A parameter whose value is fixed: how a fragment's `$n` arrives at another node.
    pub fn constant(name: &str, value: ScalarValue) -> ParamUdf {
        let data_type = value.data_type();
        let values = Arc::new(ParamSlot::default());
        values.set(vec![value]);
        ParamUdf { index: 0, name: name.to_string(), data_type, values, signature: Signature::nullary(Volatility::Stable) }
    }

    /// The value bound to this parameter for the running execution.
    pub fn value(&self) -> datafusion::common::Result<ScalarValue> {
        self.values.get(self.index)
    }
}

impl PartialEq for ParamUdf {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index && self.data_type == other.data_type && Arc::ptr_eq(&self.values, &other.values)
    }
}
impl Eq for ParamUdf {}
impl std::hash::Hash for ParamUdf {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.index.hash(state);
        self.data_type.hash(state);
    }
}

impl ScalarUDFImpl for ParamUdf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::common::Result<DataType> {
        Ok(self.data_type.clone())
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value()?))
    }
}
