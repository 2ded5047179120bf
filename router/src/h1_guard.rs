//! Request framing read off the wire, for the one thing hyper hides: an
//! HTTP/1 request carrying both `Content-Length` and `Transfer-Encoding`.
//!
//! hyper frames such a request by `Transfer-Encoding`, drops the
//! `Content-Length` and closes the connection after the answer, so the
//! service cannot tell it was there. A front proxy should refuse it instead
//! (RFC 9112 6.1, 6.3): it is the classic request-smuggling probe.
//!
//! - [`Framing`] is the sans-IO core: fed the client's bytes in order, it
//!   follows HTTP/1.1 message framing as hyper does (heads, `Content-Length`
//!   and chunked bodies, trailers, the pause after an upgrade request) and
//!   records which request, counted from 0 on the connection, has both
//!   headers. It answers the service, which counts the requests hyper hands
//!   it in the same order.
//! - [`H1Guard`] wraps the client stream and feeds [`Framing`] what each
//!   read returned; [`FramingHandle`] shares it with the service.
//!
//! Misreading must fail safe: whenever the bytes do not frame as hyper would
//! frame them (a parse error, a head over the size limit, an unanswered
//! upgrade, the HTTP/2 preface), inspection stops for the connection and
//! nothing more is flagged. hyper refuses most of those streams itself.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use http::{HeaderMap, StatusCode, header};
use tokio::io::{AsyncRead, ReadBuf};
use tracing::debug;

/// The first line of the HTTP/2 prior-knowledge preface.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// Header slots kept on the stack; a larger `max_headers` allocates.
const STACK_HEADERS: usize = 128;
/// A partial-head buffer larger than this is freed once the head is read.
const KEEP_CAPACITY: usize = 4096;

/// Where the request stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At a request head; a partial one is in `held`.
    Head,
    /// In a body of known length: bytes left (never 0).
    Body(u64),
    /// In a chunked body.
    Chunked(Chunked),
    /// After an upgrade request: what follows is the next request or a
    /// tunnel, depending on the answer. Kept in `held` until then.
    Paused,
    /// Not inspecting any more.
    Off,
}

/// An upgrade request (an `Upgrade` header, or CONNECT) whose answer is not
/// known yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PendingUpgrade {
    index: u64,
    connect: bool,
}

/// The request framing of one client connection; see the module docs.
#[derive(Debug)]
pub(crate) struct Framing {
    state: State,
    /// A partial head, or the bytes kept while paused.
    held: Vec<u8>,
    /// Empty lines read before the partial head in `held`: the parser
    /// skips them (as hyper's does), so they are dropped from `held` rather
    /// than parsed again at every next one, but they count towards
    /// `max_head` (as they do in hyper's buffer).
    skipped: usize,
    /// hyper's largest request head (its read buffer limit).
    max_head: usize,
    max_headers: usize,
    /// Request heads read so far.
    heads: u64,
    /// Requests the service has been handed so far.
    admitted: u64,
    /// The request with both framing headers, if any (inspection then
    /// stops: hyper closes that connection after answering it).
    conflict: Option<u64>,
    upgrade: Option<PendingUpgrade>,
    /// Bytes handed to the head parser so far (a work bound is tested).
    #[cfg(any(test, feature = "fuzzing"))]
    parsed: u64,
}

/// What the service learns about the request it was just handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Admission {
    pub index: u64,
    /// Both `Content-Length` and `Transfer-Encoding`: answer 400.
    pub conflicting: bool,
    /// An upgrade request: call [`Framing::answered`] with its status.
    pub awaits_answer: bool,
}

enum HeadStep {
    /// A complete head of this many bytes; the state is set.
    Read(usize),
    Partial,
    Off,
}

impl Framing {
    /// `max_head`: hyper's read buffer limit (the largest head it reads);
    /// `max_headers`: the most header fields hyper accepts.
    pub(crate) fn new(max_head: usize, max_headers: usize) -> Self {
        Framing {
            state: State::Head,
            held: Vec::new(),
            skipped: 0,
            max_head: max_head.max(1),
            max_headers,
            heads: 0,
            admitted: 0,
            conflict: None,
            upgrade: None,
            #[cfg(any(test, feature = "fuzzing"))]
            parsed: 0,
        }
    }

    /// Whether inspection stopped for good.
    pub(crate) fn is_off(&self) -> bool {
        self.state == State::Off
    }

    /// The request (0-based) that carried both framing headers.
    #[cfg(test)]
    fn conflict(&self) -> Option<u64> {
        self.conflict
    }

    fn off(&mut self) {
        self.state = State::Off;
        self.held = Vec::new();
        self.skipped = 0;
        self.upgrade = None;
    }

