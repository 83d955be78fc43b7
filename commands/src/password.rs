//! Password hashing with Argon2id, off the async runtime.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use domain::{Password, PasswordHash};

use crate::error::StoreError;

/// Argon2id cost parameters. The default is OWASP's recommendation for Argon2id
/// (19 MiB of memory, 2 passes, 1 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashingParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashingParams {
    fn default() -> Self {
        HashingParams {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// Hashes and verifies passwords. Verification of an unknown account runs against a dummy
/// hash of the same cost, so a wrong email and a wrong password take the same time.
///
/// Argon2 runs on a few threads of its own, one per CPU; requests queue for them. Hashing
/// is CPU-bound, so this costs no throughput, and it bounds memory: each computation holds
/// `memory_kib` (19 MiB by default). On tokio's blocking pool a burst of logins ran them
/// all at once, each on whichever pool thread was free, and the allocator kept a freed
/// block per thread: the benchmark process grew from 0.1 to 3 GiB during its registration
/// phase (0.9 GiB with a semaphore on the blocking pool; see docs/benchmarks.md).
#[derive(Clone)]
pub struct PasswordHasher {
    params: HashingParams,
    dummy: Arc<OnceLock<String>>,
    pool: Arc<HashPool>,
    gauge: Arc<Gauge>,
}

type Job = Box<dyn FnOnce() + Send>;

/// Why a password computation did not run.
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// The queue is full: the caller should answer "busy, retry shortly" (HTTP 429 with
    /// `Retry-After`) rather than wait behind everyone else.
    #[error("too many password computations queued; try again shortly")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Jobs waiting or running beyond the threads, per thread, by default.
pub const DEFAULT_QUEUE_PER_THREAD: usize = 16;

/// The hashing threads. They end when the last [`PasswordHasher`] clone is dropped.
struct HashPool {
    jobs: std::sync::mpsc::Sender<Job>,
    threads: usize,
    /// Jobs accepted and not yet finished (or skipped).
    queued: Arc<AtomicUsize>,
    /// The most `queued` may be; beyond it a job is refused at once.
    capacity: usize,
    /// Jobs skipped because their caller had gone by the time a thread took them.
    skipped: Arc<AtomicUsize>,
}

impl HashPool {
    fn new(threads: usize, capacity: usize) -> Result<HashPool, StoreError> {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while taking a job, not while running it.
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job must not take the thread with it.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| StoreError::msg(format!("starting a hashing thread: {e}")))?;
        }
        Ok(HashPool {
            jobs: tx,
            threads,
            queued: Arc::default(),
            capacity: capacity.max(threads),
            skipped: Arc::default(),
        })
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, HashError> {
        // Take a place in the queue, or refuse at once when it is full.
        let taken = self
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.capacity).then_some(n + 1)
            });
        if taken.is_err() {
            return Err(HashError::Busy);
        }
        struct Place(Arc<AtomicUsize>);
        impl Drop for Place {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let place = Place(self.queued.clone());
        let skipped = self.skipped.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _place = place;
                // The caller gave up (client gone, request timed out): don't spend 19 MiB
                // and tens of milliseconds on an answer nobody reads.
                if tx.is_closed() {
                    skipped.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let _ = tx.send(f());
            }))
            .map_err(|_| StoreError::msg("hashing threads are gone"))?;
        rx.await
            .map_err(|_| HashError::Store(StoreError::msg("a hashing job died")))
    }
}

/// Computations in flight and the most seen at once.
#[derive(Default)]
struct Gauge {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl Gauge {
    fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(n, Ordering::SeqCst);
        let out = f();
        self.now.fetch_sub(1, Ordering::SeqCst);
        out
    }
}

