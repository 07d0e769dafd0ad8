//! Built-in functions where PostgreSQL's answer differs from DataFusion's and a client
//! would notice: `chr(0)` is an error (54000, "null character not permitted"), since a
//! text value cannot hold a NUL byte in PostgreSQL (DataFusion returns one, which
//! clients then cut or choke on).
//!
//! Owns: the wrappers, registered over DataFusion's functions of the same name. Must
//! never: change an answer PostgreSQL would give.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::common::ScalarValue;
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature};

use crate::error::Error;

/// `chr(n)` refusing 0.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Chr {
    inner: Arc<ScalarUDF>,
}

impl Chr {
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(Chr { inner: datafusion::functions::string::chr() })
    }
}

fn null_character() -> datafusion::error::DataFusionError {
    Error::ProgramLimit("null character not permitted".into()).into()
}

impl ScalarUDFImpl for Chr {
    fn name(&self) -> &str {
        "chr"
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn return_type(&self, args: &[DataType]) -> datafusion::common::Result<DataType> {
        self.inner.return_type(args)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> datafusion::common::Result<ColumnarValue> {
        match args.args.first() {
            Some(ColumnarValue::Scalar(ScalarValue::Int64(Some(0)))) => return Err(null_character()),
            Some(ColumnarValue::Array(a)) if a.data_type() == &DataType::Int64 => {
                let codes = a.as_primitive::<Int64Type>();
                if codes.iter().any(|c| c == Some(0)) {
                    return Err(null_character());
                }
            }
            _ => {}
        }
        self.inner.invoke_with_args(args)
    }
}
