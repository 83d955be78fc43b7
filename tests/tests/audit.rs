//! The audit trail, on both stores: every appended event is chained; a payload edited, a
//! row deleted or rows reordered directly in SQL is found where it happened; an anchor
//! shows a truncated history; events stored before the chain are chained by the
//! migration; exports are checked by an independent Python script; replays and the admin
//! history apply the upcasters without touching what the hashes cover.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use commands::audit::{self, AsOf, VerifyReport};
use commands::{CommandMeta, Database};
use domain::{DisplayName, Email, PasswordHash, User, UserCommand, UserId};
use serde_json::Value;
use tests::{Backend, TestApp, TestDb, karmic_binary, on_both_backends};

fn register(id: UserId, email: &str) -> UserCommand {
    UserCommand::Register {
        user_id: id,
        email: Email::parse(email).unwrap(),
        password_hash: PasswordHash::from_phc("$argon2id$v=19$m=1024,t=1,p=1$x$y".into()),
        display_name: DisplayName::parse("Ann").unwrap(),
        grant_admin: false,
    }
}

/// `n` users with four events each: registered, admin granted, revoked, granted again.
async fn history(db: &Database, n: usize) -> Vec<UserId> {
    let users = db.aggregates::<User>();
    let meta = CommandMeta::system("audit-test");
    let mut ids = Vec::new();
    for i in 0..n {
        let id = UserId::new_v7();
        let key = id.to_string();
        let email = format!("user{i}-ann-{}@example.com", id.as_uuid().simple());
        for c in [
            register(id, &email),
            UserCommand::GrantAdmin,
            UserCommand::RevokeAdmin,
            UserCommand::GrantAdmin,
        ] {
            users.execute(&key, c, &(), None, &meta).await.unwrap();
        }
        ids.push(id);
    }
    ids
}

async fn verify(db: &Database) -> VerifyReport {
    audit::verify(db, None, &|_| {}).await.unwrap()
}

/// Run one statement as written (tests use literals, so it reads the same on both).
async fn sql(db: &Database, statement: &str) {
    match db {
        Database::Postgres(p) => sqlx::query(statement).execute(p).await.map(drop),
        Database::Sqlite(p) => sqlx::query(statement).execute(p).await.map(drop),
    }
    .unwrap_or_else(|e| panic!("{statement}: {e}"));
}

/// Where an event is in commit order, as reports print it.
async fn position_of(db: &Database, id: UserId, sequence: i64) -> String {
    let h = audit::history(db, "user", &id.to_string()).await.unwrap();
    h.iter()
        .find(|e| e.event.sequence == sequence)
        .unwrap()
        .event
        .position
        .to_string()
}

fn assert_broken_at(r: &VerifyReport, id: UserId, sequence: i64, position: &str, problem: &str) {
    assert!(!r.ok(), "{r:?}");
    let b = r.first_broken.as_ref().unwrap();
    assert_eq!(
        (
            b.aggregate_type.as_str(),
            b.aggregate_id.as_str(),
            b.sequence
        ),
        ("user", id.to_string().as_str(), sequence),
        "{r:?}"
    );
    assert_eq!(b.position, position, "{r:?}");
    assert!(b.problem.contains(problem), "{r:?}");
}

async fn appended_events_are_chained_and_verify(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let ids = history(&db, 3).await;
    let r = verify(&db).await;
    assert!(r.ok(), "{r:?}");
    assert_eq!((r.events, r.aggregates, r.broken), (12, 3, 0));
    let anchor = r.anchor.clone().unwrap();
    assert_eq!(anchor.aggregates, 3);
    // Each stored hash is the documented function of the stored event and the one before.
    let h = audit::history(&db, "user", &ids[0].to_string())
        .await
        .unwrap();
    let mut prev = commands::chain::GENESIS.to_owned();
    for e in &h {
        let want = e.body().hash(&prev);
        assert_eq!(e.hash.as_deref(), Some(want.as_str()));
        prev = want;
    }
    // The same history gives the same anchor; a verify against it agrees.
    let again = audit::verify(&db, Some(&anchor), &|_| {}).await.unwrap();
    assert_eq!(again.anchor_matches, Some(true), "{again:?}");
}

