//! Log lines written in batches by a thread of their own.
//!
//! Every connection ends with an access line in each ztunnel it crosses, so a node opening
//! thousands of short connections a second logs thousands of lines a second. A writer thread
//! woken for each line (a futex wake, its spinning before it sleeps again, and one `write` per
//! line) cost 9% of the ztunnels' CPU in the lab's connection-setup benchmark. Here a worker
//! appends its formatted line to a shared buffer and wakes the thread only when the buffer was
//! empty; the thread then waits [`COALESCE`] for more lines and writes everything with one
//! `write`. An idle node wakes nobody.
//!
//! Nothing is dropped: a worker finding [`LIMIT`] bytes waiting (the output is slower than the
//! lines, a full pipe) waits until the thread has taken them. Dropping the [`Guard`] writes
//! what is left and stops the thread, giving an output that takes nothing [`FINAL_WRITE`]
//! before the process goes on without it.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the thread gathers lines after the first one before it writes them: 10 ms. Lines
/// appear at most this late; at a thousand lines a second it makes one write of ten lines.
pub const COALESCE: Duration = Duration::from_millis(10);

/// Bytes waiting before a worker that logs waits for the thread: 256 KiB, about 1,000 access
/// lines.
pub const LIMIT: usize = 256 * 1024;

struct State {
    lines: Vec<u8>,
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The thread waits here for a first line (or the close).
    wake: Condvar,
    /// Workers wait here for room.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves whole lines in the buffer: still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where `tracing` writes: each formatted line is appended to the shared buffer.
#[derive(Clone)]
pub struct BatchedWriter {
    shared: Arc<Shared>,
}

/// Stops the thread when dropped, after it has written every line, waiting at most
/// [`FINAL_WRITE`] for an output that does not take them (a pipe nobody reads).
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    done: std::sync::mpsc::Receiver<()>,
}

/// How long dropping the [`Guard`] waits for the last lines to be written: 1 s.
pub const FINAL_WRITE: Duration = Duration::from_secs(1);

/// A batch buffer grown past this by a burst of lines is freed once written, so a burst's
/// buffers do not stay allocated: 64 KiB.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Starts the thread writing to `out`; lines go to the returned writer.
pub fn spawn(out: impl Write + Send + 'static, thread_name: &str) -> io::Result<(BatchedWriter, Guard)> {
    let shared = Arc::new(Shared {
        state: Mutex::new(State { lines: Vec::new(), closed: false }),
        wake: Condvar::new(),
        room: Condvar::new(),
    });
    let s = shared.clone();
    let (done_tx, done) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name(thread_name.to_owned()).spawn(move || {
        run(&s, out);
        let _ = done_tx.send(());
    })?;
    Ok((BatchedWriter { shared: shared.clone() }, Guard { shared, thread: Some(thread), done }))
}

fn run(shared: &Shared, mut out: impl Write) {
    let mut batch = Vec::new();
    loop {
        let mut state = shared.lock();
        while state.lines.is_empty() && !state.closed {
            state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if !state.closed {
            // Let the lines of the next few milliseconds join this write.
            drop(state);
            std::thread::sleep(COALESCE);
            state = shared.lock();
        }
        let closed = state.closed;
        std::mem::swap(&mut batch, &mut state.lines);
        drop(state);
        shared.room.notify_all();
        // A failed write (stdout closed) loses these lines; there is nowhere else to say so.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if batch.capacity() > KEEP_CAPACITY {
            batch = Vec::new();
        }
        if closed && shared.lock().lines.is_empty() {
            return;
        }
    }
}

impl Write for BatchedWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        while state.lines.len() >= LIMIT && !state.closed {
            state = self.shared.room.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if state.lines.is_empty() {
            self.shared.wake.notify_one();
        }
        state.lines.extend_from_slice(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedWriter {
    type Writer = BatchedWriter;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_one();
        self.shared.room.notify_all();
        // Joined only once it has finished: an output that takes nothing must not keep the
        // process from exiting.
        if self.done.recv_timeout(FINAL_WRITE).is_ok()
            && let Some(thread) = self.thread.take()
        {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records each `write` it is given.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Recorder {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_logged_together_are_written_together_in_order_and_none_is_lost() {
        let out = Recorder::default();
        let (writer, guard) = spawn(out.clone(), "test-log").unwrap();
        let lines: Vec<String> = (0..500).map(|i| format!("line {i}\n")).collect();
        let threads: Vec<_> = [0, 1]
            .into_iter()
            .map(|half| {
                let mut w = writer.clone();
                let mine: Vec<String> = lines.iter().skip(half).step_by(2).cloned().collect();
                std::thread::spawn(move || {
                    for line in mine {
                        w.write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(guard);

        let writes = out.0.lock().unwrap();
        let text = String::from_utf8(writes.concat()).unwrap();
        let number = |line: &str| line.trim_start_matches("line ").parse::<u32>().unwrap();
        let mut got: Vec<u32> = text.lines().map(number).collect();
        assert_eq!(got.len(), 500, "every line written once, after the guard is dropped");
        // Each writer's own lines keep their order.
        let evens: Vec<u32> = got.iter().copied().filter(|n| n % 2 == 0).collect();
        assert!(evens.windows(2).all(|w| w[0] < w[1]), "one writer's lines out of order");
        got.sort_unstable();
        assert_eq!(got, (0..500).collect::<Vec<u32>>());
        // Lines logged within a few milliseconds share a write.
        assert!(writes.len() < 50, "{} writes for 500 lines", writes.len());
    }

    #[test]
    fn dropping_the_guard_waits_at_most_a_second_for_an_output_that_takes_nothing() {
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut writer, guard) = spawn(Stuck, "test-log").unwrap();
        writer.write_all(b"a line nobody reads\n").unwrap();
        std::thread::sleep(COALESCE * 3);
        let started = std::time::Instant::now();
        drop(guard);
        let waited = started.elapsed();
        assert!(waited >= FINAL_WRITE && waited < FINAL_WRITE * 3, "waited {waited:?}");
    }

    #[test]
    fn a_worker_waits_for_room_instead_of_dropping_lines() {
        /// Blocks every write until told to go on.
        struct Gate(Arc<(Mutex<bool>, Condvar)>, Recorder);
        impl Write for Gate {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                let (open, cv) = &*self.0;
                let mut open = open.lock().unwrap();
                while !*open {
                    open = cv.wait(open).unwrap();
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let out = Recorder::default();
        let (writer, guard) = spawn(Gate(gate.clone(), out.clone()), "test-log").unwrap();
        let line = vec![b'x'; 1023];
        let logger = {
            let mut w = writer.clone();
            let line = [line.clone(), b"\n".to_vec()].concat();
            std::thread::spawn(move || {
                // Three times the limit, while the output is stuck.
                for _ in 0..3 * LIMIT / 1024 {
                    w.write_all(&line).unwrap();
                }
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!logger.is_finished(), "the worker must wait while the limit is reached");
        {
            let (open, cv) = &*gate;
            *open.lock().unwrap() = true;
            cv.notify_all();
        }
        logger.join().unwrap();
        drop(guard);
        let written: usize = out.0.lock().unwrap().iter().map(Vec::len).sum();
        assert_eq!(written, 3 * LIMIT, "every byte of every line");
    }
}
