//! The frontend byte stream cut into whole messages and checked before pgwire decodes
//! them: lengths, the layout of every message whose fields pgwire reads, and the UTF-8
//! of query texts.
//!
//! Why here: pgwire's decoders read fields from the connection's whole buffer, not
//! from the message's declared length, and index or `get_*` without bounds checks, so
//! a Bind or CopyData with a short or lying length makes them panic or read into the
//! next message. PostgreSQL answers such a message with FATAL 08P01 ("invalid message
//! format") and closes the connection; [`Framer`] finds them first so the connection
//! loop can do the same. Bad UTF-8 in a Query or Parse text is not a protocol error
//! (PostgreSQL answers 22021 and goes on), so that message is passed on with the
//! text replaced by a marker the handlers answer 22021 for.
//!
//! Owns: the layout rules of the start-up packet and of every frontend message type.
//! Must never: pass on a message whose fields do not fit its length exactly; hold more
//! than [`MESSAGE_BYTES_MAX`] of one message. Pure: bytes in, bytes out, no IO (the
//! fuzz target under `fuzz/` builds this file on its own).

use bytes::{Buf, BufMut, BytesMut};

/// The largest message held to be checked (PostgreSQL's limit for the largest
/// messages is 1 GB; pgwire's own limits are lower for most types). Larger messages
/// are refused, except CopyData, which passes through as it arrives.
pub const MESSAGE_BYTES_MAX: usize = 256 << 20;

/// PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
pub const STARTUP_BYTES_MAX: usize = 10_000;

const CANCEL_REQUEST_CODE: u32 = 80877102;
const SSL_REQUEST_CODE: u32 = 80877103;
const GSS_REQUEST_CODE: u32 = 80877104;

/// Why a message was refused: the text of PostgreSQL's FATAL 08P01 error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Malformed {}

/// Cuts one connection's input into checked messages.
pub struct Framer {
    input: BytesMut,
    /// Bytes of the current CopyData message still to pass through unchecked.
    passing: usize,
    /// The start-up packet (no type byte) has gone by.
    typed: bool,
    marker: &'static [u8],
}

impl Framer {
    /// `marker` replaces a query text whose bytes are not valid UTF-8.
    pub fn new(marker: &'static [u8]) -> Framer {
        Framer { input: BytesMut::new(), passing: 0, typed: false, marker }
    }

    /// Adds bytes read from the client.
    pub fn push(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
    }

    /// Moves whatever is ready into `out`: Ok(false) if more input is needed first.
    pub fn next_into(&mut self, out: &mut BytesMut) -> Result<bool, Malformed> {
        if self.passing > 0 {
            let n = self.passing.min(self.input.len());
            if n == 0 {
                return Ok(false);
            }
            out.put(self.input.split_to(n));
            self.passing -= n;
            return Ok(true);
        }
        if !self.typed {
            if self.input.len() < 4 {
                return Ok(false);
            }
            let len = (&self.input[..4]).get_u32() as usize;
            if !(8..=STARTUP_BYTES_MAX).contains(&len) {
                return Err(Malformed("invalid length of startup packet".into()));
            }
            if self.input.len() < len {
                return Ok(false);
            }
            let packet = self.input.split_to(len);
            check_startup(&packet)?;
            // An SSL or GSS request is answered and followed by the real start-up.
            let code = (&packet[4..8]).get_u32();
            self.typed = !matches!(code, SSL_REQUEST_CODE | GSS_REQUEST_CODE);
            out.put(packet);
            return Ok(true);
        }
        if self.input.len() < 5 {
            return Ok(false);
        }
        let tag = self.input[0];
        let len = (&self.input[1..5]).get_u32() as usize;
        if len < 4 {
            return Err(Malformed(format!("invalid message length {len} for message type \"{}\"", tag.escape_ascii())));
        }
        let total = len + 1;
        if tag == b'd' {
            // CopyData may be large and has no inner layout: pass it as it arrives.
            self.passing = total;
            return Ok(true);
        }
        if total > MESSAGE_BYTES_MAX {
            return Err(Malformed(format!("invalid message length {len}: larger than {MESSAGE_BYTES_MAX} bytes")));
        }
        if self.input.len() < total {
            self.input.reserve(total - self.input.len());
            return Ok(false);
        }
        let msg = self.input.split_to(total);
        match check_message(tag, &msg[5..], self.marker)? {
            Some(replacement) => out.put(replacement),
            None => out.put(msg),
        }
        Ok(true)
    }
}

