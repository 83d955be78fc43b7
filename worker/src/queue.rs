//! The job queue port and its embedded adapter.
//!
//! The worker consumes storage notifications from a queue with SQS's semantics: at-least-
//! once delivery, a visibility timeout per receive, a receive count, a dead-letter queue
//! after too many receives, and receipt handles (only the latest receive may delete a
//! message or change its visibility). In AWS that is SQS itself; embedded, it is
//! [`SqliteQueue`], a table in the embedded database, so it survives restarts.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use sqlx::{Row, SqlitePool};
use tokio::sync::{Notify, OwnedRwLockReadGuard, RwLock, oneshot};
use uuid::Uuid;

/// A message as one receive hands it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub id: String,
    pub body: String,
    /// Deletes the message or changes its visibility, until the next receive of it.
    pub receipt: String,
    /// How many times it has been received, this time included (SQS's
    /// `ApproximateReceiveCount`), less the receives given back.
    pub receive_count: u32,
    /// How many times it has been given back ([`JobQueue::give_back`]).
    pub given_back: u32,
}

/// A queue with SQS's semantics (see the module documentation).
#[async_trait::async_trait]
pub trait JobQueue: Send + Sync {
    async fn send(&self, body: &str) -> Result<String>;
    /// Up to `max` visible messages, waiting up to `wait` for the first; each is hidden
    /// for `visibility`.
    ///
    /// Cancel-safe: if the returned future is dropped (a worker shutting down mid-poll),
    /// whatever the receive took is released ([`JobQueue::release`]) instead of
    /// staying hidden for `visibility`; [`JobQueue::close`] waits until that is done.
    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>>;
    /// Undo this receive: the message comes back after `delay` with its receive count
    /// unspent, and one more give-back counted if `counted`. `false`: the receipt is
    /// stale. Callers use [`JobQueue::give_back`] or [`JobQueue::release`].
    async fn put_back(&self, message: &Received, delay: Duration, counted: bool) -> Result<bool>;
    /// Let the message come back after `delay` as if this receive had not happened: its
    /// receive count is not spent. For a receive that did no work (the event store or the
    /// bucket was unreachable), so that an outage never walks a message into the
    /// dead-letter queue behind the job's back. `false`: the receipt is stale.
    async fn give_back(&self, message: &Received, delay: Duration) -> Result<bool> {
        self.put_back(message, delay, true).await
    }
    /// Make the message visible now as if this receive had not happened, without counting
    /// a give-back: nothing failed (a receive cut short, a worker stopping before it
    /// started any attempt). `false`: the receipt is stale.
    async fn release(&self, message: &Received) -> Result<bool> {
        self.put_back(message, Duration::ZERO, false).await
    }
    /// Wait until receives whose callers went away have given their messages back.
    async fn close(&self);
    /// Hide the message for `visibility` from now (a heartbeat). `false`: the receipt is
    /// stale (the message was received again, or deleted).
    async fn change_visibility(&self, receipt: &str, visibility: Duration) -> Result<bool>;
    /// `false`: the receipt is stale.
    async fn delete(&self, receipt: &str) -> Result<bool>;
    /// Move the message to the dead-letter queue now (retrying cannot help). `false`:
    /// the receipt is stale.
    async fn dead_letter(&self, message: &Received) -> Result<bool>;
    /// Messages waiting in the dead-letter queue.
    async fn dead_letters(&self) -> Result<Vec<(String, String)>>;
}

/// The dead-letter queue as operators work it (`karmic dlq`): messages are taken (hidden
/// from other takers for a while, each with a receipt), then removed or given back.
#[async_trait::async_trait]
pub trait DeadLetterQueue: Send + Sync {
    /// Up to `max` (at most 10) messages, waiting up to `wait` for the first; each is
    /// hidden from other takers for `hold`.
    async fn take(&self, max: u32, wait: Duration, hold: Duration) -> Result<Vec<Received>>;
    /// Make a taken message visible again now. `false`: the receipt is stale.
    async fn untake(&self, receipt: &str) -> Result<bool>;
    /// Delete a taken message. `false`: the receipt is stale.
    async fn remove(&self, receipt: &str) -> Result<bool>;
    /// About how many messages it holds, taken or not (for progress bars).
    async fn approximate_len(&self) -> Result<u64>;
    /// Have the queue service move every dead letter back to the job queue itself (SQS
    /// `StartMessageMoveTask`); the task's handle, or `None` where it cannot (the
    /// embedded queue, an endpoint without the API): the caller then moves them one by
    /// one.
    async fn move_all_back(&self) -> Result<Option<String>> {
        Ok(None)
    }
}