    /// Take the next bytes the client sent, in order.
    pub(crate) fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Paused => {
                    if self.held.len() + data.len() > self.max_head {
                        self.off();
                    } else {
                        self.held.extend_from_slice(data);
                    }
                    return;
                }
                State::Body(left) => {
                    let n = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    data = &data[n..];
                    // n <= left, and a usize always fits in a u64 here.
                    let left = left - n as u64;
                    if left == 0 {
                        self.message_end();
                    } else {
                        self.state = State::Body(left);
                    }
                }
                State::Chunked(mut c) => match c.advance(data) {
                    Some((used, done)) => {
                        data = &data[used..];
                        if done {
                            self.message_end();
                        } else {
                            self.state = State::Chunked(c);
                        }
                    }
                    None => self.off(),
                },
                State::Head if self.held.is_empty() && self.skipped == 0 => match self.head(data) {
                    HeadStep::Read(n) => data = &data[n..],
                    HeadStep::Partial => {
                        if data.len() >= self.max_head {
                            self.off();
                        } else {
                            self.held.extend_from_slice(data);
                        }
                        return;
                    }
                    HeadStep::Off => self.off(),
                },
                State::Head => {
                    // Copy only up to the next empty line: a head cannot
                    // end before one, and the rest may be a large body.
                    let hint = head_end_hint(&self.held, data);
                    let upto = hint.unwrap_or(data.len());
                    if self.skipped + self.held.len() + upto > self.max_head {
                        // Too large for hyper too: it answers 431.
                        self.off();
                        return;
                    }
                    let old = self.held.len();
                    self.held.extend_from_slice(&data[..upto]);
                    if hint.is_none() {
                        return;
                    }
                    let held = std::mem::take(&mut self.held);
                    match self.head(&held) {
                        HeadStep::Read(n) => match n.checked_sub(old) {
                            Some(used) if used <= upto => {
                                data = &data[used..];
                                self.skipped = 0;
                                self.keep_emptied(held);
                            }
                            // The head ended inside bytes already judged
                            // partial: not possible, but never guess.
                            _ => self.off(),
                        },
                        HeadStep::Partial => {
                            data = &data[upto..];
                            if held.iter().all(|&b| b == b'\r' || b == b'\n') {
                                // Only empty lines so far: the head starts
                                // after them.
                                self.skipped += held.len();
                                self.keep_emptied(held);
                            } else {
                                self.held = held;
                            }
                        }
                        HeadStep::Off => self.off(),
                    }
                }
            }
        }
    }

    /// Keep `held`'s buffer, emptied, unless it grew large.
    fn keep_emptied(&mut self, mut held: Vec<u8>) {
        held.clear();
        self.held = if held.capacity() > KEEP_CAPACITY {
            Vec::new()
        } else {
            held
        };
    }

    /// Parse a head at the start of `bytes` and set the state after it.
    fn head(&mut self, bytes: &[u8]) -> HeadStep {
        if self.heads == 0 && bytes.starts_with(H2_PREFACE_LINE) {
            return HeadStep::Off;
        }
        if let Some(len) = plain_head(bytes, self.max_head, self.max_headers) {
            // No framing header, no upgrade: a head with no body.
            self.heads += 1;
            self.message_end();
            return HeadStep::Read(len);
        }
        let mut stack = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; STACK_HEADERS];
        let mut heap;
        let slots = if self.max_headers <= STACK_HEADERS {
            &mut stack[..self.max_headers]
        } else {
            heap = vec![MaybeUninit::uninit(); self.max_headers];
            &mut heap[..]
        };
        // The same parser, with the same (default) settings, as hyper's.
        let mut req = httparse::Request::new(&mut []);
        let parsed = req.parse_with_uninit_headers(bytes, slots);
        #[cfg(any(test, feature = "fuzzing"))]
        {
            let n = match parsed {
                Ok(httparse::Status::Complete(len)) => len,
                _ => bytes.len(),
            };
            self.parsed += n as u64;
        }
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return HeadStep::Partial,
            // hyper refuses it too (400 or 431) and closes.
            Err(_) => return HeadStep::Off,
        };
        let index = self.heads;
        self.heads += 1;

        let mut has_cl = false;
        let mut length: Option<Option<u64>> = Some(None);
        let mut has_te = false;
        let mut chunked = false;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            let name = h.name.as_bytes();
            if name.eq_ignore_ascii_case(b"content-length") {
                has_cl = true;
                length = match (length, digits(h.value)) {
                    (Some(None), Some(n)) => Some(Some(n)),
                    (Some(Some(prev)), Some(n)) if prev == n => Some(Some(n)),
                    _ => None,
                };
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                has_te = true;
                // As hyper: the last line decides.
                chunked = ends_chunked(h.value);
            } else if name.eq_ignore_ascii_case(b"upgrade") {
                upgrade = true;
            }
        }
        if has_cl && has_te {
            self.conflict = Some(index);
            return HeadStep::Off;
        }
        if has_te && (req.version != Some(1) || !chunked) {
            // hyper answers 400 and closes.
            return HeadStep::Off;
        }
        if upgrade {
            self.upgrade = Some(PendingUpgrade {
                index,
                connect: req.method == Some("CONNECT"),
            });
        }
        if has_te {
            self.state = State::Chunked(Chunked::default());
        } else {
            match length {
                Some(Some(n)) if n > 0 => self.state = State::Body(n),
                Some(_) => self.message_end(),
                // hyper answers 400 and closes.
                None => return HeadStep::Off,
            }
        }
        HeadStep::Read(len)
    }

    fn message_end(&mut self) {
        self.state = if self.upgrade.is_some() {
            State::Paused
        } else {
            State::Head
        };
    }

    /// The service was handed its next request (hyper hands them over in
    /// order, each after reading its head). `has_te`: whether it carries
    /// `Transfer-Encoding`, which hyper keeps on a conflicting request; a
    /// flagged request without one means the count went astray, and then
    /// nothing is refused.
    pub(crate) fn admit(&mut self, has_te: bool) -> Admission {
        let index = self.admitted;
        self.admitted += 1;
        let flagged = self.conflict == Some(index);
        if flagged && !has_te {
            debug!(
                index,
                "request framing out of step with hyper; not refusing"
            );
        }
        Admission {
            index,
            conflicting: flagged && has_te,
            awaits_answer: self.upgrade.is_some_and(|u| u.index == index),
        }
    }

    /// The service answered request `index` with `status`. Only upgrade
    /// requests need this: on a switch inspection stops (a tunnel follows),
    /// otherwise the bytes kept since are read as requests.
    pub(crate) fn answered(&mut self, index: u64, status: StatusCode) {
        let Some(u) = self.upgrade.filter(|u| u.index == index) else {
            return;
        };
        self.upgrade = None;
        // hyper switches on exactly these (see its `Server::encode`).
        let switched =
            status == StatusCode::SWITCHING_PROTOCOLS || (u.connect && status.is_success());
        if switched {
            self.off();
        } else if self.state == State::Paused {
            self.state = State::Head;
            let kept = std::mem::take(&mut self.held);
            self.feed(&kept);
        }
    }
}

