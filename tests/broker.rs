//! Queue probes against the real RabbitMQ on 127.0.0.1:5672.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use testrunner_operator::broker::{BrokerSettings, BrokerUri, Brokers, Probe};
use testrunner_operator::crd::TestRunnerPool;
use tokio::net::{TcpListener, TcpStream};

mod common;
use common::{eventually, publish_confirmed, queue_counts};

const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

fn queue_name(test: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "test.broker.{test}.{}.{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect() -> Connection {
    Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("RabbitMQ answers on 127.0.0.1:5672 (start it with `rabbitmq-server -detached`)")
}

#[tokio::test]
async fn depth_is_published_minus_consumed() {
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let queue = queue_name("depth");
    declare(&ch, &queue).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        publish_confirmed(&ch, &queue, &format!("ticket-{i}")).await;
    }
    let brokers = Brokers::default();
    let uri = BrokerUri::parse(BROKER).unwrap();
    assert_eq!(
        brokers.probe(&uri, &queue).await,
        Probe::Depth {
            ready: 10,
            consumers: 0
        }
    );

    // Take 3 and ack them: 7 left.
    for _ in 0..3 {
        let msg = ch
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("a ticket");
        msg.ack(BasicAckOptions::default()).await.unwrap();
    }
    // Hold one unacked: a passive declare counts ready messages only.
    let held = ch
        .basic_get(queue.as_str().into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a ticket");
    assert_eq!(
        brokers.probe(&uri, &queue).await,
        Probe::Depth {
            ready: 6,
            consumers: 0
        }
    );
    held.ack(BasicAckOptions::default()).await.unwrap();

    // A second pool on the same broker shares the connection.
    let other = queue_name("depth-other");
    declare(&ch, &other).await;
    assert_eq!(
        brokers.probe(&uri, &other).await,
        Probe::Depth {
            ready: 0,
            consumers: 0
        }
    );
    assert_eq!(brokers.connections(), 1);

    for q in [&queue, &other] {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn a_missing_queue_is_reported_and_the_connection_stays_usable() {
    let brokers = Brokers::default();
    let uri = BrokerUri::parse(BROKER).unwrap();
    let missing = queue_name("missing");
    assert_eq!(brokers.probe(&uri, &missing).await, Probe::QueueNotFound);
    // The 404 closed the channel only; the next probe opens a new one.
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, &missing).await;
    assert_eq!(
        brokers.probe(&uri, &missing).await,
        Probe::Depth {
            ready: 0,
            consumers: 0
        }
    );
    ch.queue_delete(missing.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn wrong_credentials_are_reported_without_the_password() {
    let brokers = Brokers::new(BrokerSettings {
        min_backoff: Duration::from_millis(10),
        ..Default::default()
    });
    let uri = BrokerUri::parse("amqp://guest:not-the-password@127.0.0.1:5672/%2f").unwrap();
    match brokers.probe(&uri, "any").await {
        Probe::Unreachable { reason, message } => {
            assert!(!message.contains("not-the-password"), "{message}");
            assert!(
                ["AuthenticationFailed", "ConnectionFailed", "ProtocolError"].contains(&reason),
                "{reason}: {message}"
            );
        }
        other => panic!("expected Unreachable, got {other:?}"),
    }
}

/// A TCP forwarder to the real broker that a test can cut and restore.
struct Proxy {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(port: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                conns.spawn(async move {
                    let mut outbound = TcpStream::connect("127.0.0.1:5672").await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Proxy { port, task }
    }

    /// Cuts every connection (the JoinSet drops them) and stops listening.
    fn cut(self) -> u16 {
        self.task.abort();
        self.port
    }
}

#[tokio::test]
async fn an_unreachable_broker_is_reported_and_the_probe_recovers() {
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let queue = queue_name("outage");
    declare(&ch, &queue).await;

    let proxy = Proxy::start(0).await;
    let uri =
        BrokerUri::parse(&format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port)).unwrap();
    let brokers = Brokers::new(BrokerSettings {
        connect_timeout: Duration::from_secs(2),
        probe_timeout: Duration::from_secs(2),
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(200),
    });
    assert_eq!(
        brokers.probe(&uri, &queue).await,
        Probe::Depth {
            ready: 0,
            consumers: 0
        }
    );

    // The broker goes away: probes say so (and never hang).
    let port = proxy.cut();
    eventually(
        "the outage to be reported",
        Duration::from_secs(10),
        || async { matches!(brokers.probe(&uri, &queue).await, Probe::Unreachable { .. }) },
    )
    .await;

    // It comes back on the same address: the probe reconnects by itself.
    let _proxy = Proxy::start(port).await;
    eventually("the probe to recover", Duration::from_secs(10), || async {
        brokers.probe(&uri, &queue).await
            == Probe::Depth {
                ready: 0,
                consumers: 0,
            }
    })
    .await;
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn forgetting_a_broker_closes_its_connection() {
    let brokers = Brokers::default();
    let uri = BrokerUri::parse(BROKER).unwrap();
    let queue = queue_name("forget");
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, &queue).await;
    assert!(matches!(
        brokers.probe(&uri, &queue).await,
        Probe::Depth { .. }
    ));
    assert_eq!(brokers.connections(), 1);
    brokers.forget(&uri);
    assert_eq!(brokers.connections(), 0);
    // A later probe opens a fresh connection.
    assert!(matches!(
        brokers.probe(&uri, &queue).await,
        Probe::Depth { .. }
    ));
    assert_eq!(brokers.connections(), 1);
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
}

/// A connection, a channel and two fresh durable queues: (from, to).
async fn queue_pair(test: &str) -> (Connection, lapin::Channel, String, String) {
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (from, to) = (
        queue_name(&format!("{test}-from")),
        queue_name(&format!("{test}-to")),
    );
    declare(&ch, &from).await;
    declare(&ch, &to).await;
    (conn, ch, from, to)
}

async fn delete_queues(ch: &lapin::Channel, queues: &[&String]) {
    for q in queues {
        ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }
}

async fn declare(ch: &lapin::Channel, queue: &str) {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

async fn publish_ids(ch: &lapin::Channel, queue: &str, ids: &[String]) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    for id in ids {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-testrunner-quarantined-from".into(),
            lapin::types::AMQPValue::LongString("work".into()),
        );
        headers.insert(
            "x-suite".into(),
            lapin::types::AMQPValue::LongString("unit".into()),
        );
        let props = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_headers(headers);
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            id.as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
}

/// Takes every message of `queue`: (ids, raw messages).
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<lapin::message::BasicGetMessage> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        m.ack(BasicAckOptions::default()).await.unwrap();
        out.push(m);
    }
    out
}

fn id_of(m: &lapin::message::BasicGetMessage) -> String {
    m.properties.message_id().as_ref().unwrap().to_string()
}

#[tokio::test]
async fn replay_moves_exactly_the_chosen_tickets_intact() {
    let (conn, ch, from, to) = queue_pair("replay").await;
    let ids: Vec<String> = (0..5).map(|i| format!("t-{i}")).collect();
    publish_ids(&ch, &from, &ids).await;
    let brokers = Brokers::default();
    let uri = BrokerUri::parse(BROKER).unwrap();

    let one = brokers
        .replay(&uri, &from, &to, Some(&["t-3".to_string()]))
        .await
        .unwrap();
    assert_eq!(one, ["t-3"]);
    let all = brokers.replay(&uri, &from, &to, None).await.unwrap();
    assert_eq!(all.len(), 4);

    let ch2 = conn.create_channel().await.unwrap();
    let moved = drain(&ch2, &to).await;
    let mut got: Vec<String> = moved.iter().map(id_of).collect();
    got.sort();
    assert_eq!(got, ids, "every ticket once");
    assert!(drain(&ch2, &from).await.is_empty());
    let h = moved[0].properties.headers().clone().unwrap();
    assert!(
        h.inner().contains_key("x-suite"),
        "application headers kept"
    );
    assert!(
        h.inner()
            .keys()
            .filter(|k| k.as_str().starts_with("x-testrunner-"))
            .all(|k| k.as_str() == "x-testrunner-replayed-at"),
        "quarantine headers removed"
    );
    assert!(
        h.inner().contains_key("x-testrunner-replayed-at"),
        "the replay is stamped"
    );
    delete_queues(&ch2, &[&from, &to]).await;
}

#[tokio::test]
async fn a_replay_cut_off_midway_loses_and_duplicates_nothing() {
    let (conn, ch, from, to) = queue_pair("cut").await;
    let ids: Vec<String> = (0..400).map(|i| format!("t-{i:03}")).collect();
    publish_ids(&ch, &from, &ids).await;

    // The operator's connection dies while it replays: cut the TCP link mid-way.
    let proxy = Proxy::start(0).await;
    let uri =
        BrokerUri::parse(&format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port)).unwrap();
    let brokers = Brokers::default();
    let replay = tokio::spawn({
        let (from, to) = (from.clone(), to.clone());
        async move { brokers.replay(&uri, &from, &to, None).await }
    });
    eventually(
        "the replay to be under way",
        Duration::from_secs(10),
        || async {
            let ch = conn.create_channel().await.unwrap();
            queue_counts(&ch, &to).await.0 > 0
        },
    )
    .await;
    proxy.cut();
    let result = replay.await.unwrap();
    assert!(
        result.is_err() || result.as_ref().unwrap().len() == ids.len(),
        "{result:?}"
    );

    // Whatever was not committed went back: every ticket sits in exactly one queue.
    let ch2 = conn.create_channel().await.unwrap();
    eventually(
        "the cut connection's messages to return",
        Duration::from_secs(10),
        || async {
            let (a, a_consumers) = queue_counts(&ch2, &from).await;
            let (b, _) = queue_counts(&ch2, &to).await;
            a + b == ids.len() as u32 && a_consumers == 0
        },
    )
    .await;
    let mut all: Vec<String> = drain(&ch2, &from)
        .await
        .iter()
        .chain(drain(&ch2, &to).await.iter())
        .map(id_of)
        .collect();
    all.sort();
    assert_eq!(all, ids, "nothing lost, nothing twice");
    delete_queues(&ch2, &[&from, &to]).await;
}

#[tokio::test]
async fn after_an_outage_only_what_the_broker_dead_lettered_goes_back() {
    use lapin::types::{AMQPValue, FieldArray};
    let (conn, ch, from, to) = queue_pair("dlx").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    // t-0 and t-1 were dead-lettered by a delivery-limit backstop; t-1 is also on the
    // operator's own list (a real poison ticket); t-2 was quarantined by the operator.
    for (id, dead_lettered) in [("t-0", true), ("t-1", true), ("t-2", false)] {
        let mut headers = FieldTable::default();
        if dead_lettered {
            let mut death = FieldTable::default();
            death.insert(
                "reason".into(),
                AMQPValue::LongString("delivery_limit".into()),
            );
            headers.insert(
                "x-death".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
            );
        }
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers);
        ch.basic_publish(
            "".into(),
            from.as_str().into(),
            BasicPublishOptions::default(),
            id.as_bytes(),
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let brokers = Brokers::default();
    let uri = BrokerUri::parse(BROKER).unwrap();
    let listed = vec!["t-1".to_string()];
    let moved = brokers
        .replay_where(
            &uri,
            &from,
            &to,
            testrunner_operator::broker::ReplayFilter::DeadLettered { except: &listed },
        )
        .await
        .unwrap();
    assert_eq!(moved, ["t-0"]);
    let ch2 = conn.create_channel().await.unwrap();
    let back: Vec<String> = drain(&ch2, &to).await.iter().map(id_of).collect();
    assert_eq!(back, ["t-0"]);
    let mut kept: Vec<String> = drain(&ch2, &from).await.iter().map(id_of).collect();
    kept.sort();
    assert_eq!(kept, ["t-1", "t-2"], "the rest stays, in quarantine");
    delete_queues(&ch2, &[&from, &to]).await;
}

/// A broker of the test's own (common::broker_node) restarts with its durable queue and
/// persistent message, and the operator's probe sees it unreachable while it is down and
/// finds the depth again after it came back, on the same address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_node_of_its_own_restarts_with_its_messages_and_probes_recover() {
    let mut node =
        tokio::task::spawn_blocking(|| common::broker_node::BrokerNode::start("restart"))
            .await
            .unwrap();
    let uri = node.uri();
    let conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, "kept").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    publish_confirmed(&ch, "kept", "ticket").await;
    let brokers = Brokers::new(BrokerSettings::default());
    let key = BrokerUri::parse(&uri).unwrap();
    assert_eq!(
        brokers.probe(&key, "kept").await,
        Probe::Depth {
            ready: 1,
            consumers: 0
        }
    );

    let mut node = tokio::task::spawn_blocking(move || {
        node.stop();
        node
    })
    .await
    .unwrap();
    eventually(
        "the probe to see the broker down",
        Duration::from_secs(30),
        || async { matches!(brokers.probe(&key, "kept").await, Probe::Unreachable { .. }) },
    )
    .await;
    let node = tokio::task::spawn_blocking(move || {
        node.restart();
        node
    })
    .await
    .unwrap();
    assert_eq!(node.uri(), uri, "the same address after the restart");
    eventually(
        "the probe to find the persistent ticket again",
        Duration::from_secs(60),
        || async {
            brokers.probe(&key, "kept").await
                == Probe::Depth {
                    ready: 1,
                    consumers: 0,
                }
        },
    )
    .await;
    tokio::task::spawn_blocking(move || drop(node))
        .await
        .unwrap();
}