/// What a detached receive hands back: the messages, and its hold on the queue's
/// `receiving` lock (released once they are handed over or given back).
type Handover = (Result<Vec<Received>>, OwnedRwLockReadGuard<()>);

/// The caller's end of a detached receive. Dropped before it has the messages, it tells
/// the poll to stop and gives back whatever the poll already took.
struct Pending<Q: JobQueue + Clone + 'static> {
    rx: oneshot::Receiver<Handover>,
    abandoned: Arc<AtomicBool>,
    queue: Q,
}

impl<Q: JobQueue + Clone + 'static> Drop for Pending<Q> {
    fn drop(&mut self) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.rx.close();
        // Sent just before the close: still ours to give back.
        if let Ok((Ok(messages), guard)) = self.rx.try_recv()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let queue = self.queue.clone();
            rt.spawn(async move {
                for m in &messages {
                    let _ = queue.release(m).await;
                }
                drop(guard);
            });
        }
    }
}

/// An adapter's receives in flight, for the trait's cancel-safety: each holds the lock
/// shared until its messages are handed over or released; [`Receiving::close`] (an
/// adapter's [`JobQueue::close`]) takes it exclusively.
#[derive(Debug, Clone, Default)]
pub(crate) struct Receiving(Arc<RwLock<()>>);

