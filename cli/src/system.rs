//! The whole system in one process, as `karmic serve` runs it: the HTTP API and its
//! projector, and, as configured, the embedded S3 endpoint and the document worker.
//! `karmic worker` runs the worker alone.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use anyhow::{Context, Result, anyhow};
use commands::documents::Documents;
use handlers::{Application, Runtime, Settings};
use projections::Nudging;
use storage::embedded::{EmbeddedS3, ObjectCreatedSink};
use tokio::sync::watch;
use worker::queue::{DeadLetterQueue, JobQueue, SqliteQueue};
use worker::sqs::{SqsQueue, SqsSettings};
use worker::{IsolatedAnalyzer, Worker, WorkerSettings};

/// The embedded endpoint's notifications go to the embedded queue, which exists only
/// once the database is open: until then a PUT answers 500 and the client retries.
#[derive(Default)]
struct LateQueue(OnceLock<Arc<dyn JobQueue>>);

#[async_trait::async_trait]
impl ObjectCreatedSink for LateQueue {
    async fn object_created(&self, notification: String) -> Result<()> {
        let queue = self
            .0
            .get()
            .ok_or_else(|| anyhow!("the queue is not open yet"))?;
        queue.send(&notification).await.map(|_| ())
    }
}

/// The job queue as configured: SQS when `KARMIC_SQS_QUEUE_URL` is set, else the
/// embedded queue (embedded store only).
pub async fn job_queue(rt: &Runtime) -> Result<Arc<dyn JobQueue>> {
    Ok(queues(rt).await?.0)
}

/// The job queue and its dead-letter queue, as configured (see [`job_queue`]).
pub async fn queues(rt: &Runtime) -> Result<(Arc<dyn JobQueue>, Arc<dyn DeadLetterQueue>)> {
    let s = &rt.settings;
    if let Some(queue_url) = &s.sqs_queue_url {
        let queue = Arc::new(
            SqsQueue::connect(&SqsSettings {
                endpoint: s.sqs_endpoint.clone(),
                queue_url: queue_url.clone(),
                dead_letter_url: s.sqs_dlq_url.clone(),
                region: s.aws_region.clone(),
                credentials: s.aws_credentials.clone(),
                // Above the longest long poll.
                operation_timeout: s.worker_wait + std::time::Duration::from_secs(10),
            })
            .await?,
        );
        return Ok((queue.clone(), queue));
    }
    match &rt.state.db {
        commands::Database::Sqlite(pool) => {
            let queue = Arc::new(SqliteQueue::new(
                pool.clone(),
                "documents",
                // One receive more than the job's attempts: a worker that dies during the
                // last attempt leaves a receive that records the job as dead-lettered.
                s.job_max_attempts + 1,
            ));
            Ok((queue.clone(), queue))
        }
        _ => Err(anyhow!(
            "KARMIC_SQS_QUEUE_URL must be set with KARMIC_DATABASE_URL (the embedded queue lives in the embedded store)"
        )),
    }
}

/// The analysis child: `KARMIC_ANALYZER_PROGRAM`, else `karmic-analyze` beside this
/// executable, else this executable; each is run as `PROGRAM analyze-child SETTINGS`
/// (`karmic-analyze` reads only the last argument).
fn analyzer(settings: &Settings) -> Result<IsolatedAnalyzer> {
    let program: PathBuf = match &settings.analyzer_program {
        Some(p) => p.clone(),
        None => {
            let me = std::env::current_exe().context("finding the karmic executable")?;
            let beside = me.with_file_name("karmic-analyze");
            if beside.is_file() { beside } else { me }
        }
    };
    let args: Vec<std::ffi::OsString> = vec!["analyze-child".into()];
    Ok(IsolatedAnalyzer::new(program, args)
        .with_timeout(settings.analyzer_timeout)
        .with_memory_bytes(settings.analyzer_memory_mb << 20)
        .with_limits(worker::Limits {
            max_bytes: settings.upload_max_bytes,
            ..worker::Limits::default()
        }))
}

/// A worker over the runtime's services.
pub fn worker(rt: &Runtime, queue: Arc<dyn JobQueue>) -> Result<Worker> {
    let s = &rt.settings;
    let defaults = WorkerSettings::default();
    Ok(Worker {
        queue,
        // Nobody waits on the worker's commits: the projector's loop in this process
        // projects them in batches instead of a pass after each of them.
        documents: Documents::new(
            &rt.state.db,
            Arc::new(Nudging(rt.projector.clone())),
            s.job_max_attempts,
        ),
        objects: rt.state.objects.clone(),
        analyzer: Arc::new(analyzer(s)?),
        settings: WorkerSettings {
            worker_id: s.worker_id.clone().unwrap_or(defaults.worker_id),
            concurrency: s
                .worker_concurrency
                .unwrap_or_else(|| worker::run::default_concurrency(s.analyzer_memory_mb << 20)),
            wait: s.worker_wait,
            visibility: s.worker_visibility,
            heartbeat: s.worker_heartbeat,
            shutdown_grace: s.worker_shutdown_grace,
            max_bytes: s.upload_max_bytes,
            retry_delay: s.worker_retry_delay,
        },
    })
}

