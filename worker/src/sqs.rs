//! [`JobQueue`] over Amazon SQS (and anything that speaks its API, such as moto).
//!
//! SQS does the visibility timeouts, receive counts and dead-lettering (the queue's
//! redrive policy) itself; this adapter only maps the port onto its calls. Three things
//! SQS has no call for are built from others: moving one message to the dead-letter
//! queue now (send it there, then delete it here), listing dead letters (a receive on
//! the dead-letter queue that leaves the messages visible), and giving a receive back
//! (send a delayed copy that carries the receives already spent in the message
//! attribute [`RECEIVES_BEFORE`], then delete the original).

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::ProvideErrorMetadata;
use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName};
use secrecy::{ExposeSecret, SecretString};

use crate::queue::{DeadLetterQueue, JobQueue, Received, Receiving};

/// Where the queue is and how to reach it.
#[derive(Debug, Clone)]
pub struct SqsSettings {
    /// `KARMIC_SQS_ENDPOINT`; `None` is AWS's own endpoint for the region.
    pub endpoint: Option<String>,
    /// `KARMIC_SQS_QUEUE_URL`.
    pub queue_url: String,
    /// `KARMIC_SQS_DLQ_URL`; `None`: read from the queue's redrive policy.
    pub dead_letter_url: Option<String>,
    pub region: String,
    /// Static keys (local stand-ins); `None`: the default AWS credential chain.
    pub credentials: Option<(String, SecretString)>,
    /// Above the long-poll wait, or every receive would time out.
    pub operation_timeout: Duration,
}

/// The message attribute in which a copy made by [`JobQueue::give_back`] carries the
/// receives its original had already spent; a receive reports SQS's own count plus it.
pub const RECEIVES_BEFORE: &str = "KarmicReceivesBefore";

/// The message attribute that counts how often a message was given back.
pub const GIVEN_BACK: &str = "KarmicGivenBack";

/// SQS delays a message by at most 15 minutes.
const MAX_DELAY: Duration = Duration::from_secs(900);

/// The SQS adapter.
#[derive(Debug, Clone)]
pub struct SqsQueue {
    client: Client,
    queue_url: String,
    dead_letter_url: String,
    receiving: Receiving,
}

/// An SQS client for these settings (shared with set-up code and tests).
pub async fn client(
    endpoint: Option<&str>,
    region: &str,
    credentials: Option<&(String, SecretString)>,
    operation_timeout: Duration,
) -> Client {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_owned()))
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .operation_timeout(operation_timeout)
                .connect_timeout(Duration::from_secs(5))
                .build(),
        );
    if let Some(endpoint) = endpoint {
        loader = loader.endpoint_url(endpoint);
    }
    if let Some((key, secret)) = credentials {
        loader = loader.credentials_provider(aws_sdk_sqs::config::Credentials::new(
            key.clone(),
            secret.expose_secret().to_owned(),
            None,
            None,
            "karmic-settings",
        ));
    }
    Client::new(&loader.load().await)
}

fn code<E: ProvideErrorMetadata>(e: &E) -> &str {
    e.code().unwrap_or("")
}

/// Does the error say "this receipt no longer names an in-flight message"? SQS answers
/// a receipt spent by a later receive or a delete with `InvalidParameterValue` whose
/// message names the receipt handle; the same code for any other parameter is a real
/// error and is reported as one.
fn stale_receipt<E: ProvideErrorMetadata>(e: &E) -> bool {
    match code(e) {
        "ReceiptHandleIsInvalid"
        | "AWS.SimpleQueueService.ReceiptHandleIsInvalid"
        | "MessageNotInflight"
        | "AWS.SimpleQueueService.MessageNotInflight" => true,
        "InvalidParameterValue" => e
            .message()
            .is_some_and(|m| m.to_ascii_lowercase().contains("receipt")),
        _ => false,
    }
}

fn secs(d: Duration) -> i32 {
    i32::try_from(d.as_secs()).unwrap_or(i32::MAX)
}

impl SqsQueue {
    /// Connect, and find the dead-letter queue from the redrive policy if it is not
    /// configured.
    pub async fn connect(settings: &SqsSettings) -> Result<SqsQueue> {
        let client = client(
            settings.endpoint.as_deref(),
            &settings.region,
            settings.credentials.as_ref(),
            settings.operation_timeout,
        )
        .await;
        let dead_letter_url = match &settings.dead_letter_url {
            Some(url) => url.clone(),
            None => dead_letter_url_of(&client, &settings.queue_url).await?,
        };
        Ok(SqsQueue {
            client,
            queue_url: settings.queue_url.clone(),
            dead_letter_url,
            receiving: Receiving::default(),
        })
    }