async fn an_edited_payload_or_time_is_found_where_it_is(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let ids = history(&db, 3).await;
    let target = ids[1];
    let at = position_of(&db, target, 1).await;
    let edit = match backend {
        Backend::Postgres => format!(
            "UPDATE events SET payload = replace(payload::text, '-ann-', '-eve-')::json
              WHERE aggregate_id = '{target}' AND sequence = 1"
        ),
        Backend::Sqlite => format!(
            "UPDATE events SET payload = replace(payload, '-ann-', '-eve-')
              WHERE aggregate_id = '{target}' AND sequence = 1"
        ),
    };
    sql(&db, &edit).await;
    let r = verify(&db).await;
    assert_broken_at(&r, target, 1, &at, "hash does not match");
    assert_eq!(r.broken, 1, "one edited event is one break: {r:?}");
    assert!(r.anchor.is_none(), "no anchor for a broken history");

    // A changed time is a changed event too.
    let t2 = TestDb::new(backend).await;
    let db2 = t2.connect().await;
    let ids = history(&db2, 2).await;
    let at = position_of(&db2, ids[0], 3).await;
    let edit = match backend {
        Backend::Postgres => format!(
            "UPDATE events SET recorded_at = recorded_at - interval '1 hour'
              WHERE aggregate_id = '{}' AND sequence = 3",
            ids[0]
        ),
        Backend::Sqlite => format!(
            "UPDATE events SET recorded_at = '2020-01-01T00:00:00.000000Z'
              WHERE aggregate_id = '{}' AND sequence = 3",
            ids[0]
        ),
    };
    sql(&db2, &edit).await;
    assert_broken_at(&verify(&db2).await, ids[0], 3, &at, "hash does not match");
}

async fn a_deleted_row_is_found_where_it_was(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let ids = history(&db, 3).await;
    let target = ids[2];
    let at = position_of(&db, target, 3).await;
    sql(
        &db,
        &format!("DELETE FROM events WHERE aggregate_id = '{target}' AND sequence = 2"),
    )
    .await;
    assert_broken_at(&verify(&db).await, target, 3, &at, "sequence 2 is missing");
}

async fn reordered_rows_are_found(backend: Backend) {
    // Two events of one aggregate swap their places in its sequence.
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let ids = history(&db, 2).await;
    let target = ids[0];
    // The event that was third is now second: the break shows where it now stands.
    let at = position_of(&db, target, 3).await;
    for (from, to) in [(2, 1000), (3, 2), (1000, 3)] {
        sql(
            &db,
            &format!(
                "UPDATE events SET sequence = {to} WHERE aggregate_id = '{target}' AND sequence = {from}"
            ),
        )
        .await;
    }
    let r = verify(&db).await;
    assert_broken_at(&r, target, 2, &at, "hash does not match");

    // Two events swap their places in commit order (sequence and hashes untouched).
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let ids = history(&db, 2).await;
    let target = ids[1];
    match backend {
        Backend::Postgres => {
            sql(
                &db,
                &format!(
                    "UPDATE events e SET transaction_id = o.transaction_id
                       FROM events o
                      WHERE e.aggregate_id = '{target}' AND o.aggregate_id = '{target}'
                        AND ((e.sequence = 2 AND o.sequence = 3) OR (e.sequence = 3 AND o.sequence = 2))"
                ),
            )
            .await
        }
        Backend::Sqlite => {
            let Database::Sqlite(p) = &db else {
                unreachable!()
            };
            let mut rowids = Vec::new();
            for seq in [2, 3] {
                let sql = format!(
                    "SELECT rowid FROM events WHERE aggregate_id = '{target}' AND sequence = {seq}"
                );
                rowids.push(sqlx::query_scalar::<_, i64>(&sql).fetch_one(p).await.unwrap());
            }
            let (r2, r3) = (rowids[0], rowids[1]);
            for (from, to) in [(r2, 1_000_000), (r3, r2), (1_000_000, r3)] {
                sql(&db, &format!("UPDATE events SET rowid = {to} WHERE rowid = {from}")).await;
            }
        }
    }
    let at = position_of(&db, target, 3).await;
    let r = verify(&db).await;
    assert_broken_at(&r, target, 3, &at, "commit order");
}

