//! A Bind's parameter values, decoded for the types the plan infers. Date/time values
//! sent as text — as pgbench (`-M prepared`), JDBC and most drivers send them, often
//! with no type — are read as PostgreSQL reads them ([`crate::pg_datetime`]: a bare
//! date, a `T`, fractions, zones, `infinity`; 22007 / 22008 otherwise), and so are
//! numbers for `numeric`, integer and float parameters ([`crate::pg_numeric`]:
//! spaces, exponents, rounding to the column's scale, `Infinity`; 22P02 / 22003);
//! every other value by arrow-pg, whose text readers take one timestamp layout and
//! decimals of at most 28 digits without an exponent.
//!
//! Owns: which parameters are read here, and the scalar each becomes.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::{ParamValues, ScalarValue};
use pgwire::api::portal::Portal;
use pgwire::api::Type;
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};

use crate::pg_datetime::{parse_date, parse_timestamp, DateTimeError, MINUS_INFINITY, PLUS_INFINITY};
use crate::pg_numeric::{int_of_width, parse_decimal, parse_float, parse_int, NumericError};

/// The parameters of `portal`, for the plan's `types` (one per parameter, if known).
pub fn decode<S: Clone>(portal: &Portal<S>, types: &[Option<&DataType>]) -> PgWireResult<ParamValues> {
    let mut ours = Vec::new();
    for i in 0..portal.parameter_len() {
        if portal.parameter_format.is_binary(i) {
            continue;
        }
        let Some(Some(bytes)) = portal.parameters.get(i) else { continue };
        let hint = portal.statement.parameter_types.get(i).cloned().flatten();
        let inferred = types.get(i).copied().flatten();
        let v = match text_datetime(bytes, hint.as_ref(), inferred)? {
            Some(v) => Some(v),
            None => text_number(bytes, hint.as_ref(), inferred)?,
        };
        if let Some(v) = v {
            ours.push((i, v));
        }
    }
    if ours.is_empty() {
        return arrow_pg::datatypes::df::deserialize_parameters(portal, types);
    }
    // arrow-pg reads the others; ours go to it as NULLs, then are put in place.
    let mut parameters = portal.parameters.clone();
    for (i, _) in &ours {
        parameters[*i] = None;
    }
    let mut rest = Portal::new_cursor(portal.name.clone(), Arc::clone(&portal.statement));
    rest.parameter_format = portal.parameter_format.clone();
    rest.parameters = parameters;
    let mut params = arrow_pg::datatypes::df::deserialize_parameters(&rest, types)?;
    if let ParamValues::List(list) = &mut params {
        for (i, v) in ours {
            list[i] = v.into();
        }
    }
    Ok(params)
}

fn user_error(code: &str, message: String) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new("ERROR".to_owned(), code.to_owned(), message)))
}

/// Microseconds (or an infinity) in `unit`.
fn in_unit(us: i64, unit: &TimeUnit) -> Result<i64, DateTimeError> {
    if us == PLUS_INFINITY || us == MINUS_INFINITY {
        return Ok(us);
    }
    match unit {
        TimeUnit::Second => Ok(us.div_euclid(1_000_000)),
        TimeUnit::Millisecond => Ok(us.div_euclid(1_000)),
        TimeUnit::Microsecond => Ok(us),
        TimeUnit::Nanosecond => us.checked_mul(1_000).ok_or(DateTimeError::Range),
    }
}

fn timestamp(v: i64, unit: &TimeUnit, tz: Option<Arc<str>>) -> ScalarValue {
    match unit {
        TimeUnit::Second => ScalarValue::TimestampSecond(Some(v), tz),
        TimeUnit::Millisecond => ScalarValue::TimestampMillisecond(Some(v), tz),
        TimeUnit::Microsecond => ScalarValue::TimestampMicrosecond(Some(v), tz),
        TimeUnit::Nanosecond => ScalarValue::TimestampNanosecond(Some(v), tz),
    }
}