fn pool_in_store(name: &str, uid: &str) -> kube::core::DeserializeGuard<TestRunnerPool> {
    kube::core::DeserializeGuard(Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "testrunner.dev/v1alpha1", "kind": "TestRunnerPool",
        "metadata": {"name": name, "namespace": "ci", "uid": uid},
        "spec": {"image": "registry.example/test-runner:1", "command": ["/run-tests"],
            "queue": {"name": "tickets", "connectionSecretRef": {"name": "rabbitmq"}}},
    }))
    .unwrap()))
}

/// The pools of a namespace on one broker share one outcome reader: five pools cost one
/// connection, one outcome queue and one consumer. Each report reaches the pool it names;
/// a report of a pool that is gone, or of an older pool of the same name, is dropped. When
/// the consumer is set up again (here: its queue was deleted under it), every pool forgets
/// what its workers last said. The queue goes with the last pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_of_a_namespace_share_one_outcome_queue_and_consumer() {
    use kube::runtime::reflector::{ObjectRef, store::Writer};
    use kube::runtime::watcher;
    use testrunner_operator::contract::Report;
    use testrunner_operator::controller::{ProbeKey, Probes};
    use testrunner_operator::core::Activity;

    const POOLS: usize = 5;
    let conn = connect().await;
    let ch = conn.create_channel().await.unwrap();
    let work = queue_name("shared-work");
    declare(&ch, &work).await;
    let outcomes = queue_name("shared-outcomes");

    let mut writer = Writer::<kube::core::DeserializeGuard<TestRunnerPool>>::default();
    let (tx, _rx) = futures::channel::mpsc::unbounded();
    let brokers = Brokers::default();
    let probes = Probes::new(
        brokers.clone(),
        std::sync::Arc::new(testrunner_operator::metrics::Metrics::default()),
        writer.as_reader(),
        tx,
    );
    let pools: Vec<_> = (0..POOLS)
        .map(|i| pool_in_store(&format!("p{i}"), &format!("uid-{i}")))
        .collect();
    let refs: Vec<_> = pools.iter().map(ObjectRef::from_obj).collect();
    for (pool, r) in pools.iter().zip(&refs) {
        writer.apply_watcher_event(&watcher::Event::Apply(pool.clone()));
        let key = ProbeKey {
            uri: BrokerUri::parse(BROKER).unwrap(),
            queue: work.clone(),
            interval: Duration::from_millis(200),
            outcomes: outcomes.clone(),
        };
        probes.ensure(r, key, Some(format!("uid-{}", &r.name[1..])));
    }
    let consumers = |queue: String| {
        let conn = &conn;
        async move {
            let ch = conn.create_channel().await.unwrap();
            let counts = common::passive_declare(&ch, &queue).await.ok();
            counts.map(|q| q.consumer_count())
        }
    };
    eventually(
        "one consumer on the namespace's outcome queue",
        Duration::from_secs(10),
        || async { consumers(outcomes.clone()).await == Some(1) },
    )
    .await;
    assert_eq!(probes.outcome_readers(), 1, "one reader for {POOLS} pools");
    assert_eq!(brokers.connections(), 1, "one connection for {POOLS} pools");

    // Reports: two to drop, then one for each pool.
    let publish = |report: Report| {
        let ch = &ch;
        let outcomes = &outcomes;
        async move {
            ch.basic_publish(
                "".into(),
                outcomes.as_str().into(),
                BasicPublishOptions::default(),
                &report.to_vec(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    publish(Report::state("gone-bcdfg", "r1", Some(("t-gone", 1))).of_pool("gone", "uid-9")).await;
    publish(Report::state("p0-zzzzz", "r1", Some(("t-old", 1))).of_pool("p0", "uid-old")).await;
    for i in 0..POOLS {
        let pod = format!("p{i}-bcdfg");
        let ticket = format!("t-{i}");
        publish(
            Report::state(&pod, "r1", Some((&ticket, 1)))
                .of_pool(&format!("p{i}"), &format!("uid-{i}")),
        )
        .await;
    }
    for (i, r) in refs.iter().enumerate() {
        let expected = std::collections::HashMap::from([(
            format!("p{i}-bcdfg"),
            Activity::Busy {
                ticket: format!("t-{i}"),
            },
        )]);
        eventually(
            &format!("pool p{i} to hear its own worker, and only it"),
            Duration::from_secs(10),
            || async { probes.activity(r) == expected },
        )
        .await;
    }

    // The consumer set up again: every pool forgets what it heard.
    ch.queue_delete(outcomes.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    eventually(
        "the queue declared and consumed again, every pool knowing nothing",
        Duration::from_secs(10),
        || async {
            consumers(outcomes.clone()).await == Some(1)
                && refs.iter().all(|r| probes.activity(r).is_empty())
        },
    )
    .await;

    // Pods of an older operator: p1's report on a queue of its own, without naming
    // their pool; p2's on a queue the operator did not make (read, never deleted).
    let own = queue_name("own");
    let other = queue_name("other");
    probes.read_legacy(&refs[1], [own.clone()].into(), [own.clone()].into());
    probes.read_legacy(&refs[2], [other.clone()].into(), [own.clone()].into());
    eventually("both queues consumed", Duration::from_secs(10), || async {
        consumers(own.clone()).await == Some(1) && consumers(other.clone()).await == Some(1)
    })
    .await;
    for (queue, pod) in [(&own, "p1-ccccc"), (&other, "p2-ccccc")] {
        ch.basic_publish(
            "".into(),
            queue.as_str().into(),
            BasicPublishOptions::default(),
            &Report::state(pod, "r1", Some(("t-own", 1))).to_vec(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    for (i, pod) in [(1, "p1-ccccc"), (2, "p2-ccccc")] {
        let expected = std::collections::HashMap::from([(
            pod.to_string(),
            Activity::Busy {
                ticket: "t-own".into(),
            },
        )]);
        eventually(
            &format!("pool p{i} to hear its older worker"),
            Duration::from_secs(10),
            || async { probes.activity(&refs[i]) == expected },
        )
        .await;
    }

    // The queue stays while a pool of the namespace is left, and goes with the last.
    for pool in &pools[1..] {
        writer.apply_watcher_event(&watcher::Event::Delete(pool.clone()));
    }
    eventually("four pools to go", Duration::from_secs(10), || async {
        probes.len() == 1
    })
    .await;
    eventually(
        "p1's own queue to go with p1",
        Duration::from_secs(10),
        || async { consumers(own.clone()).await.is_none() },
    )
    .await;
    eventually(
        "p2's other queue to be read no more, and kept",
        Duration::from_secs(10),
        || async { consumers(other.clone()).await == Some(0) },
    )
    .await;
    assert_eq!(
        consumers(outcomes.clone()).await,
        Some(1),
        "the last pool reads it"
    );
    writer.apply_watcher_event(&watcher::Event::Delete(pools[0].clone()));
    eventually(
        "the outcome queue and the connection to go with the last pool",
        Duration::from_secs(10),
        || async {
            consumers(outcomes.clone()).await.is_none()
                && probes.outcome_readers() == 0
                && brokers.connections() == 0
        },
    )
    .await;
    let _ = ch
        .queue_delete(work.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(outcomes.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = ch
        .queue_delete(other.as_str().into(), QueueDeleteOptions::default())
        .await;
}
