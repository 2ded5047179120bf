//! The HTTP/1 framing guard (`h1_guard::Framing`) fed arbitrary client
//! bytes in arbitrary reads, answered as the service answers it: requests
//! admitted once their heads are read, upgrade requests answered with
//! arbitrary statuses. It must not panic or hang, and:
//!
//! - memory: the bytes it keeps (a partial head, or what arrived behind an
//!   unanswered upgrade) never pass the head limit; a kept buffer is freed
//!   when inspection stops and trimmed once its head is read;
//! - inspection, once stopped, stays stopped; the conflicting request, once
//!   found, stays the one found, and inspection stops there;
//! - behind an unanswered upgrade no request is read;
//! - admissions count 0, 1, 2, ...; exactly the found request, when it has
//!   `Transfer-Encoding`, is refused, and at most one is; only the pending
//!   upgrade request awaits an answer, and a switch stops inspection;
//! - reads do not matter: the same bytes fed one at a time, with the same
//!   admissions and answers at the same offsets, give the same admissions,
//!   requests and conflict. A read may only stop inspection earlier (on a
//!   partial head that can no longer be read), never later.
//!
//! Input: byte 0 picks the head limit and the header count, byte 1 the
//! number of control bytes that follow (each pair: a read size, and the
//! service's moves after it), the rest is the client's stream.
//!
//! `cargo fuzz run h1_framing corpus/h1_framing seeds/h1_framing` (from
//! router/fuzz; new inputs go to the first, untracked, directory).
#![no_main]

use libfuzzer_sys::fuzz_target;
use portless_router::h1_guard_fuzzing::{Admission, Framing, KEEP_CAPACITY, Phase, Snapshot};

/// hyper's default buffer limit first, then small ones that fuzzing
/// reaches; the router's default (64 KiB) for inputs run by hand.
const MAX_HEADS: [usize; 8] = [8192, 1, 16, 64, 128, 512, 4096, 65536];
/// 128 header slots live on the stack, more are allocated.
const MAX_HEADERS: [usize; 8] = [100, 0, 1, 2, 4, 16, 128, 129];
/// 101 always switches, 2xx only a CONNECT.
const STATUSES: [u16; 16] = [
    101, 200, 204, 299, 101, 400, 403, 404, 405, 500, 100, 302, 101, 201, 426, 999,
];
/// Read sizes, clamped to the head limit (hyper never reads more at once).
fn read_size(c: u8) -> usize {
    match c {
        0..=31 => usize::from(c) + 1,
        32..=63 => 1 << (usize::from(c - 32) % 16),
        _ => usize::MAX,
    }
}

#[derive(Debug, Clone, Copy)]
enum Event {
    Feed(usize),
    Admit(bool, Admission),
    Answer(u64, u16),
}

/// Invariants that hold after every call, given the previous state.
fn check(prev: &Snapshot, now: &Snapshot, max_head: usize) {
    assert!(
        now.skipped + now.held_len <= max_head,
        "kept {} (and {} empty lines) > {max_head}",
        now.held_len,
        now.skipped
    );
    assert!(
        now.held_capacity <= (2 * max_head).max(8),
        "kept capacity {} for a limit of {max_head}",
        now.held_capacity
    );
    match now.phase {
        Phase::Off => {
            assert_eq!(now.held_capacity, 0, "kept bytes after stopping");
            assert_eq!(now.upgrade, None);
        }
        Phase::Body | Phase::Chunked => {
            assert_eq!(now.held_len, 0, "kept bytes in a body");
            assert!(now.held_capacity <= KEEP_CAPACITY, "{now:?}");
        }
        Phase::Paused => assert!(now.upgrade.is_some(), "paused for nothing"),
        Phase::Head => {}
    }
    if now.phase != Phase::Head {
        assert_eq!(now.skipped, 0, "empty lines counted outside a head");
    }
    if let Some((i, _)) = now.upgrade {
        // Nothing is read behind a pending upgrade request.
        assert_eq!(i + 1, now.heads, "{now:?}");
    }
    if prev.phase == Phase::Off {
        assert_eq!(now.phase, Phase::Off, "inspection resumed");
    }
    if prev.conflict.is_some() {
        assert_eq!(now.conflict, prev.conflict, "conflict changed");
    }
    if let Some(c) = now.conflict {
        assert_eq!(now.phase, Phase::Off, "inspecting past the conflict");
        assert!(c < now.heads);
    }
    assert!(now.heads >= prev.heads);
    assert!(now.admitted >= prev.admitted);
}

struct Run {
    f: Framing,
    max_head: usize,
    now: Snapshot,
    refused: u32,
    /// Bytes fed so far.
    fed: u64,
}

impl Run {
    fn new(max_head: usize, max_headers: usize) -> Self {
        let f = Framing::new(max_head, max_headers);
        let now = f.snapshot();
        assert!(now.phase == Phase::Head && now.held_capacity == 0);
        Run {
            f,
            max_head,
            now,
            refused: 0,
            fed: 0,
        }
    }

    fn step(&mut self) -> Snapshot {
        let prev = self.now;
        self.now = self.f.snapshot();
        check(&prev, &self.now, self.max_head);
        assert_eq!(self.f.is_off(), self.now.phase == Phase::Off);
        // Linear work: a byte is parsed at most twice as it arrives, and
        // twice more if kept behind an upgrade and read after its answer.
        assert!(
            self.now.parsed <= 4 * self.fed,
            "parsed {} bytes of {} fed",
            self.now.parsed,
            self.fed
        );
        prev
    }