    /// One ReceiveMessage call.
    async fn receive_once(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.queue_url)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(10))
            .wait_time_seconds(secs(wait).min(20))
            .visibility_timeout(secs(visibility))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names(RECEIVES_BEFORE)
            .message_attribute_names(GIVEN_BACK)
            .send()
            .await
            .context("receiving from SQS")?;
        Ok(out
            .messages()
            .iter()
            .filter_map(|m| {
                let count: u32 = m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(1);
                let attribute = |name: &str| -> u32 {
                    m.message_attributes()
                        .and_then(|a| a.get(name))
                        .and_then(|v| v.string_value())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0)
                };
                let before = attribute(RECEIVES_BEFORE);
                let given_back = attribute(GIVEN_BACK);
                Some(Received {
                    id: m.message_id()?.to_owned(),
                    body: m.body().unwrap_or_default().to_owned(),
                    receipt: m.receipt_handle()?.to_owned(),
                    receive_count: before.saturating_add(count),
                    given_back,
                })
            })
            .collect())
    }

    pub fn queue_url(&self) -> &str {
        &self.queue_url
    }

    pub fn dead_letter_url(&self) -> &str {
        &self.dead_letter_url
    }
}

/// The dead-letter queue named by the queue's redrive policy.
async fn dead_letter_url_of(client: &Client, queue_url: &str) -> Result<String> {
    let attrs = client
        .get_queue_attributes()
        .queue_url(queue_url)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .with_context(|| format!("reading the redrive policy of {queue_url}"))?;
    let policy = attrs
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::RedrivePolicy))
        .ok_or_else(|| {
            anyhow!("{queue_url} has no redrive policy; set KARMIC_SQS_DLQ_URL or give it one")
        })?;
    let policy: serde_json::Value =
        serde_json::from_str(policy).context("reading the redrive policy")?;
    let arn = policy
        .get("deadLetterTargetArn")
        .and_then(|v| v.as_str())
        .ok_or_else(|| anyhow!("the redrive policy of {queue_url} names no dead-letter queue"))?;
    // arn:aws:sqs:REGION:ACCOUNT:NAME
    let mut parts = arn.rsplit(':');
    let (Some(name), Some(account)) = (parts.next(), parts.next()) else {
        return Err(anyhow!("not a queue ARN: {arn}"));
    };
    let out = client
        .get_queue_url()
        .queue_name(name)
        .queue_owner_aws_account_id(account)
        .send()
        .await
        .with_context(|| format!("finding the dead-letter queue {name}"))?;
    out.queue_url()
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no URL for the dead-letter queue {name}"))
}

/// Create a queue with its dead-letter queue and redrive policy (idempotent: SQS returns
/// the existing queues when the attributes match). For local set-up and tests; in AWS the
/// template creates them. Returns (queue URL, dead-letter queue URL).
pub async fn create_with_dead_letter_queue(
    client: &Client,
    name: &str,
    max_receive_count: u32,
    visibility: Duration,
) -> Result<(String, String)> {
    let dlq = client
        .create_queue()
        .queue_name(format!("{name}-dlq"))
        .attributes(QueueAttributeName::MessageRetentionPeriod, "1209600")
        .send()
        .await
        .with_context(|| format!("creating {name}-dlq"))?;
    let dlq_url = dlq
        .queue_url()
        .ok_or_else(|| anyhow!("no URL for {name}-dlq"))?
        .to_owned();
    let arn = client
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .context("reading the dead-letter queue's ARN")?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .ok_or_else(|| anyhow!("no ARN for {name}-dlq"))?;
    let policy = serde_json::json!({
        "deadLetterTargetArn": arn,
        "maxReceiveCount": max_receive_count.to_string(),
    })
    .to_string();
    let queue = client
        .create_queue()
        .queue_name(name)
        .attributes(QueueAttributeName::RedrivePolicy, policy)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility.as_secs().to_string(),
        )
        .send()
        .await
        .with_context(|| format!("creating {name}"))?;
    let url = queue
        .queue_url()
        .ok_or_else(|| anyhow!("no URL for {name}"))?
        .to_owned();
    Ok((url, dlq_url))
}

#[async_trait::async_trait]
impl JobQueue for SqsQueue {
    async fn send(&self, body: &str) -> Result<String> {
        let out = self
            .client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .context("sending to SQS")?;
        Ok(out.message_id().unwrap_or_default().to_owned())
    }

    async fn receive(
        &self,
        max: u32,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Received>> {
        // A long poll cannot be cut short; whatever it brings after its caller has gone
        // is given back.
        self.receiving
            .detached(self, move |q, _abandoned| async move {
                q.receive_once(max, wait, visibility).await
            })
            .await
    }

    async fn close(&self) {
        self.receiving.close().await;
    }

    /// The receive undone: a copy, visible after `delay`, that carries the receives spent
    /// before this one (and the give-backs, one more if `counted`), then the delete. If
    /// the delete fails after the send, the message is delivered twice (the consumers are
    /// idempotent), never lost.
    async fn put_back(&self, message: &Received, delay: Duration, counted: bool) -> Result<bool> {
        let before = message.receive_count.saturating_sub(1);
        let number = |n: u32| {
            MessageAttributeValue::builder()
                .data_type("Number")
                .string_value(n.to_string())
                .build()
                .context("building a message attribute")
        };
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(&message.body)
            .delay_seconds(secs(delay.min(MAX_DELAY)))
            .message_attributes(RECEIVES_BEFORE, number(before)?)
            .message_attributes(
                GIVEN_BACK,
                number(message.given_back.saturating_add(u32::from(counted)))?,
            )
            .send()
            .await
            .context("putting a message back: sending its copy")?;
        self.delete(&message.receipt).await
    }

    async fn change_visibility(&self, receipt: &str, visibility: Duration) -> Result<bool> {
        match self
            .client
            .change_message_visibility()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .visibility_timeout(secs(visibility))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if stale_receipt(&e) => Ok(false),
            Err(e) => Err(e).context("changing a message's visibility"),
        }
    }

