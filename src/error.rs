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
    #[error("canceling statement due to user request")]
    Cancelled,
    #[error("statement too complex: {0}")]
    TooComplex(String),
    #[error("{0}")]
    ProgramLimit(String),
    #[error("{0}")]
    TooManyObjects(String),
    #[error("target lists can have at most {max} entries, this one has {got}")]
    TooManyColumns { max: usize, got: usize },
    #[error("invalid byte sequence for encoding \"UTF8\"")]
    InvalidEncoding,
    #[error("{0}")]
    ProtocolViolation(String),
    #[error("{0}")]
    InsufficientPrivilege(String),
    #[error("file \"{0}\" already exists")]
    DuplicateFile(String),
    #[error("{what} is full ({limit} {unit}); retry later")]
    QueueFull { what: &'static str, limit: u64, unit: &'static str },
    #[error("{0}")]
    ResourcesExhausted(String),
    /// A concurrent statement committed something this one depended on; retrying is safe.
    #[error("could not serialize access due to concurrent update: {0}")]
    SerializationFailure(String),
    /// An error whose SQLSTATE is known but which arrived second-hand: from another
    /// node, or shared between several streams inside DataFusion.
    #[error("{message}")]
    Relayed { sqlstate: &'static str, message: String },
    /// A pipeline could not run a fragment (its node is down, unreachable or timed out).
    #[error("pipeline {pipeline} is unavailable: {reason}")]
    PipelineUnavailable { pipeline: String, reason: String },
    /// A shard's Raft group could not take a write (no leader within the wait, or the
    /// group stopped). Parts of the statement for other shards may be stored: each
    /// shard's part is all-or-nothing, and a retry skips what was stored.
    #[error("shard {shard} cannot take writes now: {reason}")]
    ShardUnavailable { shard: u32, reason: String },
    /// Read-your-writes: this node's replica of a shard had not applied the session's
    /// writes within `read_wait_ms_max`. Nothing was read; a retry may succeed.
    #[error("shard {shard} is behind the session's writes here: {reason}")]
    ReplicaBehind { shard: u32, reason: String },
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

/// A SQLSTATE received from another node, as a `&'static str`: each distinct
/// well-formed code is interned once (at most a few hundred exist); anything else is
/// reported as XX000.
pub fn intern_sqlstate(code: &str) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static CODES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    const CODES_MAX: usize = 1024;
    if code.len() != 5 || !code.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()) {
        return "XX000";
    }
    let mut set = CODES.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = set.get(code) {
        return c;
    }
    if set.len() >= CODES_MAX {
        return "XX000";
    }
    let leaked: &'static str = Box::leak(code.to_string().into_boxed_str());
    set.insert(leaked);
    leaked
}

impl From<DataFusionError> for Error {
    fn from(e: DataFusionError) -> Self {
        // Unwrap our own errors that travelled through DataFusion (for example from a
        // TableProvider or a DataSink), so that their SQLSTATE survives.
        match e {
            DataFusionError::External(inner) => match inner.downcast::<Error>() {
                Ok(ours) => *ours,
                Err(other) => match find_ours(other.as_ref()) {
                    Some(ours) => Error::Relayed { sqlstate: ours.sqlstate(), message: ours.message() },
                    None => Error::DataFusion(Box::new(DataFusionError::External(other))),
                },
            },
            DataFusionError::Context(_, inner) | DataFusionError::Diagnostic(_, inner) => {
                Error::from(*inner)
            }
            DataFusionError::Shared(inner) => match std::sync::Arc::try_unwrap(inner) {
                Ok(inner) => Error::from(inner),
                Err(shared) => match find_ours(shared.as_ref()) {
                    Some(ours) => Error::Relayed { sqlstate: ours.sqlstate(), message: ours.message() },
                    None => Error::DataFusion(Box::new(DataFusionError::Shared(shared))),
                },
            },
            other => match find_ours(&other) {
                Some(ours) => Error::Relayed { sqlstate: ours.sqlstate(), message: ours.message() },
                None => Error::DataFusion(Box::new(other)),
            },
        }
    }
}

/// Our own error somewhere inside `e` (behind External, Shared, Context or Arrow's
/// ExternalError wrappers), found by reference.
pub fn find_ours<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(e);
    for _ in 0..32 {
        let x = cur?;
        if let Some(ours) = x.downcast_ref::<Error>() {
            return Some(ours);
        }
        cur = match x.downcast_ref::<DataFusionError>() {
            Some(DataFusionError::External(inner)) => Some(inner.as_ref()),
            Some(DataFusionError::Shared(inner)) => Some(inner.as_ref()),
            Some(DataFusionError::Context(_, inner)) | Some(DataFusionError::Diagnostic(_, inner)) => Some(inner.as_ref()),
            Some(DataFusionError::ArrowError(inner, _)) => Some(inner.as_ref()),
            _ => match x.downcast_ref::<ArrowError>() {
                Some(ArrowError::ExternalError(inner)) => Some(inner.as_ref()),
                _ => x.source(),
            },
        };
    }
    None
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
            Error::StatementTimeout | Error::Cancelled => "57014",
            Error::TooComplex(_) => "54001",
            Error::ProgramLimit(_) => "54000",
            Error::TooManyObjects(_) => "53400",
            Error::TooManyColumns { .. } => "54011",
            Error::InvalidEncoding => "22021",
            Error::ProtocolViolation(_) => "08P01",
            Error::InsufficientPrivilege(_) => "42501",
            Error::DuplicateFile(_) => "58P02",
            Error::QueueFull { .. } => "53000",
            Error::ResourcesExhausted(_) => "53200",
            Error::SerializationFailure(_) => "40001",
            Error::PipelineUnavailable { .. } => "58000",
            Error::ShardUnavailable { .. } => "57P03",
            Error::ReplicaBehind { .. } => "57P03",
            Error::Relayed { sqlstate, .. } => sqlstate,
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
    #[test]
    fn our_sqlstate_survives_shared_and_nested_wrappers() {
        use std::sync::Arc;
        let ours = || Error::PipelineUnavailable { pipeline: "n2.p0".into(), reason: "gone".into() };
        let shared = DataFusionError::Shared(Arc::new(DataFusionError::External(Box::new(ours()))));
        let _keep = match &shared {
            DataFusionError::Shared(a) => Arc::clone(a),
            _ => unreachable!(),
        };
        assert_eq!(Error::from(shared).sqlstate(), "58000");
        let nested = DataFusionError::ArrowError(
            Box::new(ArrowError::ExternalError(Box::new(DataFusionError::External(Box::new(ours()))))),
            None,
        );
        assert_eq!(Error::from(nested).sqlstate(), "58000");
        let twice = DataFusionError::External(Box::new(DataFusionError::External(Box::new(ours()))));
        assert_eq!(Error::from(twice).sqlstate(), "58000");
    }

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
