//! The access log: one JSON line per request, written off the request path.
//!
//! The request path only fills an [`Entry`] (copies and reference-counted
//! clones, no formatting) and hands it to a bounded channel with `try_send`:
//! it never waits on the log. A writer thread formats and writes the lines,
//! batching what is queued into one write. When the channel is full (the
//! disk cannot keep up) the entry is dropped and counted, rather than
//! slowing requests down.
//!
//! A file is reopened when it was rotated away (renamed or removed: its
//! path no longer names the open file, checked every second) and on
//! [`AccessLog::reopen`] (the binary calls it on SIGHUP).

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, SystemTime};

use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Version};

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
}

impl Target {
    /// `-` is standard output; anything else a file path.
    pub fn parse(s: &str) -> Target {
        if s == "-" {
            Target::Stdout
        } else {
            Target::File(PathBuf::from(s))
        }
    }
}

/// One request, as the request path saw it.
#[derive(Debug)]
pub struct Entry {
    /// When the request came in.
    pub time: SystemTime,
    pub client: IpAddr,
    /// The host as the client sent it (`:authority` or `Host`).
    pub host: Option<HeaderValue>,
    pub method: Method,
    pub path: Option<PathAndQuery>,
    pub status: u16,
    /// Response body bytes sent (taken by hyper).
    pub bytes: u64,
    /// From the request to the end (or abandonment) of its response body.
    pub duration: Duration,
    /// The route's key (`host/prefix`), when one matched.
    pub route: Option<Arc<str>>,
    /// The last backend tried.
    pub backend: Option<SocketAddr>,
    /// From sending to the backend to its response headers.
    pub upstream: Option<Duration>,
    pub tls: bool,
    pub version: Version,
    /// Whose fault a failure was (`client`, `backend`, `router`).
    pub fault: Option<&'static str>,
}

/// Lines queued at most; past this they are dropped (and counted).
const QUEUE: usize = 16 * 1024;
/// How long the writer lets lines gather after a write (lines reach the
/// file at most this late, plus the write).
const GATHER: Duration = Duration::from_millis(10);
/// How often the writer checks whether its file was rotated away.
const ROTATION_CHECK: Duration = Duration::from_secs(1);

/// The handle the router logs through: cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Entry>,
    reopen: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("dropped", &self.dropped.load(Relaxed))
            .finish()
    }
}

impl AccessLog {
    /// Open the target (a file is created, and appended to) and start the
    /// writer thread, which ends once every handle is gone.
    pub fn open(target: Target) -> std::io::Result<AccessLog> {
        let out = Output::open(&target)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_loop(rx, out, target, flag))?;
        Ok(AccessLog {
            tx,
            reopen,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Queue a line; never waits.
    pub fn log(&self, e: Entry) {
        match self.tx.try_send(e) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Relaxed);
            }
        }
    }

    /// Reopen the file before the next line (after an outside rotation
    /// that kept the old name, say).
    pub fn reopen(&self) {
        self.reopen.store(true, Relaxed);
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

enum Output {
    Stdout(std::io::Stdout),
    File {
        file: std::io::BufWriter<std::fs::File>,
        /// (device, inode) of the open file.
        id: (u64, u64),
    },
}

fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

impl Output {
    fn open(target: &Target) -> std::io::Result<Output> {
        match target {
            Target::Stdout => Ok(Output::Stdout(std::io::stdout())),
            Target::File(p) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?;
                let id = file_id(&file.metadata()?);
                Ok(Output::File {
                    file: std::io::BufWriter::with_capacity(64 * 1024, file),
                    id,
                })
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Output::Stdout(s) => {
                let mut s = s.lock();
                s.write_all(bytes)?;
                s.flush()
            }
            Output::File { file, .. } => {
                file.write_all(bytes)?;
                file.flush()
            }
        }
    }

    /// The path no longer names the open file (renamed or removed).
    fn rotated(&self, path: &Path) -> bool {
        match self {
            Output::Stdout(_) => false,
            Output::File { id, .. } => std::fs::metadata(path).map_or(true, |m| file_id(&m) != *id),
        }
    }
}

fn write_loop(rx: Receiver<Entry>, mut out: Output, target: Target, reopen: Arc<AtomicBool>) {
    let mut buf: Vec<u8> = Vec::with_capacity(256 * 1024);
    let mut last_check = std::time::Instant::now();
    loop {
        let first = match rx.recv_timeout(ROTATION_CHECK) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let due = last_check.elapsed() >= ROTATION_CHECK;
        if reopen.swap(false, Relaxed)
            || (due && matches!(&target, Target::File(p) if out.rotated(p)))
        {
            match Output::open(&target) {
                Ok(o) => out = o,
                Err(e) => {
                    tracing::warn!(error = %e, "access log: reopening failed; writing on to the old file")
                }
            }
        }
        if due {
            last_check = std::time::Instant::now();
        }
        let Some(first) = first else { continue };
        buf.clear();
        format_entry(&mut buf, &first);
        // Whatever else is queued goes in the same write.
        while buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(e) => format_entry(&mut buf, &e),
                Err(_) => break,
            }
        }
        if let Err(e) = out.write(&buf) {
            tracing::warn!(error = %e, "access log: write failed");
        }
        // Let lines gather: while this thread sleeps instead of waiting
        // on the channel, queueing a line wakes nobody (no futex call on
        // the request path), and the next write takes them all.
        #[allow(clippy::disallowed_methods)] // the writer's own OS thread, not a tokio worker
        std::thread::sleep(GATHER);
    }
}

