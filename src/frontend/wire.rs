//! One client connection's message loop, around pgwire's message handling: start-up
//! under a deadline (and closable by [`super::admission`]), and the bytes of query
//! texts checked as UTF-8 before pgwire decodes them (its decoder would replace bad
//! bytes with U+FFFD and the text would be stored changed).
//!
//! Owns: the socket from accept to close. Must never: hand pgwire a query text that
//! was not valid UTF-8 as sent (it gets [`invalid_utf8_marker`] instead, which the
//! handlers answer with 22021).

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use futures::StreamExt;
use pgwire::api::{ClientInfo, ErrorHandler as _, PgWireConnectionState};
use pgwire::messages::PgWireFrontendMessage;
use pgwire::tokio::server::{negotiate_tls, process_error, process_message};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts};

use super::admission::Ticket;

/// Query and Parse messages larger than this are passed on unchecked (pgwire's decoder
/// then handles them as before); below it, they are held whole until checked.
const CHECKED_MESSAGE_BYTES_MAX: usize = 256 << 20;

/// The text that stands for a query whose bytes were not valid UTF-8. It starts with a
/// control character and carries a random part drawn at start, so no client can send it.
pub fn invalid_utf8_marker() -> &'static str {
    static MARKER: OnceLock<String> = OnceLock::new();
    MARKER.get_or_init(|| format!("\u{1}tidemark-invalid-utf8-{:032x}", rand::random::<u128>()))
}

/// Serves one accepted connection until it ends.
pub async fn serve(socket: TcpStream, frontend: &super::Frontend, mut ticket: Ticket, startup_timeout: Duration) {
    let deadline = tokio::time::sleep(startup_timeout);
    tokio::pin!(deadline);
    let negotiated = tokio::select! {
        _ = &mut deadline => return,
        _ = &mut ticket.evicted => return,
        s = negotiate_tls::<super::Prepared>(socket, None) => s,
    };
    let Ok(Some(framed)) = negotiated else { return };
    let parts = framed.into_parts();
    let io = Utf8Checked::new(parts.io, parts.read_buf);
    let mut socket = Framed::from_parts(FramedParts::new(io, parts.codec));

    let handler = std::sync::Arc::new(frontend.clone_handle());
    let startup = std::sync::Arc::clone(&frontend.startup);
    let (simple, extended, copy) = (handler.clone(), handler.clone(), handler);
    let cancel = std::sync::Arc::clone(&frontend.cancel);
    let errors = super::QuietErrors;
    let mut started = false;
    loop {
        let in_startup = matches!(socket.state(), PgWireConnectionState::AwaitingStartup | PgWireConnectionState::AuthenticationInProgress);
        if !in_startup && !started {
            started = true;
            ticket.started();
        }
        let msg = if in_startup {
            tokio::select! {
                _ = &mut deadline => None,
                _ = &mut ticket.evicted => None,
                m = socket.next() => m,
            }
        } else {
            socket.next().await
        };
        let Some(Ok(msg)) = msg else { break };
        if matches!(msg, PgWireFrontendMessage::Terminate(_)) {
            break;
        }
        let is_extended = match socket.state() {
            PgWireConnectionState::CopyInProgress(extended) => extended,
            _ => msg.is_extended_query(),
        };
        let handled = process_message(
            msg,
            &mut socket,
            startup.clone(),
            simple.clone(),
            extended.clone(),
            copy.clone(),
            cancel.clone(),
        )
        .await;
        if let Err(mut e) = handled {
            errors.on_error(&socket, &mut e);
            if process_error(&mut socket, e, is_extended).await.is_err() {
                break;
            }
        }
    }
}

/// The connection's byte stream with each Query and Parse message held until whole
/// and its texts checked as UTF-8; a message that fails is replaced by one carrying
/// [`invalid_utf8_marker`]. Other messages pass through as they arrive.
pub struct Utf8Checked<S> {
    inner: S,
    input: BytesMut,
    output: BytesMut,
    /// Bytes of the current message still to pass through unchecked.
    passing: usize,
    /// The start-up packet (no type byte) has gone by.
    typed: bool,
    eof: bool,
}

impl<S> Utf8Checked<S> {
    pub fn new(inner: S, already_read: BytesMut) -> Self {
        Utf8Checked { inner, input: already_read, output: BytesMut::new(), passing: 0, typed: false, eof: false }
    }

