//! Numeric text as PostgreSQL reads it: `numeric`, `bigint` / `integer` / `smallint`
//! and `double precision` / `real` input, for text-format parameters (drivers and
//! pgbench send numbers as text, often untyped).
//!
//! Owns: the rules of PostgreSQL 15's `numeric_in`, `int8in`/`int4in`/`int2in` and
//! `float8in`/`float4in` that clients meet: surrounding spaces, a sign, `.5` and `5.`,
//! exponents (`1.5e3`, numeric and floats only), `NaN` / `Infinity` / `inf`, a value
//! rounded half away from zero to the column's scale, and the SQLSTATEs: 22P02 for
//! text that is not a number of that type, 22003 for one out of its range. Pure.
//!
//! A `numeric` value is rounded to the scale the plan gives the parameter (that of the
//! column it is compared with or stored into), as PostgreSQL rounds a value assigned to
//! `numeric(p, s)`. PostgreSQL compares an untyped parameter as `numeric` without a
//! scale, so `quantity = '1.0000005'` matches no row of a `numeric(38, 6)` column there
//! and the rows of 1.000001 here. `NaN`, which PostgreSQL's numeric holds, cannot be
//! held by a decimal column's type here and is refused (0A000); infinities are out of
//! range of any `numeric(p, s)` (22003), as there.

/// Why a text is not a number of the type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NumericError {
    /// 22P02: not a number of that type.
    Syntax,
    /// 22003: out of the type's range (or, for `numeric(p, s)`, its precision).
    Range,
    /// 0A000: a value the column's type cannot hold here (`NaN`, infinities).
    Special,
}

impl NumericError {
    pub fn sqlstate(self) -> &'static str {
        match self {
            NumericError::Syntax => "22P02",
            NumericError::Range => "22003",
            NumericError::Special => "0A000",
        }
    }

    /// PostgreSQL's message for `text` read as `type_name`.
    pub fn message(self, type_name: &str, text: &str, precision: u8, scale: i8) -> String {
        match (self, type_name) {
            (NumericError::Syntax, _) => format!("invalid input syntax for type {type_name}: \"{text}\""),
            (NumericError::Range, "numeric") => format!(
                "numeric field overflow: a field with precision {precision}, scale {scale} must round to an absolute value less than 10^{}",
                i32::from(precision) - i32::from(scale)
            ),
            (NumericError::Range, "double precision" | "real") => format!("\"{text}\" is out of range for type {type_name}"),
            (NumericError::Range, _) => format!("value \"{text}\" is out of range for type {type_name}"),
            (NumericError::Special, _) => format!("\"{text}\" cannot be held by a numeric({precision}, {scale}) value here"),
        }
    }
}

/// An exponent past any digit a value of precision 38 can hold.
const EXPONENT_MAX: i64 = 1_000_000;

/// Reads `text` as `numeric(precision, scale)`: the unscaled value (`value / 10^scale`),
/// rounded half away from zero to `scale` digits. `precision` at most 38.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Result<i128, NumericError> {
    let t = text.trim_matches(is_space);
    let lower = t.to_ascii_lowercase();
    match lower.as_str() {
        "nan" => return Err(NumericError::Special),
        // PostgreSQL reads them, and no numeric(p, s) holds them.
        "infinity" | "+infinity" | "-infinity" | "inf" | "+inf" | "-inf" => return Err(NumericError::Range),
        _ => {}
    }
    let (negative, rest) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => {
            let e = &rest[i + 1..];
            let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return Err(NumericError::Syntax);
            }
            // Saturated: a larger exponent overflows any precision, a smaller one
            // rounds to zero, as in PostgreSQL.
            let exp: i64 = if digits.len() > 6 { EXPONENT_MAX } else { digits.parse().map_err(|_| NumericError::Syntax)? };
            let exp = if e.starts_with('-') { -exp } else { exp };
            (&rest[..i], exp)
        }
        None => (rest, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int_part.is_empty() && frac_part.is_empty()) || !all_digits(int_part) || !all_digits(frac_part) {
        return Err(NumericError::Syntax);
    }
    // The digits, and where the point falls among them once the exponent is applied.
    let digits: Vec<u8> = int_part.bytes().chain(frac_part.bytes()).map(|b| b - b'0').collect();
    let point = int_part.len() as i64 + exponent;
    // The value scaled by 10^scale is the digits up to position point + scale; the
    // next digit rounds.
    let keep = point + i64::from(scale);
    let mut unscaled: i128 = 0;
    let limit = 10i128.pow(u32::from(precision.min(38)));
    for k in 0..keep.max(0) {
        let d = digits.get(k as usize).copied().unwrap_or(0);
        if unscaled == 0 && d == 0 {
            continue;
        }
        unscaled = unscaled.checked_mul(10).and_then(|v| v.checked_add(i128::from(d))).ok_or(NumericError::Range)?;
        if unscaled >= limit {
            return Err(NumericError::Range);
        }
    }
    let next = if keep >= 0 { digits.get(keep as usize).copied().unwrap_or(0) } else { 0 };
    if next >= 5 {
        unscaled += 1;
        if unscaled >= limit {
            return Err(NumericError::Range);
        }
    }
    Ok(if negative { -unscaled } else { unscaled })
}

