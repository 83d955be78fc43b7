//! The event-store port's contract, run against both adapters (SQLite and Postgres).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::time::Duration;

use commands::{CommandError, CommandMeta, Database, Position, StoredEvent};
use domain::{
    DisplayName, Email, PasswordHash, Profile, ProfileCommand, User, UserCommand, UserEvent, UserId,
};
use tests::{Backend, TestDb, on_both_backends};

fn register(id: UserId, email: &str) -> UserCommand {
    UserCommand::Register {
        user_id: id,
        email: Email::parse(email).unwrap(),
        password_hash: PasswordHash::from_phc("$argon2id$v=19$m=1024,t=1,p=1$x$y".into()),
        display_name: DisplayName::parse("Ann").unwrap(),
        grant_admin: false,
    }
}

/// Everything committed so far. Waits until the feed can show all of it (on Postgres,
/// transactions of other tests running in the same cluster hold it back for a moment).
async fn read_all(db: &Database, from: Position) -> Vec<StoredEvent> {
    let feed = db.feed();
    if let Some(horizon) = feed.horizon().await.unwrap() {
        for _ in 0..1000 {
            if feed.is_visible(horizon).await.unwrap() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let mut out = Vec::new();
    let mut at = from;
    loop {
        let batch = feed.read_after(at, 3).await.unwrap();
        let Some(last) = batch.last() else { break };
        at = last.position;
        out.extend(batch);
    }
    out
}

async fn appended_events_load_back_in_order(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let users = db.aggregates::<User>();
    let id = UserId::new_v7();
    let meta = CommandMeta {
        request_id: Some("req-1".into()),
        actor: Some("test".into()),
    };
    let c = users
        .execute(
            &id.to_string(),
            register(id, "a@example.com"),
            &(),
            None,
            &meta,
        )
        .await
        .unwrap();
    assert_eq!((c.version, c.events), (1, 1));
    let c = users
        .execute(&id.to_string(), UserCommand::GrantAdmin, &(), None, &meta)
        .await
        .unwrap();
    assert_eq!(c.version, 2);

    let loaded = users.load(&id.to_string()).await.unwrap();
    assert_eq!(loaded.version, 2);
    assert_eq!(loaded.state.role, domain::Role::Admin);
    assert_eq!(loaded.state.email.unwrap().as_str(), "a@example.com");
    let events = users.events(&id.to_string()).await.unwrap();
    assert_eq!(events.len(), 2);
    assert!(matches!(events[1], (2, UserEvent::AdminRoleGranted)));

    // The feed carries names, versions, metadata and a recording time.
    let feed = read_all(&db, Position::START).await;
    assert_eq!(feed.len(), 2);
    assert_eq!(feed[0].event_type, "UserRegistered");
    assert_eq!(feed[0].event_version, "1.0");
    assert_eq!(feed[0].metadata["request_id"], "req-1");
    assert!(
        (chrono::Utc::now() - feed[0].recorded_at)
            .num_seconds()
            .abs()
            < 60
    );
    let decoded: UserEvent = feed[1].decode().unwrap();
    assert_eq!(decoded, UserEvent::AdminRoleGranted);
    // An unknown aggregate loads empty at version 0.
    assert_eq!(users.load("nobody").await.unwrap().version, 0);
}

async fn an_expected_version_that_is_stale_writes_nothing(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let users = db.aggregates::<User>();
    let id = UserId::new_v7();
    let meta = CommandMeta::default();
    users
        .execute(
            &id.to_string(),
            register(id, "a@example.com"),
            &(),
            Some(0),
            &meta,
        )
        .await
        .unwrap();
    let err = users
        .execute(
            &id.to_string(),
            UserCommand::GrantAdmin,
            &(),
            Some(0),
            &meta,
        )
        .await
        .unwrap_err();
    assert!(matches!(
        err,
        CommandError::StaleVersion {
            expected: 0,
            actual: 1
        }
    ));
    assert_eq!(users.load(&id.to_string()).await.unwrap().version, 1);
}

/// Two writers at one version: exactly one wins, the other is a conflict.
async fn two_writers_at_one_version_give_one_winner_and_one_conflict(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let profiles = db.aggregates::<Profile>();
    let id = UserId::new_v7();
    let meta = CommandMeta::default();
    profiles
        .execute(
            &id.to_string(),
            ProfileCommand::Create {
                user_id: id,
                display_name: DisplayName::parse("A").unwrap(),
            },
            &(),
            None,
            &meta,
        )
        .await
        .unwrap();
    for round in 0..10 {
        let mk = |n: &str| domain::ProfileFields {
            display_name: DisplayName::parse(n).unwrap(),
            bio: None,
            avatar_url: None,
            location: None,
            website: None,
        };
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(2));
        let mut tasks = Vec::new();
        for w in 0..2 {
            let p = profiles.clone();
            let b = barrier.clone();
            let fields = mk(&format!("writer {w} round {round}"));
            let version = p.load(&id.to_string()).await.unwrap().version;
            tasks.push(tokio::spawn(async move {
                b.wait().await;
                p.execute(
                    &id.to_string(),
                    ProfileCommand::Update(fields),
                    &(),
                    Some(version),
                    &CommandMeta::default(),
                )
                .await
            }));
        }
        let mut ok = 0;
        let mut losers = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(CommandError::Conflict) | Err(CommandError::StaleVersion { .. }) => losers += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!((ok, losers), (1, 1), "round {round}");
    }
    assert_eq!(profiles.load(&id.to_string()).await.unwrap().version, 11);
}

/// Many concurrent writers: the feed returns every committed event exactly once, and the
/// events of each aggregate in sequence order.
async fn the_feed_returns_every_event_exactly_once_in_commit_order(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let users = db.aggregates::<User>();
    let mut tasks = Vec::new();
    for w in 0..8 {
        let users = users.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..10 {
                let id = UserId::new_v7();
                users
                    .execute(
                        &id.to_string(),
                        register(id, &format!("u{w}x{i}@example.com")),
                        &(),
                        None,
                        &CommandMeta::default(),
                    )
                    .await
                    .unwrap();
                users
                    .execute(
                        &id.to_string(),
                        UserCommand::GrantAdmin,
                        &(),
                        None,
                        &CommandMeta::default(),
                    )
                    .await
                    .unwrap();
                ids.push(id);
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.extend(t.await.unwrap());
    }
    let feed = read_all(&db, Position::START).await;
    assert_eq!(feed.len(), 160);
    let keys: HashSet<(String, i64)> = feed
        .iter()
        .map(|e| (e.aggregate_id.clone(), e.sequence))
        .collect();
    assert_eq!(keys.len(), 160, "an event came twice");
    let positions: Vec<Position> = feed.iter().map(|e| e.position).collect();
    let mut sorted = positions.clone();
    sorted.sort();
    assert_eq!(positions, sorted, "feed order is not stable");
    for id in ids {
        let seqs: Vec<i64> = feed
            .iter()
            .filter(|e| e.aggregate_id == id.to_string())
            .map(|e| e.sequence)
            .collect();
        assert_eq!(seqs, vec![1, 2]);
    }
    let head = db.feed().head().await.unwrap().unwrap().0;
    assert_eq!(head, *positions.last().unwrap());
    assert_eq!(db.feed().count_after(Position::START).await.unwrap(), 160);
    assert_eq!(db.feed().count_after(head).await.unwrap(), 0);
}

/// The trap: a transaction that began earlier (and so holds a lower position) commits
/// later. A reader that already moved past the later, committed event must still get the
/// earlier one. A naive `position > last` reader loses it for good.
async fn an_early_transaction_that_commits_late_is_not_skipped(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let users = db.aggregates::<User>();
    let feed = db.feed();

    // Writer A opens a transaction and inserts an event without committing.
    let slow = UserId::new_v7();
    let insert_sql = match backend {
        Backend::Postgres => "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                              VALUES ('user', $1, 1, 'AdminRoleGranted', '1.0', '\"AdminRoleGranted\"', '{}')",
        Backend::Sqlite => "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
                            VALUES ('user', ?, 1, 'AdminRoleGranted', '1.0', '\"AdminRoleGranted\"', '{}')",
    };
    let (commit_a, a_done) = tokio::sync::oneshot::channel::<()>();
    let (a_inserted_tx, a_inserted) = tokio::sync::oneshot::channel::<()>();
    let db_a = db.clone();
    let slow_id = slow.to_string();
    let writer_a = tokio::spawn(async move {
        match db_a {
            Database::Postgres(p) => {
                let mut tx = p.begin().await.unwrap();
                sqlx::query(insert_sql)
                    .bind(&slow_id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                a_inserted_tx.send(()).unwrap();
                a_done.await.unwrap();
                tx.commit().await.unwrap();
            }
            Database::Sqlite(p) => {
                let mut tx = p.begin().await.unwrap();
                sqlx::query(insert_sql)
                    .bind(&slow_id)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                a_inserted_tx.send(()).unwrap();
                a_done.await.unwrap();
                tx.commit().await.unwrap();
            }
        }
    });
    a_inserted.await.unwrap();

    // Writer B commits a later event while A is still open (on SQLite, B waits for A:
    // one writer at a time, which is why rowid order is commit order there).
    let fast = UserId::new_v7();
    let users_b = users.clone();
    let mut writer_b = Some(tokio::spawn(async move {
        users_b
            .execute(
                &fast.to_string(),
                register(fast, "fast@example.com"),
                &(),
                None,
                &CommandMeta::default(),
            )
            .await
            .unwrap();
    }));
    if backend == Backend::Postgres {
        writer_b.take().unwrap().await.unwrap();
        // A naive reader sees B and moves its checkpoint past A's position.
        let naive: Vec<i64> = match &db {
            Database::Postgres(p) => sqlx::query_scalar(
                "SELECT position FROM events WHERE position > 0 ORDER BY position",
            )
            .fetch_all(p)
            .await
            .unwrap(),
            Database::Sqlite(_) => unreachable!(),
        };
        assert_eq!(
            naive.len(),
            1,
            "the naive reader sees only the committed later event"
        );
    } else {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Our reader, meanwhile: whatever it returns now, it must never have passed A.
    let mut seen = Vec::new();
    let mut at = Position::START;
    let first = feed.read_after(at, 100).await.unwrap();
    assert!(
        first.iter().all(|e| e.aggregate_id != fast.to_string()),
        "the feed moved past an open transaction"
    );
    if let Some(last) = first.last() {
        at = last.position;
    }
    seen.extend(first);

    commit_a.send(()).unwrap();
    writer_a.await.unwrap();
    if let Some(b) = writer_b {
        b.await.unwrap();
    }

    // After A commits, reading on from the checkpoint yields the rest, once each.
    seen.extend(read_all(&db, at).await);
    let ids: Vec<&str> = seen.iter().map(|e| e.aggregate_id.as_str()).collect();
    assert!(
        ids.contains(&slow.to_string().as_str()),
        "the late-committing event was skipped: {ids:?}"
    );
    assert!(ids.contains(&fast.to_string().as_str()));
    assert_eq!(seen.len(), 2, "an event came twice: {ids:?}");
}

on_both_backends!(
    appended_events_load_back_in_order,
    an_expected_version_that_is_stale_writes_nothing,
    two_writers_at_one_version_give_one_winner_and_one_conflict,
    the_feed_returns_every_event_exactly_once_in_commit_order,
    an_early_transaction_that_commits_late_is_not_skipped,
);