async fn an_anchor_shows_a_truncated_history(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let ids = history(&db, 3).await;
    let anchor = verify(&db).await.anchor.unwrap();

    // Later events do not disturb the anchor.
    let users = db.aggregates::<User>();
    users
        .execute(
            &ids[0].to_string(),
            UserCommand::RevokeAdmin,
            &(),
            None,
            &CommandMeta::system("audit-test"),
        )
        .await
        .unwrap();
    history(&db, 1).await;
    let r = audit::verify(&db, Some(&anchor), &|_| {}).await.unwrap();
    assert!(r.ok() && r.anchor_matches == Some(true), "{r:?}");

    // An aggregate's last event removed: every chain still holds, the anchor does not.
    sql(
        &db,
        &format!(
            "DELETE FROM events WHERE aggregate_id = '{}' AND sequence = 4",
            ids[2]
        ),
    )
    .await;
    assert!(verify(&db).await.ok(), "the chains alone cannot show it");
    let r = audit::verify(&db, Some(&anchor), &|_| {}).await.unwrap();
    assert_eq!(r.anchor_matches, Some(false), "{r:?}");
    assert!(!r.ok());
}

/// Events stored before the chain existed, in an old version: the migration chains them,
/// the chain goes on from them, and replay and export read them in their new shape while
/// the hashes stay over what was stored.
async fn old_events_are_chained_by_the_migration_and_replay_upcast(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let id = UserId::new_v7();
    let old = format!(
        r#"{{"UserRegistered":{{"user_id":"{id}","email":"old@example.com","password_hash":"$argon2id$v=19$m=1024,t=1,p=1$x$y"}}}}"#
    );
    let time = match backend {
        Backend::Postgres => "'2025-01-02T03:04:05.678Z'",
        Backend::Sqlite => "'2025-01-02T03:04:05.678Z'",
    };
    sql(
        &db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata, recorded_at)
             VALUES ('user', '{id}', 1, 'UserRegistered', '0.9', '{old}', '{{}}', {time}),
                    ('user', '{id}', 2, 'AdminRoleGranted', '1.0', '\"AdminRoleGranted\"', '{{}}', {time})"
        ),
    )
    .await;
    let r = verify(&db).await;
    assert_eq!(r.broken, 2, "never chained: {r:?}");
    assert!(r.first_broken.unwrap().problem.contains("no hash"));

    db.migrate().await.unwrap();
    let r = verify(&db).await;
    assert!(r.ok(), "{r:?}");
    // The chain goes on from the backfilled events, and a second migrate changes nothing.
    db.aggregates::<User>()
        .execute(
            &id.to_string(),
            UserCommand::RevokeAdmin,
            &(),
            None,
            &CommandMeta::system("audit-test"),
        )
        .await
        .unwrap();
    let before = audit::history(&db, "user", &id.to_string()).await.unwrap();
    db.migrate().await.unwrap();
    assert_eq!(
        audit::history(&db, "user", &id.to_string()).await.unwrap(),
        before
    );
    let r = verify(&db).await;
    assert!(r.ok() && r.events == 3, "{r:?}");

    // Replay: the old registration reads with the field its upcaster adds.
    let (state, version) = audit::replay("user", &before, AsOf::version(2)).unwrap();
    assert_eq!(version, 2);
    assert_eq!(state["email"], "old@example.com", "{state}");
    assert_eq!(state["role"], "admin", "{state}");
    let (now, v) = audit::replay("user", &before, AsOf::NOW).unwrap();
    assert_eq!((now["role"].as_str(), v), (Some("user"), 3), "{now}");
    // Export: the stored form as stored, the upcast form beside it.
    let line = serde_json::to_value(before[0].export_line(true)).unwrap();
    assert_eq!(line["event_version"], "0.9");
    assert!(
        line["payload"]["UserRegistered"]
            .get("display_name")
            .is_none()
    );
    assert_eq!(
        line["upcast"]["payload"]["UserRegistered"]["display_name"],
        ""
    );
    assert_ne!(line["upcast"]["event_version"], "0.9");
    assert_eq!(line["recorded_at"], "2025-01-02T03:04:05.678000Z");

    // An append after an event that was never chained (stored by an older build after
    // the migration ran): the append chains the aggregate first, never writes a gap.
    let late = UserId::new_v7();
    sql(
        &db,
        &format!(
            "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             VALUES ('user', '{late}', 1, 'UserRegistered', '0.9', '{}', '{{}}')",
            old.replace(&id.to_string(), &late.to_string()).replace("old@", "late@")
        ),
    )
    .await;
    db.aggregates::<User>()
        .execute(
            &late.to_string(),
            UserCommand::GrantAdmin,
            &(),
            None,
            &CommandMeta::system("audit-test"),
        )
        .await
        .unwrap();
    let h = audit::history(&db, "user", &late.to_string())
        .await
        .unwrap();
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|e| e.hash.is_some()), "{h:?}");
    let r = verify(&db).await;
    assert!(r.ok() && r.events == 5, "{r:?}");
}

