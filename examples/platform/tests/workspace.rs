//! Issue #21's workspace routes end to end, on gateway processes against
//! the real PostgreSQL, Redis and Kafka-protocol broker, checked through
//! HTTP, SSE, the database and the processes' logs:
//!
//! - scheduled jobs: every route's happy path, `401`, `403`, `400`/`404`/
//!   `422` problem bodies; with **two gateways** running, an interval job
//!   runs once per period (no period twice, none between), its runs are
//!   published to the scheduler topic once each and recorded in history;
//!   the runner moves to the other gateway when its holder is killed; every
//!   change is on the audit trail;
//! - uploads: `201` with the SHA-256 the test computes, the bytes back for
//!   the uploader only (`404` for another subject or tenant), `413` past
//!   the limit, `415` outside the allowlist, `401`/`403`;
//! - notifications: a completed run notifies the job's owner (list and
//!   SSE stream), mark read, `401`/`403`/`404`, the pending gauge, and an
//!   expired notification is deleted by the janitor within its period.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use support::processes::{Processes, Wiring};
use support::*;

const OPERATOR_SCOPES: &str = "scheduler:read scheduler:write notifications:read";
const USER_SCOPES: &str = "scheduler:read uploads:write uploads:read notifications:read";

fn workspace_settings(env: &Env, ttl_secs: u64) -> String {
    let p = &env.prefix;
    format!(
        r#"
[workspace]
schema = "{p}_ws"

[workspace.scheduler]
topic = "{p}.sched"
tick_ms = 200
lease_ttl_ms = 1500

[workspace.uploads]
max_bytes = 1024
allowed_content_types = ["text/plain", "application/json"]

[workspace.notifications]
ttl_secs = {ttl_secs}
janitor_interval_ms = 500
stream_poll_ms = 200
"#
    )
}

/// A closed loopback port: the gateway never calls SomaBrain.
fn no_brain() -> String {
    format!("http://127.0.0.1:{}", soma_testkit::free_port())
}

fn jobs(base: &str) -> String {
    format!("{base}/v1/ui/scheduler/jobs")
}