    /// Moves whatever is ready from `input` to `output`; false if more bytes are needed.
    fn frame(&mut self) -> bool {
        if self.passing > 0 {
            let n = self.passing.min(self.input.len());
            if n == 0 {
                return false;
            }
            self.output.put(self.input.split_to(n));
            self.passing -= n;
            return true;
        }
        if !self.typed {
            if self.input.len() < 4 {
                return false;
            }
            let len = (&self.input[..4]).get_u32() as usize;
            self.typed = true;
            self.passing = len.max(4);
            return true;
        }
        if self.input.len() < 5 {
            return false;
        }
        let tag = self.input[0];
        let total = 1 + (&self.input[1..5]).get_u32() as usize;
        if !matches!(tag, b'Q' | b'P') || total > CHECKED_MESSAGE_BYTES_MAX || total < 5 {
            self.passing = total.max(5);
            return true;
        }
        if self.input.len() < total {
            self.input.reserve(total - self.input.len());
            return false;
        }
        let msg = self.input.split_to(total);
        match checked(tag, &msg) {
            Some(replacement) => self.output.put(replacement),
            None => self.output.put(msg),
        }
        true
    }
}

/// None if the message's texts are valid UTF-8, else the message to pass on instead.
fn checked(tag: u8, msg: &[u8]) -> Option<BytesMut> {
    let body = &msg[5..];
    let cstr = |from: usize| -> Option<(usize, bool)> {
        let end = body[from..].iter().position(|b| *b == 0)? + from;
        Some((end, std::str::from_utf8(&body[from..end]).is_ok()))
    };
    let marker = invalid_utf8_marker().as_bytes();
    let mut out = BytesMut::new();
    match tag {
        b'Q' => {
            let (_, ok) = cstr(0)?;
            if ok {
                return None;
            }
            out.put_u8(b'Q');
            out.put_u32((4 + marker.len() + 1) as u32);
            out.put_slice(marker);
            out.put_u8(0);
        }
        _ => {
            let (name_end, name_ok) = cstr(0)?;
            let (query_end, query_ok) = cstr(name_end + 1)?;
            if name_ok && query_ok {
                return None;
            }
            // Keep a valid name (the statement is then refused under it); a bad name
            // becomes the unnamed statement.
            let name: &[u8] = if name_ok { &body[..name_end] } else { b"" };
            let rest = &body[query_end + 1..];
            out.put_u8(b'P');
            out.put_u32((4 + name.len() + 1 + marker.len() + 1 + rest.len()) as u32);
            out.put_slice(name);
            out.put_u8(0);
            out.put_slice(marker);
            out.put_u8(0);
            out.put_slice(rest);
        }
    }
    Some(out)
}

impl<S: AsyncRead + Unpin> AsyncRead for Utf8Checked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            if !self.output.is_empty() {
                let n = self.output.len().min(buf.remaining());
                let chunk = self.output.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if self.frame() {
                continue;
            }
            if self.eof {
                return Poll::Ready(Ok(()));
            }
            let this = &mut *self;
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                        // Whatever is left is incomplete: pass it on for pgwire to judge.
                        let rest = this.input.split();
                        this.output.put(rest);
                    } else {
                        this.input.extend_from_slice(rb.filled());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Utf8Checked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    async fn through(bytes: Vec<u8>) -> Vec<u8> {
        let mut r = Utf8Checked::new(std::io::Cursor::new(bytes), BytesMut::new());
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn valid_messages_pass_unchanged_and_bad_texts_are_marked() {
        let startup = {
            let mut s = 12u32.to_be_bytes().to_vec();
            s.extend_from_slice(&196608u32.to_be_bytes());
            s.extend_from_slice(&[0, 0, 0, 0]);
            s
        };
        let good_q = msg(b'Q', b"select '\xc3\xa9'\0");
        let sync = msg(b'S', b"");
        let mut all = startup.clone();
        all.extend(&good_q);
        all.extend(&sync);
        assert_eq!(through(all.clone()).await, all);

        let bad_q = msg(b'Q', b"select '\xff'\0");
        let mut input = startup.clone();
        input.extend(&bad_q);
        input.extend(&sync);
        let mut want = startup.clone();
        want.extend(msg(b'Q', &[invalid_utf8_marker().as_bytes(), b"\0"].concat()));
        want.extend(&sync);
        assert_eq!(through(input).await, want);

        let bad_p = msg(b'P', b"s1\0select '\xc3('\0\0\0");
        let mut input = startup.clone();
        input.extend(&bad_p);
        let mut want = startup;
        want.extend(msg(b'P', &[b"s1\0", invalid_utf8_marker().as_bytes(), b"\0\0\0"].concat()));
        assert_eq!(through(input).await, want);
    }
}