/// Where in `data` the first empty line (`\n\n` or `\n\r\n`, across the end
/// of `held` too) ends, if any: a head can end nowhere else.
fn head_end_hint(held: &[u8], data: &[u8]) -> Option<usize> {
    let at = |i: usize, back: usize| -> Option<u8> {
        match i.checked_sub(back) {
            Some(j) => data.get(j).copied(),
            None => held
                .len()
                .checked_sub(back - i)
                .and_then(|j| held.get(j).copied()),
        }
    };
    data.iter().enumerate().find_map(|(i, &b)| {
        let end = b == b'\n'
            && (at(i, 1) == Some(b'\n') || (at(i, 1) == Some(b'\r') && at(i, 2) == Some(b'\n')));
        end.then_some(i + 1)
    })
}

/// The length of the head that starts `bytes` when it is a complete head
/// whose framing needs no parser: no line starts with the name
/// `Content-Length`, `Transfer-Encoding` or `Upgrade` (any case), the method
/// is not CONNECT, the head starts with no empty line, and it is within
/// `max_head` bytes and `max_headers` lines. Such a head, if hyper accepts
/// it, has no body and no upgrade; if hyper refuses it, hyper closes the
/// connection and what follows does not matter. `None`: not known here,
/// [`Framing::head`] parses it (a partial head, a body, an upgrade).
///
/// This is the guard's cost on nearly every request: one pass over the
/// head's bytes looking at line starts, instead of the full parse.
fn plain_head(bytes: &[u8], max_head: usize, max_headers: usize) -> Option<usize> {
    const NAMES: [&[u8]; 3] = [b"content-length", b"transfer-encoding", b"upgrade"];
    match bytes.first() {
        None | Some(b'\r' | b'\n') => return None,
        Some(b'C') if bytes.starts_with(b"CONNECT") => return None,
        Some(_) => {}
    }
    let mut at = 0;
    let mut lines = 0usize;
    loop {
        let nl = at + bytes.get(at..)?.iter().position(|&b| b == b'\n')?;
        let start = nl + 1;
        if start > max_head {
            return None;
        }
        let rest = &bytes[start..];
        match rest.first() {
            // An empty line (`\n` or `\r\n`): the head ends after it.
            Some(b'\n') => return Some(start + 1).filter(|&n| n <= max_head),
            Some(b'\r') if rest.get(1) == Some(&b'\n') => {
                return Some(start + 2).filter(|&n| n <= max_head);
            }
            Some(b'\r') => return None,
            Some(&c) if matches!(c | 0x20, b'c' | b't' | b'u') => {
                for name in NAMES {
                    // Shorter: another name, or a line not ended yet (and
                    // then no empty line follows: `None` below).
                    let Some(prefix) = rest.get(..name.len()) else {
                        continue;
                    };
                    if prefix.eq_ignore_ascii_case(name) {
                        // Another name only if it goes on (`Upgrade-Insecure-Requests`).
                        match rest.get(name.len()) {
                            Some(&b) if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' => {}
                            _ => return None,
                        }
                    }
                }
            }
            Some(_) => {}
            None => return None,
        }
        lines += 1;
        if lines > max_headers {
            return None;
        }
        at = start;
    }
}

/// A Content-Length value as hyper reads it: ASCII digits only, no sign,
/// no list, no overflow.
fn digits(v: &[u8]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Whether a Transfer-Encoding value ends in `chunked`, as hyper reads it
/// (a value with bytes outside visible ASCII is not chunked).
fn ends_chunked(v: &[u8]) -> bool {
    if !v.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\t') {
        return false;
    }
    std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// Where a chunked body is; the grammar is hyper's decoder's
/// (`proto/h1/decode.rs`), byte for byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ChunkAt {
    #[default]
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Chunked {
    at: ChunkAt,
    /// The chunk size being read, then the data bytes left.
    size: u64,
}

impl Chunked {
    /// Read from `data`: how many bytes belong to this body, and whether it
    /// ended there. `None`: malformed (hyper fails the body and closes).
    fn advance(&mut self, data: &[u8]) -> Option<(usize, bool)> {
        use ChunkAt::*;
        let mut i = 0;
        while i < data.len() {
            if self.at == Data {
                let n = usize::try_from(self.size)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - i);
                i += n;
                self.size -= n as u64;
                if self.size == 0 {
                    self.at = DataCr;
                }
                continue;
            }
            let b = data[i];
            i += 1;
            self.at = match (self.at, b) {
                (Start | Size, _) if b.is_ascii_hexdigit() => {
                    let d = u64::from(hex(b));
                    self.size = self.size.checked_mul(16)?.checked_add(d)?;
                    Size
                }
                (Size | SizeLws, b' ' | b'\t') => SizeLws,
                (Size | SizeLws, b';') => Extension,
                (Size | SizeLws | Extension, b'\r') => SizeLf,
                (Extension, b'\n') => return None,
                (Extension, _) => Extension,
                (SizeLf, b'\n') if self.size == 0 => EndCr,
                (SizeLf, b'\n') => Data,
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Start,
                (EndCr, b'\r') => EndLf,
                (Trailer, b'\r') => TrailerLf,
                (EndCr | Trailer, _) => Trailer,
                (TrailerLf, b'\n') => EndCr,
                (EndLf, b'\n') => return Some((i, true)),
                _ => return None,
            };
        }
        Some((i, false))
    }
}