    fn feed(&mut self, data: &[u8]) {
        self.f.feed(data);
        self.fed += data.len() as u64;
        let prev = self.step();
        if prev.phase == Phase::Paused && self.now.phase != Phase::Off {
            assert_eq!(self.now.phase, Phase::Paused, "resumed without an answer");
            assert_eq!(
                self.now.heads, prev.heads,
                "read a request behind an upgrade"
            );
        }
        assert_eq!(self.now.admitted, prev.admitted);
    }

    fn admit(&mut self, has_te: bool) -> Admission {
        let a = self.f.admit(has_te);
        let prev = self.step();
        assert_eq!(a.index, prev.admitted, "admissions out of order");
        assert_eq!(self.now.admitted, prev.admitted + 1);
        assert_eq!(
            Snapshot {
                admitted: prev.admitted,
                ..self.now
            },
            prev
        );
        let found = self.now.conflict == Some(a.index);
        assert_eq!(a.conflicting, found && has_te, "{a:?} {:?}", self.now);
        assert_eq!(
            a.awaits_answer,
            self.now.upgrade.is_some_and(|(i, _)| i == a.index)
        );
        if a.conflicting {
            self.refused += 1;
            assert_eq!(self.refused, 1, "two requests refused");
        }
        a
    }

    fn answered(&mut self, index: u64, status: u16) {
        self.f.answered(index, status);
        let prev = self.step();
        let Some((pending, connect)) = prev.upgrade.filter(|&(i, _)| i == index) else {
            assert_eq!(
                self.now, prev,
                "an answer to no pending upgrade changed the state"
            );
            return;
        };
        assert_ne!(
            self.now.upgrade.map(|u| u.0),
            Some(pending),
            "still pending"
        );
        let switched = status == 101 || (connect && (200..300).contains(&status));
        if switched {
            assert_eq!(self.now.phase, Phase::Off, "inspecting a tunnel");
        }
        if prev.phase != Phase::Paused {
            // Answered mid-body: nothing was kept, the body goes on.
            assert_eq!(self.now.heads, prev.heads);
            assert!(switched || self.now.phase == prev.phase);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [config, n, rest @ ..] = data else {
        return;
    };
    let max_head = MAX_HEADS[usize::from(config & 7)];
    let max_headers = MAX_HEADERS[usize::from(config >> 3 & 7)];
    let n = (usize::from(*n) % 64 * 2).min(rest.len() & !1);
    let (control, stream) = rest.split_at(n);
    let control: &[u8] = if control.is_empty() {
        &[0xff, 1]
    } else {
        control
    };

    // The run under test: reads as the control bytes say, the service
    // moving after each.
    let mut run = Run::new(max_head, max_headers);
    let mut events = Vec::new();
    let mut awaiting: Option<u64> = None;
    let mut offset = 0;
    for (step, pair) in control.chunks_exact(2).cycle().enumerate() {
        if offset == stream.len() && step >= control.len() / 2 {
            break;
        }
        let (size, moves) = (pair[0], pair[1]);
        let len = read_size(size).min(max_head).min(stream.len() - offset);
        if len > 0 {
            run.feed(&stream[offset..offset + len]);
            offset += len;
            events.push(Event::Feed(len));
        }
        // Admit what hyper has read, one upgrade request at a time.
        if moves & 1 != 0 {
            while awaiting.is_none() && run.now.admitted < run.now.heads {
                let has_te = moves & 2 != 0 || run.now.conflict == Some(run.now.admitted);
                let a = run.admit(has_te);
                events.push(Event::Admit(has_te, a));
                if a.awaits_answer {
                    awaiting = Some(a.index);
                }
            }
        }
        let status = STATUSES[usize::from(moves >> 4)];
        match (moves >> 2 & 3, awaiting) {
            (1 | 2, Some(i)) => {
                run.answered(i, status);
                events.push(Event::Answer(i, status));
                awaiting = None;
            }
            (3, _) => {
                // An answer to a request that is not a pending upgrade.
                let i = run.now.admitted.wrapping_sub(u64::from(moves & 2));
                if run.now.upgrade.is_none_or(|(u, _)| u != i) {
                    run.answered(i, status);
                    events.push(Event::Answer(i, status));
                }
            }
            _ => {}
        }
    }
    assert_eq!(offset, stream.len());

    // The same stream a byte at a time, the same moves at the same offsets.
    let mut byte = Run::new(max_head, max_headers);
    let mut at = 0;
    for e in &events {
        match *e {
            Event::Feed(len) => {
                for b in &stream[at..at + len] {
                    byte.feed(std::slice::from_ref(b));
                }
                at += len;
            }
            Event::Admit(has_te, want) => {
                assert_eq!(
                    byte.admit(has_te),
                    want,
                    "admission differs a byte at a time"
                );
            }
            Event::Answer(i, status) => byte.answered(i, status),
        }
    }
    let (a, b) = (run.now, byte.now);
    assert_eq!(a.heads, b.heads, "requests read differ a byte at a time");
    assert_eq!(a.conflict, b.conflict, "conflict differs a byte at a time");
    // A read may stop inspection on a partial head (bytes held or empty
    // lines counted) that a byte at a time is not judged yet.
    let partial = b.phase == Phase::Head && b.held_len + b.skipped > 0;
    assert!(
        a.phase == b.phase || (a.phase == Phase::Off && partial),
        "{a:?} in reads, {b:?} a byte at a time"
    );
});