/// The embedded S3 endpoint, serving from the moment it is built (the system's own
/// start-up already talks to it), stopped by `stop`.
struct EmbeddedS3Task {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Drop for EmbeddedS3Task {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// `karmic serve`, built and bound but not yet running.
pub struct System {
    app: Application,
    s3: Option<EmbeddedS3Task>,
    worker: Option<Worker>,
    queue: Option<Arc<dyn JobQueue>>,
}

impl System {
    pub async fn build(mut settings: Settings) -> Result<System> {
        let mut s3 = None;
        let sink = Arc::new(LateQueue::default());
        if settings.is_embedded() && settings.s3_endpoint.is_none() {
            std::fs::create_dir_all(&settings.data_dir).with_context(|| {
                format!(
                    "creating the data directory {}",
                    settings.data_dir.display()
                )
            })?;
            let (key, secret) = storage::embedded::credentials(&settings.data_dir)?;
            let endpoint = EmbeddedS3::bind(
                &settings.data_dir.join("objects"),
                settings.s3_embedded_addr,
                &key,
                &secret,
                sink.clone(),
            )
            .await?
            .allow_origins(&settings.cors_origins);
            let addr = endpoint.local_addr();
            settings.s3_endpoint = Some(format!("http://{addr}"));
            settings.s3_credentials = Some((key, secret));
            let (stop, mut stopped) = watch::channel(false);
            let task = tokio::spawn(endpoint.run_until(async move {
                let _ = stopped.wait_for(|s| *s).await;
            }));
            s3 = Some(EmbeddedS3Task { addr, stop, task });
        }
        let app = Application::build(settings).await?;
        let rt = app.runtime();
        let run_worker = rt
            .settings
            .worker_in_process
            .unwrap_or(rt.settings.is_embedded());
        let queue = if run_worker || s3.is_some() {
            Some(job_queue(rt).await?)
        } else {
            None
        };
        if let Some(q) = &queue {
            let _ = sink.0.set(q.clone());
        }
        if s3.is_some() {
            rt.state.objects.ensure_bucket().await?;
        }
        let worker = match (&queue, run_worker) {
            (Some(q), true) => Some(worker(rt, q.clone())?),
            _ => None,
        };
        Ok(System {
            app,
            s3,
            worker,
            queue,
        })
    }

    /// The HTTP API's port.
    pub fn port(&self) -> u16 {
        self.app.port()
    }

    /// The embedded S3 endpoint's address, if it runs.
    pub fn s3_addr(&self) -> Option<SocketAddr> {
        self.s3.as_ref().map(|s| s.addr)
    }

    pub fn runtime(&self) -> &Runtime {
        self.app.runtime()
    }

    /// The job queue the worker consumes (and the embedded endpoint feeds).
    pub fn queue(&self) -> Option<Arc<dyn JobQueue>> {
        self.queue.clone()
    }

    /// Run until `shutdown` resolves: then the API drains, the worker finishes or
    /// releases its jobs, and the storage endpoint stops last (the worker reads from it).
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (tx, rx) = watch::channel(false);
        let tx = Arc::new(tx);
        let stopped = move |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // Whichever part ends first (the signal, or the API or the worker failing on its
        // own) stops the others: one part down is the whole process down, so that a
        // supervisor sees it exit and restarts it.
        let api = {
            let (tx, part) = (tx.clone(), self.app.run_until(stopped(rx.clone())));
            tokio::spawn(async move {
                let r = part.await;
                let _ = tx.send(true);
                r
            })
        };
        let worker = self.worker.map(|w| {
            let (tx, part) = (tx.clone(), w.run(stopped(rx.clone())));
            tokio::spawn(async move {
                let r = part.await;
                let _ = tx.send(true);
                r
            })
        });
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        let api = api.await.context("the API task")?;
        let worker = match worker {
            Some(w) => w.await.context("the worker task")?,
            None => Ok(()),
        };
        let s3 = match self.s3 {
            Some(mut s) => {
                let _ = s.stop.send(true);
                (&mut s.task).await.context("the storage task")?
            }
            None => Ok(()),
        };
        api.and(worker).and(s3)
    }
}

/// `karmic worker`: the worker alone (AWS: on EC2, against SQS, S3 and the event store),
/// with the projector running beside it so read models follow its events.
pub async fn run_worker(mut settings: Settings) -> Result<()> {
    if settings.is_embedded() && settings.s3_endpoint.is_none() && settings.s3_credentials.is_none()
    {
        // Beside an embedded `karmic serve` (KARMIC_WORKER_IN_PROCESS=false): its S3
        // endpoint, with the keys it keeps in the data directory.
        settings.s3_credentials =
            Some(storage::embedded::existing_credentials(&settings.data_dir)?);
    }
    let rt = Runtime::build(settings).await?;
    let queue = job_queue(&rt).await?;
    let w = worker(&rt, queue)?;
    let (tx, mut rx_worker) = watch::channel(false);
    // The projector loop stops only once the worker has: the worker's commits nudge it
    // (`Nudging`), and those of its last jobs must not find it gone.
    let (stop_projector, mut rx_proj) = watch::channel(false);
    let projector = tokio::spawn(rt.projector.clone().run(async move {
        let _ = rx_proj.wait_for(|s| *s).await;
    }));
    tokio::spawn(async move {
        handlers::app::shutdown_signal().await;
        let _ = tx.send(true);
    });
    let result = w
        .run(async move {
            let _ = rx_worker.wait_for(|s| *s).await;
        })
        .await;
    let _ = stop_projector.send(true);
    let _ = projector.await;
    // A nudge that came as the loop stopped: one last pass, bounded.
    if let Err(e) = tokio::time::timeout(std::time::Duration::from_secs(5), rt.projector.catch_up())
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r.map(drop))
    {
        tracing::warn!(error = %format!("{e:#}"), "read models left behind at exit; the next projector pass catches up");
    }
    result
}