/// One JSON line. Fields with nothing to say are `null`.
///
/// Numbers, addresses and times are written by hand: `core::fmt` (floats
/// above all, and `Ipv4Addr`'s `Display`) made up most of the log's cost,
/// 8,800 instructions a line of 10,400 per logged request in all
/// (bench/router_instr.sh with `PORTLESS_BENCH_ACCESS_LOG`).
pub fn format_entry(out: &mut Vec<u8>, e: &Entry) {
    out.extend_from_slice(b"{\"time\":\"");
    rfc3339(out, e.time);
    out.extend_from_slice(b"\",\"client\":\"");
    push_ip(out, e.client);
    out.extend_from_slice(b"\",\"host\":");
    json_str(out, e.host.as_ref().map(|h| h.as_bytes()));
    out.extend_from_slice(b",\"method\":");
    json_str(out, Some(e.method.as_str().as_bytes()));
    out.extend_from_slice(b",\"path\":");
    json_str(out, e.path.as_ref().map(|p| p.as_str().as_bytes()));
    out.extend_from_slice(b",\"status\":");
    push_u64(out, u64::from(e.status));
    out.extend_from_slice(b",\"bytes\":");
    push_u64(out, e.bytes);
    out.extend_from_slice(b",\"duration_ms\":");
    push_ms(out, e.duration);
    out.extend_from_slice(b",\"route\":");
    json_str(out, e.route.as_deref().map(str::as_bytes));
    out.extend_from_slice(b",\"backend\":");
    match e.backend {
        Some(b) => {
            out.push(b'"');
            if b.is_ipv6() {
                out.push(b'[');
                push_ip(out, b.ip());
                out.push(b']');
            } else {
                push_ip(out, b.ip());
            }
            out.push(b':');
            push_u64(out, u64::from(b.port()));
            out.push(b'"');
        }
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"upstream_ms\":");
    match e.upstream {
        Some(u) => push_ms(out, u),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"tls\":");
    out.extend_from_slice(if e.tls { b"true" } else { b"false" });
    out.extend_from_slice(b",\"http\":\"");
    out.extend_from_slice(match e.version {
        Version::HTTP_09 => b"HTTP/0.9",
        Version::HTTP_10 => b"HTTP/1.0",
        Version::HTTP_11 => b"HTTP/1.1",
        Version::HTTP_2 => b"HTTP/2.0",
        Version::HTTP_3 => b"HTTP/3.0",
        _ => b"?",
    });
    out.extend_from_slice(b"\",\"fault\":");
    json_str(out, e.fault.map(str::as_bytes));
    out.extend_from_slice(b"}\n");
}

fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let mut text = crate::headers::IpText::default();
    out.extend_from_slice(text.format(ip));
}

fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        // v % 10 < 10: the cast cannot truncate.
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// `v` in `width` digits at least, zero-padded.
fn push_padded(out: &mut Vec<u8>, v: u64, width: usize) {
    let mut n = 1;
    let mut rest = v / 10;
    while rest > 0 {
        n += 1;
        rest /= 10;
    }
    for _ in n..width {
        out.push(b'0');
    }
    push_u64(out, v);
}

/// Milliseconds with three decimals (microsecond precision).
fn push_ms(out: &mut Vec<u8>, d: Duration) {
    let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, micros / 1000);
    out.push(b'.');
    push_padded(out, micros % 1000, 3);
}

/// A JSON string (or `null`); bytes outside printable ASCII are escaped as
/// `\u00XX`, so that a hostile path cannot break the line or the JSON.
fn json_str(out: &mut Vec<u8>, s: Option<&[u8]>) {
    let Some(s) = s else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    for &b in s {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            0x20..=0x7e => out.push(b),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        }
    }
    out.push(b'"');
}

