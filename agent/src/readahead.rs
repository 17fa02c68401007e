//! Read-ahead, asked of the kernel with `posix_fadvise(WILLNEED)` so that the disk works while
//! the agent hashes, compresses and sends.
//!
//! Across the files of a ReadFiles call ([`with_read_ahead`], [`Files`]): a cold tree of small
//! files read one after another costs one disk round trip per file, with both cores idle
//! meanwhile (a fifth of a 2 GB pull's wall time on a virtual disk). While the call reads one
//! file, a helper opens the next ones and asks for their first bytes: the requests go out
//! together and the reads that follow find their data in the page cache. The helper opens files
//! through [`source::open`], so it reaches nothing the call itself could not, and it stays a
//! bounded number of files and bytes ahead, so what it brings in is not evicted before use.
//!
//! Within a file ([`Sequential`]): the kernel's own read-ahead (128 KiB by default) leaves a
//! virtual disk idle between requests; a few MiB stay asked for past the reader.

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::{Condvar, Mutex};

use crate::config::Source;
use crate::source;

/// Files the helper may be ahead of the reader.
const MAX_FILES: usize = 256;
/// Bytes it may have asked for ahead of the reader.
const MAX_BYTES: u64 = 32 << 20;
/// Bytes asked for at the start of each file: the kernel's own read-ahead takes over from there
/// once a file is read sequentially.
const PER_FILE: u64 = 2 << 20;

#[derive(Default)]
struct Position {
    /// Index of the file the reader is on.
    reading: usize,
    done: bool,
}

/// Shared between the reader of a call's files and its helper.
#[derive(Default)]
pub struct Files {
    position: Mutex<Position>,
    moved: Condvar,
}

impl Files {
    /// The reader starts on file `index`.
    pub fn reading(&self, index: usize) {
        self.position.lock().expect("read-ahead position").reading = index;
        self.moved.notify_one();
    }

    /// The reader is done (also when it stops early): the helper returns.
    fn done(&self) {
        self.position.lock().expect("read-ahead position").done = true;
        self.moved.notify_one();
    }

    /// The helper: advise on each of `paths` in turn, waiting while it is far enough ahead.
    fn run(&self, src: &Source, paths: &[Vec<u8>]) {
        // Files advised and not yet reached by the reader, with the bytes asked for.
        let mut ahead: VecDeque<(usize, u64)> = VecDeque::new();
        let mut bytes = 0u64;
        for (index, path) in paths.iter().enumerate() {
            let mut pos = self.position.lock().expect("read-ahead position");
            loop {
                if pos.done {
                    return;
                }
                while ahead.front().is_some_and(|&(i, _)| i < pos.reading) {
                    bytes -= ahead.pop_front().map_or(0, |(_, n)| n);
                }
                if ahead.len() < MAX_FILES && bytes < MAX_BYTES {
                    break;
                }
                pos = self.moved.wait(pos).expect("read-ahead position");
            }
            // The reader is already there: advice would come too late.
            let behind = index <= pos.reading;
            drop(pos);
            if behind {
                continue;
            }
            // Errors are the reader's to report when it gets there.
            let Ok(f) = source::open(src, path) else { continue };
            let len = f.metadata().map_or(0, |m| m.len()).min(PER_FILE);
            if let Some(n) = NonZeroU64::new(len)
                && rustix::fs::fadvise(&f, 0, Some(n), rustix::fs::Advice::WillNeed).is_ok()
            {
                ahead.push_back((index, len));
                bytes += len;
            }
        }
    }
}

/// Run `read` with a helper reading ahead through `paths`; `read` tells it where it is with
/// [`Files::reading`]. The helper stops when `read` returns or panics.
pub fn with_read_ahead<R>(src: &Source, paths: &[Vec<u8>], read: impl FnOnce(&Files) -> R) -> R {
    struct Done<'a>(&'a Files);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.done();
        }
    }
    let ahead = Files::default();
    std::thread::scope(|s| {
        s.spawn(|| ahead.run(src, paths));
        let _done = Done(&ahead);
        read(&ahead)
    })
}

/// Keeps a few MiB asked for past a sequential reader of one file.
pub struct Sequential {
    advised: u64,
    len: u64,
}

impl Sequential {
    /// Bytes asked for at once; the request is renewed when less than this is left ahead.
    const STEP: u64 = 4 << 20;

    /// For a file of `len` bytes.
    pub fn new(len: u64) -> Sequential {
        Sequential { advised: 0, len }
    }

    /// The reader is at `pos`: keep at least [`Self::STEP`] bytes past it asked for.
    pub fn advise(&mut self, f: &std::fs::File, pos: u64) {
        self.advised = self.advised.max(pos);
        while self.advised < self.len.min(pos + Self::STEP) {
            let n = Self::STEP.min(self.len - self.advised);
            // Advice only: a refusal costs speed, not correctness.
            let _ = rustix::fs::fadvise(f, self.advised, NonZeroU64::new(n), rustix::fs::Advice::WillNeed);
            self.advised += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn source_at(root: &std::path::Path) -> Source {
        let toml = format!("[[source]]\nname = \"files\"\nkind = \"path\"\nroots = [{:?}]\n", root.to_str().unwrap());
        let cfg: crate::config::AgentConfig = toml::from_str(&toml).unwrap();
        cfg.validate().unwrap().remove(0)
    }

    /// A reader that stops early (the collector went away) is not kept waiting for the helper,
    /// and paths the source refuses or lacks cost the helper nothing but a skip.
    #[test]
    fn the_helper_stops_with_its_reader() {
        let dir = tempfile::tempdir().unwrap();
        let mut paths = Vec::new();
        for i in 0..600 {
            std::fs::write(dir.path().join(format!("f{i}")), vec![7u8; 100_000]).unwrap();
            paths.push(format!("f{i}").into_bytes());
        }
        paths.insert(3, b"../outside".to_vec());
        paths.insert(5, b"missing".to_vec());
        let src = source_at(dir.path());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let read = with_read_ahead(&src, &paths, |ahead| {
                for i in 0..10 {
                    ahead.reading(i);
                }
                10
            });
            tx.send(read).unwrap();
        });
        assert_eq!(rx.recv_timeout(Duration::from_secs(30)), Ok(10));
    }

    /// The advice runs at least a step ahead of the reader and never past the end of the file.
    #[test]
    fn sequential_advice_stays_a_step_ahead_within_the_file() {
        const MIB: u64 = 1 << 20;
        let file = tempfile::tempfile().unwrap();
        file.set_len(10 * MIB).unwrap();
        let mut s = Sequential::new(10 * MIB);
        s.advise(&file, 0);
        assert_eq!(s.advised, 4 * MIB);
        s.advise(&file, MIB);
        assert_eq!(s.advised, 8 * MIB);
        s.advise(&file, 3 * MIB);
        assert_eq!(s.advised, 8 * MIB, "still a step ahead: no new request");
        s.advise(&file, 9 * MIB);
        assert_eq!(s.advised, 10 * MIB);
    }
}
