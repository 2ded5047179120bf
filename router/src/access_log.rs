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

use std::fmt::Write as _;
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
    let mut buf = String::with_capacity(64 * 1024);
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
        while buf.len() < 60 * 1024 {
            match rx.try_recv() {
                Ok(e) => format_entry(&mut buf, &e),
                Err(_) => break,
            }
        }
        if let Err(e) = out.write(buf.as_bytes()) {
            tracing::warn!(error = %e, "access log: write failed");
        }
    }
}

/// One JSON line. Fields with nothing to say are `null`.
pub fn format_entry(out: &mut String, e: &Entry) {
    out.push_str("{\"time\":\"");
    rfc3339(out, e.time);
    out.push_str("\",\"client\":\"");
    let _ = write!(out, "{}", e.client);
    out.push_str("\",\"host\":");
    json_str(out, e.host.as_ref().map(|h| h.as_bytes()));
    out.push_str(",\"method\":");
    json_str(out, Some(e.method.as_str().as_bytes()));
    out.push_str(",\"path\":");
    json_str(out, e.path.as_ref().map(|p| p.as_str().as_bytes()));
    let _ = write!(
        out,
        ",\"status\":{},\"bytes\":{},\"duration_ms\":{:.3}",
        e.status,
        e.bytes,
        e.duration.as_secs_f64() * 1e3
    );
    out.push_str(",\"route\":");
    json_str(out, e.route.as_deref().map(str::as_bytes));
    out.push_str(",\"backend\":");
    match e.backend {
        Some(b) => {
            let _ = write!(out, "\"{b}\"");
        }
        None => out.push_str("null"),
    }
    out.push_str(",\"upstream_ms\":");
    match e.upstream {
        Some(u) => {
            let _ = write!(out, "{:.3}", u.as_secs_f64() * 1e3);
        }
        None => out.push_str("null"),
    }
    let _ = write!(out, ",\"tls\":{},\"http\":\"{:?}\"", e.tls, e.version);
    out.push_str(",\"fault\":");
    json_str(out, e.fault.map(str::as_bytes));
    out.push_str("}\n");
}

/// A JSON string (or `null`); bytes outside printable ASCII are escaped as
/// `\u00XX`, so that a hostile path cannot break the line or the JSON.
fn json_str(out: &mut String, s: Option<&[u8]>) {
    let Some(s) = s else {
        out.push_str("null");
        return;
    };
    out.push('"');
    for &b in s {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            0x20..=0x7e => out.push(char::from(b)),
            _ => {
                let _ = write!(out, "\\u{b:04x}");
            }
        }
    }
    out.push('"');
}

/// `2026-12-07T02:19:28.123Z`.
fn rfc3339(out: &mut String, t: SystemTime) {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days to a civil date (Howard Hinnant's algorithm), in u64/i64.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_rfc3339() {
        let mut s = String::new();
        rfc3339(&mut s, SystemTime::UNIX_EPOCH);
        assert_eq!(s, "1970-01-01T00:00:00.000Z");
        s.clear();
        // 2024-02-29T12:34:56.789Z, a leap day.
        rfc3339(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::from_millis(1_709_210_096_789),
        );
        assert_eq!(s, "2024-02-29T12:34:56.789Z");
        s.clear();
        rfc3339(
            &mut s,
            SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400),
        );
        assert_eq!(s, "2000-02-29T00:00:00.000Z");
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
        let mut s = String::new();
        format_entry(&mut s, &e);
        assert_eq!(
            s,
            "{\"time\":\"1970-01-01T00:00:00.000Z\",\"client\":\"192.0.2.7\",\"host\":\"a.test\",\"method\":\"GET\",\"path\":\"/x?q=1\",\"status\":200,\"bytes\":12,\"duration_ms\":1.500,\"route\":\"a.test/\",\"backend\":\"127.0.0.1:8080\",\"upstream_ms\":1.000,\"tls\":true,\"http\":\"HTTP/2.0\",\"fault\":null}\n"
        );
        let mut s = String::new();
        json_str(&mut s, Some(b"a\n\x7f\xff\\"));
        assert_eq!(s, "\"a\\u000a\\u007f\\u00ff\\\\\"");
    }
}