/// `2026-12-07T02:19:28.123Z`.
fn rfc3339(out: &mut Vec<u8>, t: SystemTime) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    push_padded(out, n(year), 4);
    out.push(b'-');
    push_padded(out, n(month), 2);
    out.push(b'-');
    push_padded(out, n(day), 2);
    out.push(b'T');
    push_padded(out, rem / 3600, 2);
    out.push(b':');
    push_padded(out, rem % 3600 / 60, 2);
    out.push(b':');
    push_padded(out, rem % 60, 2);
    out.push(b'.');
    push_padded(out, u64::from(d.subsec_millis()), 3);
    out.push(b'Z');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_rfc3339() {
        let mut s = Vec::new();
        rfc3339(&mut s, SystemTime::UNIX_EPOCH);
        assert_eq!(String::from_utf8_lossy(&s), "1970-01-01T00:00:00.000Z");
        s.clear();
        // 2024-02-29T12:34:56.789Z, a leap day.
        rfc3339(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_210_096_789),
        );
        assert_eq!(String::from_utf8_lossy(&s), "2024-02-29T12:34:56.789Z");
        s.clear();
        rfc3339(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400),
        );
        assert_eq!(String::from_utf8_lossy(&s), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn numbers_and_addresses_format_as_fmt_does() {
        for v in [0u64, 1, 9, 10, 99, 100, 12_345, u64::MAX] {
            let mut s = Vec::new();
            push_u64(&mut s, v);
            assert_eq!(String::from_utf8_lossy(&s), v.to_string());
            for w in [2, 3, 4] {
                let mut s = Vec::new();
                push_padded(&mut s, v, w);
                assert_eq!(String::from_utf8_lossy(&s), format!("{v:0w$}"));
            }
        }
        for us in [0u64, 1, 999, 1000, 1500, 123_456_789] {
            let mut s = Vec::new();
            push_ms(&mut s, Duration::from_micros(us));
            assert_eq!(
                String::from_utf8_lossy(&s),
                format!("{:.3}", us as f64 / 1e3)
            );
        }
        let mut e = Entry {
            time: SystemTime::UNIX_EPOCH,
            client: "2001:db8::1".parse().unwrap(),
            host: None,
            method: Method::POST,
            path: None,
            status: 502,
            bytes: 0,
            duration: Duration::ZERO,
            route: None,
            backend: Some("[2001:db8::2]:8080".parse().unwrap()),
            upstream: None,
            tls: false,
            version: Version::HTTP_10,
            fault: Some("backend"),
        };
        let mut s = Vec::new();
        format_entry(&mut s, &e);
        let s = String::from_utf8(s).unwrap();
        assert!(s.contains("\"client\":\"2001:db8::1\""), "{s}");
        assert!(s.contains("\"backend\":\"[2001:db8::2]:8080\""), "{s}");
        assert!(s.contains("\"http\":\"HTTP/1.0\""), "{s}");
        e.backend = Some("10.0.0.1:80".parse().unwrap());
        let mut s = Vec::new();
        format_entry(&mut s, &e);
        let s = String::from_utf8(s).unwrap();
        assert!(s.contains("\"backend\":\"10.0.0.1:80\""), "{s}");
    }

    #[test]
    fn a_line_is_one_line_of_json_whatever_the_request() {
        let e = Entry {
            time: SystemTime::UNIX_EPOCH,
            client: "192.0.2.7".parse().unwrap(),
            host: Some(HeaderValue::from_static("a.test")),
            method: Method::GET,
            path: Some(PathAndQuery::from_static("/x?q=1")),
            status: 200,
            bytes: 12,
            duration: Duration::from_micros(1500),
            route: Some("a.test/".into()),
            backend: Some("127.0.0.1:8080".parse().unwrap()),
            upstream: Some(Duration::from_millis(1)),
            tls: true,
            version: Version::HTTP_2,
            fault: None,
        };
        let mut s = Vec::new();
        format_entry(&mut s, &e);
        assert_eq!(
            String::from_utf8_lossy(&s),
            "{\"time\":\"1970-01-01T00:00:00.000Z\",\"client\":\"192.0.2.7\",\"host\":\"a.test\",\"method\":\"GET\",\"path\":\"/x?q=1\",\"status\":200,\"bytes\":12,\"duration_ms\":1.500,\"route\":\"a.test/\",\"backend\":\"127.0.0.1:8080\",\"upstream_ms\":1.000,\"tls\":true,\"http\":\"HTTP/2.0\",\"fault\":null}\n"
        );
        let mut s = Vec::new();
        json_str(&mut s, Some(b"a\n\x7f\xff\\"));
        assert_eq!(
            String::from_utf8_lossy(&s),
            "\"a\\u000a\\u007f\\u00ff\\\\\""
        );
    }
}
