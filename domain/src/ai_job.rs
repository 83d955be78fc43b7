//! The `AiJob` aggregate: the analysis of one uploaded object, through its attempts.
//!
//! Life: requested → started (attempt n, worker) → succeeded (result)
//!                                               | attempt failed (error, retryable or not)
//!                                               → dead-lettered (after the last attempt,
//!                                                 or at once when retrying cannot help)
//!       dead-lettered → redriven (an operator) → started again …
//!
//! Messages are delivered at least once and attempts can overlap (a slow attempt whose
//! lease on the message ran out while another started). So a job succeeds at most once;
//! a result that arrives after the job finished is recorded, never applied over it; and
//! an attempt is known by the queue's receive count, so a repeated start of the same
//! attempt records nothing.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::EVENT_VERSION_1;
use crate::document::{ContentType, DocumentId, ObjectKey};
use crate::values::{UserId, ValueError};

/// A job's id: derived from the document and the object's ETag, so that every copy of a
/// storage notification for the same object names the same job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(Uuid);

impl JobId {
    /// The namespace of job ids (a fixed, random UUID; never change it).
    const NAMESPACE: Uuid = Uuid::from_u128(0x6b61_726d_6963_4a6f_8062_0a1d_9c3e_5f10);

    pub fn for_object(document: DocumentId, etag: &str) -> Self {
        let name = format!("{document}:{}", etag.trim_matches('"'));
        JobId(Uuid::new_v5(&Self::NAMESPACE, name.as_bytes()))
    }

    pub fn parse(s: &str) -> Result<Self, ValueError> {
        Uuid::parse_str(s)
            .map(JobId)
            .map_err(|_| ValueError::InvalidId { field: "job_id" })
    }