impl PasswordHasher {
    /// One computation at a time per CPU, and [`DEFAULT_QUEUE_PER_THREAD`] jobs queued
    /// per CPU at most.
    pub fn new(params: HashingParams) -> Result<Self, StoreError> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Self::with_limits(params, cpus, cpus * DEFAULT_QUEUE_PER_THREAD)
    }

    /// At most `allowed` (at least 1) computations at a time.
    pub fn with_concurrency(params: HashingParams, allowed: usize) -> Result<Self, StoreError> {
        Self::with_limits(params, allowed, allowed.max(1) * DEFAULT_QUEUE_PER_THREAD)
    }

    /// At most `allowed` computations at a time and `queue` accepted at once (running
    /// ones included); more are refused with [`HashError::Busy`].
    pub fn with_limits(
        params: HashingParams,
        allowed: usize,
        queue: usize,
    ) -> Result<Self, StoreError> {
        let allowed = allowed.max(1);
        // Fail early on impossible parameters.
        Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|e| StoreError::msg(format!("invalid Argon2 parameters: {e}")))?;
        Ok(PasswordHasher {
            params,
            dummy: Arc::new(OnceLock::new()),
            pool: Arc::new(HashPool::new(allowed, queue)?),
            gauge: Arc::default(),
        })
    }

    pub fn params(&self) -> HashingParams {
        self.params
    }

    /// How many Argon2 computations may run at once, and the most that have.
    pub fn concurrency(&self) -> (usize, usize) {
        (self.pool.threads, self.gauge.peak.load(Ordering::SeqCst))
    }

    /// How many jobs the queue accepts at once, and how many were skipped because their
    /// caller had gone.
    pub fn queue(&self) -> (usize, usize) {
        (self.pool.capacity, self.pool.skipped.load(Ordering::SeqCst))
    }

    /// Run `f` on a hashing thread.
    async fn limited<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, HashError> {
        let gauge = self.gauge.clone();
        Ok(self.pool.run(move || gauge.run(f)).await??)
    }

    fn argon2(params: HashingParams) -> Result<Argon2<'static>, StoreError> {
        let p = Params::new(
            params.memory_kib,
            params.iterations,
            params.parallelism,
            None,
        )
        .map_err(|e| StoreError::msg(format!("invalid Argon2 parameters: {e}")))?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, p))
    }

    fn hash_blocking(params: HashingParams, password: &str) -> Result<String, StoreError> {
        // A fresh random salt per hash (from the OS generator).
        let hash = Self::argon2(params)?
            .hash_password(password.as_bytes())
            .map_err(|e| StoreError::msg(format!("hashing a password: {e}")))?;
        Ok(hash.to_string())
    }

    /// Hash a new password (CPU-bound; runs on the blocking pool).
    pub async fn hash(&self, password: &Password) -> Result<PasswordHash, HashError> {
        let params = self.params;
        let pw = password.expose().to_owned();
        let phc = self
            .limited(move || Self::hash_blocking(params, &pw))
            .await?;
        Ok(PasswordHash::from_phc(phc))
    }

    /// Does `password` match `hash`? `None` verifies against the dummy hash and returns false.
    pub async fn verify(
        &self,
        password: &str,
        hash: Option<&PasswordHash>,
    ) -> Result<bool, HashError> {
        let params = self.params;
        let real = hash.map(|h| h.as_str().to_owned());
        let dummy = self.dummy.clone();
        let pw = password.to_owned();
        let ok = self
            .limited(move || -> Result<bool, StoreError> {
                let phc = match &real {
                    Some(h) => h.clone(),
                    // Made once, on the blocking pool like every other hash.
                    None => match dummy.get() {
                        Some(h) => h.clone(),
                        None => {
                            let h = Self::hash_blocking(params, "karmic-timing-equaliser")?;
                            dummy.get_or_init(|| h).clone()
                        }
                    },
                };
                // Verified with the parameters recorded in the hash itself.
                Ok(Self::argon2(params)?
                    .verify_password(pw.as_bytes(), phc.as_str())
                    .is_ok()
                    && real.is_some())
            })
            .await?;
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordHasher {
        PasswordHasher::new(HashingParams {
            memory_kib: 256,
            iterations: 1,
            parallelism: 1,
        })
        .unwrap()
    }

    #[tokio::test]
    async fn a_hash_verifies_only_its_own_password() {
        let h = cheap();
        let pw = Password::parse("correct horse battery").unwrap();
        let hash = h.hash(&pw).await.unwrap();
        assert!(hash.as_str().starts_with("$argon2id$"));
        assert!(
            h.verify("correct horse battery", Some(&hash))
                .await
                .unwrap()
        );
        assert!(!h.verify("wrong horse battery", Some(&hash)).await.unwrap());
    }

    #[tokio::test]
    async fn verifying_without_a_hash_is_always_false() {
        let h = cheap();
        assert!(!h.verify("karmic-timing-equaliser", None).await.unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_more_hashes_run_at_once_than_allowed() {
        let h = PasswordHasher::with_concurrency(
            HashingParams {
                memory_kib: 4096,
                iterations: 2,
                parallelism: 1,
            },
            2,
        )
        .unwrap();
        let pw = Password::parse("correct horse battery").unwrap();
        let mut tasks = Vec::new();
        for i in 0..24 {
            let (h, pw) = (h.clone(), pw.clone());
            tasks.push(tokio::spawn(async move {
                if i % 2 == 0 {
                    h.hash(&pw).await.map(|_| ())
                } else {
                    h.verify("nobody's password", None).await.map(|_| ())
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let (allowed, peak) = h.concurrency();
        assert_eq!(allowed, 2);
        assert!((1..=2).contains(&peak), "peak {peak}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_full_queue_refuses_at_once_and_abandoned_jobs_are_skipped() {
        let h = PasswordHasher::with_limits(
            HashingParams {
                // Slow enough (~0.2 s optimised) that the first job is still running
                // while the queue is checked.
                memory_kib: 65536,
                iterations: 3,
                parallelism: 1,
            },
            1,
            4,
        )
        .unwrap();
        let pw = Password::parse("correct horse battery").unwrap();
        // 4 accepted (1 running, 3 waiting), the rest refused without waiting.
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (h, pw) = (h.clone(), pw.clone());
            tasks.push(tokio::spawn(async move { h.hash(&pw).await }));
        }
        for _ in 0..500 {
            if h.pool.queued.load(Ordering::SeqCst) == 4 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(h.pool.queued.load(Ordering::SeqCst), 4, "the queue filled");
        let started = std::time::Instant::now();
        assert!(matches!(h.hash(&pw).await, Err(HashError::Busy)));
        assert!(started.elapsed() < std::time::Duration::from_millis(5));
        // Callers that leave: their queued jobs are skipped, not computed.
        for t in &tasks[1..] {
            t.abort();
        }
        let first = tasks.remove(0);
        first.await.unwrap().unwrap();
        for t in tasks {
            let _ = t.await;
        }
        // The queue drains; the skipped jobs never ran.
        for _ in 0..100 {
            if h.pool.queued.load(Ordering::SeqCst) == 0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(h.pool.queued.load(Ordering::SeqCst), 0);
        assert_eq!(h.queue().1, 3, "abandoned jobs skipped");
        let (_, peak) = h.concurrency();
        assert_eq!(peak, 1);
        h.hash(&pw).await.unwrap();
    }

    #[tokio::test]
    async fn two_hashes_of_one_password_differ_by_salt() {
        let h = cheap();
        let pw = Password::parse("correct horse battery").unwrap();
        assert_ne!(h.hash(&pw).await.unwrap(), h.hash(&pw).await.unwrap());
    }
}