on_both_backends!(
    appended_events_are_chained_and_verify,
    an_edited_payload_or_time_is_found_where_it_is,
    a_deleted_row_is_found_where_it_was,
    reordered_rows_are_found,
    an_anchor_shows_a_truncated_history,
    old_events_are_chained_by_the_migration_and_replay_upcast,
);

fn karmic(t: &TestDb, args: &[&str]) -> std::process::Output {
    Command::new(karmic_binary!())
        .args(args)
        .envs(t.process_env())
        .env("KARMIC_LOG_FORMAT", "json")
        .output()
        .unwrap()
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/verify-export.py")
}

fn python(file: &std::path::Path) -> std::process::Output {
    Command::new("python3")
        .arg(script())
        .arg(file)
        .output()
        .expect("python3 must be installed")
}

/// The CLI end to end, and the auditor's own check: the export verifies with a short
/// Python script (hashlib, no Karmic code), which also finds an edit, whether made to the
/// file or to the database before the export. `events verify` exits 3 on a tampered store.
async fn exports_verify_without_karmic_and_the_cli_reports_tampering(backend: Backend) {
    let t = TestDb::new(backend).await;
    let db = t.connect().await;
    let ids = history(&db, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("history.jsonl");

    let out = karmic(
        &t,
        &["events", "export", "--upcast", "-o", file.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 16);
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for k in [
        "position",
        "recorded_at",
        "aggregate_type",
        "aggregate_id",
        "sequence",
        "event_type",
        "event_version",
        "payload",
        "metadata",
        "hash",
        "upcast",
    ] {
        assert!(first.get(k).is_some(), "{k} missing from {first}");
    }
    let ok = python(&file);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("16 events in 4 aggregates"));

    // An edit to the file.
    let edited = dir.path().join("edited.jsonl");
    std::fs::write(&edited, text.replacen("-ann-", "-eve-", 1)).unwrap();
    let bad = python(&edited);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stdout).contains("hash does not match"));

    // A verify of the untouched store passes and saves an anchor.
    let anchor = dir.path().join("anchor.json");
    let out = karmic(
        &t,
        &[
            "events",
            "verify",
            "--save-anchor",
            anchor.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("16 events in 4 aggregates checked; 0 broken")
    );
    assert!(
        std::fs::read_to_string(&anchor)
            .unwrap()
            .contains("\"heads\"")
    );

    // An edit to the database: verify exits 3 naming the aggregate, the export fails the
    // script.
    let target = ids[3];
    sql(
        &db,
        &format!("UPDATE events SET metadata = '{{\"actor\":\"someone else\"}}' WHERE aggregate_id = '{target}' AND sequence = 2"),
    )
    .await;
    let out = karmic(&t, &["events", "verify", "--json"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["first_broken"]["aggregate_id"], target.to_string());
    assert_eq!(report["first_broken"]["sequence"], 2);
    let out = karmic(&t, &["events", "export", "-o", file.to_str().unwrap()]);
    assert!(out.status.success());
    let bad = python(&file);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stdout).contains(&target.to_string()));

    // list pages through commit order; replay prints a state; unknown things have codes.
    let out = karmic(
        &t,
        &["events", "list", "--limit", "5", "--aggregate-type", "user"],
    );
    assert!(out.status.success(), "{out:?}");
    let page = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(page.lines().count(), 7, "{page}");
    let next = page
        .lines()
        .last()
        .unwrap()
        .strip_prefix("next page: --after ")
        .unwrap()
        .to_owned();
    let out = karmic(
        &t,
        &[
            "events", "list", "--json", "--limit", "100", "--after", &next,
        ],
    );
    let rest: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rest["events"].as_array().unwrap().len(), 11);
    assert!(rest["next_after"].is_null());
    let out = karmic(
        &t,
        &[
            "events",
            "replay",
            "user",
            &ids[0].to_string(),
            "--version",
            "2",
            "--json",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (r["version"].as_i64(), r["latest_version"].as_i64()),
        (Some(2), Some(4))
    );
    assert_eq!(r["state"]["role"], "admin");
    let out = karmic(
        &t,
        &["events", "replay", "user", &UserId::new_v7().to_string()],
    );
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let out = karmic(&t, &["events", "replay", "nothing", "x"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = karmic(&t, &["events", "list", "--since", "yesterday"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
}

mod cli {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        exports_verify_without_karmic_and_the_cli_reports_tampering(Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        exports_verify_without_karmic_and_the_cli_reports_tampering(Backend::Postgres).await
    }
}

/// The admin history endpoint: admins only, upcast payloads, password hashes redacted,
/// state at a version or a time, problems for bad input.
async fn the_admin_history_endpoint(backend: Backend) {
    let app = TestApp::spawn_with(backend, |s| {
        s.bootstrap_admin_email = Some("boss@example.com".into());
    })
    .await;
    let (_, admin) = app.signed_up("boss@example.com").await;
    let (user, token) = app.signed_up("someone@example.com").await;
    let path = format!("/admin/events/user/{user}");
    assert_eq!(app.get(&path, &token).await.status(), 403);
    let r = app.get(&path, &admin).await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["version"], body["latest_version"]);
    let events = body["events"].as_array().unwrap();
    assert_eq!(events[0]["event_type"], "UserRegistered");
    assert_eq!(
        events[0]["payload"]["UserRegistered"]["password_hash"],
        "[redacted]"
    );
    assert_eq!(body["state"]["password_hash"], "[redacted]");
    assert!(!body.to_string().contains("$argon2"), "{body}");
    assert_eq!(events[0]["hash"].as_str().unwrap().len(), 64);
    let r = app.get(&format!("{path}?version=0"), &admin).await;
    let at0: Value = r.json().await.unwrap();
    assert_eq!(
        (
            at0["version"].as_i64(),
            at0["events"].as_array().unwrap().len()
        ),
        (Some(0), 0)
    );
    let r = app
        .get(&format!("{path}?as_of=2000-01-01T00:00:00Z"), &admin)
        .await;
    assert_eq!(r.json::<Value>().await.unwrap()["version"], 0);
    let r = app
        .get(&format!("{path}?as_of=2999-01-01T00:00:00Z"), &admin)
        .await;
    assert_eq!(
        r.json::<Value>().await.unwrap()["version"],
        body["latest_version"]
    );
    for bad in [
        format!("{path}?version=-1"),
        format!("{path}?as_of=yesterday"),
        format!("/admin/events/nothing/{user}"),
        "/admin/events/user/a%20b".to_owned(),
    ] {
        tests::assert_problem(app.get(&bad, &admin).await, 400).await;
    }
    tests::assert_problem(
        app.get(&format!("/admin/events/user/{}", UserId::new_v7()), &admin)
            .await,
        404,
    )
    .await;
}

mod http {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn sqlite() {
        the_admin_history_endpoint(Backend::Sqlite).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres() {
        the_admin_history_endpoint(Backend::Postgres).await
    }
}
