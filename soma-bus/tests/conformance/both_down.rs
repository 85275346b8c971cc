//! Scenario 8 — both stores down: Kafka unreachable *and* PostgreSQL
//! unreachable (a cut TCP proxy in front of it), then Kafka unreachable and
//! PostgreSQL failing at COMMIT (a deferred constraint trigger that raises).
//! `publish` and `publish_many` must return `Err`, never `Ok`; after
//! recovery no refused message appears (no phantom) and every accepted one
//! takes effect once (no loss).
//!
//! Answers Dapr's certification "component outage" tests and Watermill's
//! `TestPublishSubscribe` error paths (a publisher error means the message
//! was not published).

use std::time::{Duration, Instant};

use soma_bus::{BusProducer, DurablePublisher, KafkaSink};
use soma_outbox::{Outbox, OutboxConfig, Relay};

use crate::common::{FaultProxy, OwnBroker, config, outbox, require_postgres};
use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_and_postgres_down_publish_returns_err_and_leaves_no_phantom() {
    quiet_logs();
    bounded("both stores down", Duration::from_secs(120), async {
        let kafka_port = soma_testkit::free_port();
        let broker = OwnBroker::behind_proxy(kafka_port);
        let kafka = FaultProxy::start(kafka_port, broker.port).await;
        let pg = FaultProxy::start(soma_testkit::free_port(), 5432).await;
        let mut cfg = config(&kafka.addr());
        cfg.publisher.timeout_ms = 1_000;
        cfg.publisher.breaker = soma_observability::resilience::BreakerConfig::new(1, 300);
        cfg.publisher.pending_key_poll_interval_ms = 100;
        let topic = topic_with(&cfg, "c8down", 1).await;
        // The ledger and the checks use PostgreSQL directly; the publisher
        // and the relay go through the proxy.
        let direct = outbox(&require_postgres()).await;
        let ledger = Ledger::new(direct.clone(), "c8").await;
        let q = format!("\"{}\"", direct.schema());
        for stmt in [
            format!("CREATE TABLE {q}.fail_commit (on_ boolean)"),
            format!(
                "CREATE FUNCTION {q}.fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$
                 BEGIN
                   IF EXISTS (SELECT 1 FROM {q}.fail_commit) THEN
                     RAISE EXCEPTION 'injected failure at COMMIT';
                   END IF;
                   RETURN NULL;
                 END $$"
            ),
            format!(
                "CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT ON {q}.outbox
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION {q}.fail_commit()"
            ),
        ] {
            sqlx::query(&stmt).execute(direct.pool()).await.unwrap();
        }
        let url = format!("postgres://postgres@127.0.0.1:{}/test", pg.port);
        let proxied_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(2))
            .connect(&url)
            .await
            .unwrap();
        let ob = Outbox::new(proxied_pool, OutboxConfig::new(direct.schema()))
            .await
            .unwrap();
        let producer = BusProducer::new(&cfg).unwrap();
        let relay =
            Relay::new(ob.clone(), KafkaSink::new(producer.clone()), relay_config()).spawn();
        let publisher = DurablePublisher::builder(producer.clone(), ob.clone()).build();
        let consumer = ledger
            .consumer(&cfg, &[&topic], "a", Faults::default())
            .producer(producer.clone())
            .spawn()
            .unwrap();
        let mut msgs = Msgs::new();
        let keys = ["k0", "k1", "k2"];
        let publish_round = async |msgs: &mut Msgs, expect_ok: Option<bool>| {
            let envs: Vec<_> = keys.iter().map(|k| msgs.next(&topic, k, "p")).collect();
            let single = publisher.publish(&topic, &envs[0]).await;
            let many = publisher.publish_many(&topic, &envs[1..]).await;
            msgs.answer(envs[0].id, &single);
            msgs.answers(&envs[1..], &many);
            if let Some(ok) = expect_ok {
                for r in std::iter::once(&single).chain(&many) {
                    assert_eq!(r.is_ok(), ok, "{r:?}");
                    if let Err(e) = r {
                        assert!(e.is_unavailable(), "{e}");
                    }
                }
            }
        };

        for _ in 0..10 {
            publish_round(&mut msgs, Some(true)).await;
        }
        // Both unreachable.
        kafka.cut();
        pg.cut();
        let t = Instant::now();
        for _ in 0..5 {
            publish_round(&mut msgs, Some(false)).await;
        }
        let refused_unreachable = msgs.refused();
        eprintln!("both unreachable: 5 rounds in {:?}", t.elapsed());
        // Kafka unreachable, PostgreSQL up but failing at COMMIT.
        pg.restore();
        sqlx::query(&format!("INSERT INTO {q}.fail_commit VALUES (true)"))
            .execute(direct.pool())
            .await
            .unwrap();
        for _ in 0..5 {
            publish_round(&mut msgs, Some(false)).await;
        }
        assert_eq!(msgs.refused(), 2 * refused_unreachable);
        // Recovery.
        sqlx::query(&format!("DELETE FROM {q}.fail_commit"))
            .execute(direct.pool())
            .await
            .unwrap();
        kafka.restore();
        for _ in 0..10 {
            publish_round(&mut msgs, Some(true)).await;
        }
        let v = ledger
            .verify(&msgs, Duration::from_secs(60), Duration::from_secs(1))
            .await;
        let leftovers: i64 = sqlx::query_scalar(&format!(
            "SELECT (SELECT count(*) FROM {q}.outbox) + (SELECT count(*) FROM {q}.dead_letters)"
        ))
        .fetch_one(direct.pool())
        .await
        .unwrap();
        assert_eq!(leftovers, 0, "nothing left behind in the outbox");
        eprintln!("both down: {v:?}, {} refused", msgs.refused());
        consumer.shutdown().await;
        publisher.shutdown().await;
        relay.shutdown().await.unwrap();
        drop(broker);
    })
    .await;
}
