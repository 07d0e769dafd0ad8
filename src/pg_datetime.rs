//! Date and time input as PostgreSQL reads it, for parameters sent as text (pgbench's
//! `-M prepared`, JDBC and other drivers send `$n` as text, often with no type: the
//! value is then read as the type the plan infers for it).
//!
//! Accepts what PostgreSQL's ISO input accepts: `2024-06-14`, `2024-06-14 10:00`,
//! `2024-06-14T10:00:00.123456`, seconds with up to 9 fractional digits (rounded to
//! microseconds), a zone `Z`, `UTC`, `GMT`, `+02`, `+0200`, `+02:00`, `-05:30:15`,
//! `infinity`, `+infinity`, `-infinity` and `epoch`, with surrounding spaces and in any
//! letter case. A zone is applied for `timestamp with time zone` and ignored for
//! `timestamp` (as PostgreSQL does); a time of day is ignored for `date`. Errors are
//! PostgreSQL's: 22007 (invalid_datetime_format) for text that is not a date/time,
//! 22008 (datetime_field_overflow) for a field out of range (month 13, 25:00). The
//! session's time zone is UTC.
//!
//! Pure: no IO. Owns: this grammar. Must never: accept text PostgreSQL refuses as a
//! different instant than PostgreSQL would read.

use chrono::NaiveDate;

/// `timestamp 'infinity'` and `'-infinity'` (PostgreSQL's own representation).
pub const PLUS_INFINITY: i64 = i64::MAX;
pub const MINUS_INFINITY: i64 = i64::MIN;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateTimeError {
    /// 22007: not a date/time at all.
    Syntax,
    /// 22008: a field is out of range.
    Range,
}

impl DateTimeError {
    pub fn sqlstate(self) -> &'static str {
        match self {
            DateTimeError::Syntax => "22007",
            DateTimeError::Range => "22008",
        }
    }

    /// PostgreSQL's message for `text` read as `type_name`.
    pub fn message(self, type_name: &str, text: &str) -> String {
        match self {
            DateTimeError::Syntax => format!("invalid input syntax for type {type_name}: \"{text}\""),
            DateTimeError::Range => format!("date/time field value out of range: \"{text}\""),
        }
    }
}

struct Fields {
    date: NaiveDate,
    /// Microseconds since midnight.
    time_us: i64,
    /// Seconds east of UTC, if a zone was given.
    offset_s: Option<i64>,
}

/// Reads `text` as a timestamp: microseconds since 1970-01-01 00:00 (UTC when
/// `with_zone`; the zone, if any, is applied then, and ignored otherwise), or
/// [`PLUS_INFINITY`] / [`MINUS_INFINITY`].
pub fn parse_timestamp(text: &str, with_zone: bool) -> Result<i64, DateTimeError> {
    let t = text.trim();
    if let Some(v) = special(t) {
        return Ok(v);
    }
    let f = fields(t)?;
    let days = f.date.signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days();
    let mut us = days.checked_mul(86_400_000_000).and_then(|d| d.checked_add(f.time_us)).ok_or(DateTimeError::Range)?;
    if with_zone {
        us = us.checked_sub(f.offset_s.unwrap_or(0) * 1_000_000).ok_or(DateTimeError::Range)?;
    }
    Ok(us)
}