async fn history(client: &reqwest::Client, base: &str, token: &str, id: &str) -> Vec<Value> {
    let r = client
        .get(format!("{}/{id}/history", jobs(base)))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let body: Value = expect_status(r, 200).await.json().await.unwrap();
    body["runs"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_job_runs_once_per_period_with_two_gateways_and_every_route_is_guarded() {
    let env = Env::new();
    let brain = no_brain();
    let wiring = Wiring::new(&brain, "unused").settings(&workspace_settings(&env, 3600));
    let mut gateways = Processes::start_gateways(&env, &wiring, 2);
    gateways.wait_ready(Duration::from_secs(90)).await;
    let client = reqwest::Client::new();
    let (a, b) = (
        format!("http://{}", gateways.apis[0]),
        format!("http://{}", gateways.apis[1]),
    );
    let op = env.token("olga", "acme", &["operator"], OPERATOR_SCOPES);
    let other_op = env.token("oscar", "acme", &["operator"], OPERATOR_SCOPES);
    let user = env.token("ursula", "acme", &["user"], USER_SCOPES);
    let eve = env.token("eve", "globex", &["admin"], OPERATOR_SCOPES);

    // 401 without credentials, 403 without the action, 400/422 on bad input.
    let r = client.get(jobs(&a)).send().await.unwrap();
    expect_problem(r, 401, "missing_credential").await;
    let r = client
        .post(jobs(&a))
        .bearer_auth(&user)
        .json(&json!({"name": "n", "schedule": {"every_secs": 5}}))
        .send()
        .await
        .unwrap();
    assert_forbidden(r, "missing_role").await;
    let r = client
        .post(jobs(&a))
        .bearer_auth(&op)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "invalid_body").await;
    for (body, field) in [
        (
            json!({"name": "n", "schedule": {"every_secs": 0}}),
            "schedule.every_secs",
        ),
        (
            json!({"name": "n", "schedule": {"cron": "every day"}}),
            "schedule.cron",
        ),
        (
            json!({"name": "n", "schedule": {"hourly": true}}),
            "schedule",
        ),
        (
            json!({"name": "n", "schedule": {"every_secs": 5}, "owner": "x"}),
            "owner",
        ),
        (json!({"schedule": {"every_secs": 5}}), "name"),
        (json!({"name": " ", "schedule": {"every_secs": 5}}), "name"),
    ] {
        let r = client
            .post(jobs(&a))
            .bearer_auth(&op)
            .json(&body)
            .send()
            .await
            .unwrap();
        let problem = expect_problem(r, 422, "invalid_job").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(detail.starts_with(field), "{body}: {detail}");
    }

    // Create on A, see it on B.
    let r = client
        .post(jobs(&a))
        .bearer_auth(&op)
        .json(&json!({"name": "tick", "schedule": {"every_secs": 1}, "payload": {"k": 1}}))
        .send()
        .await
        .unwrap();
    let job: Value = expect_status(r, 201).await.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["owner"], "olga");
    let r = client
        .get(jobs(&b))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    let listed: Value = expect_status(r, 200).await.json().await.unwrap();
    assert_eq!(listed["jobs"][0]["id"], id.as_str(), "{listed}");
    let r = client.get(jobs(&a)).bearer_auth(&eve).send().await.unwrap();
    let foreign: Value = expect_status(r, 200).await.json().await.unwrap();
    assert_eq!(foreign["jobs"], json!([]), "another tenant sees nothing");

    // Both gateways run; the job runs for about six periods.
    tokio::time::sleep(Duration::from_millis(6_300)).await;
    let r = client
        .put(format!("{}/{id}", jobs(&b)))
        .bearer_auth(&op)
        .json(&json!({"name": "tick", "schedule": {"every_secs": 1}, "enabled": false}))
        .send()
        .await
        .unwrap();
    let disabled: Value = expect_status(r, 200).await.json().await.unwrap();
    assert_eq!(disabled["enabled"], false);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let runs = history(&client, &a, &user, &id).await;
    let periods: BTreeSet<String> = runs
        .iter()
        .map(|r| r["scheduled_for"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(periods.len(), runs.len(), "a period ran twice: {runs:#?}");
    assert!(
        (4..=8).contains(&runs.len()),
        "about six periods of 1 s ran: {runs:#?}"
    );
    let times: Vec<chrono::DateTime<chrono::Utc>> =
        periods.iter().map(|t| t.parse().unwrap()).collect();
    for w in times.windows(2) {
        assert_eq!(
            (w[1] - w[0]).num_milliseconds(),
            1_000,
            "consecutive periods, none skipped or doubled: {times:?}"
        );
    }
    for run in &runs {
        assert_eq!(run["status"], "published", "{run}");
        assert_eq!(run["trigger"], "schedule", "{run}");
    }
    // Each run on the topic, once.
    let topic = format!("{}.sched", env.prefix);
    let run_ids: BTreeSet<String> = runs
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let published = published_runs(&topic, Duration::from_secs(10)).await;
    assert_eq!(
        published.iter().collect::<BTreeSet<_>>(),
        run_ids.iter().collect::<BTreeSet<_>>(),
        "every recorded run is on the topic"
    );
    assert_eq!(published.len(), run_ids.len(), "no run published twice");
    let notes = notifications(&client, &a, &op).await;
    let run_notes = notes
        .iter()
        .filter(|n| n["kind"] == "scheduler.run_completed")
        .count();
    assert_eq!(
        run_notes,
        runs.len(),
        "one notification per run: {notes:#?}"
    );

    // Another operator of the tenant may not change it; another tenant
    // does not find it; bad ids.
    let run = format!("{}/{id}/run", jobs(&a));
    let r = client
        .post(&run)
        .bearer_auth(&other_op)
        .send()
        .await
        .unwrap();
    assert_forbidden(r, "not_schedule_owner").await;
    let r = client
        .delete(format!("{}/{id}", jobs(&a)))
        .bearer_auth(&other_op)
        .send()
        .await
        .unwrap();
    assert_forbidden(r, "not_schedule_owner").await;
    let r = client.post(&run).bearer_auth(&user).send().await.unwrap();
    assert_forbidden(r, "missing_role").await;
    let r = client.post(&run).bearer_auth(&eve).send().await.unwrap();
    expect_problem(r, 404, "not_found").await;
    let r = client
        .get(format!("{}/{id}/history", jobs(&a)))
        .bearer_auth(&eve)
        .send()
        .await
        .unwrap();
    expect_problem(r, 404, "not_found").await;
    let r = client
        .put(format!("{}/not-a-uuid", jobs(&a)))
        .bearer_auth(&op)
        .json(&json!({"name": "n", "schedule": {"every_secs": 5}}))
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "invalid_id").await;
    let r = client.post(&run).send().await.unwrap();
    expect_problem(r, 401, "missing_credential").await;

    // The holder dies; "run now" on the disabled job is run by the other.
    let newest = runs
        .iter()
        .max_by_key(|r| r["scheduled_for"].as_str().unwrap().to_owned())
        .unwrap();
    let holder = recorded_by(&gateways, newest["id"].as_str().unwrap());
    gateways.kill(holder);
    let (survivor, base) = if holder == "soma-gateway" {
        ("soma-gateway-2", &b)
    } else {
        ("soma-gateway", &a)
    };
    let r = client
        .post(format!("{base}/v1/ui/scheduler/jobs/{id}/run"))
        .bearer_auth(&op)
        .send()
        .await
        .unwrap();
    expect_status(r, 202).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let manual = loop {
        let runs = history(&client, base, &op, &id).await;
        if let Some(m) = runs.iter().find(|r| r["trigger"] == "manual") {
            if m["status"] == "published" {
                break m.clone();
            }
        }
        assert!(Instant::now() < deadline, "no manual run: {runs:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let before: i64 = runs
        .iter()
        .map(|r| r["fence"].as_i64().unwrap())
        .max()
        .unwrap();
    assert!(
        manual["fence"].as_i64().unwrap() > before,
        "the new holder's token is newer: {manual} vs {before}"
    );
    assert!(
        gateways.log(survivor).contains("scheduler_lease_acquired"),
        "{survivor} took the lease"
    );

    // Delete; then it is gone.
    let r = client
        .delete(format!("{base}/v1/ui/scheduler/jobs/{id}"))
        .bearer_auth(&op)
        .send()
        .await
        .unwrap();
    expect_status(r, 204).await;
    let r = client
        .get(format!("{base}/v1/ui/scheduler/jobs/{id}/history"))
        .bearer_auth(&op)
        .send()
        .await
        .unwrap();
    expect_problem(r, 404, "not_found").await;

    // Every change is on the audit trail (the processes' JSON logs).
    let logs = gateways.log("soma-gateway") + &gateways.log("soma-gateway-2");
    for action in [
        "scheduler.create",
        "scheduler.update",
        "scheduler.run",
        "scheduler.delete",
    ] {
        let audited = logs.lines().any(|l| {
            l.contains("soma_policy::audit")
                && l.contains(&format!("\"action\":\"{action}\""))
                && l.contains("\"result\":\"changed\"")
                && l.contains(&id)
        });
        assert!(audited, "no audit entry for {action}");
    }
}

/// The gateway that recorded `run_id` (the runner's log names each run it
/// records).
fn recorded_by(p: &Processes, run_id: &str) -> &'static str {
    let recorded = |name: &str| {
        p.log(name)
            .lines()
            .any(|l| l.contains("scheduler_run_recorded") && l.contains(run_id))
    };
    match (recorded("soma-gateway"), recorded("soma-gateway-2")) {
        (true, false) => "soma-gateway",
        (false, true) => "soma-gateway-2",
        other => panic!("run {run_id} recorded by {other:?} (gateway, gateway-2)"),
    }
}

/// Every run id on `topic`, duplicates kept: the topic read from the start
/// for `within` (a fresh consumer group).
async fn published_runs(topic: &str, within: Duration) -> Vec<String> {
    let all = std::sync::Mutex::new(Vec::new());
    let _ = record_matching(topic, within, |payload, _| {
        if let Some(id) = payload["run_id"].as_str() {
            all.lock().unwrap().push(id.to_owned());
        }
        false
    })
    .await;
    all.into_inner().unwrap()
}

async fn notifications(client: &reqwest::Client, base: &str, token: &str) -> Vec<Value> {
    let r = client
        .get(format!("{base}/v1/notifications"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let body: Value = expect_status(r, 200).await.json().await.unwrap();
    body["notifications"].as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_are_checked_and_private_and_notifications_stream_and_expire() {
    let env = Env::new();
    let brain = no_brain();
    let ttl_secs = 3;
    let wiring = Wiring::new(&brain, "unused").settings(&workspace_settings(&env, ttl_secs));
    let mut gateway = Processes::start_gateways(&env, &wiring, 1);
    gateway.wait_ready(Duration::from_secs(90)).await;
    let client = reqwest::Client::new();
    let base = gateway.base();
    let pool = PgPool::connect(&soma_testkit::postgres_url())
        .await
        .unwrap();
    let ursula = env.token("ursula", "acme", &["user"], USER_SCOPES);
    let victor = env.token("victor", "acme", &["user"], USER_SCOPES);
    let eve = env.token("eve", "globex", &["user"], USER_SCOPES);
    let read_only = env.token("rita", "acme", &["user"], "uploads:read");
    let uploads = format!("{base}/v1/uploads");

    // Uploads.
    let body = b"hello, attachment".to_vec();
    let r = client
        .post(&uploads)
        .bearer_auth(&ursula)
        .header("content-type", "text/plain; charset=utf-8")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let up: Value = expect_status(r, 201).await.json().await.unwrap();
    assert_eq!(up["sha256"], hex::encode(Sha256::digest(&body)));
    assert_eq!(up["size_bytes"], body.len());
    assert_eq!(up["content_type"], "text/plain");
    let one = format!("{uploads}/{}", up["id"].as_str().unwrap());
    let r = client.get(&one).bearer_auth(&ursula).send().await.unwrap();
    let r = expect_status(r, 200).await;
    assert_eq!(
        r.headers()["x-checksum-sha256"],
        up["sha256"].as_str().unwrap()
    );
    assert_eq!(r.headers()["content-type"], "text/plain");
    assert_eq!(r.bytes().await.unwrap().as_ref(), body.as_slice());
    for other in [&victor, &eve] {
        let r = client.get(&one).bearer_auth(other).send().await.unwrap();
        expect_problem(r, 404, "not_found").await;
    }
    let r = client
        .post(&uploads)
        .bearer_auth(&ursula)
        .header("content-type", "text/plain")
        .body(vec![b'x'; 2_000])
        .send()
        .await
        .unwrap();
    expect_problem(r, 413, "upload_too_large").await;
    let r = client
        .post(&uploads)
        .bearer_auth(&ursula)
        .header("content-type", "image/png")
        .body(vec![1, 2, 3])
        .send()
        .await
        .unwrap();
    expect_problem(r, 415, "unsupported_media_type").await;
    let r = client
        .post(&uploads)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    expect_problem(r, 401, "missing_credential").await;
    let r = client
        .post(&uploads)
        .bearer_auth(&read_only)
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_forbidden(r, "missing_scope").await;
    let r = client
        .get(format!("{uploads}/nope"))
        .bearer_auth(&ursula)
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "invalid_id").await;

    // Notifications: a job of Ursula's (an admin may create jobs, too)
    // runs once; the stream and the list show its notification.
    let notifications_url = format!("{base}/v1/notifications");
    let r = client.get(&notifications_url).send().await.unwrap();
    expect_problem(r, 401, "missing_credential").await;
    let r = client
        .get(&notifications_url)
        .bearer_auth(&read_only)
        .send()
        .await
        .unwrap();
    assert_forbidden(r, "missing_scope").await;
    let stream = client
        .get(format!("{notifications_url}/stream"))
        .bearer_auth(&ursula)
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::from_response(stream);
    let admin = env.token("ursula", "acme", &["admin"], OPERATOR_SCOPES);
    let r = client
        .post(jobs(&base))
        .bearer_auth(&admin)
        .json(&json!({"name": "once", "schedule": {"every_secs": 3600}, "enabled": false}))
        .send()
        .await
        .unwrap();
    let job: Value = expect_status(r, 201).await.json().await.unwrap();
    let r = client
        .post(format!(
            "{}/{}/run",
            jobs(&base),
            job["id"].as_str().unwrap()
        ))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    expect_status(r, 202).await;
    let event = sse
        .next(Instant::now() + Duration::from_secs(10))
        .await
        .expect("a notification on the stream");
    assert_eq!(event.event, "notification");
    assert_eq!(event.data["kind"], "scheduler.run_completed");
    assert_eq!(event.data["body"]["job_id"], job["id"]);
    assert_eq!(event.id, event.data["seq"].to_string());
    let listed = notifications(&client, &base, &ursula).await;
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let note_id = listed[0]["id"].as_str().unwrap().to_owned();
    assert!(notifications(&client, &base, &victor).await.is_empty());
    // Measured by the janitor's next pass.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let admin = gateway.admin("soma-gateway");
        let gauge = metric(&client, admin, "soma_platform_notifications_pending", "").await;
        if gauge >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "pending gauge {gauge}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let read = format!("{notifications_url}/{note_id}/read");
    let r = client
        .post(&read)
        .bearer_auth(&victor)
        .send()
        .await
        .unwrap();
    expect_problem(r, 404, "not_found").await;
    let r = client
        .post(&read)
        .bearer_auth(&ursula)
        .send()
        .await
        .unwrap();
    expect_status(r, 204).await;
    let listed = notifications(&client, &base, &ursula).await;
    assert!(listed[0]["read_at"].is_string(), "{listed:#?}");
    let r = client
        .post(format!("{notifications_url}/x/read"))
        .bearer_auth(&ursula)
        .send()
        .await
        .unwrap();
    expect_problem(r, 400, "invalid_id").await;

    // Expiry: the row is still stored until its TTL, and deleted by the
    // janitor within one period after.
    let table = format!("{}_ws.notifications", env.prefix);
    let stored = |pool: PgPool, table: String, id: String| async move {
        sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table} WHERE id = $1::uuid"))
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    assert_eq!(
        stored(pool.clone(), table.clone(), note_id.clone()).await,
        1
    );
    let expires: chrono::DateTime<chrono::Utc> =
        listed[0]["expires_at"].as_str().unwrap().parse().unwrap();
    let wait = (expires - chrono::Utc::now()).to_std().unwrap_or_default();
    // TTL, then one janitor period (500 ms) and a margin for the pass.
    tokio::time::sleep(wait + Duration::from_millis(500 + 700)).await;
    assert_eq!(
        stored(pool.clone(), table, note_id).await,
        0,
        "the janitor deleted the expired notification"
    );
    assert!(notifications(&client, &base, &ursula).await.is_empty());
    assert!(
        gateway
            .log("soma-gateway")
            .contains("notifications_expired")
    );
}