impl Receiving {
    /// Run `poll` in a task of its own, so that dropping the caller's future mid-poll
    /// cannot strand the messages it took: they are released. `poll` should stop early
    /// once its flag is set.
    pub(crate) async fn detached<Q, F, Fut>(&self, queue: &Q, poll: F) -> Result<Vec<Received>>
    where
        Q: JobQueue + Clone + 'static,
        F: FnOnce(Q, Arc<AtomicBool>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<Received>>> + Send + 'static,
    {
        let guard = self.0.clone().read_owned().await;
        let (tx, rx) = oneshot::channel::<Handover>();
        let abandoned = Arc::new(AtomicBool::new(false));
        let (q, flag) = (queue.clone(), abandoned.clone());
        tokio::spawn(async move {
            let got = poll(q.clone(), flag).await;
            if let Err((Ok(messages), guard)) = tx.send((got, guard)) {
                for m in &messages {
                    let _ = q.release(m).await;
                }
                drop(guard);
            }
        });
        let mut pending = Pending {
            rx,
            abandoned,
            queue: queue.clone(),
        };
        let (got, guard) = (&mut pending.rx)
            .await
            .map_err(|_| anyhow!("the receive task failed"))?;
        drop(guard);
        got
    }

    /// Wait until receives whose callers went away have released their messages.
    pub(crate) async fn close(&self) {
        let _ = self.0.write().await;
    }
}

/// [`JobQueue`] over the `queue_messages` table of the embedded database.
#[derive(Debug, Clone)]
pub struct SqliteQueue {
    pool: SqlitePool,
    name: String,
    dead_letter_name: String,
    max_receives: u32,
    receiving: Receiving,
    /// Wakes this handle's long polls when it sends (one process: the embedded S3
    /// endpoint and the worker of `karmic serve` share a handle); other processes' sends
    /// are found by the poll every 50 ms.
    arrived: Arc<Notify>,
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    )
    .unwrap_or(i64::MAX)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl SqliteQueue {
    /// The queue `name`, whose messages go to `{name}-dlq` after `max_receives`
    /// receives (SQS's `maxReceiveCount`).
    pub fn new(pool: SqlitePool, name: &str, max_receives: u32) -> Self {
        SqliteQueue {
            pool,
            name: name.to_owned(),
            dead_letter_name: format!("{name}-dlq"),
            max_receives: max_receives.max(1),
            receiving: Receiving::default(),
            arrived: Arc::new(Notify::new()),
        }
    }

    /// The long poll: one attempt every 50 ms until a message comes, `wait` is over or
    /// the caller has gone.
    async fn poll(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
        abandoned: &AtomicBool,
    ) -> Result<Vec<Received>> {
        let deadline = Instant::now() + wait;
        loop {
            if abandoned.load(Ordering::SeqCst) {
                return Ok(vec![]);
            }
            // Listening before looking, so that a send in between is not missed.
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let got = self.receive_now(max.clamp(1, 10), visibility).await?;
            if !got.is_empty() || Instant::now() >= deadline {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::select! {
                () = arrived => {}
                () = tokio::time::sleep(left.min(Duration::from_millis(50))) => {}
            }
        }
    }

    /// One attempt at receiving: two statements, each atomic on its own (SQLite has one
    /// writer), so two consumers never take the same message.
    async fn receive_now(&self, max: u32, visibility: Duration) -> Result<Vec<Received>> {
        let now = now_ms();
        // Visible again after being received as often as allowed: to the dead-letter
        // queue, as SQS does on the next receive.
        sqlx::query(
            "UPDATE queue_messages SET queue = ?2, visible_at = ?3, receive_count = 0,
                    receipt = NULL
              WHERE queue = ?1 AND visible_at <= ?3 AND receive_count >= ?4",
        )
        .bind(&self.name)
        .bind(&self.dead_letter_name)
        .bind(now)
        .bind(i64::from(self.max_receives))
        .execute(&self.pool)
        .await
        .context("receiving: dead-lettering")?;
        let rows = sqlx::query(
            "UPDATE queue_messages
                SET receive_count = receive_count + 1, receipt = lower(hex(randomblob(16))),
                    visible_at = ?3
              WHERE id IN (SELECT id FROM queue_messages
                            WHERE queue = ?1 AND visible_at <= ?2 AND receive_count < ?5
                            ORDER BY visible_at, sent_at LIMIT ?4)
             RETURNING id, body, receipt, receive_count, given_back, sent_at",
        )
        .bind(&self.name)
        .bind(now)
        .bind(now.saturating_add(ms(visibility)))
        .bind(i64::from(max))
        .bind(i64::from(self.max_receives))
        .fetch_all(&self.pool)
        .await
        .context("receiving")?;
        let mut out: Vec<(i64, Received)> = Vec::with_capacity(rows.len());
        for row in rows {
            let count: i64 = row.try_get("receive_count")?;
            let given_back: i64 = row.try_get("given_back")?;
            out.push((
                row.try_get("sent_at")?,
                Received {
                    id: row.try_get("id")?,
                    body: row.try_get("body")?,
                    receipt: row.try_get("receipt")?,
                    receive_count: u32::try_from(count).unwrap_or(u32::MAX),
                    given_back: u32::try_from(given_back).unwrap_or(u32::MAX),
                },
            ));
        }
        out.sort_by_key(|(sent, _)| *sent);
        Ok(out.into_iter().map(|(_, r)| r).collect())
    }
}

#[async_trait::async_trait]
impl JobQueue for SqliteQueue {
    async fn send(&self, body: &str) -> Result<String> {
        let id = Uuid::now_v7().to_string();
        let now = now_ms();
        sqlx::query(
            "INSERT INTO queue_messages (id, queue, body, sent_at, visible_at)
             VALUES (?1, ?2, ?3, ?4, ?4)",
        )
        .bind(&id)
        .bind(&self.name)
        .bind(body)
        .bind(now)
        .execute(&self.pool)
        .await
        .context("sending to the embedded queue")?;
        self.arrived.notify_waiters();
        Ok(id)
    }

    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>> {
        self.receiving
            .detached(self, move |q, abandoned| async move {
                q.poll(max, wait, visibility, &abandoned).await
            })
            .await
    }

    /// The receive undone: visible after `delay`, its receive count unspent, a give-back
    /// counted if `counted`.
    async fn put_back(&self, message: &Received, delay: Duration, counted: bool) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE queue_messages
                SET visible_at = ?2, receive_count = max(receive_count - 1, 0), receipt = NULL,
                    given_back = given_back + ?3
              WHERE receipt = ?1",
        )
        .bind(&message.receipt)
        .bind(now_ms().saturating_add(ms(delay)))
        .bind(i64::from(counted))
        .execute(&self.pool)
        .await
        .context("putting a message back")?
        .rows_affected();
        Ok(n == 1)
    }

    async fn close(&self) {
        self.receiving.close().await;
    }

