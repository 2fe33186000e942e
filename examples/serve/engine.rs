//! The engine thread: requests wait in a queue; whenever the model is free, up to `max_batch`
//! of them run together as one batch (`generate_rows`, each row with its own settings), so
//! concurrent users share every layer's weight reads. Tokens go back to the HTTP handlers over
//! unbounded channels; a closed channel (the client went away) stops that row's compute.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flexgen_opt::{FinishReason, Flow, GenerationConfig, OptEngine, OptTokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use flexgen::serve::{ApiError, Event, Metrics};

/// One row to generate: a choice of a request.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// The choice index within its request.
    pub index: usize,
    /// Prompt ids, BOS included.
    pub prompt: Vec<u32>,
    /// Its settings (checked by the handler against the model before queueing).
    pub cfg: GenerationConfig,
}

/// How the engine forms batches.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// Rows per batch at most.
    pub max_batch: usize,
    /// After the first request arrives at an idle engine, wait this long for others to join.
    pub batch_window: Duration,
    /// Rows allowed to wait; more are refused with 429.
    pub max_queue: usize,
    /// KV cache a batch may allocate (rows x (longest prompt + most new tokens) x bytes per
    /// token); rows that would exceed it wait for the next batch. A single row always runs.
    pub max_kv_cache_bytes: usize,
    /// KV cache bytes per token of one row (all layers, K and V, f32).
    pub kv_bytes_per_token: usize,
}

struct Job {
    spec: JobSpec,
    tx: UnboundedSender<Event>,
}

#[derive(Default)]
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Handle to the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    queue: Arc<Queue>,
    metrics: Arc<Metrics>,
    max_queue: usize,
}

impl Engine {
    /// Starts the engine thread, which owns the model from now on.
    pub fn start(
        model: OptEngine,
        tokenizer: Arc<OptTokenizer>,
        opts: EngineOptions,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Engine> {
        let queue = Arc::new(Queue::default());
        let engine = Engine {
            queue: queue.clone(),
            metrics: metrics.clone(),
            max_queue: opts.max_queue,
        };
        std::thread::Builder::new()
            .name("flexgen-engine".into())
            .spawn(move || loop {
                let batch = next_batch(&queue, &opts, &metrics);
                run_batch(&model, &tokenizer, batch, &metrics);
            })?;
        Ok(engine)
    }

    /// Queues the rows of one request; their events arrive on the returned channel. Dropping
    /// the receiver cancels them.
    pub fn submit(&self, specs: Vec<JobSpec>) -> Result<UnboundedReceiver<Event>, ApiError> {
        let (tx, rx) = unbounded_channel();
        let mut q = lock(&self.queue.jobs);
        if q.len() + specs.len() > self.max_queue {
            return Err(ApiError::busy(q.len()));
        }
        q.extend(specs.into_iter().map(|spec| Job {
            spec,
            tx: tx.clone(),
        }));
        self.metrics.queued.store(q.len(), Ordering::Relaxed);
        drop(q);
        self.queue.ready.notify_one();
        Ok(rx)
    }
}

/// Waits for work, lets the batch window fill, and takes up to `max_batch` live rows.
fn next_batch(queue: &Queue, opts: &EngineOptions, metrics: &Metrics) -> Vec<Job> {
    let mut q = lock(&queue.jobs);
    loop {
        // Rows left over from the last batch have waited already: only a request that wakes an
        // idle engine waits for the window.
        let idle = q.is_empty();
        while q.is_empty() {
            q = queue.ready.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        let deadline = Instant::now() + opts.batch_window;
        while idle && q.len() < opts.max_batch {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = queue
                .ready
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let mut batch = Vec::with_capacity(opts.max_batch);
        let (mut longest_prompt, mut most_new) = (0, 0);
        while batch.len() < opts.max_batch {
            let Some(job) = q.front() else { break };
            if job.tx.is_closed() {
                q.pop_front();
                metrics.cancelled(1);
                continue;
            }
            // The batch's cache holds every row at the longest prompt plus the most new tokens.
            let p = longest_prompt.max(job.spec.prompt.len());
            let g = most_new.max(job.spec.cfg.max_new_tokens);
            let bytes = (batch.len() + 1) * (p + g) * opts.kv_bytes_per_token;
            if !batch.is_empty() && bytes > opts.max_kv_cache_bytes {
                break;
            }
            (longest_prompt, most_new) = (p, g);
            batch.extend(q.pop_front());
        }
        metrics.queued.store(q.len(), Ordering::Relaxed);
        if !batch.is_empty() {
            return batch;
        }
    }
}

/// Runs one batch to the end, streaming every row's tokens to its request.
fn run_batch(model: &OptEngine, tok: &OptTokenizer, batch: Vec<Job>, metrics: &Metrics) {
    metrics.batch(batch.len());
    metrics.running.store(batch.len(), Ordering::Relaxed);
    let prompts: Vec<Vec<u32>> = batch.iter().map(|j| j.spec.prompt.clone()).collect();
    let cfgs: Vec<GenerationConfig> = batch.iter().map(|j| j.spec.cfg.clone()).collect();
    let mut notified = vec![false; batch.len()];
    let mut started = false;
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        model.generate_rows(&prompts, &cfgs, Some(tok), |ev| {
            started = true;
            metrics.token();
            let job = &batch[ev.row];
            let mut alive = if ev.text.is_empty() {
                !job.tx.is_closed()
            } else {
                job.tx
                    .send(Event::Delta {
                        index: job.spec.index,
                        text: ev.text.to_string(),
                    })
                    .is_ok()
            };
            if let Some(reason) = ev.finished {
                notified[ev.row] = true;
                alive &= job
                    .tx
                    .send(Event::Finished {
                        index: job.spec.index,
                        reason,
                        prompt_tokens: job.spec.prompt.len(),
                        completion_tokens: ev.index + 1,
                    })
                    .is_ok();
            }
            if alive {
                Flow::Continue
            } else {
                if ev.finished.is_none() {
                    metrics.cancelled(1);
                }
                Flow::StopRow
            }
        })
    }));
    metrics.running.store(0, Ordering::Relaxed);
    match result {
        Ok(Ok(outs)) => {
            // Rows that produced no token (max_tokens 0) end here.
            for ((job, out), done) in batch.iter().zip(outs).zip(notified) {
                if !done && out.finish_reason != FinishReason::Cancelled {
                    let _ = job.tx.send(Event::Finished {
                        index: job.spec.index,
                        reason: out.finish_reason,
                        prompt_tokens: out.prompt_tokens,
                        completion_tokens: out.token_ids.len(),
                    });
                }
            }
        }
        // A request the handler's checks let through failed the whole batch before any token:
        // run each row alone so only the bad one fails.
        Ok(Err(_)) if !started && batch.len() > 1 => {
            for job in batch {
                run_batch(model, tok, vec![job], metrics);
            }
        }
        Ok(Err(e)) => fail(&batch, &notified, &format!("generation failed: {e}")),
        Err(_) => fail(&batch, &notified, "generation panicked"),
    }
}

fn fail(batch: &[Job], notified: &[bool], message: &str) {
    for (job, &done) in batch.iter().zip(notified) {
        if !done {
            let _ = job.tx.send(Event::Failed {
                message: message.to_string(),
            });
        }
    }
}