    async fn delete(&self, receipt: &str) -> Result<bool> {
        match self
            .client
            .delete_message()
            .queue_url(&self.queue_url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if stale_receipt(&e) => Ok(false),
            Err(e) => Err(e).context("deleting a message"),
        }
    }

    /// Send to the dead-letter queue, then delete here: SQS has no call that moves one
    /// message. If the delete fails after the send, the message comes back and is
    /// dead-lettered again (the job's events say it already is): the dead-letter queue
    /// may hold a duplicate, never lose one.
    async fn dead_letter(&self, message: &Received) -> Result<bool> {
        self.client
            .send_message()
            .queue_url(&self.dead_letter_url)
            .message_body(&message.body)
            .send()
            .await
            .context("sending to the dead-letter queue")?;
        self.delete(&message.receipt).await
    }

    async fn dead_letters(&self) -> Result<Vec<(String, String)>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.dead_letter_url)
            .max_number_of_messages(10)
            .wait_time_seconds(0)
            .visibility_timeout(0)
            .send()
            .await
            .context("peeking at the dead-letter queue")?;
        Ok(out
            .messages()
            .iter()
            .map(|m| {
                (
                    m.message_id().unwrap_or_default().to_owned(),
                    m.body().unwrap_or_default().to_owned(),
                )
            })
            .collect())
    }
}

#[async_trait::async_trait]
impl DeadLetterQueue for SqsQueue {
    async fn take(&self, max: u32, wait: Duration, hold: Duration) -> Result<Vec<Received>> {
        let out = self
            .client
            .receive_message()
            .queue_url(&self.dead_letter_url)
            .max_number_of_messages(i32::try_from(max.clamp(1, 10)).unwrap_or(10))
            .wait_time_seconds(secs(wait).min(20))
            .visibility_timeout(secs(hold))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .context("taking from the dead-letter queue")?;
        Ok(out
            .messages()
            .iter()
            .filter_map(|m| {
                Some(Received {
                    id: m.message_id()?.to_owned(),
                    body: m.body().unwrap_or_default().to_owned(),
                    receipt: m.receipt_handle()?.to_owned(),
                    receive_count: m
                        .attributes()
                        .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(1),
                    given_back: 0,
                })
            })
            .collect())
    }

    async fn untake(&self, receipt: &str) -> Result<bool> {
        match self
            .client
            .change_message_visibility()
            .queue_url(&self.dead_letter_url)
            .receipt_handle(receipt)
            .visibility_timeout(0)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if stale_receipt(&e) => Ok(false),
            Err(e) => Err(e).context("giving back a dead letter"),
        }
    }

    async fn remove(&self, receipt: &str) -> Result<bool> {
        match self
            .client
            .delete_message()
            .queue_url(&self.dead_letter_url)
            .receipt_handle(receipt)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if stale_receipt(&e) => Ok(false),
            Err(e) => Err(e).context("removing a dead letter"),
        }
    }

    /// `StartMessageMoveTask` from the dead-letter queue to the job queue. Any refusal
    /// (moto and other stand-ins lack the API; a task may already be running) falls back
    /// to the caller's message-by-message move, which is always correct.
    async fn move_all_back(&self) -> Result<Option<String>> {
        let source = queue_arn(&self.client, &self.dead_letter_url).await?;
        let destination = queue_arn(&self.client, &self.queue_url).await?;
        match self
            .client
            .start_message_move_task()
            .source_arn(source)
            .destination_arn(destination)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out.task_handle().unwrap_or_default().to_owned())),
            Err(e) => {
                tracing::info!(
                    code = e.code().unwrap_or("-"),
                    error = %aws_sdk_sqs::error::DisplayErrorContext(&e),
                    "no message move task; moving dead letters one by one"
                );
                Ok(None)
            }
        }
    }

    async fn approximate_len(&self) -> Result<u64> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(&self.dead_letter_url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .send()
            .await
            .context("counting dead letters")?;
        Ok(out
            .attributes()
            .map(|a| {
                a.values()
                    .filter_map(|v| v.parse::<u64>().ok())
                    .sum::<u64>()
            })
            .unwrap_or(0))
    }
}

/// A queue's ARN.
async fn queue_arn(client: &Client, url: &str) -> Result<String> {
    client
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .with_context(|| format!("reading the ARN of {url}"))?
        .attributes()
        .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
        .ok_or_else(|| anyhow!("no ARN for {url}"))
}