    async fn change_visibility(&self, receipt: &str, visibility: Duration) -> Result<bool> {
        let n = sqlx::query("UPDATE queue_messages SET visible_at = ?2 WHERE receipt = ?1")
            .bind(receipt)
            .bind(now_ms().saturating_add(ms(visibility)))
            .execute(&self.pool)
            .await
            .context("changing a message's visibility")?
            .rows_affected();
        Ok(n == 1)
    }

    async fn delete(&self, receipt: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM queue_messages WHERE receipt = ?1")
            .bind(receipt)
            .execute(&self.pool)
            .await
            .context("deleting a message")?
            .rows_affected();
        Ok(n == 1)
    }

    async fn dead_letter(&self, message: &Received) -> Result<bool> {
        let receipt = &message.receipt;
        let n = sqlx::query(
            "UPDATE queue_messages SET queue = ?2, visible_at = ?3, receive_count = 0,
                    receipt = NULL WHERE receipt = ?1",
        )
        .bind(receipt)
        .bind(&self.dead_letter_name)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .context("dead-lettering a message")?
        .rows_affected();
        Ok(n == 1)
    }

    async fn dead_letters(&self) -> Result<Vec<(String, String)>> {
        let rows =
            sqlx::query("SELECT id, body FROM queue_messages WHERE queue = ?1 ORDER BY sent_at")
                .bind(&self.dead_letter_name)
                .fetch_all(&self.pool)
                .await
                .context("listing dead letters")?;
        rows.iter()
            .map(|r| Ok((r.try_get("id")?, r.try_get("body")?)))
            .collect()
    }
}

#[async_trait::async_trait]
impl DeadLetterQueue for SqliteQueue {
    async fn take(&self, max: u32, wait: Duration, hold: Duration) -> Result<Vec<Received>> {
        let deadline = Instant::now() + wait;
        loop {
            let now = now_ms();
            let rows = sqlx::query(
                "UPDATE queue_messages
                    SET receive_count = receive_count + 1,
                        receipt = lower(hex(randomblob(16))), visible_at = ?3
                  WHERE id IN (SELECT id FROM queue_messages
                                WHERE queue = ?1 AND visible_at <= ?2
                                ORDER BY sent_at, id LIMIT ?4)
                 RETURNING id, body, receipt, receive_count, given_back, sent_at",
            )
            .bind(&self.dead_letter_name)
            .bind(now)
            .bind(now.saturating_add(ms(hold)))
            .bind(i64::from(max.clamp(1, 10)))
            .fetch_all(&self.pool)
            .await
            .context("taking from the dead-letter queue")?;
            let mut out: Vec<(i64, Received)> = Vec::with_capacity(rows.len());
            for row in rows {
                let count: i64 = row.try_get("receive_count")?;
                let given_back: i64 = row.try_get("given_back")?;
                out.push((
                    row.try_get("sent_at")?,
                    Received {
                        id: row.try_get("id")?,
                        body: row.try_get("body")?,
                        receipt: row.try_get("receipt")?,
                        receive_count: u32::try_from(count).unwrap_or(u32::MAX),
                        given_back: u32::try_from(given_back).unwrap_or(u32::MAX),
                    },
                ));
            }
            if !out.is_empty() || Instant::now() >= deadline {
                out.sort_by_key(|(sent, _)| *sent);
                return Ok(out.into_iter().map(|(_, r)| r).collect());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn untake(&self, receipt: &str) -> Result<bool> {
        let n = sqlx::query(
            "UPDATE queue_messages SET visible_at = ?3, receipt = NULL
              WHERE receipt = ?1 AND queue = ?2",
        )
        .bind(receipt)
        .bind(&self.dead_letter_name)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .context("giving back a dead letter")?
        .rows_affected();
        Ok(n == 1)
    }

    async fn remove(&self, receipt: &str) -> Result<bool> {
        let n = sqlx::query("DELETE FROM queue_messages WHERE receipt = ?1 AND queue = ?2")
            .bind(receipt)
            .bind(&self.dead_letter_name)
            .execute(&self.pool)
            .await
            .context("removing a dead letter")?
            .rows_affected();
        Ok(n == 1)
    }

    async fn approximate_len(&self) -> Result<u64> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM queue_messages WHERE queue = ?1")
            .bind(&self.dead_letter_name)
            .fetch_one(&self.pool)
            .await
            .context("counting dead letters")?;
        Ok(u64::try_from(n).unwrap_or_default())
    }
}
