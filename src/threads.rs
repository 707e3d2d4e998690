//! Named threads that can be joined with a deadline.
//!
//! std's `JoinHandle` has no timed join; polling `is_finished` costs a sleep per look
//! (and a millisecond on every VM stop). Here the thread holds a guard for its whole
//! life that marks it done and notifies a condvar when dropped (on return or while
//! unwinding), and the joiner waits on the condvar with a timeout.
#![forbid(unsafe_code)]

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

type Done = Arc<(Mutex<bool>, Condvar)>;

/// Marks its thread done when dropped.
struct DoneGuard(Done);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let (m, c) = &*self.0;
        *m.lock().unwrap_or_else(|p| p.into_inner()) = true;
        c.notify_all();
    }
}

/// A spawned thread and the means to wait for its end.
pub struct Joinable {
    handle: JoinHandle<()>,
    done: Done,
}

/// How a bounded join went.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// The thread returned.
    Finished,
    /// The thread panicked.
    Panicked,
    /// The deadline passed first; the thread is left running.
    TimedOut,
}

impl Joinable {
    /// Spawns `f` on a thread called `name`.
    pub fn spawn(name: String, f: impl FnOnce() + Send + 'static) -> std::io::Result<Self> {
        let done: Done = Arc::new((Mutex::new(false), Condvar::new()));
        let guard = DoneGuard(done.clone());
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            let _guard = guard;
            f();
        })?;
        Ok(Self { handle, done })
    }

    /// Waits until the thread ends or `deadline` passes.
    pub fn join_until(self, deadline: Instant) -> Joined {
        {
            let (m, c) = &*self.done;
            let mut done = m.lock().unwrap_or_else(|p| p.into_inner());
            while !*done {
                let now = Instant::now();
                if now >= deadline {
                    return Joined::TimedOut;
                }
                done = c
                    .wait_timeout(done, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        match self.handle.join() {
            Ok(()) => Joined::Finished,
            Err(_) => Joined::Panicked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn joins_finished_panicked_and_stuck_threads() {
        let soon = || Instant::now() + Duration::from_secs(5);
        let t = Joinable::spawn("t-ok".into(), || {}).unwrap();
        assert_eq!(t.join_until(soon()), Joined::Finished);
        let t = Joinable::spawn("t-panic".into(), || panic!("deliberate test panic")).unwrap();
        assert_eq!(t.join_until(soon()), Joined::Panicked);
        let (tx, rx) = mpsc::channel::<()>();
        let t = Joinable::spawn("t-stuck".into(), move || {
            let _ = rx.recv();
        })
        .unwrap();
        let start = Instant::now();
        assert_eq!(
            t.join_until(Instant::now() + Duration::from_millis(50)),
            Joined::TimedOut
        );
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(tx);
    }
}