/// Reads `text` as a date: days since 1970-01-01 (a time of day and a zone are
/// ignored), or `i32::MAX` / `i32::MIN` for the infinities.
pub fn parse_date(text: &str) -> Result<i32, DateTimeError> {
    let t = text.trim();
    match special(t) {
        Some(PLUS_INFINITY) => return Ok(i32::MAX),
        Some(MINUS_INFINITY) => return Ok(i32::MIN),
        Some(_) => return Ok(0),
        None => {}
    }
    let f = fields(t)?;
    let days = f.date.signed_duration_since(NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch")).num_days();
    i32::try_from(days).map_err(|_| DateTimeError::Range)
}

fn special(t: &str) -> Option<i64> {
    match t.to_ascii_lowercase().as_str() {
        "infinity" | "+infinity" => Some(PLUS_INFINITY),
        "-infinity" => Some(MINUS_INFINITY),
        "epoch" => Some(0),
        _ => None,
    }
}

/// A run of ASCII digits at the start of `s`, and the rest.
fn digits(s: &str) -> (&str, &str) {
    let n = s.bytes().take_while(u8::is_ascii_digit).count();
    s.split_at(n)
}

fn number(d: &str) -> Result<i64, DateTimeError> {
    d.parse::<i64>().map_err(|_| DateTimeError::Range)
}

fn fields(t: &str) -> Result<Fields, DateTimeError> {
    use DateTimeError::{Range, Syntax};
    // The date: YYYY-MM-DD (a year of 4 or more digits).
    let (y, rest) = digits(t);
    let rest = rest.strip_prefix('-').ok_or(Syntax)?;
    let (m, rest) = digits(rest);
    let rest = rest.strip_prefix('-').ok_or(Syntax)?;
    let (d, mut rest) = digits(rest);
    if y.len() < 4 || !(1..=2).contains(&m.len()) || !(1..=2).contains(&d.len()) {
        return Err(Syntax);
    }
    let (y, m, d) = (number(y)?, number(m)?, number(d)?);
    let date = NaiveDate::from_ymd_opt(i32::try_from(y).map_err(|_| Range)?, m as u32, d as u32).ok_or(Range)?;
    // The time: [ T]HH:MM[:SS[.fraction]].
    let mut time_us = 0;
    let time_text = if let Some(r) = rest.strip_prefix(['T', 't']).filter(|r| r.starts_with(|c: char| c.is_ascii_digit())) {
        Some(r)
    } else if rest.starts_with(char::is_whitespace) && rest.trim_start().starts_with(|c: char| c.is_ascii_digit()) {
        Some(rest.trim_start())
    } else if rest.is_empty() || rest.starts_with(char::is_whitespace) || rest.starts_with(['+', '-', 'Z', 'z']) {
        None
    } else {
        return Err(Syntax);
    };
    if let Some(tt) = time_text {
        let (h, r) = digits(tt);
        let r = r.strip_prefix(':').ok_or(Syntax)?;
        let (mi, r) = digits(r);
        if !(1..=2).contains(&h.len()) || mi.len() != 2 {
            return Err(Syntax);
        }
        let (mut s, mut r) = ("0", r);
        if let Some(r2) = r.strip_prefix(':') {
            let (sd, r3) = digits(r2);
            if sd.len() != 2 {
                return Err(Syntax);
            }
            s = sd;
            r = r3;
        }
        let mut frac_us = 0;
        if let Some(r2) = r.strip_prefix('.') {
            let (fd, r3) = digits(r2);
            if fd.is_empty() || fd.len() > 9 {
                return Err(Syntax);
            }
            // Rounded to microseconds, as PostgreSQL does.
            let nanos = number(&format!("{fd:0<9}"))?;
            frac_us = (nanos + 500) / 1000;
            r = r3;
        }
        let (h, mi, s) = (number(h)?, number(mi)?, number(s)?);
        if h > 24 || mi > 59 || s > 60 || (h == 24 && (mi, s, frac_us) != (0, 0, 0)) {
            return Err(Range);
        }
        time_us = ((h * 60 + mi) * 60 + s) * 1_000_000 + frac_us;
        rest = r;
    }
    // The zone.
    let z = rest.trim();
    let offset_s = if z.is_empty() {
        None
    } else if z.eq_ignore_ascii_case("z") || z.eq_ignore_ascii_case("utc") || z.eq_ignore_ascii_case("gmt") {
        Some(0)
    } else {
        let (sign, r) = match z.as_bytes()[0] {
            b'+' => (1, &z[1..]),
            b'-' => (-1, &z[1..]),
            _ => return Err(Syntax),
        };
        let parts: Vec<&str> = if r.contains(':') {
            r.split(':').collect()
        } else {
            match r.len() {
                1 | 2 => vec![r],
                4 => vec![&r[..2], &r[2..]],
                6 => vec![&r[..2], &r[2..4], &r[4..]],
                _ => return Err(Syntax),
            }
        };
        if parts.is_empty() || parts.len() > 3 || parts.iter().any(|p| p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit())) {
            return Err(Syntax);
        }
        let v: Vec<i64> = parts.iter().map(|p| number(p)).collect::<Result<_, _>>()?;
        let (h, m, s) = (v[0], v.get(1).copied().unwrap_or(0), v.get(2).copied().unwrap_or(0));
        if h > 15 || m > 59 || s > 59 {
            return Err(Range);
        }
        Some(sign * (h * 3600 + m * 60 + s))
    };
    Ok(Fields { date, time_us, offset_s })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `testdata/pg_datetime.txt`: `timestamp|timestamptz|date TEXT => VALUE | 22007 |
    /// 22008`, TEXT quoted with `'` (VALUE: microseconds or days since the epoch).
    #[test]
    fn fixtures() {
        for d in crate::fixture::directives("pg_datetime.txt") {
            let kind = d.words[0].as_str();
            let text = d.text.split_once('\'').and_then(|(_, r)| r.rsplit_once('\'')).map(|(t, _)| t).expect("quoted text");
            let got = match kind {
                "timestamp" => parse_timestamp(text, false).map(|v| v.to_string()),
                "timestamptz" => parse_timestamp(text, true).map(|v| v.to_string()),
                "date" => parse_date(text).map(|v| v.to_string()),
                other => panic!("line {}: unknown kind {other}", d.line),
            };
            let got = got.unwrap_or_else(|e| e.sqlstate().to_string());
            assert_eq!(Some(got), d.want, "line {}: {}", d.line, d.text);
        }
    }
}