/// Reads `text` as an integer of `bits` (16, 32 or 64) bits.
pub fn parse_int(text: &str, bits: u32) -> Result<i64, NumericError> {
    let t = text.trim_matches(is_space);
    let (negative, digits) = match t.as_bytes().first() {
        Some(b'-') => (true, &t[1..]),
        Some(b'+') => (false, &t[1..]),
        _ => (false, t),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(NumericError::Syntax);
    }
    let (lo, hi) = (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1);
    let mut v: i128 = 0;
    for b in digits.bytes() {
        v = v * 10 + i128::from(b - b'0');
        if v > hi + 1 {
            return Err(NumericError::Range);
        }
    }
    let v = if negative { -v } else { v };
    if v < lo || v > hi {
        return Err(NumericError::Range);
    }
    Ok(v as i64)
}

/// `v` if it is an integer of `bits` (16, 32 or 64) bits.
pub fn int_of_width(v: i64, bits: u32) -> Result<i64, NumericError> {
    let (lo, hi) = (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1);
    if (lo..=hi).contains(&i128::from(v)) { Ok(v) } else { Err(NumericError::Range) }
}

/// Reads `text` as a `double precision` (or, with `single`, a `real`).
pub fn parse_float(text: &str, single: bool) -> Result<f64, NumericError> {
    let t = text.trim_matches(is_space);
    match t.to_ascii_lowercase().as_str() {
        "nan" => return Ok(f64::NAN),
        "infinity" | "+infinity" | "inf" | "+inf" => return Ok(f64::INFINITY),
        "-infinity" | "-inf" => return Ok(f64::NEG_INFINITY),
        _ => {}
    }
    // Rust's reader takes spellings of infinity and NaN that PostgreSQL does not
    // (`+nan`, `infinity` with other signs were handled above): only numbers here.
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E')) {
        return Err(NumericError::Syntax);
    }
    let v: f64 = t.parse().map_err(|_| NumericError::Syntax)?;
    let out_of_range = |v: f64, zero: bool| v.is_infinite() || (zero && v == 0.0);
    // A nonzero mantissa that reads as 0 underflowed; PostgreSQL refuses it.
    let nonzero = t.split(['e', 'E']).next().is_some_and(|m| m.bytes().any(|b| (b'1'..=b'9').contains(&b)));
    if single {
        let f = v as f32;
        if out_of_range(f64::from(f), nonzero) {
            return Err(NumericError::Range);
        }
        return Ok(f64::from(f));
    }
    if out_of_range(v, nonzero) {
        return Err(NumericError::Range);
    }
    Ok(v)
}

/// PostgreSQL's `isspace` in these readers.
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures() {
        for d in crate::fixture::directives("pg_numeric.txt") {
            let kind = d.words[0].as_str();
            let text = d.text.split_once('\'').and_then(|(_, r)| r.rsplit_once('\'')).map(|(t, _)| t).expect("quoted text");
            let got = match kind {
                "numeric" => {
                    let (p, s): (u8, i8) = (d.words[1].parse().unwrap(), d.words[2].parse().unwrap());
                    parse_decimal(text, p, s).map(|v| v.to_string())
                }
                "bigint" => parse_int(text, 64).map(|v| v.to_string()),
                "integer" => parse_int(text, 32).map(|v| v.to_string()),
                "smallint" => parse_int(text, 16).map(|v| v.to_string()),
                "double" => parse_float(text, false).map(|v| format!("{v:?}")),
                "real" => parse_float(text, true).map(|v| format!("{v:?}")),
                other => panic!("line {}: unknown kind {other}", d.line),
            };
            let got = got.unwrap_or_else(|e| e.sqlstate().to_string());
            assert_eq!(Some(got), d.want, "line {}: {}", d.line, d.text);
        }
    }
}