/// A text value read as a date/time: when the client typed it `timestamp`,
/// `timestamptz` or `date`, or left it untyped and the plan wants one. `None`: not a
/// date/time parameter (arrow-pg reads it).
fn text_datetime(bytes: &[u8], hint: Option<&Type>, inferred: Option<&DataType>) -> PgWireResult<Option<ScalarValue>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Kind {
        Timestamp,
        TimestampTz,
        Date,
    }
    let kind = match (hint, inferred) {
        (Some(t), _) if *t == Type::TIMESTAMP => Kind::Timestamp,
        (Some(t), _) if *t == Type::TIMESTAMPTZ => Kind::TimestampTz,
        (Some(t), _) if *t == Type::DATE => Kind::Date,
        (Some(t), _) if *t != Type::UNKNOWN => return Ok(None),
        (_, Some(DataType::Timestamp(_, None))) => Kind::Timestamp,
        (_, Some(DataType::Timestamp(_, Some(_)))) => Kind::TimestampTz,
        (_, Some(DataType::Date32 | DataType::Date64)) => Kind::Date,
        _ => return Ok(None),
    };
    let text = String::from_utf8_lossy(bytes);
    let type_name = match kind {
        Kind::Timestamp => "timestamp",
        Kind::TimestampTz => "timestamp with time zone",
        Kind::Date => "date",
    };
    let fail = |e: DateTimeError| user_error(e.sqlstate(), e.message(type_name, &text));
    // Read as the client's type, then made the plan's.
    let us = match kind {
        Kind::Date => {
            let days = parse_date(&text).map_err(fail)?;
            match days {
                i32::MAX => PLUS_INFINITY,
                i32::MIN => MINUS_INFINITY,
                d => i64::from(d) * 86_400_000_000,
            }
        }
        k => parse_timestamp(&text, k == Kind::TimestampTz).map_err(fail)?,
    };
    let days = || match us {
        PLUS_INFINITY => i32::MAX,
        MINUS_INFINITY => i32::MIN,
        us => i32::try_from(us.div_euclid(86_400_000_000)).unwrap_or(if us > 0 { i32::MAX } else { i32::MIN }),
    };
    Ok(Some(match inferred {
        Some(DataType::Timestamp(unit, tz)) => timestamp(in_unit(us, unit).map_err(fail)?, unit, tz.clone()),
        Some(DataType::Date32) => ScalarValue::Date32(Some(days())),
        Some(DataType::Date64) => ScalarValue::Date64(Some(i64::from(days()) * 86_400_000)),
        _ if kind == Kind::Date => ScalarValue::Date32(Some(days())),
        _ if kind == Kind::TimestampTz => ScalarValue::TimestampMicrosecond(Some(us), Some("+00:00".into())),
        _ => ScalarValue::TimestampMicrosecond(Some(us), None),
    }))
}

/// A text value read as a number: when the plan wants a decimal, an integer or a
/// float and the client typed it as a number of that family or left it untyped. The
/// client's integer or float type reads it (as PostgreSQL would), then it must fit the
/// plan's. `None`: not such a parameter (arrow-pg reads it).
fn text_number(bytes: &[u8], hint: Option<&Type>, inferred: Option<&DataType>) -> PgWireResult<Option<ScalarValue>> {
    let untyped = hint.is_none_or(|t| *t == Type::UNKNOWN);
    let int_hint = hint.and_then(|t| match *t {
        Type::INT8 => Some(64),
        Type::INT4 => Some(32),
        Type::INT2 => Some(16),
        _ => None,
    });
    let float_hint = hint.and_then(|t| match *t {
        Type::FLOAT8 => Some(false),
        Type::FLOAT4 => Some(true),
        _ => None,
    });
    let text = String::from_utf8_lossy(bytes);
    let fail = |e: NumericError, type_name: &str, p: u8, s: i8| user_error(e.sqlstate(), e.message(type_name, &text, p, s));
    let int_name = |bits: u32| match bits {
        64 => "bigint",
        32 => "integer",
        _ => "smallint",
    };
    Ok(Some(match inferred {
        Some(DataType::Decimal128(p, s)) if untyped || hint == Some(&Type::NUMERIC) => {
            ScalarValue::Decimal128(Some(parse_decimal(&text, *p, *s).map_err(|e| fail(e, "numeric", *p, *s))?), *p, *s)
        }
        Some(t @ (DataType::Int64 | DataType::Int32 | DataType::Int16)) if untyped || int_hint.is_some() => {
            let want = match t {
                DataType::Int64 => 64,
                DataType::Int32 => 32,
                _ => 16,
            };
            let read = int_hint.unwrap_or(want);
            let v = parse_int(&text, read).map_err(|e| fail(e, int_name(read), 0, 0))?;
            // Read as the client's type, then it must fit the plan's.
            let v = int_of_width(v, want).map_err(|e| fail(e, int_name(want), 0, 0))?;
            match want {
                64 => ScalarValue::Int64(Some(v)),
                32 => ScalarValue::Int32(Some(v as i32)),
                _ => ScalarValue::Int16(Some(v as i16)),
            }
        }
        Some(t @ (DataType::Float64 | DataType::Float32)) if untyped || float_hint.is_some() => {
            let single = float_hint.unwrap_or(*t == DataType::Float32);
            let name = if single { "real" } else { "double precision" };
            let v = parse_float(&text, single).map_err(|e| fail(e, name, 0, 0))?;
            match t {
                DataType::Float64 => ScalarValue::Float64(Some(v)),
                _ => ScalarValue::Float32(Some(v as f32)),
            }
        }
        _ => return Ok(None),
    }))
}
