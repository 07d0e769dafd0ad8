//! The crate's error type and the one table that maps every error to a SQLSTATE.
//!
//! Owns: classification of errors into user / system / bug and their SQLSTATE codes.
//! Must never: map an error with a catch-all arm. Every variant is named in
//! [`Error::sqlstate`], so adding a variant forces a decision about its code.

use datafusion::arrow::error::ArrowError;
use datafusion::error::DataFusionError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Who is at fault when an error happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The statement or its input is wrong; the user can fix it.
    User,
    /// The environment failed (disk, network, limits); retrying may help.
    System,
    /// Tidemark itself is wrong.
    Bug,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("syntax error: {0}")]
    Syntax(String),
    #[error("relation \"{0}\" does not exist")]
    UndefinedTable(String),
    #[error("column \"{0}\" does not exist")]
    UndefinedColumn(String),
    #[error("column \"{column}\" of relation \"{table}\" does not exist")]
    UndefinedColumnOf { table: String, column: String },
    #[error("{0}")]
    DatatypeMismatch(String),
    #[error("{0}")]
    InvalidText(String),
    #[error("null value in column \"{column}\" of relation \"{table}\" violates not-null constraint (row {row})")]
    NotNullViolation { table: String, column: String, row: u64 },
    #[error("{0}")]
    InvalidParameter(String),
    #[error("{0}")]
    BadCopyFormat(String),
    #[error("could not open file \"{0}\": no such file")]
    UndefinedFile(String),
    #[error("feature not supported: {0}")]
    NotSupported(String),
    #[error("{0}")]
    ReadOnly(String),
    #[error("canceling statement due to statement timeout")]
    StatementTimeout,
    #[error("{what} is full ({limit} {unit}); retry later")]
    QueueFull { what: &'static str, limit: u64, unit: &'static str },
    #[error("{0}")]
    ResourcesExhausted(String),
    /// A pipeline could not run a fragment (its node is down, unreachable or timed out).
    #[error("pipeline {pipeline} is unavailable: {reason}")]
    PipelineUnavailable { pipeline: String, reason: String },
    #[error("data corrupted: {0}")]
    Corrupt(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("object store error: {0}")]
    ObjectStore(#[from] object_store::Error),
    #[error("configuration error: {0}")]
    Config(String),
    #[error(transparent)]
    DataFusion(Box<DataFusionError>),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        // Unwrap our own errors that travelled through DataFusion (for example from a
        // TableProvider or a DataSink), so that their SQLSTATE survives.
        match e {
            DataFusionError::External(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(other) => Error::DataFusion(Box::new(DataFusionError::External(other))),
            },
            DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
                Error::from(*inner)
            }
            DataFusionError::Shared(inner) => match std::sync::Arc::try_unwrap(inner) {
                Ok(inner) => Error::from(inner),
                Err(shared) => Error::DataFusion(Box::new(DataFusionError::Shared(shared))),
            },
            other => Error::DataFusion(Box::new(other)),
        }
    }
}

impl From<ArrowError> for Error {
    fn from(e: ArrowError) -> Self {
        Error::from(DataFusionError::from(e))
    }
}

impl From<parquet::errors::ParquetError> for Error {
    fn from(e: parquet::errors::ParquetError) -> Self {
        Error::Corrupt(e.to_string())
    }
}

impl From<Error> for DataFusionError {
    fn from(e: Error) -> Self {
        DataFusionError::External(Box::new(e))
    }
}

impl Error {
    /// The one table from errors to SQLSTATE codes. No catch-all arm.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Error::Syntax(_) => "42601",
            Error::UndefinedTable(_) => "42P01",
            Error::UndefinedColumn(_) | Error::UndefinedColumnOf { .. } => "42703",
            Error::DatatypeMismatch(_) => "42804",
            Error::InvalidText(_) => "22P02",
            Error::NotNullViolation { .. } => "23502",
            Error::InvalidParameter(_) => "22023",
            Error::BadCopyFormat(_) => "22P04",
            Error::UndefinedFile(_) => "58P01",
            Error::NotSupported(_) => "0A000",
            Error::ReadOnly(_) => "25006",
            Error::StatementTimeout => "57014",
            Error::QueueFull { .. } => "53000",
            Error::ResourcesExhausted(_) => "53200",
            Error::PipelineUnavailable { .. } => "58000",
            Error::Corrupt(_) => "XX001",
            Error::Io(_) => "58030",
            Error::ObjectStore(e) => match e {
                object_store::Error::NotFound { .. } => "58P01",
                _ => "58030",
            },
            Error::Config(_) => "F0000",
            Error::DataFusion(e) => datafusion_sqlstate(e),
            Error::Internal(_) => "XX000",
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self.sqlstate() {
            "XX000" => ErrorClass::Bug,
            s if s.starts_with("58") || s.starts_with("53") || s.starts_with("57") || s == "XX001" => {
                ErrorClass::System
            }
            _ => ErrorClass::User,
        }
    }

    /// A short message for the client; DataFusion's own prefixes are kept because they
    /// say which phase failed.
    pub fn message(&self) -> String {
        match self {
            Error::DataFusion(e) => datafusion_message(e),
            other => other.to_string(),
        }
    }
}

fn datafusion_message(e: &DataFusionError) -> String {
    match e {
        DataFusionError::SchemaError(s, _) => match s.as_ref() {
            datafusion::common::SchemaError::FieldNotFound { field, .. } => {
                format!("column \"{}\" does not exist", field.name)
            }
            other => other.to_string(),
        },
        other => other.to_string(),
    }
}