/// Reads the fields of one message body, each bounded by the body's end.
struct Fields<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn short() -> Malformed {
        Malformed("insufficient data left in message".into())
    }
    fn cstring(&mut self) -> Result<&'a [u8], Malformed> {
        let rest = &self.body[self.at..];
        let end = rest.iter().position(|b| *b == 0).ok_or_else(|| Malformed("invalid string in message".into()))?;
        self.at += end + 1;
        Ok(&rest[..end])
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        if self.body.len() - self.at < n {
            return Err(Self::short());
        }
        let b = &self.body[self.at..self.at + n];
        self.at += n;
        Ok(b)
    }
    fn i32(&mut self) -> Result<i32, Malformed> {
        Ok((&self.bytes(4)?[..]).get_i32())
    }
    /// A count of what follows: unsigned, as PostgreSQL reads it (a Bind may carry
    /// 65,535 values).
    fn count(&mut self) -> Result<usize, Malformed> {
        Ok((&self.bytes(2)?[..]).get_u16() as usize)
    }
    fn end(&self) -> Result<(), Malformed> {
        if self.at == self.body.len() {
            Ok(())
        } else {
            Err(Malformed("invalid message format".into()))
        }
    }
}

fn check_startup(packet: &[u8]) -> Result<(), Malformed> {
    let code = (&packet[4..8]).get_u32();
    match code {
        SSL_REQUEST_CODE | GSS_REQUEST_CODE if packet.len() == 8 => Ok(()),
        CANCEL_REQUEST_CODE if packet.len() == 16 => Ok(()),
        SSL_REQUEST_CODE | GSS_REQUEST_CODE | CANCEL_REQUEST_CODE => Err(Malformed("invalid length of startup packet".into())),
        // Protocol 3.x: name/value pairs, then one terminating zero byte as the last.
        c if c >> 16 == 3 => {
            let mut f = Fields { body: &packet[8..], at: 0 };
            loop {
                if f.at + 1 == f.body.len() && f.body[f.at] == 0 {
                    return Ok(());
                }
                let name = f.cstring().map_err(|_| Malformed("invalid startup packet layout: expected terminator as last byte".into()))?;
                if name.is_empty() {
                    return Err(Malformed("invalid startup packet layout: expected terminator as last byte".into()));
                }
                f.cstring().map_err(|_| Malformed("invalid startup packet layout: expected terminator as last byte".into()))?;
            }
        }
        // Another protocol version: pgwire refuses it (it reads only the version).
        _ => Ok(()),
    }
}

/// Checks one typed message's body; Some(message) to pass on instead of it when a
/// query text is not valid UTF-8.
fn check_message(tag: u8, body: &[u8], marker: &[u8]) -> Result<Option<BytesMut>, Malformed> {
    let mut f = Fields { body, at: 0 };
    match tag {
        // Query: one string.
        b'Q' => {
            let text = f.cstring()?;
            f.end()?;
            if std::str::from_utf8(text).is_ok() {
                return Ok(None);
            }
            let mut out = BytesMut::new();
            out.put_u8(b'Q');
            out.put_u32((4 + marker.len() + 1) as u32);
            out.put_slice(marker);
            out.put_u8(0);
            Ok(Some(out))
        }
        // Parse: name, text, parameter type oids.
        b'P' => {
            let name = f.cstring()?;
            let text = f.cstring()?;
            let types_at = f.at;
            let n = f.count()?;
            f.bytes(4 * n)?;
            f.end()?;
            let name_ok = std::str::from_utf8(name).is_ok();
            if name_ok && std::str::from_utf8(text).is_ok() {
                return Ok(None);
            }
            // Keep a valid name (the statement is then refused under it); a bad name
            // becomes the unnamed statement.
            let name: &[u8] = if name_ok { name } else { b"" };
            let rest = &body[types_at..];
            let mut out = BytesMut::new();
            out.put_u8(b'P');
            out.put_u32((4 + name.len() + 1 + marker.len() + 1 + rest.len()) as u32);
            out.put_slice(name);
            out.put_u8(0);
            out.put_slice(marker);
            out.put_u8(0);
            out.put_slice(rest);
            Ok(Some(out))
        }
        // Bind: portal, statement, formats, values, result formats.
        b'B' => {
            f.cstring()?;
            f.cstring()?;
            let formats = f.count()?;
            f.bytes(2 * formats)?;
            let values = f.count()?;
            for _ in 0..values {
                let len = f.i32()?;
                if len >= 0 {
                    f.bytes(len as usize)?;
                } else if len != -1 {
                    return Err(Fields::short());
                }
            }
            let results = f.count()?;
            f.bytes(2 * results)?;
            f.end()?;
            Ok(None)
        }
        // Describe, Close: 'S' or 'P', then a name.
        b'D' | b'C' => {
            let kind = f.bytes(1)?[0];
            if kind != b'S' && kind != b'P' {
                let what = if tag == b'D' { "DESCRIBE" } else { "CLOSE" };
                return Err(Malformed(format!("invalid {what} message subtype {}", kind)));
            }
            f.cstring()?;
            f.end()?;
            Ok(None)
        }
        // Execute: portal, row limit.
        b'E' => {
            f.cstring()?;
            f.i32()?;
            f.end()?;
            Ok(None)
        }
        // CopyFail: a message.
        b'f' => {
            f.cstring()?;
            f.end()?;
            Ok(None)
        }
        // Sync, Flush, CopyDone, Terminate: nothing.
        b'S' | b'H' | b'c' | b'X' => {
            f.end()?;
            Ok(None)
        }
        // Password and SASL messages (read by their length), FunctionCall and unknown
        // types (refused by pgwire without reading them).
        _ => Ok(None),
    }
}