fn hex(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// [`Framing`] shared by a connection's [`H1Guard`] and its service.
#[derive(Debug, Clone)]
pub(crate) struct FramingHandle(Arc<Mutex<Framing>>);

impl FramingHandle {
    pub(crate) fn new(max_head: usize, max_headers: usize) -> Self {
        FramingHandle(Arc::new(Mutex::new(Framing::new(max_head, max_headers))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Framing> {
        // Only this module locks it, and nothing in it panics while
        // holding it; a poisoned state is still a consistent one.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Feed read bytes; false once inspection stopped for good.
    fn feed(&self, data: &[u8]) -> bool {
        let mut f = self.lock();
        f.feed(data);
        !f.is_off()
    }

    /// The service was handed its next request; see [`Framing::admit`].
    pub(crate) fn admit(&self, headers: &HeaderMap) -> Verdict {
        let a = self
            .lock()
            .admit(headers.contains_key(header::TRANSFER_ENCODING));
        Verdict {
            conflicting: a.conflicting,
            answer_to: a.awaits_answer.then(|| (self.clone(), a.index)),
        }
    }
}

/// What the service learns about one request.
#[derive(Debug)]
pub(crate) struct Verdict {
    /// Both `Content-Length` and `Transfer-Encoding`: answer 400.
    pub conflicting: bool,
    /// An upgrade request: the framing waits for its answer.
    answer_to: Option<(FramingHandle, u64)>,
}

impl Verdict {
    /// Report the status the request was answered with.
    pub(crate) fn answered(self, status: StatusCode) {
        if let Some((f, index)) = self.answer_to {
            f.lock().answered(index, status);
        }
    }
}

/// A client stream whose reads feed a [`Framing`]. Without a handle (or
/// once inspection stopped) it only passes bytes through.
#[derive(Debug)]
pub(crate) struct H1Guard<T> {
    inner: T,
    framing: Option<FramingHandle>,
}

impl<T> H1Guard<T> {
    pub(crate) fn new(inner: T, framing: Option<FramingHandle>) -> Self {
        H1Guard { inner, framing }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for H1Guard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(f)) = (&polled, &this.framing) {
            let read = &buf.filled()[before..];
            if !read.is_empty() && !f.feed(read) {
                this.framing = None;
            }
        }
        polled
    }
}

crate::io::delegate_async_write!(H1Guard);

/// [`Framing`] as the `h1_framing` fuzz target (router/fuzz) drives it from
/// outside the crate, with the internals it checks; not an API.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use http::StatusCode;

    /// A partial-head buffer larger than this is freed once the head is read.
    pub const KEEP_CAPACITY: usize = super::KEEP_CAPACITY;

    /// The framing of one client connection.
    #[derive(Debug)]
    pub struct Framing(super::Framing);

    /// Where the request stream is.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Phase {
        Head,
        Body,
        Chunked,
        Paused,
        Off,
    }

    /// The framing's state, internals included.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Snapshot {
        pub phase: Phase,
        pub held_len: usize,
        pub held_capacity: usize,
        /// Empty lines dropped before the partial head.
        pub skipped: usize,
        pub heads: u64,
        pub admitted: u64,
        pub conflict: Option<u64>,
        /// The pending upgrade request: its index, and whether a CONNECT.
        pub upgrade: Option<(u64, bool)>,
        /// Bytes handed to the head parser so far.
        pub parsed: u64,
    }

    /// What the service learns about the request it was just handed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Admission {
        pub index: u64,
        pub conflicting: bool,
        pub awaits_answer: bool,
    }

    impl Framing {
        pub fn new(max_head: usize, max_headers: usize) -> Self {
            Framing(super::Framing::new(max_head, max_headers))
        }

        pub fn feed(&mut self, data: &[u8]) {
            self.0.feed(data);
        }

        pub fn is_off(&self) -> bool {
            self.0.is_off()
        }

        pub fn admit(&mut self, has_te: bool) -> Admission {
            let a = self.0.admit(has_te);
            Admission {
                index: a.index,
                conflicting: a.conflicting,
                awaits_answer: a.awaits_answer,
            }
        }

        /// `status`: a valid code (100 to 999), else ignored.
        pub fn answered(&mut self, index: u64, status: u16) {
            if let Ok(s) = StatusCode::from_u16(status) {
                self.0.answered(index, s);
            }
        }

        pub fn snapshot(&self) -> Snapshot {
            let f = &self.0;
            Snapshot {
                phase: match f.state {
                    super::State::Head => Phase::Head,
                    super::State::Body(_) => Phase::Body,
                    super::State::Chunked(_) => Phase::Chunked,
                    super::State::Paused => Phase::Paused,
                    super::State::Off => Phase::Off,
                },
                held_len: f.held.len(),
                held_capacity: f.held.capacity(),
                skipped: f.skipped,
                heads: f.heads,
                admitted: f.admitted,
                conflict: f.conflict,
                upgrade: f.upgrade.map(|u| (u.index, u.connect)),
                parsed: f.parsed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX_HEAD: usize = 8192;
    /// A body that reads like a conflicting request.
    const DECOY: &[u8] =
        b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    const CONFLICT: &[u8] =
        b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    fn framing() -> Framing {
        Framing::new(MAX_HEAD, 100)
    }

    fn fed(parts: &[&[u8]]) -> Framing {
        let mut f = framing();
        for p in parts {
            f.feed(p);
        }
        f
    }

    #[derive(Debug, Clone)]
    enum Body {
        None,
        Sized(Vec<u8>),
        /// Chunks, with extensions, with trailers.
        Chunked(Vec<Vec<u8>>, bool, bool),
    }

    fn request(body: &Body) -> Vec<u8> {
        let mut out = b"POST /p HTTP/1.1\r\nHost: a.test\r\n".to_vec();
        match body {
            Body::None => out.extend_from_slice(b"\r\n"),
            Body::Sized(b) => {
                out.extend_from_slice(format!("content-LENGTH: {}\r\n\r\n", b.len()).as_bytes());
                out.extend_from_slice(b);
            }
            Body::Chunked(chunks, ext, trailers) => {
                out.extend_from_slice(b"Transfer-Encoding: gzip, Chunked\r\n\r\n");
                for c in chunks.iter().filter(|c| !c.is_empty()) {
                    let e = if *ext { " ;name=\"va;l\"" } else { "" };
                    out.extend_from_slice(format!("{:X}{e}\r\n", c.len()).as_bytes());
                    out.extend_from_slice(c);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(if *ext { b"000;last\r\n" } else { b"0\r\n" });
                if *trailers {
                    out.extend_from_slice(b"Content-Length: 7\r\nX-T: v\r\n");
                }
                out.extend_from_slice(b"\r\n");
            }
        }
        out
    }

    fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(DECOY.to_vec()),
            Just(b"\r\n0\r\n\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..64),
        ]
    }

    fn body() -> impl Strategy<Value = Body> {
        prop_oneof![
            Just(Body::None),
            body_bytes().prop_map(Body::Sized),
            (
                proptest::collection::vec(body_bytes(), 0..4),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(c, e, t)| Body::Chunked(c, e, t)),
        ]
    }

    /// Feed `stream` in pieces of the given sizes (cycled), then the rest.
    fn feed_in(f: &mut Framing, stream: &[u8], sizes: &[usize]) {
        let mut rest = stream;
        for &n in sizes.iter().cycle().take(stream.len()) {
            if rest.is_empty() {
                break;
            }
            let (a, b) = rest.split_at(n.clamp(1, rest.len()));
            f.feed(a);
            rest = b;
        }
        f.feed(rest);
    }

    /// Head lines that `plain_head` must tell apart.
    fn head_line() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            Just("Host: a.test"),
            Just("Content-Length: 3"),
            Just("content-LENGTH: 0"),
            Just("Content-Length : 3"),
            Just("Content-Lengthy: 3"),
            Just("Content-Length"),
            Just("Transfer-Encoding: chunked"),
            Just("TRANSFER-ENCODING: gzip, chunked"),
            Just("Transfer-Encoding-X: chunked"),
            Just("TE: trailers"),
            Just("Upgrade: websocket"),
            Just("upgrade:h2c"),
            Just("Upgrade-Insecure-Requests: 1"),
            Just("Cookie: a=b"),
            Just("Connection: close"),
            Just("User-Agent: x"),
            Just(" folded"),
            Just("Bad Name: x"),
            Just("C"),
            Just(""),
        ]
    }

    fn head_bytes() -> impl Strategy<Value = Vec<u8>> {
        (
            prop_oneof![
                Just("GET / HTTP/1.1"),
                Just("POST /p HTTP/1.1"),
                Just("CONNECT a:1 HTTP/1.1"),
                Just("GET / HTTP/1.0"),
                Just("get / HTTP/1.1"),
                Just("TRACE / HTTP/1.1"),
                Just(""),
            ],
            proptest::collection::vec(head_line(), 0..6),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..8),
        )
            .prop_map(|(first, lines, crlf, tail)| {
                let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
                // An empty line among `lines` ends the head where it falls.
                let mut out = first.as_bytes().to_vec();
                out.extend_from_slice(eol);
                for l in lines {
                    out.extend_from_slice(l.as_bytes());
                    out.extend_from_slice(eol);
                }
                out.extend_from_slice(eol);
                out.extend(tail);
                out
            })
    }

    proptest! {
        /// Whatever `plain_head` takes without the parser, the parser reads
        /// as the same head with no framing header, no upgrade, or refuses.
        #[test]
        fn plain_heads_are_what_the_parser_reads(head in head_bytes(), cut in 0usize..200) {
            let head = &head[..cut.min(head.len())];
            let Some(n) = plain_head(head, MAX_HEAD, 100) else {
                return Ok(());
            };
            let mut slots = [httparse::EMPTY_HEADER; 100];
            let mut req = httparse::Request::new(&mut slots);
            match req.parse(head) {
                Ok(httparse::Status::Complete(len)) => {
                    prop_assert_eq!(len, n);
                    prop_assert_ne!(req.method, Some("CONNECT"));
                    for h in req.headers.iter() {
                        for name in ["content-length", "transfer-encoding", "upgrade"] {
                            prop_assert!(!h.name.eq_ignore_ascii_case(name), "{}", h.name);
                        }
                    }
                }
                Ok(httparse::Status::Partial) => prop_assert!(false, "partial, taken as {n}"),
                Err(_) => {}
            }
        }
    }

    #[test]
    fn plain_heads_skip_the_parser() {
        let mut f = fed(&[
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade-Insecure-Requests: 1\r\nCookie: c\r\n\r\n",
            b"GET / HTTP/1.1\nhost: a\n\n",
        ]);
        assert_eq!((f.parsed, f.heads, f.state), (0, 2, State::Head));
        f.feed(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab");
        assert!(f.parsed > 0);
        assert_eq!((f.heads, f.state), (3, State::Head));
    }

    #[test]
    fn both_lengths_in_either_order_are_flagged() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: 4\r\nTRANSFER-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            // Values hyper would refuse or ignore still count.
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: nope\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let f = fed(&[head]);
            assert_eq!(f.conflict(), Some(0), "{}", String::from_utf8_lossy(head));
            assert!(f.is_off());
        }
    }

    #[test]
    fn one_length_header_is_not_flagged() {
        for head in [
            &b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-Content-Length: 4\r\nX-Transfer-Encoding: chunked\r\n\r\n",
        ] {
            let f = fed(&[head]);
            assert_eq!(f.conflict(), None);
            assert_eq!(f.state, State::Head);
        }
    }

    #[test]
    fn pipelined_requests_flag_the_right_one_at_every_split() {
        let mut stream = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n".to_vec();
        stream.extend(request(&Body::Sized(DECOY.to_vec())));
        stream.extend(request(&Body::Chunked(
            vec![DECOY.to_vec(), b"x".to_vec()],
            true,
            true,
        )));
        stream.extend_from_slice(b"\r\n");
        stream.extend(request(&Body::None));
        stream.extend_from_slice(CONFLICT);
        stream.extend_from_slice(b"GET /after HTTP/1.1\r\n\r\n");
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let f = fed(&[a, b]);
            assert_eq!(f.conflict(), Some(4), "split at {cut}");
        }
        for size in [1, 2, 3, 7, 50] {
            let mut f = framing();
            feed_in(&mut f, &stream, &[size]);
            assert_eq!(f.conflict(), Some(4), "pieces of {size}");
        }
    }

    #[test]
    fn bodies_that_read_like_conflicting_requests_are_not_flagged() {
        let mut stream = request(&Body::Sized(DECOY.to_vec()));
        stream.extend(request(&Body::Chunked(vec![DECOY.to_vec()], false, false)));
        for size in [1, 5, 4096] {
            let mut f = framing();
            feed_in(&mut f, &stream, &[size]);
            assert_eq!(f.conflict(), None);
            assert_eq!(f.state, State::Head);
            assert_eq!(f.heads, 2);
        }
    }

    #[test]
    fn empty_lines_before_a_head_are_parsed_once_and_count_towards_the_limit() {
        // hyper skips empty lines before a request line, within its buffer
        // limit. Each one could end a head, and the held bytes used to be
        // parsed again at each: quadratic, seconds of CPU for 64 KiB of
        // them (found by the h1_framing fuzz target).
        let max = 64 * 1024;
        let mut f = Framing::new(max, 100);
        f.feed(b"\n");
        f.feed(&vec![b'\n'; max / 2]);
        f.feed(&b"\r\n".repeat(max / 8));
        f.feed(CONFLICT);
        assert_eq!(f.conflict(), Some(0));
        assert!(f.parsed < 3 * max as u64, "parsed {} bytes", f.parsed);

        // Up to the limit, with the head, and not one byte more.
        let head = CONFLICT.len() - b"0\r\n\r\n".len();
        for (extra, conflict) in [(0, Some(0)), (1, None)] {
            let mut stream = vec![b'\n'; MAX_HEAD - head + extra];
            stream.extend_from_slice(CONFLICT);
            for size in [1, 2, 7, 4096] {
                let mut f = framing();
                feed_in(&mut f, &stream, &[size]);
                assert_eq!(f.conflict(), conflict, "{extra} over, pieces of {size}");
                assert!(f.parsed <= 2 * stream.len() as u64, "parsed {}", f.parsed);
            }
        }
    }

    #[test]
    fn http2_prior_knowledge_stops_inspection() {
        let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        stream.extend_from_slice(CONFLICT);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let f = fed(&[a, b]);
            assert!(f.is_off(), "split at {cut}");
            assert_eq!(f.conflict(), None);
        }
    }

    const WS: &[u8] =
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

    #[test]
    fn a_refused_upgrade_resumes_on_the_kept_bytes() {
        let mut stream = WS.to_vec();
        stream.extend_from_slice(CONFLICT);
        for cut in 0..=stream.len() {
            let (a, b) = stream.split_at(cut);
            let mut f = fed(&[a]);
            // hyper hands the request over once its head is read.
            if cut < WS.len() {
                f.feed(b);
            }
            assert!(f.admit(false).awaits_answer);
            if cut >= WS.len() {
                f.feed(b);
            }
            assert_eq!(f.conflict(), None, "parsed before the answer");
            f.answered(0, StatusCode::FORBIDDEN);
            assert_eq!(f.conflict(), Some(1), "split at {cut}");
            assert!(f.admit(true).conflicting);
        }
    }

    #[test]
    fn a_switched_upgrade_is_a_tunnel_and_stops_inspection() {
        let mut f = fed(&[WS, CONFLICT]);
        f.admit(false);
        f.answered(0, StatusCode::SWITCHING_PROTOCOLS);
        assert!(f.is_off());
        f.feed(CONFLICT);
        assert_eq!(f.conflict(), None);
    }

    #[test]
    fn connect_is_a_tunnel_on_2xx_only() {
        let connect = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        let mut f = fed(&[connect, CONFLICT]);
        assert!(f.admit(false).awaits_answer);
        f.answered(0, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(f.conflict(), Some(1));
        let mut f = fed(&[connect, CONFLICT]);
        f.admit(false);
        f.answered(0, StatusCode::OK);
        assert!(f.is_off());
        assert_eq!(f.conflict(), None);
    }

    #[test]
    fn an_upgrade_answered_before_its_body_ends_does_not_pause() {
        let head = b"POST /ws HTTP/1.1\r\nUpgrade: x\r\nContent-Length: 3\r\n\r\nab";
        let mut f = fed(&[head]);
        let a = f.admit(false);
        f.answered(a.index, StatusCode::NOT_FOUND);
        f.feed(b"c");
        assert_eq!(f.state, State::Head);
        f.feed(CONFLICT);
        assert_eq!(f.conflict(), Some(1));
    }

    #[test]
    fn an_unanswered_upgrade_keeps_at_most_max_head_bytes() {
        let mut f = fed(&[WS]);
        f.feed(&vec![b'x'; MAX_HEAD]);
        assert_eq!(f.state, State::Paused);
        f.feed(b"x");
        assert!(f.is_off());
        // Answers to other requests change nothing.
        let mut f = fed(&[WS, CONFLICT]);
        f.answered(7, StatusCode::OK);
        assert_eq!(f.state, State::Paused);
    }

    #[test]
    fn oversized_heads_and_too_many_headers_stop_inspection() {
        let mut big = b"GET / HTTP/1.1\r\nX-Big: ".to_vec();
        big.extend(vec![b'a'; MAX_HEAD]);
        big.extend_from_slice(b"\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        // hyper reads at most its buffer limit at once, so a larger head
        // always comes in pieces.
        for size in [1, 1000, MAX_HEAD] {
            let mut f = framing();
            feed_in(&mut f, &big, &[size]);
            assert!(f.is_off(), "pieces of {size}");
            assert_eq!(f.conflict(), None);
        }
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n");
        let f = fed(&[&many]);
        assert!(f.is_off());
        assert_eq!(f.conflict(), None);
        // The same head within the limits is read, and a larger limit
        // (past the stack slots) is honoured.
        let mut f = Framing::new(MAX_HEAD, 200);
        f.feed(&many);
        assert_eq!(f.conflict(), Some(0));
    }

    #[test]
    fn framing_hyper_refuses_stops_inspection() {
        for bad in [
            &b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 4, 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1;a\nb\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
            b"POST / HTTP/1.1\r\nBad Name: x\r\nContent-Length: 1\r\n\r\n",
            b"POST / HTTP/2.0\r\nContent-Length: 1\r\n\r\n",
        ] {
            let f = fed(&[bad]);
            assert!(f.is_off(), "{}", String::from_utf8_lossy(bad));
        }
        // Heads with no framing header are taken without the parser
        // (`plain_head`), malformed or not: hyper refuses these and closes,
        // so what the framing makes of the rest never matters.
        for bad in [
            &b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n"[..],
            b"GET / HTTP/2.0\r\n\r\n",
        ] {
            let f = fed(&[bad]);
            assert_eq!(
                (f.heads, f.parsed),
                (1, 0),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn admission_counts_requests_and_wants_transfer_encoding_on_the_flagged_one() {
        let mut f = fed(&[b"GET / HTTP/1.1\r\n\r\n", CONFLICT]);
        assert!(!f.admit(false).conflicting);
        let second = f.admit(false);
        assert_eq!(second.index, 1);
        // Flagged, but hyper's request has no Transfer-Encoding: the
        // count went astray, so nothing is refused.
        assert!(!second.conflicting);
        let mut f = fed(&[b"GET / HTTP/1.1\r\n\r\n", CONFLICT]);
        assert!(!f.admit(true).conflicting);
        assert!(f.admit(true).conflicting);
        assert!(!f.admit(true).conflicting);
    }

    #[tokio::test]
    async fn the_guard_feeds_what_each_read_returns() {
        use tokio::io::AsyncReadExt;
        let mut stream = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        stream.extend_from_slice(CONFLICT);
        let handle = FramingHandle::new(MAX_HEAD, 100);
        let mut g = H1Guard::new(&stream[..], Some(handle.clone()));
        let mut buf = [0u8; 7];
        let mut out = Vec::new();
        loop {
            let n = g.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, stream);
        assert!(g.framing.is_none(), "still inspecting after the conflict");
        let mut h = HeaderMap::new();
        h.insert(header::TRANSFER_ENCODING, "chunked".parse().unwrap());
        assert!(!handle.admit(&h).conflicting);
        assert!(handle.admit(&h).conflicting);
        // An upgrade request's answer reaches the framing.
        let handle = FramingHandle::new(MAX_HEAD, 100);
        let mut stream = WS.to_vec();
        stream.extend_from_slice(CONFLICT);
        let mut g = H1Guard::new(&stream[..], Some(handle.clone()));
        let mut sink = Vec::new();
        g.read_to_end(&mut sink).await.unwrap();
        handle.admit(&h).answered(StatusCode::NOT_FOUND);
        assert!(handle.admit(&h).conflicting);
    }

    /// One request of a stream sent to a real hyper server.
    #[derive(Debug, Clone)]
    enum Sent {
        Plain(Body),
        /// An upgrade request (CONNECT when true) that is refused.
        Upgrade(bool),
    }

    fn sent() -> impl Strategy<Value = Sent> {
        prop_oneof![
            4 => body().prop_map(Sent::Plain),
            1 => any::<bool>().prop_map(Sent::Upgrade),
        ]
    }

    /// Serve `stream`, written in pieces of `sizes`, with hyper behind an
    /// [`H1Guard`], answering as the router does. Returns, per request
    /// hyper handed over: whether it was refused as conflicting.
    fn served_by_hyper(stream: Vec<u8>, sizes: Vec<usize>, expect: usize) -> Vec<bool> {
        use http_body_util::{BodyExt, Empty};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let handle = FramingHandle::new(MAX_HEAD, 100);
            let io = hyper_util::rt::TokioIo::new(H1Guard::new(server, Some(handle.clone())));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let a = handle.admit(req.headers());
                    let tx = tx.clone();
                    async move {
                        let _ = tx.send(a.conflicting);
                        let mut resp = http::Response::new(Empty::<bytes::Bytes>::new());
                        if a.conflicting {
                            *resp.status_mut() = StatusCode::BAD_REQUEST;
                            resp.headers_mut()
                                .insert(header::CONNECTION, "close".parse().unwrap());
                        } else {
                            let upgrade = req.headers().contains_key(header::UPGRADE)
                                || req.method() == http::Method::CONNECT;
                            let _ = req.into_body().collect().await;
                            if upgrade {
                                *resp.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                            }
                        }
                        a.answered(resp.status());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(MAX_HEAD)
                .serve_connection(io, svc)
                .with_upgrades();
            tokio::spawn(conn);
            tokio::spawn(async move {
                let mut rest = &stream[..];
                for &n in sizes.iter().cycle() {
                    if rest.is_empty() {
                        break;
                    }
                    let (a, b) = rest.split_at(n.clamp(1, rest.len()));
                    if client.write_all(a).await.is_err() {
                        return;
                    }
                    rest = b;
                    tokio::task::yield_now().await;
                }
                // Drain the answers until hyper closes.
                let mut sink = Vec::new();
                let _ = client.read_to_end(&mut sink).await;
            });
            let mut seen = Vec::new();
            let deadline = tokio::time::sleep(std::time::Duration::from_secs(2));
            tokio::pin!(deadline);
            while seen.len() < expect {
                tokio::select! {
                    v = rx.recv() => match v { Some(v) => seen.push(v), None => break },
                    _ = &mut deadline => break,
                }
            }
            // Anything hyper hands over past the expected count is wrong too.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            while let Ok(v) = rx.try_recv() {
                seen.push(v);
            }
            seen
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The guard's count of requests is hyper's: exactly the
        /// conflicting request is refused, whatever came before it.
        #[test]
        fn hyper_refuses_exactly_the_conflicting_request(
            reqs in proptest::collection::vec(sent(), 0..6),
            sizes in proptest::collection::vec(1usize..300, 1..6),
            conflict in any::<bool>(),
        ) {
            let mut stream = Vec::new();
            for r in &reqs {
                match r {
                    Sent::Plain(b) => stream.extend(request(b)),
                    Sent::Upgrade(false) => stream.extend_from_slice(WS),
                    Sent::Upgrade(true) => stream.extend_from_slice(b"CONNECT a:1 HTTP/1.1\r\nHost: a:1\r\n\r\n"),
                }
            }
            let mut want = vec![false; reqs.len()];
            if conflict {
                stream.extend_from_slice(CONFLICT);
                want.push(true);
                // Never served: hyper closes after the conflicting one.
                stream.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
            }
            let got = served_by_hyper(stream, sizes, want.len());
            prop_assert_eq!(got, want);
        }
    }

    proptest! {
        #[test]
        fn well_formed_streams_are_never_flagged_and_always_followed(
            bodies in proptest::collection::vec(body(), 1..6),
            sizes in proptest::collection::vec(1usize..200, 1..8),
            at in 0usize..6,
        ) {
            let mut stream = Vec::new();
            for b in &bodies {
                stream.extend(request(b));
            }
            let mut f = framing();
            feed_in(&mut f, &stream, &sizes);
            prop_assert_eq!(f.conflict(), None);
            prop_assert_eq!(f.state, State::Head);
            prop_assert_eq!(f.heads, bodies.len() as u64);

            // The same stream with a conflicting request inserted: that
            // one is flagged.
            let at = at.min(bodies.len());
            let mut stream = Vec::new();
            for (i, b) in bodies.iter().enumerate() {
                if i == at {
                    stream.extend_from_slice(CONFLICT);
                }
                stream.extend(request(b));
            }
            if at == bodies.len() {
                stream.extend_from_slice(CONFLICT);
            }
            let mut f = framing();
            feed_in(&mut f, &stream, &sizes);
            prop_assert_eq!(f.conflict(), Some(at as u64));
        }

        #[test]
        fn any_bytes_are_taken_without_panic(
            stream in proptest::collection::vec(any::<u8>(), 0..512),
            sizes in proptest::collection::vec(1usize..64, 1..4),
        ) {
            let mut f = Framing::new(256, 8);
            feed_in(&mut f, &stream, &sizes);
            let a = f.admit(true);
            f.answered(a.index, StatusCode::OK);
        }
    }
}