/// SQLSTATE for an error raised inside DataFusion. DataFusion reports planning errors as
/// strings, so the planning arm looks at the message; anything it does not recognise
/// is a plain syntax-or-access rule violation (42000 family), never a silent success.
fn datafusion_sqlstate(e: &DataFusionError) -> &'static str {
    match e {
        DataFusionError::SQL(_, _) => "42601",
        DataFusionError::NotImplemented(_) => "0A000",
        DataFusionError::SchemaError(s, _) => match s.as_ref() {
            datafusion::common::SchemaError::FieldNotFound { .. } => "42703",
            datafusion::common::SchemaError::AmbiguousReference { .. } => "42702",
            datafusion::common::SchemaError::DuplicateQualifiedField { .. }
            | datafusion::common::SchemaError::DuplicateUnqualifiedField { .. } => "42701",
        },
        DataFusionError::Plan(msg) => plan_sqlstate(msg),
        DataFusionError::ArrowError(a, _) => arrow_sqlstate(a),
        DataFusionError::ParquetError(_) => "XX001",
        DataFusionError::ObjectStore(_) => "58030",
        DataFusionError::IoError(_) => "58030",
        DataFusionError::Configuration(_) => "22023",
        DataFusionError::Execution(msg) => execution_sqlstate(msg),
        DataFusionError::ExecutionJoin(_) => "XX000",
        DataFusionError::ResourcesExhausted(_) => "53200",
        DataFusionError::External(_) => "XX000",
        DataFusionError::Context(_, inner) => datafusion_sqlstate(inner),
        DataFusionError::Diagnostic(_, inner) => datafusion_sqlstate(inner),
        DataFusionError::Collection(errs) => errs.first().map(datafusion_sqlstate).unwrap_or("XX000"),
        DataFusionError::Shared(inner) => datafusion_sqlstate(inner),
        DataFusionError::Substrait(_) => "XX000",
        DataFusionError::Ffi(_) => "XX000",
        DataFusionError::Internal(_) => "XX000",
    }
}

fn arrow_sqlstate(e: &ArrowError) -> &'static str {
    match e {
        ArrowError::CastError(_) | ArrowError::ParseError(_) => "22P02",
        ArrowError::DivideByZero => "22012",
        ArrowError::ArithmeticOverflow(_) => "22003",
        ArrowError::NotYetImplemented(_) => "0A000",
        ArrowError::InvalidArgumentError(_) => "22023",
        ArrowError::MemoryError(_) => "53200",
        ArrowError::CsvError(_) | ArrowError::JsonError(_) | ArrowError::AvroError(_) => "22P04",
        ArrowError::IoError(_, _) => "58030",
        ArrowError::ParquetError(_) | ArrowError::IpcError(_) => "XX001",
        ArrowError::SchemaError(_) => "42804",
        ArrowError::ComputeError(_) => "22000",
        ArrowError::ExternalError(_) => "XX000",
        ArrowError::CDataInterface(_) => "XX000",
        ArrowError::DictionaryKeyOverflowError
        | ArrowError::RunEndIndexOverflowError
        | ArrowError::OffsetOverflowError(_) => "54000",
    }
}

fn plan_sqlstate(msg: &str) -> &'static str {
    let m = msg.to_ascii_lowercase();
    if m.contains("table") && m.contains("not found") {
        "42P01"
    } else if m.contains("no field named") || m.contains("column") && m.contains("not found") {
        "42703"
    } else if m.contains("coerce")
        || m.contains("cannot infer common")
        || m.contains("type mismatch")
        || m.contains("does not support")
        || m.contains("mismatch")
    {
        "42804"
    } else if m.contains("function") && (m.contains("invalid") || m.contains("not found")) {
        "42883"
    } else if m.contains("placeholder") || m.contains("parameter") {
        "42P02"
    } else {
        "42000"
    }
}

fn execution_sqlstate(msg: &str) -> &'static str {
    let m = msg.to_ascii_lowercase();
    if m.contains("divide by zero") || m.contains("division by zero") {
        "22012"
    } else if m.contains("overflow") {
        "22003"
    } else if m.contains("cast") || m.contains("parse") {
        "22P02"
    } else if m.contains("not nullable") || m.contains("non-nullable") {
        "23502"
    } else {
        "XX000"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_errors_survive_a_trip_through_datafusion() {
        let ours = Error::NotNullViolation { table: "usage".into(), column: "entity_id".into(), row: 3 };
        let df: DataFusionError = ours.into();
        let back = Error::from(DataFusionError::Context("insert".into(), Box::new(df)));
        assert_eq!(back.sqlstate(), "23502");
        assert!(back.message().contains("entity_id"));
        assert!(back.message().contains("row 3"));
    }

    #[test]
    fn datafusion_classes() {
        assert_eq!(Error::from(DataFusionError::Plan("table 'x' not found".into())).sqlstate(), "42P01");
        assert_eq!(Error::from(DataFusionError::NotImplemented("x".into())).sqlstate(), "0A000");
        assert_eq!(Error::from(ArrowError::CastError("bad".into())).sqlstate(), "22P02");
        assert_eq!(Error::Internal("x".into()).class(), ErrorClass::Bug);
        assert_eq!(Error::StatementTimeout.class(), ErrorClass::System);
        assert_eq!(Error::Syntax("x".into()).class(), ErrorClass::User);
    }
}