/// The fuzz target's check of one input (`fuzz/fuzz_targets/wire.rs`), also run by the
/// tests on every kept input: the first byte picks how the rest is cut into reads; the
/// rest goes through [`Framer`], and what it passes is decoded by pgwire as the
/// connection would. Panics (the fuzzer's finding) if pgwire panics on a passed
/// message or reads a different number of bytes than the message's length says.
#[cfg(any(test, fuzzing))]
pub fn fuzz_one(data: &[u8]) {
    use pgwire::messages::{DecodeContext, PgWireFrontendMessage};
    let Some((&c, data)) = data.split_first() else { return };
    let mut framer = Framer::new(b"\x01marker");
    let mut passed = BytesMut::new();
    'feed: for part in data.chunks(c as usize % 64 + 1) {
        framer.push(part);
        loop {
            match framer.next_into(&mut passed) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(_) => break 'feed,
            }
        }
    }
    let mut ctx = DecodeContext::default();
    ctx.awaiting_frontend_ssl = false;
    loop {
        let declared = if ctx.awaiting_frontend_startup {
            (passed.len() >= 4).then(|| (&passed[..4]).get_u32() as usize)
        } else {
            (passed.len() >= 5).then(|| 1 + (&passed[1..5]).get_u32() as usize)
        };
        let Some(declared) = declared.filter(|d| *d <= passed.len()) else { break };
        let before = passed.len();
        match PgWireFrontendMessage::decode(&mut passed, &ctx) {
            Ok(Some(m)) => {
                assert_eq!(before - passed.len(), declared, "pgwire read past or short of the message: {m:?}");
                match m {
                    PgWireFrontendMessage::Startup(_) => ctx.awaiting_frontend_startup = false,
                    PgWireFrontendMessage::CancelRequest(_) => break,
                    _ => {}
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKER: &[u8] = b"\x01bad-utf8";

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup() -> Vec<u8> {
        let params = b"user\0tidemark\0\0";
        let mut s = ((8 + params.len()) as u32).to_be_bytes().to_vec();
        s.extend_from_slice(&196608u32.to_be_bytes());
        s.extend_from_slice(params);
        s
    }

    /// Everything the framer passes on, and the error it stopped at, if any.
    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, Option<Malformed>) {
        let mut f = Framer::new(MARKER);
        let mut out = BytesMut::new();
        for part in input.chunks(chunk.max(1)) {
            f.push(part);
            loop {
                match f.next_into(&mut out) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => return (out.to_vec(), Some(e)),
                }
            }
        }
        (out.to_vec(), None)
    }

    #[test]
    fn valid_messages_pass_unchanged_whatever_the_chunking() {
        let mut all = startup();
        all.extend(msg(b'Q', "select 'é'\0".as_bytes()));
        all.extend(msg(b'P', b"s1\0select $1\0\x00\x01\x00\x00\x00\x17"));
        all.extend(msg(b'B', b"\0s1\0\x00\x01\x00\x00\x00\x01\x00\x00\x00\x011\x00\x00"));
        all.extend(msg(b'B', b"\0s1\0\x00\x00\x00\x01\xff\xff\xff\xff\x00\x01\x00\x01"));
        // The protocol's largest count: 65,535 values (counts are unsigned).
        let mut wide = b"\0s1\0\x00\x00\xff\xff".to_vec();
        wide.extend(std::iter::repeat_n([0xff_u8; 4], 65_535).flatten());
        wide.extend(b"\x00\x00");
        all.extend(msg(b'B', &wide));
        all.extend(msg(b'D', b"P\0"));
        all.extend(msg(b'E', b"\0\x00\x00\x00\x00"));
        all.extend(msg(b'C', b"Ss1\0"));
        all.extend(msg(b'd', &[7; 100]));
        all.extend(msg(b'c', b""));
        all.extend(msg(b'f', b"why\0"));
        all.extend(msg(b'H', b""));
        all.extend(msg(b'S', b""));
        all.extend(msg(b'X', b""));
        for chunk in [1, 3, 7, 64, all.len()] {
            assert_eq!(run(&all, chunk), (all.clone(), None), "chunk {chunk}");
        }
    }

    #[test]
    fn bad_utf8_texts_are_replaced_by_the_marker() {
        let mut input = startup();
        input.extend(msg(b'Q', b"select '\xff'\0"));
        input.extend(msg(b'P', b"s1\0select '\xc3('\0\0\0"));
        input.extend(msg(b'P', b"\xff\0select 1\0\0\0"));
        let mut want = startup();
        want.extend(msg(b'Q', &[MARKER, b"\0"].concat()));
        want.extend(msg(b'P', &[b"s1\0", MARKER, b"\0\0\0"].concat()));
        want.extend(msg(b'P', &[b"\0", MARKER, b"\0\0\0"].concat()));
        assert_eq!(run(&input, 5), (want, None));
    }

    #[test]
    fn malformed_messages_stop_the_stream_after_the_good_ones() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (msg(b'd', b"")[..1].iter().copied().chain(2u32.to_be_bytes()).collect(), "invalid message length 2"),
            (msg(b'Q', b"select 1"), "invalid string in message"),
            (msg(b'Q', b"select 1\0junk"), "invalid message format"),
            (msg(b'P', b"\0select 1\0\x00\x02\x00\x00\x00\x17"), "insufficient data left in message"),
            (msg(b'P', b"\0select 1\0\xff\xff"), "insufficient data left in message"),
            (msg(b'B', b"\0\0\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00"), "insufficient data left in message"),
            (msg(b'B', b"\0\0\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"), "insufficient data left in message"),
            (msg(b'B', b"\0\0\x00\x00\x00\x00"), "insufficient data left in message"),
            (msg(b'D', b"X\0"), "invalid DESCRIBE message subtype 88"),
            (msg(b'C', b""), "insufficient data left in message"),
            (msg(b'E', b"\0\x00\x00"), "insufficient data left in message"),
            (msg(b'S', b"x"), "invalid message format"),
        ];
        for (bad, why) in cases {
            let mut input = startup();
            input.extend(msg(b'Q', b"select 1\0"));
            let good = input.clone();
            input.extend(&bad);
            input.extend(msg(b'S', b""));
            let (out, err) = run(&input, 4);
            assert_eq!(out, good, "{why}");
            assert!(err.as_ref().is_some_and(|e| e.0.starts_with(why)), "{why}: {err:?}");
        }
    }

    /// Every input the fuzzer ever kept (its seeds and every crash it found) passes.
    #[test]
    fn kept_fuzz_inputs_pass() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
        let mut n = 0;
        for dir in ["seeds/wire", "regressions/wire"] {
            for e in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = e.unwrap().path();
                fuzz_one(&std::fs::read(&path).unwrap());
                n += 1;
            }
        }
        assert!(n >= 5, "the kept inputs are missing ({n} found)");
    }

    #[test]
    fn startup_packets_are_checked() {
        let ok: Vec<Vec<u8>> = vec![
            startup(),
            [&16u32.to_be_bytes()[..], &CANCEL_REQUEST_CODE.to_be_bytes(), &[0; 8]].concat(),
            [&9u32.to_be_bytes()[..], &196608u32.to_be_bytes(), b"\0"].concat(),
        ];
        for p in ok {
            assert_eq!(run(&p, 2), (p.clone(), None));
        }
        let bad: Vec<(Vec<u8>, &str)> = vec![
            (3u32.to_be_bytes().to_vec(), "invalid length of startup packet"),
            (20_000u32.to_be_bytes().to_vec(), "invalid length of startup packet"),
            ([&12u32.to_be_bytes()[..], &CANCEL_REQUEST_CODE.to_be_bytes(), &[0; 4]].concat(), "invalid length of startup packet"),
            ([&14u32.to_be_bytes()[..], &196608u32.to_be_bytes(), b"user\0x"].concat(), "invalid startup packet layout"),
            ([&12u32.to_be_bytes()[..], &196608u32.to_be_bytes(), b"\0\0\0\0"].concat(), "invalid startup packet layout"),
        ];
        for (p, why) in bad {
            let (out, err) = run(&p, 3);
            assert!(out.is_empty());
            assert!(err.as_ref().is_some_and(|e| e.0.starts_with(why)), "{why}: {err:?}");
        }
        // After an SSL request comes the real start-up packet, also untyped.
        let mut input = [&8u32.to_be_bytes()[..], &SSL_REQUEST_CODE.to_be_bytes()].concat();
        input.extend(startup());
        input.extend(msg(b'S', b""));
        assert_eq!(run(&input, 6), (input.clone(), None));
    }
}
