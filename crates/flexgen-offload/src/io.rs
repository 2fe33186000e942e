//! A small pool of I/O threads: jobs own their buffers and hand them back through a
//! [`Ticket`]; with overlap off, jobs run inline on the caller's thread.

use std::collections::VecDeque;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::error::{Error, Result};

type Job = Box<dyn FnOnce() + Send + 'static>;

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// Threads that run I/O jobs in submission order (several at once).
pub struct IoPool {
    queue: Arc<(Mutex<Queue>, Condvar)>,
    workers: Vec<JoinHandle<()>>,
}

/// The result of a job, to wait for.
#[must_use = "a ticket must be waited for"]
pub enum Ticket<T> {
    /// Ran inline already.
    Ready(Result<T>),
    /// Running on a worker.
    Pending(mpsc::Receiver<Result<T>>),
}

impl<T> Ticket<T> {
    /// Blocks until the job is done and returns its result.
    pub fn wait(self) -> Result<T> {
        match self {
            Ticket::Ready(r) => r,
            Ticket::Pending(rx) => rx
                .recv()
                .map_err(|_| Error::Worker("an I/O job panicked".into()))?,
        }
    }
}

impl IoPool {
    /// `threads` workers (0 means every job runs inline).
    pub fn new(threads: usize) -> Self {
        let queue: Arc<(Mutex<Queue>, Condvar)> = Arc::default();
        let workers = (0..threads)
            .map(|i| {
                let q = Arc::clone(&queue);
                std::thread::Builder::new()
                    .name(format!("flexgen-io-{i}"))
                    .spawn(move || worker(&q))
                    .expect("spawning an I/O thread")
            })
            .collect();
        IoPool { queue, workers }
    }

    /// Runs `job` on a worker (or inline when the pool has none, or `inline` is set).
    pub fn submit<T: Send + 'static>(
        &self,
        inline: bool,
        job: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Ticket<T> {
        if inline || self.workers.is_empty() {
            return Ticket::Ready(job());
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let (lock, cv) = &*self.queue;
        lock.lock()
            .unwrap_or_else(|p| p.into_inner())
            .jobs
            .push_back(Box::new(move || {
                let _ = tx.send(job());
            }));
        cv.notify_one();
        Ticket::Pending(rx)
    }
}

fn worker(queue: &(Mutex<Queue>, Condvar)) {
    let (lock, cv) = queue;
    loop {
        let job = {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(j) = q.jobs.pop_front() {
                    break j;
                }
                if q.closed {
                    return;
                }
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        // A panicking job drops its sender, which its ticket reports as an error.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
    }
}

impl Drop for IoPool {
    fn drop(&mut self) {
        let (lock, cv) = &*self.queue;
        lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        cv.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_and_return_their_buffers() {
        let pool = IoPool::new(3);
        let tickets: Vec<_> = (0..20)
            .map(|i| {
                let buf = vec![0u8; 10];
                pool.submit(i % 4 == 0, move || {
                    let mut b = buf;
                    b[0] = i as u8;
                    Ok(b)
                })
            })
            .collect();
        for (i, t) in tickets.into_iter().enumerate() {
            assert_eq!(t.wait().unwrap()[0], i as u8);
        }
        let e = pool
            .submit(false, || -> Result<()> { panic!("boom") })
            .wait()
            .unwrap_err();
        assert!(e.to_string().contains("panicked"));
        let inline = IoPool::new(0);
        assert_eq!(inline.submit(false, || Ok(5)).wait().unwrap(), 5);
    }
}