    pub fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What the analysis of a document found. Bounded (see [`Analysis::bounded`]) so that an
/// event stays small whatever the document.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    /// SHA-256 of the object's bytes, lowercase hex.
    pub sha256: String,
    /// ISO 639-3 code, when the text is long enough for a reliable guess.
    pub language: Option<String>,
    pub pages: Option<u32>,
    pub words: u64,
    pub characters: u64,
    pub keywords: Vec<String>,
    /// 3–5 sentences taken from the text (fewer if it has fewer).
    pub summary: Vec<String>,
    pub entities: Entities,
    pub pii: PiiFlags,
    /// Set when the text could not be read (an encrypted PDF); the counts are then zero.
    pub note: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entities {
    pub emails: Vec<String>,
    pub urls: Vec<String>,
    pub dates: Vec<String>,
    pub phone_numbers: Vec<String>,
    pub money: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PiiFlags {
    pub email: bool,
    pub phone: bool,
    /// A card number that passes the Luhn check.
    pub card_number: bool,
    /// An IBAN that passes the mod-97 check.
    pub iban: bool,
}

impl Analysis {
    pub const MAX_KEYWORDS: usize = 20;
    pub const MAX_SUMMARY_SENTENCES: usize = 5;
    pub const MAX_ENTITIES_PER_KIND: usize = 50;
    pub const MAX_ITEM_CHARS: usize = 500;

    /// The same analysis with every list and string cut to its bound.
    pub fn bounded(mut self) -> Self {
        fn cut(s: &mut String) {
            if let Some((i, _)) = s.char_indices().nth(Analysis::MAX_ITEM_CHARS) {
                s.truncate(i);
            }
        }
        fn cut_all(v: &mut Vec<String>, n: usize) {
            v.truncate(n);
            v.iter_mut().for_each(cut);
        }
        cut_all(&mut self.keywords, Self::MAX_KEYWORDS);
        cut_all(&mut self.summary, Self::MAX_SUMMARY_SENTENCES);
        let e = &mut self.entities;
        for list in [
            &mut e.emails,
            &mut e.urls,
            &mut e.dates,
            &mut e.phone_numbers,
            &mut e.money,
        ] {
            cut_all(list, Self::MAX_ENTITIES_PER_KIND);
        }
        if let Some(note) = &mut self.note {
            cut(note);
        }
        self
    }
}

#[derive(Debug, Clone)]
pub enum AiJobCommand {
    /// A confirmed upload asks for its analysis. Idempotent.
    Request {
        job_id: JobId,
        document_id: DocumentId,
        owner: UserId,
        object_key: ObjectKey,
        etag: String,
        content_type: ContentType,
        max_attempts: u32,
    },
    /// A worker took the job's message; `attempt` is the queue's receive count (it
    /// restarts at 1 after a redrive; the job numbers its attempts on from the last).
    Start { attempt: u32, worker: String },
    /// `attempt`: the job's attempt number, as `JobStarted` recorded it.
    Succeed { attempt: u32, analysis: Analysis },
    /// `attempt`: as for `Succeed`.
    Fail {
        attempt: u32,
        error: String,
        retryable: bool,
    },
    /// An operator sends a dead-lettered job round again. `message`: the id of the
    /// dead-letter message the redrive re-sends (`None`: a replay from the event store).
    /// The same message again, after its redrive was cut short, is a no-op.
    Redrive {
        by: String,
        reason: String,
        message: Option<String>,
    },
    /// The queue dead-lettered the job's message without the job recording it (a worker
    /// killed while handling its last receive): the record catches up. Idempotent.
    RecordDeadLettered { reason: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AiJobEvent {
    JobRequested {
        job_id: JobId,
        document_id: DocumentId,
        owner: UserId,
        object_key: ObjectKey,
        etag: String,
        content_type: ContentType,
        max_attempts: u32,
    },
    JobStarted {
        attempt: u32,
        worker: String,
    },
    JobSucceeded {
        attempt: u32,
        analysis: Analysis,
    },
    AttemptFailed {
        attempt: u32,
        error: String,
        retryable: bool,
    },
    JobDeadLettered {
        reason: String,
    },
    /// A result (or failure) that came after the job had finished: kept for the record,
    /// never applied.
    LateOutcomeRecorded {
        attempt: u32,
        succeeded: bool,
    },
    /// Who sent the job round again, why, and from which dead-letter message (absent
    /// for a replay from the event store, and in events stored before these fields).
    JobRedriven {
        by: String,
        #[serde(default)]
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
}

impl DomainEvent for AiJobEvent {
    fn event_type(&self) -> String {
        match self {
            AiJobEvent::JobRequested { .. } => "JobRequested",
            AiJobEvent::JobStarted { .. } => "JobStarted",
            AiJobEvent::JobSucceeded { .. } => "JobSucceeded",
            AiJobEvent::AttemptFailed { .. } => "AttemptFailed",
            AiJobEvent::JobDeadLettered { .. } => "JobDeadLettered",
            AiJobEvent::LateOutcomeRecorded { .. } => "LateOutcomeRecorded",
            AiJobEvent::JobRedriven { .. } => "JobRedriven",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        EVENT_VERSION_1.to_owned()
    }
}

/// Why a job command was refused. `Finished` tells a worker to drop its message: the job
/// already has its outcome. HTTP mapping (operators' redrive): `NotFound` → 404,
/// `NotDeadLettered` → 409.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AiJobError {
    #[error("no such job")]
    NotFound,
    #[error("the job has finished")]
    Finished,
    #[error("only a dead-lettered job can be redriven")]
    NotDeadLettered,
    #[error("no such attempt was started")]
    UnknownAttempt,
    /// The attempt named is already under way (a duplicate delivery of the message that
    /// started it): the caller drops its copy.
    #[error("this attempt has already been started")]
    AlreadyStarted,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    #[default]
    None,
    Queued,
    Running,
    Succeeded,
    DeadLettered,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AiJob {
    pub status: JobStatus,
    pub document_id: Option<DocumentId>,
    pub owner: Option<UserId>,
    pub object_key: Option<ObjectKey>,
    pub etag: String,
    pub content_type: Option<ContentType>,
    pub max_attempts: u32,
    /// The highest attempt started.
    pub attempt: u32,
    /// Attempts counted since the last redrive (the queue's receive count restarts).
    pub attempt_base: u32,
    /// The highest attempt whose outcome (success or failure, applied or late) is recorded.
    #[serde(default)]
    pub last_outcome: u32,
    pub last_error: Option<String>,
    /// How many times operators have redriven the job.
    #[serde(default)]
    pub redrives: u32,
    /// The dead-letter message the last redrive re-sent, if it came from one.
    #[serde(default)]
    pub redriven_from: Option<String>,
}

impl AiJob {
    fn finished(&self) -> bool {
        matches!(self.status, JobStatus::Succeeded | JobStatus::DeadLettered)
    }

    pub fn decide(&self, command: AiJobCommand) -> Result<Vec<AiJobEvent>, AiJobError> {
        if self.status == JobStatus::None && !matches!(command, AiJobCommand::Request { .. }) {
            return Err(AiJobError::NotFound);
        }
        match command {
            AiJobCommand::Request {
                job_id,
                document_id,
                owner,
                object_key,
                etag,
                content_type,
                max_attempts,
            } => {
                if self.status != JobStatus::None {
                    return Ok(vec![]);
                }
                Ok(vec![AiJobEvent::JobRequested {
                    job_id,
                    document_id,
                    owner,
                    object_key,
                    etag,
                    content_type,
                    max_attempts: max_attempts.max(1),
                }])
            }
            AiJobCommand::Start { attempt, worker } => {
                if self.finished() {
                    return Err(AiJobError::Finished);
                }
                let attempt = self.attempt_base + attempt;
                if attempt <= self.attempt {
                    return Ok(vec![]);
                }
                let used = attempt - self.attempt_base;
                if used > self.max_attempts {
                    // The earlier attempts ended without an outcome (killed, timed out
                    // unrecorded): the queue would dead-letter the message now; so does
                    // the job, so that the two agree and a redrive can find it.
                    return Ok(vec![AiJobEvent::JobDeadLettered {
                        reason: format!("no outcome after {} attempts", used - 1),
                    }]);
                }
                Ok(vec![AiJobEvent::JobStarted { attempt, worker }])
            }
            AiJobCommand::Succeed { attempt, analysis } => {
                if let Some(refused) = self.outcome_check(attempt, true)? {
                    return Ok(refused);
                }
                Ok(vec![AiJobEvent::JobSucceeded {
                    attempt,
                    analysis: analysis.bounded(),
                }])
            }
            AiJobCommand::Fail {
                attempt,
                error,
                retryable,
            } => {
                if let Some(refused) = self.outcome_check(attempt, false)? {
                    return Ok(refused);
                }
                let error: String = error.chars().take(Analysis::MAX_ITEM_CHARS).collect();
                let mut events = vec![AiJobEvent::AttemptFailed {
                    attempt,
                    error: error.clone(),
                    retryable,
                }];
                let used = attempt.saturating_sub(self.attempt_base);
                if !retryable {
                    events.push(AiJobEvent::JobDeadLettered {
                        reason: format!("not retryable: {error}"),
                    });
                } else if used >= self.max_attempts {
                    events.push(AiJobEvent::JobDeadLettered {
                        reason: format!("failed {used} attempts; last: {error}"),
                    });
                }
                Ok(events)
            }
            AiJobCommand::Redrive {
                by,
                reason,
                message,
            } => {
                if message.is_some()
                    && self.redriven_from == message
                    && self.status != JobStatus::DeadLettered
                {
                    // This dead letter's redrive is already recorded (it was cut short
                    // before the message was deleted).
                    return Ok(vec![]);
                }
                if self.status != JobStatus::DeadLettered {
                    return Err(AiJobError::NotDeadLettered);
                }
                Ok(vec![AiJobEvent::JobRedriven {
                    by,
                    reason,
                    message,
                }])
            }
            AiJobCommand::RecordDeadLettered { reason } => match self.status {
                JobStatus::DeadLettered => Ok(vec![]),
                JobStatus::Succeeded => Err(AiJobError::Finished),
                _ => Ok(vec![AiJobEvent::JobDeadLettered { reason }]),
            },
        }
    }

    /// Only the current attempt's outcome is applied. One from an attempt that was never
    /// started is refused; one from an earlier attempt (timed out, then overtaken), or
    /// that arrives after the job finished, is recorded and not applied.
    fn outcome_check(
        &self,
        attempt: u32,
        succeeded: bool,
    ) -> Result<Option<Vec<AiJobEvent>>, AiJobError> {
        if attempt > self.attempt || attempt == 0 {
            return Err(AiJobError::UnknownAttempt);
        }
        let current = self.status == JobStatus::Running
            && attempt == self.attempt
            && attempt > self.attempt_base;
        Ok((!current).then(|| vec![AiJobEvent::LateOutcomeRecorded { attempt, succeeded }]))
    }
}

impl Aggregate for AiJob {
    const TYPE: &'static str = "ai_job";
    type Command = AiJobCommand;
    type Event = AiJobEvent;
    type Error = AiJobError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        for event in self.decide(command)? {
            sink.write(event, self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            AiJobEvent::JobRequested {
                document_id,
                owner,
                object_key,
                etag,
                content_type,
                max_attempts,
                ..
            } => {
                self.status = JobStatus::Queued;
                self.document_id = Some(document_id);
                self.owner = Some(owner);
                self.object_key = Some(object_key);
                self.etag = etag;
                self.content_type = Some(content_type);
                self.max_attempts = max_attempts;
            }
            AiJobEvent::JobStarted { attempt, .. } => {
                self.status = JobStatus::Running;
                self.attempt = self.attempt.max(attempt);
            }
            AiJobEvent::JobSucceeded { attempt, .. } => {
                self.status = JobStatus::Succeeded;
                self.last_error = None;
                self.last_outcome = self.last_outcome.max(attempt);
            }
            AiJobEvent::AttemptFailed { attempt, error, .. } => {
                self.last_error = Some(error);
                self.last_outcome = self.last_outcome.max(attempt);
            }
            AiJobEvent::JobDeadLettered { .. } => self.status = JobStatus::DeadLettered,
            AiJobEvent::LateOutcomeRecorded { attempt, .. } => {
                self.last_outcome = self.last_outcome.max(attempt);
            }
            AiJobEvent::JobRedriven { message, .. } => {
                self.status = JobStatus::Queued;
                // The redriven message's receive count starts again at 1.
                self.attempt_base = self.attempt;
                self.redrives += 1;
                self.redriven_from = message;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::test::TestFramework;

    type JobTest = TestFramework<AiJob>;

    fn document() -> DocumentId {
        DocumentId::parse("0190f0c4-1b2c-7d3e-8f40-0000000000d1").unwrap()
    }
    fn owner() -> UserId {
        UserId::parse("0190f0c4-1b2c-7d3e-8f40-000000000001").unwrap()
    }
    fn requested() -> AiJobEvent {
        AiJobEvent::JobRequested {
            job_id: JobId::for_object(document(), "\"e1\""),
            document_id: document(),
            owner: owner(),
            object_key: ObjectKey::for_document(owner(), document()),
            etag: "e1".into(),
            content_type: ContentType::Pdf,
            max_attempts: 3,
        }
    }
    fn request() -> AiJobCommand {
        AiJobCommand::Request {
            job_id: JobId::for_object(document(), "e1"),
            document_id: document(),
            owner: owner(),
            object_key: ObjectKey::for_document(owner(), document()),
            etag: "e1".into(),
            content_type: ContentType::Pdf,
            max_attempts: 3,
        }
    }
    fn started(attempt: u32) -> AiJobEvent {
        AiJobEvent::JobStarted {
            attempt,
            worker: "w1".into(),
        }
    }
    fn start(attempt: u32) -> AiJobCommand {
        AiJobCommand::Start {
            attempt,
            worker: "w1".into(),
        }
    }
    fn analysis(words: u64) -> Analysis {
        Analysis {
            sha256: "00".into(),
            words,
            ..Analysis::default()
        }
    }
    fn failed(attempt: u32, retryable: bool) -> AiJobEvent {
        AiJobEvent::AttemptFailed {
            attempt,
            error: "boom".into(),
            retryable,
        }
    }
    fn fail(attempt: u32, retryable: bool) -> AiJobCommand {
        AiJobCommand::Fail {
            attempt,
            error: "boom".into(),
            retryable,
        }
    }

    #[test]
    fn one_job_per_object_however_often_it_is_requested() {
        assert_eq!(
            JobId::for_object(document(), "e1"),
            JobId::for_object(document(), "\"e1\"")
        );
        assert_ne!(
            JobId::for_object(document(), "e1"),
            JobId::for_object(document(), "e2")
        );
        JobTest::with(())
            .given_no_previous_events()
            .when(request())
            .then_expect_events(vec![requested()]);
        JobTest::with(())
            .given(vec![requested()])
            .when(request())
            .then_expect_events(vec![]);
    }

    #[test]
    fn an_attempt_starts_once_and_succeeds() {
        JobTest::with(())
            .given(vec![requested()])
            .when(start(1))
            .then_expect_events(vec![started(1)]);
        JobTest::with(())
            .given(vec![requested(), started(1)])
            .when(start(1))
            .then_expect_events(vec![]);
        JobTest::with(())
            .given(vec![requested(), started(1)])
            .when(AiJobCommand::Succeed {
                attempt: 1,
                analysis: analysis(7),
            })
            .then_expect_events(vec![AiJobEvent::JobSucceeded {
                attempt: 1,
                analysis: analysis(7),
            }]);
    }

    #[test]
    fn a_job_never_succeeds_twice_and_a_late_result_is_only_recorded() {
        let done = AiJobEvent::JobSucceeded {
            attempt: 2,
            analysis: analysis(7),
        };
        // Attempt 1 timed out, attempt 2 succeeded, then attempt 1's result arrives.
        JobTest::with(())
            .given(vec![requested(), started(1), started(2), done.clone()])
            .when(AiJobCommand::Succeed {
                attempt: 1,
                analysis: analysis(99),
            })
            .then_expect_events(vec![AiJobEvent::LateOutcomeRecorded {
                attempt: 1,
                succeeded: true,
            }]);
        JobTest::with(())
            .given(vec![requested(), started(1), started(2), done.clone()])
            .when(fail(1, true))
            .then_expect_events(vec![AiJobEvent::LateOutcomeRecorded {
                attempt: 1,
                succeeded: false,
            }]);
        // A finished job is not started again: the worker drops the message.
        JobTest::with(())
            .given(vec![requested(), started(1), done])
            .when(start(2))
            .then_expect_error(AiJobError::Finished);
    }

    #[test]
    fn retryable_failures_dead_letter_after_the_last_attempt() {
        JobTest::with(())
            .given(vec![requested(), started(1)])
            .when(fail(1, true))
            .then_expect_events(vec![failed(1, true)]);
        JobTest::with(())
            .given(vec![
                requested(),
                started(1),
                failed(1, true),
                started(2),
                failed(2, true),
                started(3),
            ])
            .when(fail(3, true))
            .then_expect_events(vec![
                failed(3, true),
                AiJobEvent::JobDeadLettered {
                    reason: "failed 3 attempts; last: boom".into(),
                },
            ]);
    }

    #[test]
    fn a_failure_retrying_cannot_fix_dead_letters_at_once() {
        JobTest::with(())
            .given(vec![requested(), started(1)])
            .when(fail(1, false))
            .then_expect_events(vec![
                failed(1, false),
                AiJobEvent::JobDeadLettered {
                    reason: "not retryable: boom".into(),
                },
            ]);
    }

    #[test]
    fn a_redriven_job_gets_its_attempts_again() {
        let dead = AiJobEvent::JobDeadLettered {
            reason: "not retryable: boom".into(),
        };
        let redriven = AiJobEvent::JobRedriven {
            by: "ops".into(),
            reason: "fixed".into(),
            message: Some("m1".into()),
        };
        let redrive = |message: &str| AiJobCommand::Redrive {
            by: "ops".into(),
            reason: "fixed".into(),
            message: Some(message.into()),
        };
        JobTest::with(())
            .given(vec![
                requested(),
                started(1),
                failed(1, false),
                dead.clone(),
            ])
            .when(redrive("m1"))
            .then_expect_events(vec![redriven.clone()]);
        // The same dead letter again (its redrive was cut short): nothing new; another
        // dead letter of a job that is not dead-lettered: refused.
        JobTest::with(())
            .given(vec![
                requested(),
                started(1),
                failed(1, false),
                dead.clone(),
                redriven.clone(),
            ])
            .when(redrive("m1"))
            .then_expect_events(vec![]);
        JobTest::with(())
            .given(vec![
                requested(),
                started(1),
                failed(1, false),
                dead.clone(),
                redriven.clone(),
            ])
            .when(redrive("m2"))
            .then_expect_error(AiJobError::NotDeadLettered);
        // The queue's receive count restarts at 1: that is attempt 2 of the job.
        JobTest::with(())
            .given(vec![
                requested(),
                started(1),
                failed(1, false),
                dead.clone(),
                redriven.clone(),
            ])
            .when(start(1))
            .then_expect_events(vec![started(2)]);
        JobTest::with(())
            .given(vec![requested(), started(1)])
            .when(redrive("m1"))
            .then_expect_error(AiJobError::NotDeadLettered);
    }

    #[test]
    fn a_dead_letter_the_job_missed_is_recorded_once() {
        let dead = AiJobEvent::JobDeadLettered {
            reason: "found in the dead-letter queue".into(),
        };
        let record = || AiJobCommand::RecordDeadLettered {
            reason: "found in the dead-letter queue".into(),
        };
        JobTest::with(())
            .given(vec![requested(), started(1)])
            .when(record())
            .then_expect_events(vec![dead.clone()]);
        JobTest::with(())
            .given(vec![requested(), started(1), dead])
            .when(record())
            .then_expect_events(vec![]);
        JobTest::with(())
            .given(vec![
                requested(),
                started(1),
                AiJobEvent::JobSucceeded {
                    attempt: 1,
                    analysis: analysis(1),
                },
            ])
            .when(record())
            .then_expect_error(AiJobError::Finished);
    }

    #[test]
    fn a_redrive_stored_before_its_reason_existed_still_reads() {
        let old: AiJobEvent = serde_json::from_str(r#"{"JobRedriven":{"by":"ops"}}"#).unwrap();
        assert_eq!(
            old,
            AiJobEvent::JobRedriven {
                by: "ops".into(),
                reason: String::new(),
                message: None
            }
        );
    }

    #[test]
    fn only_the_current_attempt_decides() {
        // Attempt 1 timed out and attempt 2 is running: attempt 1's failure, even a
        // "not retryable" one, is recorded and changes nothing.
        JobTest::with(())
            .given(vec![requested(), started(1), started(2)])
            .when(fail(1, false))
            .then_expect_events(vec![AiJobEvent::LateOutcomeRecorded {
                attempt: 1,
                succeeded: false,
            }]);
        JobTest::with(())
            .given(vec![requested(), started(1), started(2)])
            .when(AiJobCommand::Succeed {
                attempt: 1,
                analysis: analysis(1),
            })
            .then_expect_events(vec![AiJobEvent::LateOutcomeRecorded {
                attempt: 1,
                succeeded: true,
            }]);
        // An attempt that never started has no outcome.
        JobTest::with(())
            .given(vec![requested(), started(1)])
            .when(fail(2, true))
            .then_expect_error(AiJobError::UnknownAttempt);
        // After a redrive, an outcome from an attempt before it is late.
        let dead = AiJobEvent::JobDeadLettered { reason: "x".into() };
        JobTest::with(())
            .given(vec![
                requested(),
                started(1),
                failed(1, false),
                dead,
                AiJobEvent::JobRedriven {
                    by: "ops".into(),
                    reason: String::new(),
                    message: None,
                },
                started(2),
            ])
            .when(fail(1, true))
            .then_expect_events(vec![AiJobEvent::LateOutcomeRecorded {
                attempt: 1,
                succeeded: false,
            }]);
    }

    #[test]
    fn attempts_that_end_without_an_outcome_dead_letter_the_job() {
        // Three attempts were killed before they could record anything; the fourth
        // receive is one too many.
        JobTest::with(())
            .given(vec![requested(), started(1), started(2), started(3)])
            .when(start(4))
            .then_expect_events(vec![AiJobEvent::JobDeadLettered {
                reason: "no outcome after 3 attempts".into(),
            }]);
    }

    #[test]
    fn commands_for_an_unknown_job_are_refused() {
        JobTest::with(())
            .given_no_previous_events()
            .when(start(1))
            .then_expect_error(AiJobError::NotFound);
    }

    #[test]
    fn results_are_bounded() {
        let big = Analysis {
            keywords: (0..100).map(|i| format!("k{i}")).collect(),
            summary: vec!["é".repeat(2000); 9],
            ..Analysis::default()
        }
        .bounded();
        assert_eq!(big.keywords.len(), Analysis::MAX_KEYWORDS);
        assert_eq!(big.summary.len(), Analysis::MAX_SUMMARY_SENTENCES);
        assert_eq!(big.summary[0].chars().count(), Analysis::MAX_ITEM_CHARS);
    }

    #[test]
    fn stored_event_names_are_stable() {
        assert_eq!(requested().event_type(), "JobRequested");
        assert_eq!(started(1).event_type(), "JobStarted");
        assert_eq!(failed(1, true).event_type(), "AttemptFailed");
        assert_eq!(requested().event_version(), "1.0");
        // The namespace is part of every stored job id: it must never change.
        assert_eq!(
            JobId::for_object(document(), "e1").to_string(),
            "fa1159d7-72bf-5d09-9d36-7a5ceac50b13"
        );
    }
}
