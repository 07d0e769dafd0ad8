//! One client connection's message loop, around pgwire's message handling: start-up
//! under a deadline (and closable by [`super::admission`]), and the client's bytes
//! passed through [`Framer`] before pgwire decodes them: a malformed message gets
//! FATAL 08P01 and the connection ends (pgwire's decoders would panic or read into the
//! next message), and a query text that is not valid UTF-8 reaches the handlers as
//! [`invalid_utf8_marker`] (pgwire would replace bad bytes with U+FFFD and the text
//! would be stored changed), which they answer with 22021.
//!
//! Owns: the socket from accept to close. Must never: hand pgwire a message that
//! [`Framer`] did not pass.

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use pgwire::api::{ClientInfo, ErrorHandler as _, PgWireConnectionState};
use pgwire::error::{ErrorInfo, PgWireError};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::server::{negotiate_tls, process_error, process_message};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::codec::{Framed, FramedParts};

use super::admission::Ticket;
use super::framing::{Framer, Malformed};

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
    let io = Checked::new(parts.io, parts.read_buf);
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
        let msg = match msg {
            Some(Ok(msg)) => msg,
            Some(Err(PgWireError::IoError(e))) => {
                // A malformed message: PostgreSQL's answer, then the connection ends.
                if let Some(m) = e.get_ref().and_then(|r| r.downcast_ref::<Malformed>()) {
                    let info = ErrorInfo::new("FATAL".into(), "08P01".into(), m.to_string());
                    let _ = socket.send(PgWireBackendMessage::ErrorResponse(info.into())).await;
                }
                break;
            }
            _ => break,
        };
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

/// The connection's byte stream as [`Framer`] passes it on: whole, checked messages
/// (CopyData as it arrives). A malformed message ends the stream with an
/// [`std::io::ErrorKind::InvalidData`] error carrying the [`Malformed`] reason, after
/// every message before it has been read.
pub struct Checked<S> {
    inner: S,
    framer: Framer,
    output: BytesMut,
    failed: Option<Malformed>,
    eof: bool,
}

impl<S> Checked<S> {
    pub fn new(inner: S, already_read: BytesMut) -> Self {
        let mut framer = Framer::new(invalid_utf8_marker().as_bytes());
        framer.push(&already_read);
        Checked { inner, framer, output: BytesMut::new(), failed: None, eof: false }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Checked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        loop {
            let this = &mut *self;
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                let chunk = this.output.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            if let Some(m) = &this.failed {
                return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::InvalidData, m.clone())));
            }
            match this.framer.next_into(&mut this.output) {
                Ok(true) => continue,
                Ok(false) => {}
                Err(m) => {
                    this.failed = Some(m);
                    continue;
                }
            }
            if this.eof {
                // Whatever is left is an incomplete message of a client that is gone.
                return Poll::Ready(Ok(()));
            }
            let mut tmp = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.framer.push(rb.filled());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Checked<S> {
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

